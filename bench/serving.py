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

Many chatters (issue 13 item 3): N chatters (--chatters, 8) each send their own image at
detail=low with "Describe the image." at the same moment, through `Engine.stream` from N threads
(the engine's own concurrency, not the web server's), replies fixed at --chatter-tokens (64)
tokens; once with batching (the decode steps of all replies in one forward pass,
serving/batching.py) and once with `engine.batching = False` (one reply at a time, the others
queue: the plain library call). One chatter alone, on the batched path, is the baseline. TTFT is
measured by the caller, from calling `stream` to its first token. Prints the aggregate tokens/s of
N chatters / one chatter (goal >= 3) and their p95 TTFT / one chatter's (goal <= 2), for both paths.

    python bench/serving.py --sections chatters   # that section only (its results are printed, not saved)

The same through the real server, as issue 13's acceptance asks (section "server",
bench/server_chatters.py): the app serving this model at detail=low, N `gradio_client` clients
streaming /chat at the same moment, against one client alone.

Decode against the memory-bandwidth bound (issue 13): one chatter, a short text prompt, greedy, a reply
fixed at --decode-tokens (128) tokens; its decode tokens/s (the reply's own `tokens_per_s`, first token
excluded; median of 3), and the plain `model.generate` on the same prompt, over the bound = this machine's read bandwidth (the best of 5 sums of a 256 MiB
float32 tensor, the way the issue measured it) / the weight bytes one decode step reads (the text model's
parameters and the full output head; the input embedding counts one row, the vision tower none).
Goal: at least 0.5.

Vision precision (serving/precision.py): the model above is loaded as the app loads it (`--vision-dtype
auto`: on a CPU with AMX its vision encoder runs in bfloat16); the same first turn at detail=high and
low, new pictures each time, on the plain path, against the model loaded with its vision encoder in
float32 (the plain library call). Prints TTFT and the ratio for each detail.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatapp.core import config  # noqa: E402
from chatapp.core.config import validate_generation  # noqa: E402
from chatapp.demo import shapes  # noqa: E402
from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random  # noqa: E402
from chatapp.serving.cache import ServingCache  # noqa: E402
from chatapp.serving.engine import Engine  # noqa: E402
from bench.server_chatters import together  # noqa: E402  (a namespace package under ROOT, on sys.path)

CACHE = ROOT / "bench" / "cache"
GOAL = 0.1  # follow-up TTFT / first-turn TTFT with the cache (issue 13)
DETAIL_GOAL = 0.15  # first-turn TTFT at detail=low / at detail=high (issue 13)
CHATTERS_THROUGHPUT_GOAL = 3.0  # aggregate tokens/s of N chatters / one chatter (issue 13)
CHATTERS_TTFT_GOAL = 2.0  # p95 TTFT of N chatters / one chatter's (issue 13)
DECODE_GOAL = 0.5  # one chatter's decode tokens/s / the memory-bandwidth bound (issue 13)
SECTIONS = ("follow-ups", "chatters", "server", "decode", "vision")


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


def vision_precision(engine: Engine, tokens: int, repeats: int) -> tuple[dict, list[str]]:
    """First-turn TTFT at each detail, the engine's vision dtype against float32, new pictures each time."""
    from chatapp.serving.precision import vision_dtype_of

    plain = Engine.load(engine.model_id, vision_dtype="float32")
    rng = random.Random(7)
    used = vision_dtype_of(engine.model)
    figures: dict = {"vision_dtype": used}
    for detail in ("high", "low"):
        times = {}
        for name, each in (("float32", plain), (used, engine)):
            kept, each.cache = each.cache, None
            times[name] = statistics.median(first_turn_at(each, shapes.render(shapes.random_scene(rng)), tokens,
                                                          detail)[0] for _ in range(repeats))
            each.cache = kept
        figures[detail] = dict(times, ratio=times[used] / times["float32"])
        print(f"  vision encoder, detail={detail}: float32 {times['float32']:.2f} s, {used} {times[used]:.2f} s "
              f"({figures[detail]['ratio']:.2f}x)", flush=True)
    plain.generation_thread.shutdown()  # its OpenMP team goes with its thread (precision.one_torch_thread)
    table = ["| vision encoder (first turn, plain path) | TTFT at high (17 frames) | TTFT at low (1 frame) |",
             "|---|---|---|",
             f"| float32 (the library's) | {figures['high']['float32']:.2f} s | {figures['low']['float32']:.2f} s |",
             f"| {used} (`--vision-dtype auto`, what the app runs) | {figures['high'][used]:.2f} s "
             f"| {figures['low'][used]:.2f} s |",
             f"| ratio | {figures['high']['ratio']:.2f} | {figures['low']['ratio']:.2f} |"]
    return figures, table


