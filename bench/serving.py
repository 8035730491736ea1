"""Follow-up turns with and without the conversation prefix cache (chatapp/serving/cache.py), on the
random-weight model with SmolVLM-256M-Instruct's real dimensions and processor, in one run.

    python bench/serving.py [--tokens 16] [--repeats 1]

A conversation: one 64x64 image (the processor upsizes it to 17 frames of 512 px, 1,100+ prompt
tokens) with "Describe the image.", then a text follow-up. Each repeat plays it twice through
`Engine.generate`, greedy, replies fixed at --tokens tokens: once on the plain path (no cache: the
follow-up encodes the whole history, its image included, again) and once with the cache (a fresh
one, so its first turn computes everything too). TTFT is the reply's `time_to_first_token_s`,
the prompt's processing included. Prints both paths' first-turn and follow-up TTFT, the ratio
follow-up / first turn for each (goal with the cache: <= 0.1), and whether the replies are
identical (they must be: greedy output does not depend on the cache).

Image detail (issue 13 item 2): the conversations above see the image at detail=high (17 frames).
Each repeat also asks the same first turn at detail=low (one 512 px frame, 64 image tokens) on the
plain path, and the bench prints first-turn TTFT at low / at high on the same model (goal <= 0.15).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatapp.core import config  # noqa: E402
from chatapp.core.config import validate_generation  # noqa: E402
from chatapp.demo import shapes  # noqa: E402
from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random  # noqa: E402
from chatapp.serving.cache import ServingCache  # noqa: E402
from chatapp.serving.engine import Engine  # noqa: E402

CACHE = ROOT / "bench" / "cache"
GOAL = 0.1  # follow-up TTFT / first-turn TTFT with the cache (issue 13)
DETAIL_GOAL = 0.15  # first-turn TTFT at detail=low / at detail=high (issue 13)


def conversation_ttfts(engine: Engine, image, tokens: int,
                       detail: str = "high") -> tuple[list[float], list[str], list[int]]:
    params = validate_generation(temperature=0, max_new_tokens=tokens, image_detail=detail)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe the image."}]}]
    ttfts, texts, prompt_tokens = [], [], []
    for follow_up in ("Tell me more about it.", None):
        reply = engine.generate(conversation, params, generate_overrides={"min_new_tokens": tokens})
        ttfts.append(reply.meta.time_to_first_token_s)
        texts.append(reply.text)
        prompt_tokens.append(reply.meta.prompt_tokens)
        if follow_up:
            conversation += [{"role": "assistant", "content": [{"type": "text", "text": reply.text}]},
                             {"role": "user", "content": [{"type": "text", "text": follow_up}]}]
    return ttfts, texts, prompt_tokens


def first_turn_at(engine: Engine, image, tokens: int, detail: str) -> tuple[float, int]:
    """(TTFT, prompt tokens) of the conversation's first turn at `detail`, on the plain path."""
    params = validate_generation(temperature=0, max_new_tokens=tokens, image_detail=detail)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe the image."}]}]
    reply = engine.generate(conversation, params, generate_overrides={"min_new_tokens": tokens})
    assert reply.meta.params["image_detail"] == detail
    return reply.meta.time_to_first_token_s, reply.meta.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per reply")
    parser.add_argument("--repeats", type=int, default=1, help="conversations per path (~80 s each on 2 CPU cores)")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    engine = Engine.load(str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random")))
    image = shapes.render(shapes.random_scene(random.Random(0)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolVLM-sized random model, "
          f"{args.tokens}-token replies, {args.repeats} repeat(s), medians", flush=True)
    # the process's first generation pays one-time setup: a short text reply takes it, not the first measured turn
    engine.generate([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                    validate_generation(temperature=0, max_new_tokens=2))
    runs = {"plain": [], "cached": []}
    low_runs, low_tokens = [], 0
    identical = True
    for _ in range(args.repeats):
        engine.cache = None
        low_ttft, low_tokens = first_turn_at(engine, image, args.tokens, "low")
        low_runs.append(low_ttft)
        plain, plain_texts, turn_tokens = conversation_ttfts(engine, image, args.tokens)
        high_tokens, prompt_tokens = turn_tokens
        engine.cache = ServingCache(config.SERVING_CACHE_BYTES)
        cached, cached_texts, _ = conversation_ttfts(engine, image, args.tokens)
        identical &= plain_texts == cached_texts
        runs["plain"].append(plain)
        runs["cached"].append(cached)
        print(f"  plain {plain[0]:.2f} s / {plain[1]:.2f} s; cached {cached[0]:.2f} s / {cached[1]:.2f} s "
              f"(reused {engine.cache.stats['reused_tokens']} of {prompt_tokens} follow-up prompt tokens); "
              f"first turn at detail=low {low_ttft:.2f} s ({low_tokens} prompt tokens)", flush=True)
    figures = {"prompt_tokens_follow_up": prompt_tokens, "tokens": args.tokens, "identical_replies": identical,
               "goal": f"cached follow-up / first turn <= {GOAL}", "runs": runs}
    print(f"{'path':<7} {'first turn':>11} {'follow-up':>10} {'ratio':>6}")
    for path, values in runs.items():
        first = statistics.median(v[0] for v in values)
        follow = statistics.median(v[1] for v in values)
        figures[path] = {"first_turn_ttft_s": first, "follow_up_ttft_s": follow, "ratio": follow / first}
        print(f"{path:<7} {first:>9.2f} s {follow:>8.2f} s {follow / first:>6.3f}")
    ratio = figures["cached"]["ratio"]
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"follow-up / first turn with the cache: {ratio:.3f} (goal <= {GOAL}: {verdict}); "
          f"replies identical with and without the cache: {identical}")
    low = statistics.median(low_runs)
    high = figures["plain"]["first_turn_ttft_s"]
    detail_ratio = low / high
    figures["detail"] = {"low_first_turn_ttft_s": low, "high_first_turn_ttft_s": high, "ratio": detail_ratio,
                         "low_prompt_tokens": low_tokens, "high_prompt_tokens": high_tokens, "goal": f"low / high <= {DETAIL_GOAL}", "low_runs": low_runs}
    print(f"first-turn TTFT at detail=low is {detail_ratio:.3f} of detail=high on the same model "
          f"({low:.2f} s, {low_tokens} prompt tokens / {high:.2f} s; goal: at most {DETAIL_GOAL}: "
          f"{'met' if detail_ratio <= DETAIL_GOAL else 'NOT met'})")
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    table = ["| path | first-turn TTFT | follow-up TTFT | follow-up / first |", "|---|---|---|---|"]
    table += [f"| {path} | {figures[path]['first_turn_ttft_s']:.2f} s | {figures[path]['follow_up_ttft_s']:.2f} s "
              f"| {figures[path]['ratio']:.3f} |" for path in runs]
    table += ["", "| image detail | first-turn TTFT | prompt tokens |", "|---|---|---|",
              f"| low (1 frame) | {low:.2f} s | {low_tokens} |",
              f"| high (17 frames) | {high:.2f} s | {high_tokens} |",
              f"| low / high | {detail_ratio:.3f} (goal <= {DETAIL_GOAL}) | |"]
    save_results("serving", figures, table,
                 f"SmolVLM-sized random model, one 17-frame image, {args.tokens}-token greedy replies, medians of "
                 f"{args.repeats}. Goal: follow-up / first turn <= {GOAL} with the cache. Replies identical with "
                 f"and without the cache: {identical}.")


if __name__ == "__main__":
    main()
