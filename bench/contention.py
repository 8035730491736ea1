"""Chat latency while a training run is in progress vs idle: inter-token gaps (p50, p95) of streamed
replies in this process while the product's trainer runs in its own process, against the same
replies with no training, for the demo model and a random-weight model of SmolVLM-256M's size.
Goal: p95 gap while training <= 1.5x idle on 2 cores.

    python bench/contention.py [--models demo,smolvlm] [--tokens 48] [--replies 20] [--cycles 3]
                               [--smolvlm-tokens 128] [--smolvlm-replies 3] [--chats 120]
                               [--session same|new] [--trainer-priority idle|nice]

Serving side (this process, not niced, torch's default thread count): `Engine.load(model)` and
greedy replies of a fixed length (`min_new_tokens`, as in bench/generation.py) to one shapes image
and a question, through `engine.stream`. Every StreamEvent carries `token_times`, the
perf_counter() of each new token stamped on the generation thread when it was produced; the gaps
are the differences between consecutive tokens of one reply (the time to first token, i.e. the
prefill, is left out, and reported on its own). Every condition streams the same replies (same
images, questions and length); the gaps of a condition are pooled.

Training side: the product's trainer in its own process, as the app runs it:
`python -m chatapp train --data-dir D --model M --method kto --from base --max-steps 100000
--publish never --priority idle` (on the SmolVLM-sized model also `--batch-size 2`: TRL's KTO refuses a batch of
1), in its own process group of this process's session, as the app's background trainer is
started (`--session new`: its own session, as when started from another terminal). It limits
itself (trainer.limit_resources) to 1 torch thread on a machine with 2 cores or fewer, nice 10 and
SCHED_IDLE (`--trainer-priority nice`: nice 10 only, the product's earlier behaviour): that is what
is under test. D holds `--chats` one-question shapes chats from 5 simulated users,
answered by the demo model at temperature 1 and voted by the terse-and-correct rule (as
tests/test_trainer.py's fixture); the SmolVLM-sized model trains on the same rows.

Conditions, per cycle (`--cycles`; one more "no trainer" window closes the run):
- no trainer: the replies with no trainer process (before it starts; after it is killed);
- training / paused, interleaved: once the run's row in the store shows the training phase
  (`training (kto)`: model loaded, TRL trainer built, train() called) and, on the demo model, at
  least `--min-step` optimizer steps (a SmolVLM-sized KTO step takes minutes on one niced thread,
  so there the phase suffices), plus `--settle` s, each reply is streamed twice, once with the
  trainer running and once with it stopped (SIGSTOP to its process group), alternating which
  goes first. Both halves see the same background load on a shared machine, so their ratio is
  the drift-free figure; "no trainer" shows what a stopped trainer still costs (nothing, if the
  two idle figures agree) and how much the machine drifted.
The trainer is then killed with its process group. For each condition the CPU that the serving
process, the trainer and everything else used is printed in cores (from /proc), plus the steal
time (CPU the hypervisor gave to other machines): on a shared machine this says how quiet the
measurement was.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
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
QUESTION = "Describe the image."
MAX_STEPS = 100_000  # "large": the run is killed long before
TICK = os.sysconf("SC_CLK_TCK")
CPU_KEYS = ("wall_s", "serve", "trainer", "other", "steal")


# ---------------------------------------------------------------- CPU accounting (/proc)

def _proc_stat(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 when it is gone."""
    try:
        fields = _proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _proc_status(pid: int, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(key + ":"))


def _autogroup(pid: int | str = "self") -> str:
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0].lstrip("/")
    except OSError:
        return "-"


def _policy(pid: int) -> str:
    return {os.SCHED_OTHER: "normal", os.SCHED_IDLE: "idle", os.SCHED_BATCH: "batch"}.get(os.sched_getscheduler(pid), "?")


def _machine_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of all cores since boot; busy excludes idle, iowait and steal."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK, v[7] / TICK