def p95(values: list[float]) -> float:
    """The nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def chatters_at_once(engine: Engine, images: list, tokens: int) -> tuple[float, list[float], float | None]:
    """Each image's chatter asks at the same moment, each in its own thread; (aggregate tokens/s from
    the first request to the last token, TTFTs, decode tokens/s while every chatter was decoding:
    None where that window is empty, as when replies run one at a time)."""
    params = validate_generation(temperature=0, max_new_tokens=tokens, image_detail="low")
    results, errors = [None] * len(images), []
    start = threading.Barrier(len(images))

    def chatter(index: int) -> None:
        conversation = [{"role": "user", "content": [{"type": "image", "image": images[index]},
                                                     {"type": "text", "text": "Describe the image."}]}]
        try:
            start.wait()
            asked, times, count = time.perf_counter(), [], 0
            for event in engine.stream(conversation, params, generate_overrides={"min_new_tokens": tokens}):
                times += event.token_times
                count = event.tokens
            results[index] = (asked, times, time.perf_counter(), count)
        except Exception as error:  # reported below: a benchmark with a failed chatter measures nothing
            errors.append(error)

    together(chatter, len(images), errors)
    assert all(count == tokens for *_, count in results), "every reply must have exactly --chatter-tokens tokens"
    span = max(end for _, _, end, _ in results) - min(asked for asked, *_ in results)
    # decode alone: from the last chatter's first token (every one decoding) to the first chatter's last
    start, end = max(times[0] for _, times, *_ in results), min(times[-1] for _, times, *_ in results)
    inside = sum(start < t <= end for _, times, *_ in results for t in times)
    decode = inside / (end - start) if end > start and inside else None
    return len(images) * tokens / span, [times[0] - asked for asked, times, *_ in results], decode


def many_chatters(engine: Engine, chatters: int, tokens: int, repeats: int) -> tuple[dict, list[str]]:
    """The many-chatters section: figures and table lines."""
    scene_seed = iter(range(1000, 100000))  # a new picture for every request: no chatter reuses image features

    def new_images(n):
        return [shapes.render(shapes.random_scene(random.Random(next(scene_seed)))) for _ in range(n)]

    engine.batching = True
    # the first image request pays one-time setup (the vision tower's kernels; on a GPU, their loading):
    # an unmeasured one takes it, or the one chatter's TTFT, the ratios' denominator, is inflated
    chatters_at_once(engine, new_images(1), tokens)
    single = [chatters_at_once(engine, new_images(1), tokens) for _ in range(repeats)]
    single_rate = statistics.median(rate for rate, *_ in single)
    single_ttft = p95([ttft for _, ttfts, _ in single for ttft in ttfts])
    single_decode = statistics.median(decode for *_, decode in single)
    print(f"  one chatter: {single_rate:.1f} tokens/s, p95 TTFT {single_ttft:.2f} s, decode {single_decode:.1f} "
          "tokens/s", flush=True)
    figures = {"chatters": chatters, "tokens": tokens, "repeats": repeats,
               "one": {"tokens_per_s": single_rate, "p95_ttft_s": single_ttft, "decode_tokens_per_s": single_decode,
                       "runs": single}}
    table = [f"| {chatters} chatters at once | aggregate tokens/s | / one chatter (goal >= {CHATTERS_THROUGHPUT_GOAL}) "
             f"| p95 TTFT | / one chatter (goal <= {CHATTERS_TTFT_GOAL}) | decode tokens/s, all decoding "
             "| / one chatter |", "|---|---|---|---|---|---|---|",
             f"| one chatter | {single_rate:.1f} | 1 | {single_ttft:.2f} s | 1 | {single_decode:.1f} | 1 |"]
    for path, batching in (("batched", True), ("one at a time", False)):
        engine.batching = batching
        engine.batcher.largest_batch = engine.batcher.largest_prefill = 0
        runs = [chatters_at_once(engine, new_images(chatters), tokens) for _ in range(repeats)]
        rate = statistics.median(r for r, *_ in runs)
        ttft = p95([t for _, ttfts, _ in runs for t in ttfts])
        decodes = [d for *_, d in runs if d is not None]
        decode = statistics.median(decodes) if decodes else None
        figures[path] = {"tokens_per_s": rate, "p95_ttft_s": ttft, "throughput_ratio": rate / single_rate,
                         "ttft_ratio": ttft / single_ttft, "decode_tokens_per_s": decode,
                         "decode_ratio": decode / single_decode if decode else None,
                         "largest_batch": engine.batcher.largest_batch,
                         "largest_prefill": engine.batcher.largest_prefill, "runs": runs}
        decoded = f"{decode:.1f} tokens/s ({decode / single_decode:.2f}x)" if decode else "never all at once"
        print(f"  {chatters} chatters, {path}: {rate:.1f} tokens/s in all ({rate / single_rate:.2f}x one chatter), "
              f"p95 TTFT {ttft:.2f} s ({ttft / single_ttft:.2f}x); decode with all decoding: {decoded}; "
              f"largest batch {engine.batcher.largest_batch}, most prompts in one prefill "
              f"{engine.batcher.largest_prefill}", flush=True)
        table.append(f"| {path} | {rate:.1f} | {rate / single_rate:.2f} | {ttft:.2f} s | {ttft / single_ttft:.2f} | "
                     + (f"{decode:.1f} | {decode / single_decode:.2f} |" if decode else "- | - |"))
    engine.batching = True
    batched = figures["batched"]
    print(f"{chatters} chatters / one, batched: aggregate tokens/s {batched['throughput_ratio']:.2f}x "
          f"(goal >= {CHATTERS_THROUGHPUT_GOAL}: "
          f"{'met' if batched['throughput_ratio'] >= CHATTERS_THROUGHPUT_GOAL else 'NOT met'}), "
          f"p95 TTFT {batched['ttft_ratio']:.2f}x (goal <= {CHATTERS_TTFT_GOAL}: "
          f"{'met' if batched['ttft_ratio'] <= CHATTERS_TTFT_GOAL else 'NOT met'})")
    return figures, table


def read_bandwidth() -> float:
    """Bytes per second a sum over a 256 MiB float32 tensor reads (the best of 5)."""
    import torch

    values = torch.ones(64 * 2**20)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        values.sum()
        best = min(best, time.perf_counter() - started)
    return values.numel() * values.element_size() / best


def decode_step_bytes(model) -> int:
    """Weight bytes one decode step reads: every text-model parameter and the whole output head, one row
    of the input embedding, nothing of the vision tower or its connector."""
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    total = head.numel() * head.element_size()
    for name, parameter in model.named_parameters():
        if parameter is head or "vision" in name or "connector" in name:
            continue
        if parameter is embedding:
            total += parameter.shape[1] * parameter.element_size()
            continue
        total += parameter.numel() * parameter.element_size()
    return total


def plain_decode_rate(engine: Engine, prompt: list[dict], tokens: int) -> float:
    """Decode tokens/s of the plain library call on the same prompt: `model.generate`, greedy, timed for
    1 and for 1 + `tokens` new tokens; the difference is the decode of `tokens` tokens."""
    import torch

    text = engine.processor.apply_chat_template(prompt, add_generation_prompt=True)
    inputs = engine.processor(text=[text], return_tensors="pt")

    def timed(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return time.perf_counter() - started

    return tokens / (min(timed(1 + tokens) for _ in range(3)) - min(timed(1) for _ in range(3)))


def decode_against_bandwidth(engine: Engine, tokens: int) -> tuple[dict, list[str]]:
    """The decode section: figures and table lines."""
    params = validate_generation(temperature=0, max_new_tokens=tokens)
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]
    rates = [engine.generate(prompt, params, generate_overrides={"min_new_tokens": tokens}).meta.tokens_per_s
             for _ in range(3)]
    # The plain call and the bandwidth sum run on the engine's generation thread, as a script's would on
    # its only thread: a second thread running parallel torch ops slows every later decode of the process
    # (precision.one_torch_thread), and would make whichever side runs after it look slow.
    on_thread = engine.generation_thread.submit
    rate, plain = statistics.median(rates), on_thread(plain_decode_rate, engine, prompt, tokens).result()
    bandwidth, step_bytes = on_thread(read_bandwidth).result(), decode_step_bytes(engine.model)
    bound = bandwidth / step_bytes
    figures = {"tokens": tokens, "decode_tokens_per_s": rate, "runs": rates, "read_bandwidth_gb_s": bandwidth / 1e9,
               "weight_bytes_per_token": step_bytes, "bound_tokens_per_s": bound, "ratio": rate / bound,
               "plain_generate_tokens_per_s": plain, "plain_ratio": plain / bound,
               "goal": f"decode / bound >= {DECODE_GOAL}"}
    print(f"decode: {rate:.1f} tokens/s (runs {', '.join(f'{r:.1f}' for r in rates)}); bound {bound:.1f} tokens/s = "
          f"{bandwidth / 1e9:.1f} GB/s / {step_bytes / 1e9:.3f} GB per token; decode / bound {rate / bound:.2f} "
          f"(goal >= {DECODE_GOAL}: {'met' if rate / bound >= DECODE_GOAL else 'NOT met'}); plain model.generate "
          f"{plain:.1f} tokens/s ({plain / bound:.2f} of the bound; engine / plain {rate / plain:.2f})", flush=True)
    table = ["| one chatter | decode tokens/s | read bandwidth | weight bytes per token | bound | decode / bound |",
             "|---|---|---|---|---|---|",
             f"| {tokens}-token greedy reply | {rate:.1f} | {bandwidth / 1e9:.1f} GB/s | {step_bytes / 1e9:.3f} GB "
             f"| {bound:.1f} tokens/s | {rate / bound:.2f} (goal >= {DECODE_GOAL}) |",
             f"| plain `model.generate`, same prompt | {plain:.1f} | | | | {plain / bound:.2f} |"]
    return figures, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per reply")
    parser.add_argument("--repeats", type=int, default=1, help="conversations per path (~80 s each on 2 CPU cores)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (results are saved when all ran)")
    parser.add_argument("--chatters", type=int, default=8, help="concurrent chatters in the many-chatters section")
    parser.add_argument("--chatter-tokens", type=int, default=64, help="tokens per reply in the many-chatters section")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens of the reply in the decode section")
    parser.add_argument("--vision-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="the model's vision encoder, as `serve --vision-dtype` (the vision section compares "
                             "it with float32)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: {', '.join(sorted(sections - set(SECTIONS)))} is none of {', '.join(SECTIONS)}")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    engine = Engine.load(str(build_smolvlm_sized_random(CACHE / "smolvlm-256m-random")), vision_dtype=args.vision_dtype)
    image = shapes.render(shapes.random_scene(random.Random(0)))
    from chatapp.serving.precision import vision_dtype_of

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolVLM-sized random model, vision encoder "
          f"in {vision_dtype_of(engine.model)}, "
          f"{args.tokens}-token replies, {args.repeats} repeat(s), medians", flush=True)
    # the process's first generation pays one-time setup: a short text reply takes it, not the first measured turn
    engine.generate([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                    validate_generation(temperature=0, max_new_tokens=2))
    chatters = None
    if "chatters" in sections:
        print(f"many chatters: {args.chatters} at once vs one, detail=low, {args.chatter_tokens}-token replies, "
              f"{args.repeats} repeat(s)", flush=True)
        chatters = many_chatters(engine, args.chatters, args.chatter_tokens, args.repeats)
    server = None
    if "server" in sections:
        from bench.server_chatters import through_server  # a namespace package under ROOT, on sys.path

        print(f"many chatters through the server: {args.chatters} gradio_client clients at once vs one, detail=low, "
              f"replies up to {args.chatter_tokens} tokens, {args.repeats} repeat(s)", flush=True)
        server = through_server(CACHE / "smolvlm-256m-random", args.chatters, args.chatter_tokens, args.repeats,
                                (CHATTERS_THROUGHPUT_GOAL, CHATTERS_TTFT_GOAL), p95)
    decode = decode_against_bandwidth(engine, args.decode_tokens) if "decode" in sections else None
    vision = vision_precision(engine, args.tokens, args.repeats) if "vision" in sections else None
    if sections != set(SECTIONS):
        print("(a partial run: results printed, not saved)")
        return
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
    figures["many_chatters"], figures["server_chatters"], figures["decode"] = chatters[0], server[0], decode[0]
    figures["vision"] = vision[0]
    table += ["", *chatters[1], "", *server[1], "", *decode[1], "", *vision[1]]
    save_results("serving", figures, table,
                 f"SmolVLM-sized random model (vision encoder in {vision[0]['vision_dtype']}), one 17-frame image, "
                 f"{args.tokens}-token greedy replies, medians of "
                 f"{args.repeats}. Goal: follow-up / first turn <= {GOAL} with the cache. Replies identical with "
                 f"and without the cache: {identical}.")


if __name__ == "__main__":
    main()
