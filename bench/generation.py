"""Streaming generation through the engine vs a plain `model.generate`, same model, inputs and
parameters, in the same run. Prints time to first token (TTFT) and decode tokens/s for both and
their ratios, for the demo model and a random-weight model of SmolVLM-256M-Instruct's size.

    python bench/generation.py [--tokens 64] [--repeats 5] [--models demo,smolvlm]

Both paths start from the same conversation (one image and a question) and include the
processor call; the reply length is fixed with min_new_tokens so both decode the same number of
tokens. Plain figures are read inside generate(), from the library's own streaming hook: a no-op
streamer notes when generate() hands it the first and the last new token (the earliest moment a
plain caller could have them); engine figures are taken where a caller of the engine sees them:
when the first and the last stream events arrive, so they include the engine's hand-off to the
consuming thread and the detokenizing. Runs alternate
between the two paths; medians are reported. Both paths call generate() on the same thread (the engine's generation
thread): two threads running torch ops in one process slow each other 2-3x on a 2-core machine
(their OpenMP teams compete; measured), which would measure the benchmark, not the engine.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatapp.core import config  # noqa: E402
from chatapp.demo import shapes
from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random
from chatapp.serving.engine import Engine  # noqa: E402

CACHE = ROOT / "bench" / "cache"


def plain_generate(engine: Engine, image, question: str, tokens: int) -> tuple[float, float]:
    return engine.generation_thread.submit(_plain_generate, engine, image, question, tokens).result()


def _plain_generate(engine: Engine, image, question: str, tokens: int) -> tuple[float, float]:
    """The plain library path: chat template, processor, generate. Returns (TTFT, decode seconds
    for tokens 2..N), read from a no-op streamer: generate() passes it the prompt first, then each
    new token the moment it is chosen."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    model, processor = engine.model, engine.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    calls: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value):
            calls.append(time.perf_counter())

        def end(self):
            pass

    started = time.perf_counter()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=engine._pad_id, streamer=Clock())
    calls = calls[1:]  # the first put is the prompt
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens == len(calls)
    return calls[0] - started, calls[-1] - calls[0]


def engine_stream(engine: Engine, image, question: str, tokens: int) -> tuple[float, float, int]:
    # the processor's full splitting, as the plain call it is compared with (auto would be low on a CPU)
    params = config.validate_generation(temperature=0, max_new_tokens=tokens, image_detail="high")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    started = time.perf_counter()
    first = None
    for event in engine.stream(messages, params, generate_overrides={"min_new_tokens": tokens}):
        if first is None:
            first = time.perf_counter()
        if event.done:
            done = time.perf_counter()
            return first - started, done - started, event.meta.reply_tokens
    raise RuntimeError("no final event")


def bench_model(name: str, path: str, tokens: int, repeats: int) -> dict:
    engine = Engine.load(path)
    engine.cache = None  # the same prompt every run: with the prefix cache the engine would skip its prefill
    image = shapes.render(shapes.random_scene(random.Random(0)))
    question = "Describe the image."
    engine_stream(engine, image, question, 4)  # warm-up both paths
    plain_generate(engine, image, question, 4)
    plain_ttft, plain_tps, eng_ttft, eng_tps = [], [], [], []
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                ttft, decode = plain_generate(engine, image, question, tokens)
                plain_ttft.append(ttft)
                plain_tps.append((tokens - 1) / decode)
            else:
                ttft, total, n = engine_stream(engine, image, question, tokens)
                assert n == tokens, n
                eng_ttft.append(ttft)
                eng_tps.append((tokens - 1) / (total - ttft))
    med = statistics.median
    result = {"model": name, "plain_ttft_s": med(plain_ttft), "engine_ttft_s": med(eng_ttft),
              "plain_tokens_per_s": med(plain_tps), "engine_tokens_per_s": med(eng_tps)}
    result["tokens_per_s_ratio"] = result["engine_tokens_per_s"] / result["plain_tokens_per_s"]
    result["ttft_ratio"] = result["engine_ttft_s"] / result["plain_ttft_s"]
    # each repeat runs the two paths back to back: the median of the per-repeat ratios cancels the
    # machine's slow drift (other tenants, clock changes) that the ratio of the medians keeps
    result["paired_ttft_ratio"] = med(e / p for e, p in zip(eng_ttft, plain_ttft))
    result["paired_tokens_per_s_ratio"] = med(e / p for e, p in zip(eng_tps, plain_tps))
    result["runs"] = {"plain_ttft_s": plain_ttft, "engine_ttft_s": eng_ttft, "plain_tokens_per_s": plain_tps,
                      "engine_tokens_per_s": eng_tps}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each path on the demo model")
    parser.add_argument("--smolvlm-repeats", type=int, default=3,
                        help="runs of each path on the SmolVLM-sized model (~35 s each on 2 CPU cores)")
    parser.add_argument("--models", default="demo,smolvlm")
    parser.add_argument("--verbose", action="store_true", help="also print every run's figures")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens} new tokens, "
          f"{args.repeats} repeats, medians")
    paths = {"demo": "demo"}
    if "smolvlm" in args.models:
        paths["smolvlm"] = str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random"))
    header = (f"{'model':<9} {'TTFT plain':>11} {'TTFT engine':>12} {'ratio':>6} {'paired':>6}  {'tok/s plain':>12} "
              f"{'tok/s engine':>13} {'ratio':>6} {'paired':>6}")
    print(header)
    results = []
    for name in args.models.split(","):
        r = bench_model(name, paths[name], args.tokens, args.repeats if name == "demo" else args.smolvlm_repeats)
        results.append(dict(r, repeats=len(r["runs"]["plain_ttft_s"])))
        print(f"{name:<9} {r['plain_ttft_s'] * 1000:>9.2f}ms {r['engine_ttft_s'] * 1000:>10.2f}ms {r['ttft_ratio']:>6.3f} "
              f"{r['paired_ttft_ratio']:>6.3f}  {r['plain_tokens_per_s']:>12.1f} {r['engine_tokens_per_s']:>13.1f} "
              f"{r['tokens_per_s_ratio']:>6.3f} {r['paired_tokens_per_s_ratio']:>6.3f}", flush=True)
        if args.verbose:
            for key, values in r["runs"].items():
                print(f"    {key}: {', '.join(f'{v:.4g}' for v in values)}")
    goal = "tokens/s ratio >= 0.97, TTFT ratio <= 1.05"
    print(f"ratio: of the medians; paired: the median of each repeat's engine/plain ratio. goal: {goal}")
    save_markdown_and_json(results, args.tokens, goal)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def save_markdown_and_json(results: list[dict], tokens: int, goal: str) -> None:
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    table = ["| model | repeats | TTFT plain | TTFT engine | ratio (paired) | tokens/s plain | tokens/s engine "
             "| ratio (paired) |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['repeats']} | {_duration(r['plain_ttft_s'])} | {_duration(r['engine_ttft_s'])} "
              f"| {r['ttft_ratio']:.3f} ({r['paired_ttft_ratio']:.3f}) | {r['plain_tokens_per_s']:.1f} "
              f"| {r['engine_tokens_per_s']:.1f} | {r['tokens_per_s_ratio']:.3f} "
              f"({r['paired_tokens_per_s_ratio']:.3f}) |"
              for r in results]
    notes = (f"{tokens} new tokens per reply, greedy; medians. Ratio: engine / plain of the medians; paired: the "
             f"median of each repeat's engine / plain ratio. Goal: {goal}.")
    save_results("generation", {"tokens": tokens, "goal": goal, "models": results}, table, notes)


if __name__ == "__main__":
    main()