class Window:
    """CPU seconds used while the block runs: this process, the trainer, everything else, steal."""

    def __init__(self, trainer_pid: int | None = None):
        self.trainer_pid = trainer_pid

    def __enter__(self):
        self.t0, self.me0, (self.busy0, self.steal0) = time.perf_counter(), time.process_time(), _machine_s()
        self.tr0 = _proc_cpu_s(self.trainer_pid) if self.trainer_pid else 0.0
        return self

    def __exit__(self, *exc):
        busy, steal = _machine_s()
        me = time.process_time() - self.me0
        trainer = (_proc_cpu_s(self.trainer_pid) - self.tr0) if self.trainer_pid else 0.0
        self.seconds = {"wall_s": time.perf_counter() - self.t0, "serve": me, "trainer": trainer,
                        "other": max(0.0, busy - self.busy0 - me - trainer), "steal": steal - self.steal0}


def _add(total: dict | None, seconds: dict) -> dict:
    return {k: (total or {}).get(k, 0.0) + seconds[k] for k in CPU_KEYS}


# ---------------------------------------------------------------- serving side

def _conversations(n: int) -> list[list[dict]]:
    """The same n conversations (one image and a question) for every condition."""
    from chatapp.demo import shapes

    return [[{"role": "user", "content": [{"type": "image", "image": shapes.render(shapes.random_scene(random.Random(i)))},
                                          {"type": "text", "text": QUESTION}]}] for i in range(n)]


def stream_reply(engine, messages: list[dict], tokens: int) -> tuple[list[float], float]:
    """One greedy reply of exactly `tokens` tokens: (inter-token gaps in s, time to first token in s)."""
    from chatapp.core import config

    params = config.validate_generation(temperature=0, max_new_tokens=tokens, image_detail="high")  # 17 frames
    started = time.perf_counter()
    times: list[float] = []
    for event in engine.stream(messages, params, generate_overrides={"min_new_tokens": tokens}):
        times.extend(event.token_times)
        if event.done:
            assert event.meta.reply_tokens == tokens == len(times), (event.meta.reply_tokens, len(times))
    return [b - a for a, b in zip(times, times[1:])], times[0] - started


class Condition:
    """The pooled gaps, first-token times and CPU seconds of one condition."""

    def __init__(self, label: str, kind: str):
        self.label, self.kind, self.gaps, self.ttfts, self.cpu, self.note = label, kind, [], [], None, ""

    def reply(self, engine, messages: list[dict], tokens: int, trainer_pid: int | None = None) -> None:
        with Window(trainer_pid) as window:
            gaps, ttft = stream_reply(engine, messages, tokens)
        self.gaps += gaps
        self.ttfts.append(ttft)
        self.cpu = _add(self.cpu, window.seconds)

    def merge(self, others: list["Condition"]) -> "Condition":
        for other in others:
            self.gaps += other.gaps
            self.ttfts += other.ttfts
            self.cpu = _add(self.cpu, other.cpu)
        return self


# ---------------------------------------------------------------- training side

def build_data(root: Path, chats: int) -> dict:
    """A data dir with `chats` sampled shapes chats from 5 users, voted by the terse-and-correct rule."""
    from chatapp.learning import simulate
    from chatapp.serving.engine import Engine
    from chatapp.feedback.store import Store

    engine = Engine.load("demo")
    store = Store(root)
    logged = simulate.log_chats(store, engine.model, engine.processor, chats, seed=3, users=USERS)
    counts = simulate.vote(store, logged, simulate.style_rule("terse"))
    store.close()
    return counts


def trainer_command(data: Path, model: str, batch_size: int | None, priority: str) -> list[str]:
    command = [sys.executable, "-m", "chatapp", "train", "--data-dir", str(data), "--model", model,
               "--method", "kto", "--from", "base", "--max-steps", str(MAX_STEPS), "--publish", "never",
               "--priority", priority]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    return command


