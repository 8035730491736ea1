"""Where a benchmark leaves its latest results: docs/results/<bench>.json and docs/results/<bench>.md,
which docs/benchmarks.md links.

Invariants:
- Written only at the end of a run that finished, and each file replaces the previous one whole
  (`atomic_write`): the folder always holds the latest complete run of each benchmark, never half
  of one.
- Each file says what was measured and where: the command line, when it finished, the machine's
  cores and the torch version, beside the bench's own figures.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

from chatapp.core.clock import now_iso
from chatapp.core.files import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "results"


def _run_info() -> dict:
    import torch

    return {"command": "python " + shlex.join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
            "finished_at": now_iso("seconds"), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine()}


def save_results(bench: str, figures: dict, table: list[str], notes: str = "") -> Path:
    """Write `figures` (anything JSON can hold; other values are written as their str()) to
    docs/results/<bench>.json and the markdown `table` lines, with `notes` under them, to
    docs/results/<bench>.md. Returns the JSON file's path."""
    info = _run_info()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{bench}.json"
    atomic_write(json_path, json.dumps({"bench": bench, **info, "results": figures}, indent=1, default=str) + "\n")
    header = (f"# Latest `bench/{bench}.py` results\n\n`{info['command']}`, finished {info['finished_at']} on "
              f"{info['cores']} cores ({info['machine']}), Python {info['python']}, torch {info['torch']}. "
              f"Every figure of the run is in [{bench}.json]({bench}.json); how to read them: "
              f"[../benchmarks.md](../benchmarks.md).\n\n")
    atomic_write(RESULTS_DIR / f"{bench}.md", header + "\n".join(table) + "\n" + (f"\n{notes}\n" if notes else ""))
    print(f"results written to {json_path.relative_to(RESULTS_DIR.parent.parent)} and .md", flush=True)
    return json_path
