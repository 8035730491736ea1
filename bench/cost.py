"""What a training run costs: the unit costs the trainer measures before each run (one sampled
answer, one scoring pass, one optimizer step of KTO / SFT / DPO), on the demo model and on the
SmolVLM-256M-sized one, and each data regime's run extrapolated from them, on this CPU and (an
estimate, not a measurement) on an H200.

    python bench/cost.py [--models demo,smolvlm] [--smolvlm-batch 2] [--smolvlm-grad-accum 4]
                         [--smolvlm-steps 2] [--check-run]
    python bench/cost.py --reuse-units   # no measuring: the regimes again, from the units saved last time

The units come from `chatapp.learning.cost.calibrate`, the code every run calls, on rows of a
simulated voted store (60 demo-model chats; the SmolVLM-sized model sees the same 64x64 images,
which its processor upsizes to 17 frames of 512 px, ~1,140 prompt tokens). The regimes are those of
issue 15 (bench/learning.py); their counts follow the default recipe (`--method auto`) and are
stated in the table. `--check-run` also trains once on the demo model and compares the estimate
with the run's wall time (the estimate's own check).

The GPU column models each unit from the model's FLOPs and the fixed per-pass latency of eager
transformers: H200 bf16 dense peak 989 TFLOP/s at 25% utilisation (small 576-wide matrices keep it
low); 20 ms per forward pass and per decode step for an 18-layer model, from transformers' own
benchmark (hf-internal-testing/benchmark_results: gemma-2b eager, per-token latency 19-21 ms,
prefill 20 ms), scaled by layer count (30 for SmolVLM-256M: 33 ms); batches as the product makes
them on a GPU (modelops.batch_tokens: 28 image prompts). KTO and DPO steps keep their measured CPU ratio to
an SFT step. It is labelled an estimate everywhere it appears.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / "cache"
H200_BF16_FLOPS = 989e12
GPU_UTILISATION = 0.25
PASS_LATENCY_S_PER_LAYER = 0.020 / 18  # eager forward pass / decode step, gemma-2b (18 layers)
CHATS = 60


def regimes():
    """Issue 15's data regimes as the counts a run's cost depends on (the default recipe)."""
    from chatapp.learning.cost import Shape

    a = dict(kto_train=160, kto_held=40, prompts=560, style_prompts=40)  # 600 chats, 200 votes (20% held out)
    return {
        "a: 600 chats, 200 votes": Shape("rs", **a),
        # 38 logged prompts outside the held-out split, crossed with the training images up to 500 (data.py)
        "b: 60 prompts x 3 answers, all voted": Shape("rs", kto_train=144, kto_held=36, prompts=500, style_prompts=36),
        "c: 600 chats, 50 votes": Shape("rs", kto_train=40, kto_held=10, prompts=590, style_prompts=10),
        # pairs only: the pairs train rs's scorer (chatapp/learning/data.py choose_method); counts as measured
        # in bench/learning.py's regime d (115 pairs, 80% for training; 573 logged prompts)
        "d: 115 pairs, no thumbs": Shape("rs", kto_train=0, dpo_train=92, dpo_held=23, prompts=573, style_prompts=23,
                                         scorer_from_pairs=True),
        "e, f, g: like a": Shape("rs", **a),
    }


def voted_data(root: Path):
    """A real store with CHATS demo-model chats voted terse-and-correct, prepared as a run prepares it,
    plus DPO pairs (a liked answer against a disliked one under the liked answer's prompt)."""
    from chatapp.feedback import prefs
    from chatapp.feedback.store import Store
    from chatapp.learning import simulate
    from chatapp.learning.data import prepare_data
    from chatapp.learning.settings import TrainSettings
    from chatapp.serving.engine import Engine

    engine = Engine.load("demo")
    store = Store(root / "voted")
    logged = simulate.log_chats(store, engine.model, engine.processor, CHATS, seed=7,
                                users=[f"user{i}" for i in range(5)], temperature=1.0)
    simulate.vote(store, logged, simulate.style_rule("terse"))
    data = prepare_data(store, TrainSettings())
    liked = [r for r in data.kto_train.rows if r["label"]]
    disliked = [r for r in data.kto_train.rows if not r["label"]]
    pairs = [{"images": g["images"], "prompt": g["prompt"], "chosen": g["completion"], "rejected": b["completion"]}
             for g, b in zip(liked, disliked)]
    return dataclasses.replace(data, dpo_train=prefs.Rows("dpo", rows=pairs)), root / "voted"


def text_and_vision_params(model) -> tuple[int, int]:
    vision = sum(p.numel() for name, p in model.named_parameters() if "vision" in name)
    return sum(p.numel() for p in model.parameters()) - vision, vision


def gpu_units(model, processor, units, settings, data):
    """The units modelled for an H200 (an estimate): FLOPs / (peak x utilisation) plus eager latency."""
    from chatapp.learning import modelops
    from chatapp.learning.cost import Units

    text_params, vision_params = text_and_vision_params(model)
    layers = model.config.text_config.num_hidden_layers
    latency = PASS_LATENCY_S_PER_LAYER * layers
    image = modelops.load_images(data.kto_train.rows[0]["images"])[0]
    frames = processor.image_processor(images=[[image]], return_tensors="pt")["pixel_values"].shape[1]
    vision_config = model.config.vision_config
    patches = frames * (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = units.prompt_tokens
    flops_per_second = H200_BF16_FLOPS * GPU_UTILISATION
    forward = 2 * (vision_params * patches + text_params * tokens) / flops_per_second
    batch = max(1, min(64, modelops.batch_tokens("cuda") // tokens))
    sample_s = forward + settings.max_new_tokens * latency / batch
    score_s = forward + latency / batch
    # an SFT step: the text model forward and backward (3x), the frozen vision tower forward only
    sft_s = ((2 * vision_params * patches + 6 * text_params * tokens) / flops_per_second + 3 * latency) \
        * settings.batch_size * settings.grad_accum
    step_s = {kind: sft_s * units.step_s[kind] / units.step_s["sft"] for kind in units.step_s}
    return Units(sample_s=sample_s, score_s=score_s, step_s=step_s, prompt_tokens=tokens), {
        "text_params": text_params, "vision_params": vision_params, "frames": int(frames), "patches": int(patches),
        "layers": layers, "sampling_batch": batch}


def measure(name: str, path: str, data, settings, kinds: tuple[str, ...], demo: dict | None) -> dict:
    from chatapp.learning import cost, trainer
    from chatapp.serving.engine import Engine

    threads = trainer.limit_resources(settings.threads, "nice")
    started = time.perf_counter()
    engine = Engine.load(path)
    load_s = time.perf_counter() - started
    units = cost.calibrate(engine.model, engine.processor, "rs", data, settings, load_s, kinds=kinds,
                           timed_steps=settings.max_steps or cost.TIMED_STEPS)
    scaled = [kind for kind in ("kto", "sft", "dpo") if kind not in units.step_s]
    for kind in scaled:  # not timed here (too slow on a busy CPU): the demo model's ratio to an SFT step
        units.step_s[kind] = units.step_s["sft"] * demo["units"]["step_s"][kind] / demo["units"]["step_s"]["sft"]
    print(f"{name}: {units}", flush=True)
    result = {"model": name, "threads": threads, "steps_from_demo_ratio": scaled, "settings": {"batch_size": settings.batch_size,
              "grad_accum": settings.grad_accum, "max_new_tokens": settings.max_new_tokens}, "units": units.as_dict()}
    if name == "smolvlm":
        gpu, basis = gpu_units(engine.model, engine.processor, units, settings, data)
        result.update(gpu_units=gpu.as_dict(), gpu_basis=basis)
    return result


def extrapolate(result: dict, settings) -> dict:
    from chatapp.learning.cost import Units, estimate

    out = {}
    for regime, shape in regimes().items():
        units = Units(**dict(result["units"], load_s=0, calibrate_s=0))
        on_cpu = estimate(shape, settings, units)
        row = {"samples": on_cpu.samples, "cpu_min": on_cpu.minutes}
        if "gpu_units" in result:
            row["gpu_min"] = estimate(shape, settings, Units(**result["gpu_units"])).minutes
        out[regime] = row
    return out


def check_run() -> dict:
    """A real rs run on the demo model (200 voted chats: enough for its scorer to pass, so that the
    run does all its parts): its estimate against its wall time."""
    from chatapp.feedback.store import Store
    from chatapp.learning import simulate
    from chatapp.learning.registry import Registry
    from chatapp.learning.settings import TrainSettings
    from chatapp.learning.trainer import train
    from chatapp.serving.engine import Engine

    data = Path(tempfile.mkdtemp(prefix="bench-cost-run-")) / "data"
    store = Store(data)
    engine = Engine.load("demo")
    logged = simulate.log_chats(store, engine.model, engine.processor, 200, seed=3,
                                users=[f"user{i}" for i in range(5)], temperature=1.0)
    simulate.vote(store, logged, simulate.style_rule("terse"))
    settings = TrainSettings(rs_prompts=100, best_of=4, rs_rounds=1, rs_extra_epochs=(), publish="never")
    started = time.perf_counter()
    result = train(store, Registry.for_data_dir(data), "demo", settings, log=lambda m: print(m, flush=True))
    wall = (time.perf_counter() - started) / 60
    run = store.run(result.run_id)
    return {"settings": "rs on 200 voted chats: 100 prompts, best of 4, 1 round, one candidate",
            "estimate_min": run["estimate"]["minutes"], "actual_min": wall,
            "estimate_over_actual": run["estimate"]["minutes"] / wall, "decision": result.decision,
            "phases_reached": run["phase"], "estimate": run["estimate"]}


def minutes(value: float) -> str:
    if value >= 600:
        return f"{value / 60:,.0f} h"
    return f"{value:.1f} min" if value >= 1 else f"{value * 60:.0f} s"


def unit(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def save(results: list[dict], check: dict | None, units_from: dict | None = None) -> None:
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    table = ["| model | threads | batch x accum | prompt tokens | one sampled answer | one scoring pass | "
             "KTO step | SFT step | DPO step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        u, st = r["units"], r["settings"]
        table.append(f"| {r['model']} (this CPU) | {r['threads']} | {st['batch_size']} x {st['grad_accum']} | "
                     f"{u['prompt_tokens']} | {unit(u['sample_s'])} | {unit(u['score_s'])} | "
                     + " | ".join(unit(u["step_s"][k]) + (" (demo ratio)" if k in r["steps_from_demo_ratio"] else "")
                                  for k in ("kto", "sft", "dpo")) + " |")
        if "gpu_units" in r:
            g = r["gpu_units"]
            table.append(f"| {r['model']} (H200, **estimate**) | | {st['batch_size']} x {st['grad_accum']} | "
                         f"{g['prompt_tokens']} | {unit(g['sample_s'])} | {unit(g['score_s'])} | "
                         + " | ".join(unit(g["step_s"][k]) for k in ("kto", "sft", "dpo")) + " |")
    table += ["", "| regime (default recipe) | sampled answers | " + " | ".join(
        f"{r['model']} CPU" + (f" | {r['model']} H200 (estimate)" if "gpu_units" in r else "") for r in results)
        + " |", "|---|---|" + "---|" * sum(2 if "gpu_units" in r else 1 for r in results)]
    for regime in regimes():
        cells = []
        for r in results:
            row = r["regimes"][regime]
            cells.append(minutes(row["cpu_min"]))
            if "gpu_min" in row:
                cells.append(minutes(row["gpu_min"]))
        table.append(f"| {regime} | {results[0]['regimes'][regime]['samples']} | " + " | ".join(cells) + " |")
    notes = ""
    if check:
        notes = (f"Check run on the demo model ({check['settings']}): estimated {check['estimate_min']:.2f} min, "
                 f"took {check['actual_min']:.2f} min (estimate / actual {check['estimate_over_actual']:.2f}).")
    if units_from:
        notes = (f"Units measured by `{units_from['command']}`, finished {units_from['finished_at']}; the regimes "
                 f"extrapolated again from them. " + notes).strip()
    for line in table:
        print(line)
    print(notes, flush=True)
    save_results("cost", {"models": results, "check_run": check, "units_from": units_from}, table, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,smolvlm")
    parser.add_argument("--smolvlm-batch", type=int, default=2, help="KTO needs 2 rows a batch (its KL term)")
    parser.add_argument("--smolvlm-grad-accum", type=int, default=4)
    parser.add_argument("--smolvlm-steps", type=int, default=2, help="calibration steps (the first is warm-up)")
    parser.add_argument("--smolvlm-kinds", default="kto,sft,dpo",
                        help="TRL kinds timed on the SmolVLM-sized model; the others keep the demo model's ratio to SFT "
                             "(labelled in the table)")
    parser.add_argument("--check-run", action="store_true", help="also train once on the demo model")
    parser.add_argument("--reuse-units", action="store_true",
                        help="measure nothing: extrapolate the regimes again (the recipe's counts today) from the units "
                             "in docs/results/cost.json")
    args = parser.parse_args()
    from chatapp.learning.settings import TrainSettings

    if args.reuse_units:
        saved = json.loads((ROOT / "docs" / "results" / "cost.json").read_text())
        stored = saved["results"]
        for result in stored["models"]:
            result["regimes"] = extrapolate(result, TrainSettings(batch_size=result["settings"]["batch_size"],
                                                                  grad_accum=result["settings"]["grad_accum"]))
        units_from = stored.get("units_from") or {"command": saved["command"], "finished_at": saved["finished_at"]}
        save(stored["models"], stored.get("check_run"), units_from)
        return

    root = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    data, _ = voted_data(root)
    print(f"data: {data.summary()}", flush=True)
    settings = {"demo": TrainSettings(),
                "smolvlm": TrainSettings(batch_size=args.smolvlm_batch, grad_accum=args.smolvlm_grad_accum,
                                         max_steps=args.smolvlm_steps)}
    results = []
    for name in args.models.split(","):
        path = "demo"
        if name == "smolvlm":
            from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random

            path = str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random"))
        t0 = time.perf_counter()
        kinds = tuple(args.smolvlm_kinds.split(",")) if name == "smolvlm" else ("kto", "sft", "dpo")
        result = measure(name, path, data, settings[name], kinds, results[0] if results else None)
        run_settings = dataclasses.replace(settings[name], max_steps=None)
        result["regimes"] = extrapolate(result, run_settings)
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
    check = check_run() if args.check_run else None
    save(results, check)


if __name__ == "__main__":
    main()
