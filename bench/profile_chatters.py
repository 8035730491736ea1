"""Where the time goes when many chatters share the server (issue 13, item 5, for the SmolVLM-sized model):
the app serves the SmolVLM-sized random model at detail=low; one chatter asks, then N at once (as in
`bench/serving.py --sections server`), while py-spy samples every thread of the app.

    pip install py-spy   # not a requirement of the project: a profiler, used only here
    python bench/profile_chatters.py [--chatters 8] [--tokens 64] [--rate 40]

Prints, per reply: the client's time to first text and end, and the engine's own figures from the
store's generation record (time to first token, total, tokens/s); then the generation thread's
sampled time by the deepest chatapp frame (vision encoder, batched decode steps, text prefill, image
preprocessing, idle) and the other threads' busy share. The raw py-spy samples are kept in the
file --raw names.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.server_chatters import ask_together, serving  # noqa: E402  (a namespace package under ROOT)

MODEL = ROOT / "bench" / "cache" / "smolvlm-256m-random"  # bench/serving.py builds it
IDLE_FRAMES = ("threading.py", "selectors.py", "concurrent/futures/thread.py:81", "block_thread")


def report(name: str, results: list[tuple], store) -> None:
    """`ask_together`'s results, each reply beside the engine's own record of it."""
    began, ended = min(r[0] for r in results), max(r[2] for r in results)
    tokens = sum(r[3] for r in results)
    print(f"{name}: {tokens} tokens in {ended - began:.2f} s, {tokens / (ended - began):.1f} tokens/s in all")
    for asked, first, end, _, message_id in sorted(results, key=lambda r: r[1]):
        g = store.generation(message_id)
        print(f"  client: first text {first - asked:6.2f} s, end {end - began:6.2f} s | engine: first token "
              f"{g['time_to_first_token_s']:6.2f} s, total {g['total_s']:6.2f} s, {g['tokens_per_s']:5.1f} tokens/s, "
              f"{g['prompt_tokens']} prompt tokens")


def profile(raw: Path, rate: int) -> None:
    """The generation thread's samples by deepest chatapp frame; the other threads' by the frame they were in
    when not idle (waiting in a C call, a lock's acquire included, counts as in that frame)."""
    ours, busy = collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, count = stack.split(";"), int(count)
        thread = frames[0].split(": ", 1)[-1]
        if "chatapp-generate" in thread:
            deepest = [f for f in frames if "chatapp/" in f]
            ours[deepest[-1] if deepest else "idle: " + frames[-1]] += count
        elif not any(idle in frames[-1] for idle in IDLE_FRAMES):
            busy[frames[-1]] += count
    print(f"generation thread, seconds sampled at {rate} Hz by the deepest chatapp frame:")
    for frame, count in ours.most_common(8):
        print(f"  {count / rate:6.1f} s  {frame}")
    print("the other threads (handlers, Gradio's event loop), seconds by frame when not idle, all threads together:")
    for frame, count in busy.most_common(6):
        print(f"  {count / rate:6.1f} s  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chatters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=int, default=40, help="py-spy samples per second")
    parser.add_argument("--raw", default=str(MODEL.parent / "profile-chatters.txt"),
                        help="where py-spy's raw samples go")
    args = parser.parse_args()
    spy_binary = shutil.which("py-spy")
    if spy_binary is None:
        parser.error("py-spy is not installed: pip install py-spy")
    if not MODEL.exists():
        parser.error(f"{MODEL} is missing: `python bench/serving.py` builds it")
    from chatapp.feedback.store import Store

    with serving(MODEL, first_seed=7000) as (url, proc, new_images, data):
        one = ask_together(url, new_images(1), args.tokens)
        spy = subprocess.Popen([spy_binary, "record", "-p", str(proc.pid), "--threads", "--idle", "-r",
                                str(args.rate), "-f", "raw", "-o", args.raw, "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(1)
        many = ask_together(url, new_images(args.chatters), args.tokens)
        spy.send_signal(2)  # py-spy writes its samples on SIGINT
        spy.wait(timeout=60)
        store = Store(data)
        report("one chatter", one, store)
        report(f"{args.chatters} chatters at once", many, store)
    profile(Path(args.raw), args.rate)


if __name__ == "__main__":
    main()
