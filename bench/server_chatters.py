"""Many chatters through the real server (issue 13's acceptance): the app serves the SmolVLM-sized random
model at detail=low, and N `gradio_client` clients stream /chat at the same moment, each with its own
picture and "Describe the image.", greedy, replies up to --chatter-tokens tokens. One chatter alone,
the same way, is the baseline.

    python bench/serving.py --sections server [--chatters 8] [--chatter-tokens 64] [--repeats 1]

TTFT: from `Client.submit` to the first streamed dict with text. Tokens: the reply's own count (the last
dict's `meta.reply_tokens`; a random-weight model rarely ends early, and a reply that does counts what it
gave). Aggregate tokens/s: all tokens over the span from the first request to the last reply's end.
Prints N chatters / one for both (goals: aggregate >= 3x, p95 TTFT <= 2x).
"""
from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from chatapp.demo import shapes


def _ask(client, image_path: str, tokens: int) -> tuple[float, float, float, int, int]:
    """One streamed /chat: (asked, first text, end, reply tokens, the answer's message id), perf_counter
    seconds."""
    from gradio_client import handle_file

    asked = time.perf_counter()
    job = client.submit(conversation_id="", text="Describe the image.", image=handle_file(image_path),
                        temperature=0, max_new_tokens=tokens, image_detail="low", api_name="/chat")
    first, last = None, None
    for event in job:
        if first is None and event.get("text"):
            first = time.perf_counter()
        last = event
    end = time.perf_counter()
    if not last or not last.get("done"):
        raise RuntimeError(f"the stream ended without its last dict: {last!r}")
    return asked, first if first is not None else end, end, int(last["meta"]["reply_tokens"]), last["message_id"]


def together(work, count: int, errors: list) -> None:
    """Run `work(0..count-1)` each in its own thread and wait for all; the first error `work` recorded in
    `errors` is raised (a benchmark with a failed chatter measures nothing)."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def ask_together(url: str, images: list[str], tokens: int) -> list[tuple]:
    """Every image's chatter asks at the same moment from its own client and thread: `_ask`'s tuple for each."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in images]
    barrier = threading.Barrier(len(images))
    results, errors = [None] * len(images), []

    def chatter(index: int) -> None:
        try:
            barrier.wait()
            results[index] = _ask(clients[index], images[index], tokens)
        except Exception as error:  # reported below: a failed chatter makes the figure meaningless
            errors.append(error)

    try:
        together(chatter, len(images), errors)
    finally:
        for client in clients:
            client.close()
    return results


def _at_once(url: str, images: list[str], tokens: int) -> tuple[float, list[float], int]:
    """(aggregate tokens/s, TTFTs, tokens in all) of `ask_together`."""
    results = ask_together(url, images, tokens)
    total = sum(r[3] for r in results)
    span = max(r[2] for r in results) - min(r[0] for r in results)
    return total / span, [r[1] - r[0] for r in results], total


@contextlib.contextmanager
def serving(model_dir: Path, first_seed: int):
    """The app serving `model_dir` at detail=low with no trainer, on a fresh data dir in a temporary folder,
    after one short reply (the server's first pays one-time setup). Yields (url, the app's process,
    new_images(n): paths of n new pictures, the data dir); the app stops on leaving."""
    from bench.overhead import start, stop  # a namespace package under the project root, on sys.path

    seeds = iter(range(first_seed, 10 ** 6))  # a new picture per request: no chatter reuses cached image features
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)

        def new_images(n: int) -> list[str]:
            paths = []
            for _ in range(n):
                seed = next(seeds)
                path = folder / f"picture-{seed}.png"
                shapes.render(shapes.random_scene(random.Random(seed))).save(path)
                paths.append(str(path))
            return paths

        (folder / "data").mkdir()
        proc, url = start(["app.py", "--model", str(model_dir), "--no-trainer", "--image-detail", "low",
                           "--data-dir", str(folder / "data")], folder / "app.log")
        try:
            ask_together(url, new_images(1), 4)
            yield url, proc, new_images, folder / "data"
        finally:
            stop(proc)


def through_server(model_dir: Path, chatters: int, tokens: int, repeats: int, goals: tuple[float, float],
                   p95) -> tuple[dict, list[str]]:
    """The section: start the app, measure one chatter then `chatters` at once; figures and table lines."""
    throughput_goal, ttft_goal = goals
    with serving(model_dir, first_seed=5000) as (url, _, new_images, _):
        single = [_at_once(url, new_images(1), tokens) for _ in range(repeats)]
        many = [_at_once(url, new_images(chatters), tokens) for _ in range(repeats)]
    one_rate = statistics.median(rate for rate, *_ in single)
    one_ttft = p95([t for _, ttfts, _ in single for t in ttfts])
    rate = statistics.median(r for r, *_ in many)
    ttft = p95([t for _, ttfts, _ in many for t in ttfts])
    figures = {"chatters": chatters, "tokens": tokens, "repeats": repeats,
               "one": {"tokens_per_s": one_rate, "p95_ttft_s": one_ttft, "runs": single},
               "many": {"tokens_per_s": rate, "p95_ttft_s": ttft, "runs": many},
               "throughput_ratio": rate / one_rate, "ttft_ratio": ttft / one_ttft}
    print(f"  through the server: one chatter {one_rate:.1f} tokens/s, p95 TTFT {one_ttft:.2f} s (replies of "
          f"{', '.join(str(total) for *_, total in single)} tokens); {chatters} at once {rate:.1f} tokens/s in all, "
          f"p95 TTFT {ttft:.2f} s ({', '.join(str(total) for *_, total in many)} tokens in all)", flush=True)
    print(f"{chatters} chatters / one through the server (gradio_client): aggregate tokens/s {rate / one_rate:.2f}x "
          f"(goal >= {throughput_goal}: {'met' if rate / one_rate >= throughput_goal else 'NOT met'}), p95 TTFT "
          f"{ttft / one_ttft:.2f}x (goal <= {ttft_goal}: {'met' if ttft / one_ttft <= ttft_goal else 'NOT met'})",
          flush=True)
    table = [f"| through the server (gradio_client) | aggregate tokens/s | / one chatter (goal >= {throughput_goal}) "
             f"| p95 TTFT | / one chatter (goal <= {ttft_goal}) |", "|---|---|---|---|---|",
             f"| one chatter | {one_rate:.1f} | 1 | {one_ttft:.2f} s | 1 |",
             f"| {chatters} chatters at once | {rate:.1f} | {rate / one_rate:.2f} | {ttft:.2f} s | "
             f"{ttft / one_ttft:.2f} |"]
    return figures, table
