"""Does learning hold in every data regime? The regime matrix of issue 15 on the demo model.

Each regime (`chatapp/learning/regimes.py`) fills a fresh store with simulated users' chats and labels,
then one training run goes through the product's path, exactly as in the app: store -> trainer (the
default recipe) -> gate -> registry; the answer is measured on what the registry then serves (the
active version, or the base when nothing was promoted). Printed per regime: the labels given, the
held-out preference share before -> after (answers sampled at the users' temperature on 300 questions
no chat used), greedy accuracy before -> after, the gate's decision with its reason, and the run's
seconds. A rejected candidate (published, not served) is measured too, on the same questions, so the
bench's greedy accuracy can be set beside the gate's probe.

    python bench/learning.py [--regime a[,b,...]|all|matrix] [--seed 21] [--no-save]
                             [--lr RATE] [--epochs N] [--rs-extra-epochs N,N]

The last three change the recipe (the trainer's flags of the same names) to measure a variant; a row
trained with them says so, and its settings are in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from chatapp.core.clock import now_iso  # noqa: E402
from chatapp.learning import regimes, simulate  # noqa: E402
from chatapp.learning.settings import TrainSettings  # noqa: E402

HEADER = ["| regime | labels | preference before → after (target) | greedy accuracy before → after | decision: reason "
          "| seconds |", "|---|---|---|---|---|---|"]


def row(r: dict) -> str:
    target = "never promote" if r["regime"] in ("random", "inverted") else f"≥ {r['target']}"
    return (f"| {r['regime']}: {r['summary']} | {r['labels']} | {r['before']['preference']:.2f} → "
            f"{r['after']['preference']:.2f} ({target}) | {r['before']['greedy_accuracy']:.3f} → "
            f"{r['after']['greedy_accuracy']:.3f} | {'' if r['ok'] else '**target not met** '}{r['decision']} "
            f"({r['method']}): {r['reason']}{turned_down(r)} | "
            f"{r['seconds']:.0f} |")


def turned_down(r: dict) -> str:
    """The rejected candidate's own figures on the bench's questions (it is published, not served)."""
    figures = r.get("rejected_candidate")
    if not figures:
        return ""
    return (f" [the rejected candidate itself: preference {figures['preference']:.2f}, greedy accuracy "
            f"{figures['greedy_accuracy']:.3f}]")


def save(results: list[dict], merge: bool, items: int) -> None:
    """docs/results/learning.*: these rows, with (`merge`) the other regimes' rows already there."""
    from bench.results import RESULTS_DIR, save_results  # a namespace package under ROOT, on sys.path

    rows = list(results)
    if merge and (RESULTS_DIR / "learning.json").exists():
        ran = {r["regime"] for r in results}
        earlier = json.loads((RESULTS_DIR / "learning.json").read_text())["results"]["regimes"]
        rows = sorted([r for r in earlier if r["regime"] not in ran] + rows,
                      key=lambda r: list(regimes.REGIMES).index(r["regime"]))
    notes = ("Preference: the share of answers sampled at the users' chat temperature that the regime's simulated "
             f"users would like, on {items} held-out questions; greedy accuracy on the same questions. 'after' is "
             "what the registry serves after the run (the base when nothing was promoted). Seconds: the training "
             "run, gate included, with the machine's load average when the regime ended (load_average in the JSON).")
    save_results("learning", {"held_out_items": items, "regimes": rows}, HEADER + [row(r) for r in rows], notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", default="matrix",
                        help="comma-separated regimes (a-g, random, inverted), 'matrix' (a-g) or 'all'")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--priority", default="nice", choices=("idle", "nice"),
                        help="the runs' priority (the app's default is idle: on a machine shared with other work a "
                             "SCHED_IDLE run only gets CPU nobody else wants, so the bench runs nice)")
    parser.add_argument("--no-save", action="store_true", help="do not write docs/results/learning.*")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other regimes' rows of docs/results/learning.json (each row says when and "
                             "with which seed it ran), replacing only the regimes run now")
    parser.add_argument("--lr", type=float, default=None, help="the candidates' learning rate (train --lr)")
    parser.add_argument("--epochs", type=int, default=None, help="the first candidate's epochs (train --epochs)")
    parser.add_argument("--rs-extra-epochs", default=None,
                        help="the other candidates' epochs, comma-separated (train --rs-extra-epochs)")
    args = parser.parse_args()
    variant = {k: v for k, v in (("learning_rate", args.lr), ("epochs", args.epochs),
                                 ("rs_extra_epochs", args.rs_extra_epochs and tuple(
                                     int(e) for e in args.rs_extra_epochs.split(",")))) if v is not None}
    names = {"matrix": list(regimes.MATRIX), "all": list(regimes.REGIMES)}.get(args.regime, args.regime.split(","))
    unknown = [n for n in names if n not in regimes.REGIMES]
    if unknown:
        parser.error(f"unknown regime(s) {', '.join(unknown)}; known: {', '.join(regimes.REGIMES)}")
    root = Path(tempfile.mkdtemp(prefix="chatapp-learning-"))
    items = simulate.held_out_items(60)
    quiet = os.environ.get("CHATAPP_BENCH_LOG") != "1"
    print("\n".join(HEADER), flush=True)
    results, base_cache = [], {}
    for name in names:
        regime = regimes.REGIMES[name]
        key = (regime.judge, regime.temperature)
        r = regimes.run(regime, root / name, args.seed, items, before=base_cache.get(key),
                        settings=TrainSettings(priority=args.priority, **variant),
                        log=(lambda m: None) if quiet else (lambda m: print(m, flush=True)))
        base_cache[key] = r["before"]
        r.update(seed=args.seed, finished_at=now_iso("seconds"), load_average=os.getloadavg()[0], variant=variant)
        if variant:
            r["summary"] += " [" + ", ".join(f"{k} {v}" for k, v in variant.items()) + "]"
        results.append(r)
        shutil.rmtree(root / name, ignore_errors=True)
        print(row(r), flush=True)
        if not args.no_save:  # after each regime: an interrupted matrix keeps the rows it finished
            save(results, args.merge or len(results) > 1, len(items))
    shutil.rmtree(root, ignore_errors=True)
    print(f"{sum(r['ok'] for r in results)} of {len(results)} rows meet their target or are rejected "
          f"(load average {os.getloadavg()[0]:.1f} at the end)", flush=True)


if __name__ == "__main__":
    main()
