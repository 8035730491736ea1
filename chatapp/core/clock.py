"""Time, in one format: ISO 8601 in UTC with an explicit offset, e.g. 2026-12-02T11:22:58.123456+00:00.

Invariant: every timestamp chatapp writes (store rows, registry metadata, exports, trainer status)
comes from here, so they sort as strings and parse with `datetime.fromisoformat`.
"""
from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def now_iso(timespec: str = "microseconds") -> str:
    return utc_now().isoformat(timespec=timespec)


def seconds_since(stamp: str) -> float:
    """Seconds from an ISO timestamp written by `now_iso` until now."""
    return (utc_now() - datetime.fromisoformat(stamp)).total_seconds()


def compact_stamp() -> str:
    """A timestamp for file names: 20261202T112258."""
    return utc_now().strftime("%Y%m%dT%H%M%S")