class Trainer:
    """The product's trainer CLI in its own process group, followed through the store."""

    def __init__(self, data: Path, model: str, batch_size: int | None, log: Path, session: str, priority: str):
        self.data, self.command, self.log_path = data, trainer_command(data, model, batch_size, priority), log
        self.store = None
        self.after_id = max((r["id"] for r in self._runs()), default=0)  # runs of earlier cycles
        self.log = open(log, "w")
        # its own process group (to stop and kill it whole); the same session as this process, as the
        # app's watcher starts it, or a new one (as from another terminal): Linux's autogroup
        # scheduler shares the CPU between sessions first, and nice only counts within a session
        extra = {"start_new_session": True} if session == "new" else {"process_group": 0}
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, **extra)
        self.started = time.perf_counter()

    def _runs(self) -> list[dict]:
        from chatapp.feedback.store import Store

        if self.store is None:
            self.store = Store(self.data)
        return self.store.runs(limit=5)

    def row(self) -> dict | None:
        """This process's run: the newest, if it is newer than the runs before it started."""
        runs = self._runs()
        return runs[0] if runs and runs[0]["id"] > self.after_id else None

    def wait_training(self, min_step: int, timeout: float) -> dict:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the trainer exited with status {self.proc.returncode} before training:\n"
                                   + self.tail())
            row = self.row()
            if row and str(row["phase"]).startswith("training") and (row["step"] or 0) >= min_step:
                return row
            if time.perf_counter() - self.started > timeout:
                raise RuntimeError(f"no training after {timeout:.0f} s (run row: {row}):\n" + self.tail())
            time.sleep(0.25)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        if self.store is not None:
            self.store.close()


# ---------------------------------------------------------------- one model

def interleaved(engine, conversations: list, tokens: int, data: Path, run: dict, cycle: int):
    """Start the trainer, wait until it trains, stream each reply with it running and stopped
    (alternating the order), kill it. Returns the two conditions and what the trainer was doing."""
    trainer = Trainer(data, run["train_model"], run["batch_size"], data / "trainer.log", run["session"], run["priority"])
    training, paused = Condition(f"training {cycle}", "training"), Condition(f"paused {cycle}", "paused")
    try:
        trainer.wait_training(run["min_step"], run["wait_timeout"])
        waited = time.perf_counter() - trainer.started
        time.sleep(run["settle"])
        row, pid = trainer.row(), trainer.proc.pid
        info = {"cmd": " ".join(["python"] + trainer.command[1:]), "waited_s": waited, "nice": int(_proc_stat(pid)[16]),
                "policy": _policy(pid), "threads": (row.get("metrics") or {}).get("threads"),
                "os_threads": int(_proc_status(pid, "Threads")), "autogroup": _autogroup(pid)}
        for i, messages in enumerate(conversations):
            for condition in ((training, paused) if i % 2 == 0 else (paused, training)):
                trainer.signal(signal.SIGCONT if condition is training else signal.SIGSTOP)
                condition.reply(engine, messages, tokens, trainer_pid=pid)
            if trainer.proc.poll() is not None:
                raise RuntimeError(f"the trainer exited during the measurement (status {trainer.proc.returncode}):\n"
                                   + trainer.tail())
        trainer.signal(signal.SIGCONT)
        end = trainer.row()
        info.update(rss_mb=int(_proc_status(pid, "VmRSS").split()[0]) / 1024)
        training.note = f"{row['phase']}, step {row['step']} -> {end['step']}"
    except BaseException:
        sys.stderr.write(trainer.tail())
        raise
    finally:
        trainer.kill()
    return training, paused, info


