"""The fault suite's figures, gathered across test modules and printed as one summary line.

Invariants:
- A fault test calls `record(section, **figures)` once it has measured them; the pytest session
  prints every recorded section on one line at the end ("fault suite: ...").
- Figures live in this process only (pytest runs the suite in one process); nothing is written
  to disk, so an earlier run's figures never leak into a later summary.
"""
from __future__ import annotations

_FIGURES: dict[str, dict[str, object]] = {}


def record(section: str, **figures) -> None:
    _FIGURES.setdefault(section, {}).update(figures)


def summary_line() -> str | None:
    if not _FIGURES:
        return None
    parts = []
    for section, figures in _FIGURES.items():
        inner = ", ".join(f"{name}={_format(value)}" for name, value in figures.items())
        parts.append(f"{section}: {inner}")
    return "fault suite: " + " | ".join(parts)


def _format(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
