"""Where a batched decode step's time goes on an accelerator (a diagnostic, not a benchmark with a goal).

    python bench/gpu_profile.py [--chatters 8] [--tokens 64]

On the SmolVLM-sized model at detail=low: one chatter, then N at once (bench/serving.py's
`chatters_at_once`), with the batcher's parts timed (each part ends with a device synchronize, so a
part's time is its own): the joint and single prefills, a request's prepare (the processor on the
CPU), each decode step and inside it the model's forward pass and the rows' token choice. Also the
processor alone on one image at low and at high. Prints totals, counts and means per part.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import CACHE, chatters_at_once  # noqa: E402  (a namespace package under ROOT)
from chatapp.core.config import validate_generation  # noqa: E402
from chatapp.demo import shapes  # noqa: E402
from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random  # noqa: E402
from chatapp.serving import batching, row_sampling  # noqa: E402
from chatapp.serving.engine import Engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chatters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--torch-profile", action="store_true",
                        help="also run the N chatters under torch.profiler and print its busiest operators")
    args = parser.parse_args()
    import torch

    engine = Engine.load(str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random")))
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    times = collections.defaultdict(list)

    def timed(owner, name: str, label: str):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                sync()
                times[label].append(time.perf_counter() - started)
        setattr(owner, name, wrapper)

    seeds = iter(range(7000, 10 ** 6))

    def images(n):
        return [shapes.render(shapes.random_scene(random.Random(next(seeds)))) for _ in range(n)]

    chatters_at_once(engine, images(1), args.tokens)  # one-time setup
    for owner, name in ((batching.Batcher, "_step"), (batching.Batcher, "_admit"), (batching.Batcher, "_joint_pass"),
                        (batching.Batcher, "_prefill_alone"), (row_sampling.Row, "choose"), (engine, "prepare")):
        timed(owner, name, name)
    forward = engine.model.forward
    timed(engine.model, "forward", "model.forward")
    for label, n in (("one chatter", 1), (f"{args.chatters} chatters", args.chatters)):
        times.clear()
        engine.batcher.largest_prefill = 0
        started = time.perf_counter()
        rate, ttfts, decode = chatters_at_once(engine, images(n), args.tokens)
        wall = time.perf_counter() - started
        print(f"{label}: {wall:.2f} s, {rate:.1f} tokens/s in all, TTFTs {', '.join(f'{t:.2f}' for t in ttfts)} s, "
              f"decode {decode or 0:.1f} tokens/s, most prompts in one prefill {engine.batcher.largest_prefill}")
        for part, values in sorted(times.items(), key=lambda item: -sum(item[1])):
            print(f"  {part:<16} {sum(values):7.3f} s  {len(values):5d} x  {1000 * sum(values) / len(values):8.2f} ms")
    engine.model.forward = forward
    # the decode step's forward pass alone, in this thread (no batcher, no streaming consumers): a
    # left-padded batch as the batcher makes it, against one row
    from transformers import DynamicCache

    def decode_steps(rows: int, steps: int = 20, length: int = 120):
        model = engine.model
        device = model.device
        cache = DynamicCache(config=model.config)
        ids = torch.randint(100, 1000, (rows, length), device=device)
        mask = torch.ones((rows, length), dtype=torch.long, device=device)
        mask[1:, :rows] = 0  # some left padding, as rows of different lengths have
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
            sync()
            started = time.perf_counter()
            for step in range(steps):
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:] + step + 1,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync()
        return (time.perf_counter() - started) / steps

    for rows in (1, args.chatters):
        decode_steps(rows, steps=3)
        print(f"decode step alone, {rows} row(s): {1000 * decode_steps(rows):.1f} ms")
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        for rows in (1, args.chatters):
            with profile(activities=activities) as profiler:
                decode_steps(rows, steps=10)
            print(f"== profile of 10 decode steps, {rows} row(s)")
            averages = profiler.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
            if torch.cuda.is_available():
                print(averages.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50))
    for detail in ("low", "high"):
        conversation = [{"role": "user", "content": [{"type": "image", "image": images(1)[0]},
                                                     {"type": "text", "text": "Describe the image."}]}]
        started = time.perf_counter()
        for _ in range(3):
            engine.prepare(conversation, validate_generation(image_detail=detail))
        print(f"prepare (processor, on the CPU) at {detail}: {1000 * (time.perf_counter() - started) / 3:.1f} ms")


if __name__ == "__main__":
    main()