def bench_model(name: str, path: str, data: Path, run: dict) -> dict:
    import torch

    from chatapp.serving.engine import Engine

    t0 = time.perf_counter()
    engine = Engine.load(path)
    conversations = _conversations(run["replies"])
    stream_reply(engine, conversations[0], 4)  # warm-up
    print(f"\n{name}: serving torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
          f"{run['replies']} replies x {run['tokens']} tokens per condition and cycle, {run['cycles']} cycle(s); "
          f"loaded and warmed in {time.perf_counter() - t0:.0f} s", flush=True)
    conditions, infos = [], []

    def no_trainer(k: int) -> None:
        condition = Condition(f"no trainer {k}", "no trainer")
        for messages in conversations:
            condition.reply(engine, messages, run["tokens"])
        conditions.append(condition)

    for cycle in range(1, run["cycles"] + 1):
        no_trainer(cycle)
        training, paused, info = interleaved(engine, conversations, run["tokens"], data, run, cycle)
        conditions += [training, paused]
        infos.append(info)
    no_trainer(run["cycles"] + 1)
    pooled = {kind: Condition(f"{kind} (all)", kind + " (all)").merge([c for c in conditions if c.kind == kind])
              for kind in ("no trainer", "paused", "training")}
    return {"model": name, "conditions": conditions + list(pooled.values()), "pooled": pooled, "trainer": infos,
            "wall_s": time.perf_counter() - t0}


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def ratios(result: dict) -> dict:
    pooled = result["pooled"]
    train = pooled["training"].gaps
    return {f"{q}_{ref}": _pct(train, p) / _pct(pooled[ref].gaps, p)
            for q, p in (("p50", 50), ("p95", 95)) for ref in ("paused", "no trainer")}


