"""Which training recipe turns ~200 style votes into the liked style without losing accuracy?

Logs chats (answers sampled at temperature 1) from 5 simulated users on the demo model, votes the
first 200 answers up when they are in the liked style and correct, down otherwise, then trains
each recipe through the product's trainer (`chatapp.learning.trainer.train`, from the base) and measures, on
300 held-out questions, the liked style's share of answers sampled at temperature 1 and greedy
accuracy, plus the gate's decision and the run's wall time.

    python bench/recipes.py [--style terse] [--recipes rs,kto,sft] [--logged 800] [--votes 200]
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

from chatapp.learning import simulate  # noqa: E402
from chatapp.learning.registry import Registry  # noqa: E402
from chatapp.serving.engine import Engine  # noqa: E402
from chatapp.feedback.store import Store  # noqa: E402
from chatapp.learning.settings import TrainSettings  # noqa: E402
from chatapp.learning.trainer import train  # noqa: E402

RECIPES = {
    "rs": {},  # the default (auto) recipe: two rounds, 4-, 8- and 12-epoch candidates, the gate picks
    "rs-e48": {"rs_extra_epochs": (8,)},  # 4- and 8-epoch candidates only
    "rs-e48-t05": {"rs_extra_epochs": (8,), "rs_temperature": 0.5},  # the same, sampling at 0.5
    "rs1": {"rs_rounds": 1, "rs_extra_epochs": ()},  # one round, one 4-epoch candidate (the first default)
    "rs2": {"rs_rounds": 2, "rs_extra_epochs": ()},  # two rounds: the second samples from the first's candidate
    "rs3": {"rs_rounds": 3, "rs_extra_epochs": ()},
    "rs2-t05": {"rs_rounds": 2, "rs_temperature": 0.5, "rs_extra_epochs": ()},
    "rs2-w05": {"rs_rounds": 2, "reward_weight": 0.5, "rs_extra_epochs": ()},
    "rs2-t05-e8": {"rs_rounds": 2, "rs_temperature": 0.5, "epochs": 8},
    "rs2-e8": {"rs_rounds": 2, "epochs": 8},
    "rs-reward": {"select": "reward", "scorer_epochs": 3, "rs_rounds": 1, "rs_extra_epochs": ()},  # first version: pick by reward, weaker scorer
    "kto": {"method": "kto", "epochs": 3},
    "kto-long": {"method": "kto", "epochs": 20, "learning_rate": 2e-3},
    "sft": {"method": "sft", "epochs": 20, "learning_rate": 2e-3},
}


def measure(data, version, items):
    engine = Engine.load("demo")
    if version:
        engine.use_adapter(version, Registry.for_data_dir(data).validate(version, None))
    sampled = simulate.measure(engine.model, engine.processor, items, temperature=1.0)
    greedy = simulate.measure(engine.model, engine.processor, items, temperature=0.0)
    return sampled, greedy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", default="terse", choices=["terse", "plain", "chatty"])
    parser.add_argument("--recipes", default="rs,rs-reward,kto,kto-long,sft")
    parser.add_argument("--logged", type=int, default=800)
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chatapp-recipes-"))
    engine = Engine.load("demo")
    source = root / "logged"
    store = Store(source)
    logged = simulate.log_chats(store, engine.model, engine.processor, args.logged, seed=args.seed,
                                users=[f"user{i}" for i in range(5)])
    counts = simulate.vote(store, logged[:args.votes], simulate.style_rule(args.style))
    items = simulate.held_out_items(60)
    sampled, greedy = measure(source, None, items)
    print(f"votes {counts}; baseline: {args.style} share {sampled['style_share'][args.style]:.2f}, "
          f"greedy accuracy {greedy['accuracy']:.3f} ({len(items)} items)")
    table = [f"| recipe | {args.style} share | greedy accuracy | gate | seconds |", "|---|---|---|---|---|",
             f"| base model | {sampled['style_share'][args.style]:.2f} | {greedy['accuracy']:.3f} | | |"]
    print("\n".join(table))
    measured = {"settings": vars(args), "votes": counts, "held_out_items": len(items),
               "base": {"style_share": sampled["style_share"][args.style], "greedy_accuracy": greedy["accuracy"]},
               "recipes": []}
    for name in args.recipes.split(","):
        data = root / name
        shutil.copytree(source, data)
        started = time.perf_counter()
        settings = TrainSettings(**dict({"start_from": "base", "publish": "always"}, **RECIPES[name]))
        result = train(Store(data), Registry.for_data_dir(data), "demo", settings, log=lambda m: None)
        seconds = time.perf_counter() - started
        recipe = {"recipe": name, "settings": RECIPES[name], "decision": result.decision, "reason": result.reason,
                  "seconds": seconds, "candidates": result.metrics.get("candidates", {}),
                  "chosen": result.metrics.get("chosen")}
        measured["recipes"].append(recipe)
        if result.version is None:
            table.append(f"| {name} | - | - | {result.decision}: {result.reason} | {seconds:.0f} |")
            print(table[-1])
            continue
        sampled, greedy = measure(data, result.version, items)
        recipe.update(style_share=sampled["style_share"][args.style], greedy_accuracy=greedy["accuracy"])
        table.append(f"| {name} | {sampled['style_share'][args.style]:.2f} | {greedy['accuracy']:.3f} | "
                     f"{result.decision} | {seconds:.0f} |")
        print(table[-1], flush=True)
        print(json.dumps({"recipe": name, "reason": result.reason}), file=sys.stderr)
        for candidate, verdict in result.metrics.get("candidates", {}).items():  # every candidate the gate judged
            figures = {k: round(v, 3) for k, v in verdict["metrics"].items() if isinstance(v, (int, float))}
            print(f"    {name}: {candidate} ({verdict['epochs']} epochs): {verdict['decision']} {figures}"
                  + ("  <- chosen" if candidate == result.metrics.get("chosen") else ""), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    notes = (f"{args.style} share: of answers sampled at temperature 1; greedy accuracy: on {len(items)} held-out "
             f"questions; every recipe trained from the base on the same {args.votes} votes.")
    save_results("recipes", measured, table, notes)


if __name__ == "__main__":
    main()
