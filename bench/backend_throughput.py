"""Aggregate tokens/s of N concurrent chatters, in-process engine vs an OpenAI-compatible server, in one run.

    python bench/backend_throughput.py --model FOLDER [--backend-url http://127.0.0.1:8000/v1]
        [--chatters 32] [--tokens 64] [--image] [--adapter vN --data-dir DIR]

Each chatter sends one conversation (a text question, or with --image a 64x64 shapes image and
"Describe the image.") and streams a sampled reply of exactly --tokens tokens where the engine allows
fixing the length (in-process: min_new_tokens; vLLM: min_tokens; else the reply's own length). All
chatters start together; the figure is the sum of reply tokens / the wall time from the first request
to the last reply. The in-process backend generates one reply at a time (Engine's lock), the server
batches them: the ratio server / in-process is what scaling out buys on this machine. With --adapter,
the server's replies come from that published version (loaded into the server first), and the bench
prints the adapter tag the replies carry.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatapp.core import config  # noqa: E402
from chatapp.demo import shapes  # noqa: E402


def conversation(index: int, image: bool) -> list[dict]:
    if not image:
        return [{"role": "user", "content": [{"type": "text", "text": f"Tell me a story about the number {index}."}]}]
    picture = shapes.render(shapes.random_scene(random.Random(index)))
    return [{"role": "user", "content": [{"type": "image", "image": picture},
                                         {"type": "text", "text": "Describe the image."}]}]


def run(backend, chatters: int, tokens: int, image: bool, overrides: dict, adapter) -> dict:
    params = config.validate_generation(temperature=1.0, max_new_tokens=tokens, image_detail="low")
    replies: list = [None] * chatters
    errors: list[str] = []
    barrier = threading.Barrier(chatters)

    def chat(i: int) -> None:
        barrier.wait()
        try:
            kwargs = {"generate_overrides": overrides}
            if adapter is not None:
                kwargs["adapter"] = adapter
            replies[i] = backend.generate(conversation(i, image), params, **kwargs)
        except Exception as error:  # reported, not fatal: the figure counts replies that came back
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(chatters)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [r for r in replies if r is not None]
    total = sum(r.meta.reply_tokens for r in done)
    return {"replies": len(done), "errors": errors[:3], "reply_tokens": total, "wall_s": round(wall, 2),
            "tokens_per_s": round(total / wall, 1) if wall else None,
            "adapters": sorted({str(r.meta.adapter) for r in done})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder (served by the server too)")
    parser.add_argument("--backend-url", help="an OpenAI-compatible server serving --model (omit: in-process only)")
    parser.add_argument("--chatters", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--image", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--adapter", help="a published version to answer from on the server")
    parser.add_argument("--data-dir", help="where --adapter is published")
    parser.add_argument("--skip-inprocess", action="store_true")
    args = parser.parse_args()
    results = {}
    if args.backend_url:
        from chatapp.serving.openai_backend import OpenAIBackend

        server = OpenAIBackend(args.backend_url, local_model=args.model,
                               stage_dir=Path(args.data_dir or ROOT / "data") / "backend-models")
        if args.adapter:
            from chatapp.learning.registry import Registry

            registry = Registry.for_data_dir(args.data_dir)
            server.adapter_source = lambda version: registry.validate(version, None)
        overrides = {"min_tokens": args.tokens, "ignore_eos": True} if server.engine() == "vllm" else {}
        results["server"] = dict(run(server, args.chatters, args.tokens, args.image, overrides, args.adapter),
                                 engine=server.engine())
    if not args.skip_inprocess:
        from chatapp.serving.engine import Engine

        engine = Engine.load(args.model, device=args.device)
        results["inprocess"] = run(engine, args.chatters, args.tokens, args.image,
                                   {"min_new_tokens": args.tokens}, None)
    if "server" in results and "inprocess" in results and results["inprocess"]["tokens_per_s"]:
        results["server_over_inprocess"] = round(results["server"]["tokens_per_s"] / results["inprocess"]["tokens_per_s"], 2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
