"""LoRA training through the product's trainer vs plain TRL, same model, data and settings, in the
same run. Prints training steps/s for both and their ratio, and the training process's peak RSS
against the serving process's peak RSS on the same model (goal: <= 1.3x, i.e. no second copy of
the model while training), for the demo model and a random-weight model of SmolVLM-256M's size.

    python bench/training.py [--models demo,smolvlm] [--methods kto,sft] [--steps 20] [--repeats 3]
                             [--smolvlm-methods sft] [--smolvlm-steps 2] [--smolvlm-batch 1]
                             [--checkpointing auto|on|off]

Every measurement runs in its own fresh process, so its peak RSS (VmHWM, read when it ends) belongs
to that work only:
- server: the serving process itself, `python -m chatapp serve --no-trainer --model M`, answering
  image questions through the API (3 on the demo model, 1 on the SmolVLM-sized one). The goal's
  ratio is taken against it.
- engine alone (`--child serve`): `Engine.load(model)` and the same replies without the web server
  (no gradio): the smallest serving figure, printed beside it as the strictest ratio.
- chatapp: the product's training path: `trainer.limit_resources`, `trainer._load_base` (the
  serving loader), rows from the store by `prefs`, `trl_runs.train_trl` with a fresh LoRA
  (`trl_runs.lora_config`); TRL's reference is the base with the adapter disabled.
- plain: the same TRL trainer, rows and settings with plain library loading
  (`AutoModelForImageTextToText.from_pretrained(dtype=float32)` + `AutoProcessor`), no chatapp code.
- imports: the libraries training imports (torch, transformers, peft, trl, datasets) and nothing
  else: the floor under every training figure, which is most of it on the 2.6 MB demo model.
Both training paths use the product's gradient-checkpointing rule (`--checkpointing auto`: on from
50 M parameters, so off on the demo model and on on the SmolVLM-sized one) and the same batch.
Besides the peak, each training path reports its RSS with the trainer built, just before step 1:
set against the serving process after loading, it shows whether a second copy of the weights was
made (it would add the weights' size); what comes after it is activations.
Both training paths run with the same torch thread count (on the demo model by default what
`limit_resources` picks: 1 thread on a 2-core machine; on the SmolVLM-sized model all cores) and
the same niceness. steps/s is timed from the end of step 1 (which includes warm-up) to the end of
the last step, per wall second and per CPU second of the process (the latter is what other work
on a shared machine disturbs least: the training paths run niced, so they get little CPU while
anything else runs); on the demo model each path runs `--repeats` times, alternating, and the best
rates are kept. With 1 step a path measures memory only.

The data: 24 one-question shapes chats from 5 simulated users, answered by the demo model at
temperature 1. KTO trains on all of them voted by the terse-and-correct rule; SFT on all of them
voted up (so every batch is full). The SmolVLM-sized model trains on the same rows: its own answers
would be random tokens, and the prompt (the 64 px image upscaled and split into 16 tiles + 1, 64
tokens each: ~1140 tokens) is most of the cost anyway. Without gradient checkpointing a
SmolVLM-sized SFT row kept ~3.5 GB of activations; a KTO step costs about 4x an SFT step (policy,
KL and reference passes), so the default there is SFT, 2 steps of batch 1. Timings from a machine shared with other
work are noisy (one timed step on the SmolVLM-sized model); RSS is not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = ROOT / "bench" / "cache"
USERS = [f"user{i}" for i in range(5)]
CHATS = 24
NICE = 10  # what trainer.limit_resources applies; the plain path gets the same
LR = {"kto": 1e-3, "sft": 2e-3}  # settings.DEFAULT_LR
SERVE_TOKENS = 32
MARK = "RESULT "


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _report(result: dict) -> None:
    result["peak_rss_mb"] = peak_rss_mb()
    print(MARK + json.dumps(result), flush=True)


def _param_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _step_rates(times: dict[int, tuple[float, float]]) -> dict:
    """Steps per wall second and per CPU second of this process, from the end of step 1 to the end
    of the last step (one step: no rates, the run measures memory only). Per CPU second is what
    other work on a shared machine disturbs least."""
    last = max(times)
    if last < 2:
        return {"steps_per_s": None, "steps_per_cpu_s": None, "timed_steps": 0}
    (wall0, cpu0), (wall1, cpu1) = times[1], times[last]
    return {"steps_per_s": (last - 1) / (wall1 - wall0), "steps_per_cpu_s": (last - 1) / (cpu1 - cpu0),
            "timed_steps": last - 1}


# ---------------------------------------------------------------- children

def child_imports(args) -> None:
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    _report({})


def child_serve(args) -> None:
    import random

    from chatapp.core import config
    from chatapp.demo import shapes
    from chatapp.serving.engine import Engine

    engine = Engine.load(args.model)
    loaded = rss_mb()
    params = config.validate_generation(temperature=0, max_new_tokens=SERVE_TOKENS, image_detail="high")
    prompt_tokens = 0
    for i in range(args.replies):
        image = shapes.render(shapes.random_scene(random.Random(i)))
        reply = engine.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                              {"type": "text", "text": "Describe the image."}]}],
                                params)
        prompt_tokens = reply.meta.prompt_tokens
    _report({"loaded_rss_mb": loaded, "param_mb": _param_mb(engine.model), "prompt_tokens": prompt_tokens})


class _Progress:
    """Stands in for trl_runs.Progress (which writes to a run row in the store): notes when each step ends."""

    def __init__(self):
        self.phase, self.times = "", {}

    def start(self, phase: str, total: int) -> None:
        self.phase = phase
        self.ready_rss_mb = rss_mb()  # train_trl calls this with the trainer built, just before train()

    def step(self, step: int, loss=None, points=None, force: bool = False) -> None:
        if step:
            self.times.setdefault(step, _clock())


def child_chatapp(args) -> None:
    import torch

    from chatapp.feedback import prefs
    from chatapp.learning import trainer, trl_runs
    from chatapp.learning.settings import TrainSettings
    from chatapp.feedback.store import Store

    settings = TrainSettings(method=args.method, start_from="base", max_steps=args.steps, batch_size=args.batch,
                             max_length=args.max_length, threads=args.threads, grad_accum=args.grad_accum,
                             gradient_checkpointing=args.checkpointing)
    threads = trainer.limit_resources(settings.threads)
    engine, _ = trainer._load_base(args.model, settings)
    loaded = rss_mb()
    store = Store(Path(args.data) / args.method)
    rows = prefs.rows(store, args.method)
    extra = {}
    if args.method == "kto":
        desirable, undesirable = prefs.kto_weights(rows)
        extra = {"beta": settings.beta, "desirable_weight": desirable, "undesirable_weight": undesirable}
    progress = _Progress()
    progress.phase = f"training ({args.method})"
    torch.manual_seed(settings.seed)
    model = trl_runs.train_trl(args.method, engine.model, engine.processor, rows.rows, settings, progress,
                               LR[args.method], settings.epochs, peft_config=trl_runs.lora_config(settings), extra=extra)
    _report({**_step_rates(progress.times), "rows": len(rows), "threads": threads,
             "loaded_rss_mb": loaded, "ready_rss_mb": progress.ready_rss_mb, "adapters": sorted(model.peft_config),
             "checkpointing": trl_runs.use_gradient_checkpointing(settings, engine.model)})


def child_plain(args) -> None:
    """No chatapp code: the model, processor, dataset and trainer straight from the libraries."""
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    torch.set_num_threads(args.threads)
    os.nice(NICE)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    loaded = rss_mb()
    # the product's rule for --gradient-checkpointing auto: on from 50 M parameters
    checkpointing = (args.checkpointing == "on" or
                     args.checkpointing == "auto" and sum(p.numel() for p in model.parameters()) >= 50_000_000)
    data = json.loads((Path(args.data) / f"{args.method}.json").read_text())
    dataset = datasets.Dataset.from_list(data["rows"]).cast_column("images", datasets.Sequence(datasets.Image()))
    times: dict[int, tuple[float, float]] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            times.setdefault(state.global_step, _clock())

    # the same LoRA (the product's default: the language model's attention and MLP) and the same arguments
    # as the product's trainer
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                      task_type="CAUSAL_LM")
    config_cls, trainer_cls = {"kto": (trl.KTOConfig, trl.KTOTrainer), "sft": (trl.SFTConfig, trl.SFTTrainer)}[args.method]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        config = config_cls(output_dir=out, per_device_train_batch_size=args.batch, learning_rate=LR[args.method],
                            num_train_epochs=4, lr_scheduler_type="linear", warmup_steps=0, report_to=[],
                            logging_steps=5, save_strategy="no", gradient_checkpointing=checkpointing,
                            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                            gradient_accumulation_steps=args.grad_accum,
                            max_length=args.max_length, dataloader_num_workers=0, seed=0, use_cpu=True, bf16=False,
                            disable_tqdm=False, remove_unused_columns=False, max_steps=args.steps, **data["extra"])
        trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=processor,
                              peft_config=lora, callbacks=[Clock()])
        ready = rss_mb()
        trainer.train()
    _report({**_step_rates(times), "rows": len(dataset), "threads": args.threads,
             "loaded_rss_mb": loaded, "ready_rss_mb": ready, "checkpointing": checkpointing})


def measure_server(model: str, replies: int, timeout: float = 900) -> dict:
    """The real serving process: `python -m chatapp serve --no-trainer` on the model (gradio and all),
    answering `replies` image questions through the API as the page does; its peak RSS (VmHWM) is
    read from /proc before it is stopped."""
    import socket
    import urllib.request

    from gradio_client import Client, handle_file

    from chatapp.demo import shapes

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    image = folder / "shapes.png"
    import random

    shapes.render(shapes.random_scene(random.Random(0))).save(image)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "chatapp", "serve", "--model", model, "--no-trainer",
                               "--port", str(port), "--data-dir", str(folder / "data")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        loaded = _proc_mb(server.pid, "VmRSS")
        client = Client(url, verbose=False)
        for _ in range(replies):
            client.predict("", "Describe the image.", handle_file(str(image)), 0.0, 50, 1.0, SERVE_TOKENS,
                           api_name="/chat")
        return {"peak_rss_mb": _proc_mb(server.pid, "VmHWM"), "loaded_rss_mb": loaded}
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def _proc_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


CHILDREN = {"imports": child_imports, "serve": child_serve, "chatapp": child_chatapp, "plain": child_plain}


# ---------------------------------------------------------------- parent

def run_child(kind: str, model: str, *, data: Path | None = None, method: str = "", steps: int = 0,
              batch: int = 4, threads: int = 1, max_length: int = 2048, replies: int = 3,
              grad_accum: int = 1, checkpointing: str = "auto", timeout: float = 3600) -> dict:
    if kind == "plain":  # the plain path takes a folder ("demo" is the product's name for one)
        from chatapp.serving.loading import resolve_model_path

        model = resolve_model_path(model)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", model,
               "--threads", str(threads), "--max-length", str(max_length), "--replies", str(replies)]
    if data is not None:
        command += ["--data", str(data), "--method", method, "--steps", str(steps), "--batch", str(batch),
                    "--grad-accum", str(grad_accum), "--checkpointing", checkpointing]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise RuntimeError(f"child {kind} {method} on {model} failed (exit {done.returncode})")
    result = json.loads(lines[-1][len(MARK):])
    result["wall_s"] = time.perf_counter() - started
    return result


def build_data(root: Path) -> dict:
    """Stores for KTO (terse-and-correct votes) and SFT (all voted up), and their rows as JSON for
    the plain path (the same rows, read back without chatapp code)."""
    from chatapp.feedback import prefs
    from chatapp.learning import simulate
    from chatapp.serving.engine import Engine
    from chatapp.feedback.store import Store

    engine = Engine.load("demo")
    kto_store = Store(root / "kto")
    logged = simulate.log_chats(kto_store, engine.model, engine.processor, CHATS, seed=7, users=USERS,
                                temperature=1.0)
    counts = simulate.vote(kto_store, logged, simulate.style_rule("terse"))
    kto_store.close()
    shutil.copytree(root / "kto", root / "sft")
    sft_store = Store(root / "sft")
    simulate.vote(sft_store, logged, lambda entry: True)
    summary = {"kto_votes": counts}
    for method, store in (("kto", Store(root / "kto")), ("sft", sft_store)):
        rows = prefs.rows(store, method)
        extra = {}
        if method == "kto":
            desirable, undesirable = prefs.kto_weights(rows)
            extra = {"beta": 0.1, "desirable_weight": desirable, "undesirable_weight": undesirable}
        (root / f"{method}.json").write_text(json.dumps({"rows": rows.rows, "extra": extra}))
        summary[f"{method}_rows"] = len(rows)
    return summary


def _combine(runs: list[dict]) -> dict:
    """Repeats of one path: the best steps/s (the run least disturbed by other work on the machine),
    the largest memory figures."""
    rates = [r["steps_per_s"] for r in runs if r["steps_per_s"] is not None]
    cpu_rates = [r["steps_per_cpu_s"] for r in runs if r["steps_per_cpu_s"] is not None]
    out = dict(runs[0], steps_per_s=max(rates) if rates else None, all_steps_per_s=rates,
               steps_per_cpu_s=max(cpu_rates) if cpu_rates else None,
               wall_s=sum(r["wall_s"] for r in runs))
    for key in ("peak_rss_mb", "ready_rss_mb", "loaded_rss_mb"):
        out[key] = max(r[key] for r in runs)
    return out


def bench_model(name: str, path: str, data: Path, run: dict) -> dict:
    serve = run_child("serve", path, replies=run["replies"])
    serve["server"] = measure_server(path, run["replies"])
    rows = []
    for i, method in enumerate(run["methods"]):
        common = dict(data=data, method=method, steps=run["steps"], batch=run["batch"], threads=run["threads"],
                      max_length=run["max_length"], grad_accum=run["grad_accum"], checkpointing=run["checkpointing"])
        runs = {"plain": [], "chatapp": []}
        for repeat in range(run["repeats"]):
            for kind in (("plain", "chatapp") if (i + repeat) % 2 == 0 else ("chatapp", "plain")):
                runs[kind].append(run_child(kind, path, **common))
        rows.append({"method": method, **{kind: _combine(r) for kind, r in runs.items()}})
    return {"model": name, "serve": serve, "rows": rows}


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(result: dict, imports: dict, run: dict) -> None:
    serve = result["serve"]
    steps = run["steps"]
    timed = f"steps/s over steps 2..{steps}, best of {run['repeats']}" if steps > 1 else "1 step: memory only"
    server = serve["server"]
    checkpointing = result["rows"][0]["chatapp"].get("checkpointing")
    print(f"\n{result['model']}: {steps} steps of batch {run['batch']} x {run['grad_accum']} accumulated ({timed}), "
          f"{run['threads']} thread(s), gradient checkpointing {'on' if checkpointing else 'off'}; "
          f"weights {serve['param_mb']:.1f} MB (fp32), prompt {serve['prompt_tokens']} tokens")
    print("| method | steps/s plain | steps/s chatapp | ratio | ratio per CPU s | peak RSS plain MB "
          "| peak RSS train MB | peak RSS server MB | train/server (goal <= 1.3) | peak RSS engine alone MB "
          "| train/engine alone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        plain, chat = row["plain"], row["chatapp"]
        ratio, cpu_ratio = ((f"{chat[k] / plain[k]:.3f}" if chat[k] and plain[k] else "-")
                            for k in ("steps_per_s", "steps_per_cpu_s"))
        print(f"| {row['method']} | {_rate(plain['steps_per_s'])} | {_rate(chat['steps_per_s'])} | {ratio} | "
              f"{cpu_ratio} | "
              f"{plain['peak_rss_mb']:.0f} | {chat['peak_rss_mb']:.0f} | {server['peak_rss_mb']:.0f} | "
              f"{chat['peak_rss_mb'] / server['peak_rss_mb']:.2f} | {serve['peak_rss_mb']:.0f} | "
              f"{chat['peak_rss_mb'] / serve['peak_rss_mb']:.2f} |")
    print(f"server (python -m chatapp serve --no-trainer): RSS {server['loaded_rss_mb']:.0f} MB when up, peak "
          f"{server['peak_rss_mb']:.0f} MB ({run['replies']} API replies); engine alone: RSS "
          f"{serve['loaded_rss_mb']:.0f} MB after loading, peak {serve['peak_rss_mb']:.0f} MB; "
          f"the libraries training imports, alone: {imports['peak_rss_mb']:.0f} MB")
    for row in result["rows"]:
        plain, chat = row["plain"], row["chatapp"]
        print(f"{row['method']}: RSS with the trainer built, before step 1: chatapp {chat['ready_rss_mb']:.0f} MB, "
              f"plain {plain['ready_rss_mb']:.0f} MB (serve after loading + {chat['ready_rss_mb'] - serve['loaded_rss_mb']:.0f} MB; "
              f"a second copy of the weights would be + {serve['param_mb']:.1f} MB); peak - before step 1: "
              f"{chat['peak_rss_mb'] - chat['ready_rss_mb']:.0f} MB; {chat['rows']} rows; "
              f"steps/s plain {', '.join(f'{r:.3g}' for r in plain['all_steps_per_s'])}, "
              f"chatapp {', '.join(f'{r:.3g}' for r in chat['all_steps_per_s'])}; "
              f"wall plain {plain['wall_s']:.0f} s, chatapp {chat['wall_s']:.0f} s")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo", help="comma-separated: demo, smolvlm")
    parser.add_argument("--methods", default="kto,sft", help="on the demo model")
    parser.add_argument("--steps", type=int, default=20, help="training steps on the demo model")
    parser.add_argument("--batch", type=int, default=4, help="batch size on the demo model")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each training path on the demo model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both training paths on the demo model "
                             "(default: what trainer.limit_resources picks, 1 on a 2-core machine)")
    parser.add_argument("--smolvlm-methods", default="sft",
                        help="on the SmolVLM-sized model; a KTO step costs ~4x an SFT step (policy, KL and "
                             "reference passes, each through the vision tower)")
    parser.add_argument("--smolvlm-steps", type=int, default=2, help="training steps on the SmolVLM-sized model "
                        "(1: memory only)")
    parser.add_argument("--smolvlm-batch", type=int, default=1)
    parser.add_argument("--smolvlm-grad-accum", type=int, default=1,
                        help="batches per optimizer step on the SmolVLM-sized model (default 1; accumulating "
                             "trains on more rows per step for the same memory)")
    parser.add_argument("--smolvlm-repeats", type=int, default=1)
    parser.add_argument("--smolvlm-threads", type=int, default=os.cpu_count() or 1,
                        help="default: all cores (an SFT step of batch 2 takes ~1.5 min on 2 cores)")
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="gradient checkpointing for both paths (default auto, the product's rule: on from "
                             "50 M parameters, i.e. off on the demo model and on on the SmolVLM-sized one)")
    parser.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=2048, help="TRL max_length (SmolVLM prompts: ~1150 tokens)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--replies", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](args)
        return
    from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random

    if args.threads is None:
        cores = os.cpu_count() or 1
        args.threads = 1 if cores <= 2 else max(1, cores // 2)  # trainer.limit_resources' default
    runs = {"demo": dict(methods=args.methods.split(","), steps=args.steps, batch=args.batch, repeats=args.repeats,
                         threads=args.threads, replies=3, max_length=args.max_length, grad_accum=1,
                         checkpointing=args.checkpointing),
            "smolvlm": dict(methods=args.smolvlm_methods.split(","), steps=args.smolvlm_steps, batch=args.smolvlm_batch,
                            repeats=args.smolvlm_repeats, threads=args.smolvlm_threads, replies=1,
                            max_length=args.max_length, grad_accum=args.smolvlm_grad_accum,
                            checkpointing=args.checkpointing)}
    started = time.perf_counter()
    paths = {"demo": "demo"}
    if "smolvlm" in args.models:
        paths["smolvlm"] = str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random"))
    root = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        summary = build_data(root)
        imports = run_child("imports", "demo")
        print(f"{os.cpu_count()} cores; data: {summary}", flush=True)
        results = []
        for name in args.models.split(","):
            t0 = time.perf_counter()
            result = bench_model(name, paths[name], root, runs[name])
            print_table(result, imports, runs[name])
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
            results.append(dict(result, settings=runs[name], seconds=time.perf_counter() - t0))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ngoal: train/server peak RSS <= 1.3 (no second copy of the model); steps/s ratio ~1. "
          f"Timings are noisy on a shared machine. total {time.perf_counter() - started:.0f} s")
    save_markdown_and_json(results, imports, summary)


def save_markdown_and_json(results: list[dict], imports: dict, data: dict) -> None:
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    def ratio(a, b) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    table = ["| model | method | steps/s plain | steps/s chatapp | ratio (per CPU s) | peak RSS train MB "
             "| peak RSS server MB | train / server (goal <= 1.3) | peak RSS engine alone MB | train / engine alone |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        serve = result["serve"]
        server = serve["server"]
        for row in result["rows"]:
            plain, chat = row["plain"], row["chatapp"]
            table.append(f"| {result['model']} | {row['method']} | {_rate(plain['steps_per_s'])} "
                         f"| {_rate(chat['steps_per_s'])} | {ratio(chat['steps_per_s'], plain['steps_per_s'])} "
                         f"({ratio(chat['steps_per_cpu_s'], plain['steps_per_cpu_s'])}) | {chat['peak_rss_mb']:.0f} "
                         f"| {server['peak_rss_mb']:.0f} | {ratio(chat['peak_rss_mb'], server['peak_rss_mb'])} "
                         f"| {serve['peak_rss_mb']:.0f} | {ratio(chat['peak_rss_mb'], serve['peak_rss_mb'])} |")
    notes = ("steps/s: the best of the repeats (see `settings` in the JSON); server: `python -m chatapp serve "
             "--no-trainer` answering through the API; engine alone: the engine without the web server. "
             f"The libraries training imports, alone: {imports['peak_rss_mb']:.0f} MB peak RSS.")
    save_results("training", {"data": data, "imports": imports, "models": results}, table, notes)


if __name__ == "__main__":
    main()