def print_table(result: dict) -> None:
    info = result["trainer"][0]
    print(f"trainer: {info['cmd']}")
    print(f"trainer process: nice {info['nice']}, policy {info['policy']}, torch threads {info['threads']} "
          f"({info['os_threads']} OS threads), RSS {max(i['rss_mb'] for i in result['trainer']):.0f} MB, scheduler "
          f"group {info['autogroup']} (serving: {_autogroup()}); training "
          f"{', '.join(format(i['waited_s'], '.0f') for i in result['trainer'])} s after its start")
    print("| condition | s | gaps | p50 ms | p95 ms | p99 ms | max ms | TTFT median s "
          "| cores: serve / trainer / other / steal | trainer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in result["conditions"]:
        g, cpu = c.gaps, c.cpu
        load = " / ".join(f"{cpu[k] / cpu['wall_s']:.2f}" for k in CPU_KEYS[1:])
        print(f"| {c.label} | {cpu['wall_s']:.0f} | {len(g)} | {_pct(g, 50) * 1e3:.2f} | {_pct(g, 95) * 1e3:.2f} | "
              f"{_pct(g, 99) * 1e3:.2f} | {max(g) * 1e3:.1f} | {sorted(c.ttfts)[len(c.ttfts) // 2]:.3f} | {load} | "
              f"{c.note} |")
    r = ratios(result)
    verdict = "met" if r["p95_paused"] <= 1.5 else "NOT met"
    print(f"{result['model']}: training / paused (interleaved): p50 {r['p50_paused']:.2f}x, p95 {r['p95_paused']:.2f}x "
          f"(goal p95 <= 1.5x: {verdict}); training / no trainer: p50 {r['p50_no trainer']:.2f}x, "
          f"p95 {r['p95_no trainer']:.2f}x; {result['wall_s']:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,smolvlm", help="comma-separated: demo, smolvlm")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per reply on the demo model")
    parser.add_argument("--replies", type=int, default=20, help="replies per condition and cycle on the demo model")
    parser.add_argument("--cycles", type=int, default=3,
                        help="cycles on the demo model (each starts a fresh trainer: ~10 s to its first step)")
    parser.add_argument("--smolvlm-tokens", type=int, default=128,
                        help="tokens per reply on the SmolVLM-sized model (decode ~15 tokens/s on 2 idle cores)")
    parser.add_argument("--smolvlm-replies", type=int, default=3,
                        help="replies per condition on the SmolVLM-sized model (each has a ~30 s prefill: "
                             "17 frames of 512 px)")
    parser.add_argument("--smolvlm-cycles", type=int, default=1)
    parser.add_argument("--smolvlm-batch", type=int, default=2,
                        help="trainer --batch-size on the SmolVLM-sized model (TRL's KTOTrainer refuses 1)")
    parser.add_argument("--session", choices=["same", "new"], default="same",
                        help="start the trainer in this process's session (default, as the app's background "
                             "trainer is started) or in a new one (as from another terminal: Linux's autogroup "
                             "then shares the CPU between the sessions and the trainer's nice has no effect)")
    parser.add_argument("--trainer-priority", choices=["idle", "nice"], default="idle",
                        help="the trainer's --priority: idle (the product's default: SCHED_IDLE + nice 10) or "
                             "nice (nice 10 only)")
    parser.add_argument("--chats", type=int, default=120, help="voted chats in the training data dir")
    parser.add_argument("--min-step", type=int, default=1,
                        help="demo model: optimizer steps the run must have done before measuring")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the trainer is training")
    parser.add_argument("--wait-timeout", type=float, default=900, help="seconds to wait for the trainer to train")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    models = args.models.split(",")
    paths = {"demo": "demo"}
    if "smolvlm" in models:
        paths["smolvlm"] = str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random"))
    runs = {"demo": dict(tokens=args.tokens, replies=args.replies, cycles=args.cycles, batch_size=None,
                         min_step=args.min_step),
            "smolvlm": dict(tokens=args.smolvlm_tokens, replies=args.smolvlm_replies, cycles=args.smolvlm_cycles,
                            batch_size=args.smolvlm_batch, min_step=0)}
    root = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    try:
        votes = build_data(root / "voted", args.chats)
        print(f"{os.cpu_count()} cores (affinity {len(os.sched_getaffinity(0))}), torch {torch.__version__}; "
              f"serving: nice {os.nice(0)}, torch threads {torch.get_num_threads()}; trainer: session {args.session}, "
              f"priority {args.trainer_priority}; data: {args.chats} chats from {len(USERS)} users, votes {votes}; "
              f"prep {time.perf_counter() - started:.0f} s", flush=True)
        summary = []
        for name in models:
            data = root / name
            shutil.copytree(root / "voted", data)  # one data dir (and run lock) per model
            run = dict(runs[name], train_model=paths[name], settle=args.settle, wait_timeout=args.wait_timeout,
                       session=args.session, priority=args.trainer_priority)
            result = bench_model(name, paths[name], data, run)
            print_table(result)
            summary.append(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = ["| model | trainer priority | p50 ms: no trainer / paused / training "
             "| p95 ms: no trainer / paused / training | p50 ratio | p95 ratio (goal <= 1.5) "
             "| p95 training / no trainer |",
             "|---|---|---|---|---|---|---|"]
    for result in summary:
        pooled, r = result["pooled"], ratios(result)
        cells = [" / ".join(f"{_pct(pooled[k].gaps, p) * 1e3:.2f}" for k in ("no trainer", "paused", "training"))
                 for p in (50, 95)]
        table.append(f"| {result['model']} | {args.trainer_priority} | {cells[0]} | {cells[1]} | {r['p50_paused']:.2f} "
                     f"| {r['p95_paused']:.2f} | {r['p95_no trainer']:.2f} |")
    notes = "ratios: training / paused, interleaved reply by reply (the same background load)"
    print("\n" + "\n".join(table) + "\n" + notes)
    print(f"total {time.perf_counter() - started:.0f} s")
    save_markdown_and_json(summary, table, notes, args)


def save_markdown_and_json(summary: list[dict], table: list[str], notes: str, args) -> None:
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    def condition(c: Condition) -> dict:
        return {"label": c.label, "kind": c.kind, "gaps": len(c.gaps), "note": c.note,
                **{f"p{q}_ms": _pct(c.gaps, q) * 1e3 for q in (50, 95, 99)}, "max_ms": max(c.gaps) * 1e3,
                "ttft_median_s": sorted(c.ttfts)[len(c.ttfts) // 2],
                "cores": {k: c.cpu[k] / c.cpu["wall_s"] for k in CPU_KEYS[1:]}, "wall_s": c.cpu["wall_s"]}

    models = [{"model": r["model"], "wall_s": r["wall_s"], "ratios": ratios(r), "trainer": r["trainer"],
               "conditions": [condition(c) for c in r["conditions"]]} for r in summary]
    save_results("contention", {"settings": vars(args), "models": models}, table, notes)


if __name__ == "__main__":
    main()
