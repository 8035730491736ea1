"""The one command line: `python -m chatapp serve|ask|train|adapters|users|export|demo-model ...`.

Invariants:
- `ask` writes the reply, and nothing else, to stdout; notices and errors go to stderr.
- A user mistake (bad parameter, unknown model, bad image) exits with status 2 and one readable
  line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from chatapp.learning import adapters_cli
from chatapp.core import config
from chatapp.feedback import export
from chatapp.learning.settings import TrainSettings, WatchSettings, add_flags, from_args


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"hub id, local folder, or '{config.DEMO_MODEL_NAME}' "
                        f"(default: $CHATAPP_MODEL, else {config.DEFAULT_MODEL}, falling back to the demo "
                        "model when that cannot be loaded)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], help="bitsandbytes loading (CUDA only)")
    parser.add_argument("--vision-dtype", choices=["auto", "float32", "bfloat16"], default="auto", help=(
        "the vision encoder's precision; auto: bfloat16 on CPUs with AMX for real-size models (first replies "
        "to images ~2.5x faster, docs/benchmarks.md), else as loaded"))


def _backend_args(parser: argparse.ArgumentParser, what: str = "replies are generated") -> None:
    """Where replies come from: this process (default) or an OpenAI-compatible server (docs/architecture.md)."""
    group = parser.add_argument_group("backend", f"where {what} (README: Scaling out)")
    group.add_argument("--backend", choices=["inprocess", "openai"], default="inprocess",
                       help="inprocess: the model runs here (default); openai: an OpenAI-compatible server "
                            "(vLLM, transformers serve) at --backend-url")
    group.add_argument("--backend-url", help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--backend-model", help="the base model's name on the server (default: what it lists "
                       "first; for transformers serve, the --model folder)")
    group.add_argument("--backend-api-key-env", metavar="VAR", help="environment variable holding the API key")
    group.add_argument("--backend-path-map", action="append", default=[], metavar="LOCAL=REMOTE",
                       help="where the server sees a local folder (adapters, the model); repeatable")
    group.add_argument("--backend-engine", choices=["vllm", "transformers", "generic"],
                       help="the server's kind (default: detected)")
    group.add_argument("--backend-timeout", type=float, help="seconds to wait for the server (default 300)")


def _watch_args(parser: argparse.ArgumentParser) -> None:
    """serve's background trainer: when it trains (the rest of `train`'s flags go in --trainer-args)."""
    add_flags(parser.add_argument_group("background trainer"), WatchSettings, only=("train_after", "train_every_s"))


def _adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter version to answer with, or 'none' for the base model "
                        "(default: the data dir's active adapter)")


def _generation_args(parser: argparse.ArgumentParser) -> None:
    """One flag per generation input of config (`top_k` -> --top-k), validated later by validate_generation."""
    for param in config.SAMPLING_PARAMS:
        parser.add_argument("--" + param.name.replace("_", "-"), type=param.kind, default=param.default,
                            help=param.describe())
    # --system was its name before --system-prompt; scripts still pass it
    parser.add_argument("--system-prompt", "--system", dest=config.SYSTEM_PROMPT.name,
                        default=config.SYSTEM_PROMPT.default, help=config.SYSTEM_PROMPT.describe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatapp",
        description="Chat with an image-text model in the browser, and let users' feedback improve it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="serve the chat page (same as `python app.py`)",
                           description="Serve the chat page.")
    _model_args(serve)
    serve.add_argument("--host", default=config.DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=config.DEFAULT_PORT)
    serve.add_argument("--data-dir", help=f"database, images and adapters (default: {config.DATA_DIR_HELP})")
    serve.add_argument("--no-trainer", action="store_true",
                       help="do not start the background trainer (run `train --watch` elsewhere, or train by hand)")
    _watch_args(serve)
    serve.add_argument("--trainer-args", default="",
                       help="extra `train` options for the background trainer, e.g. \"--max-steps 50 --prompts 300\"")
    _adapter_args(serve)
    _backend_args(serve)
    serve.add_argument("--image-detail", default=config.IMAGE_DETAIL.default,
                       help="what a request's image_detail 'auto' means here: "
                            f"{config.IMAGE_DETAIL.describe()}")

    train = sub.add_parser("train", help="turn the collected feedback into a LoRA adapter (gated, versioned)",
                           description="Train a LoRA adapter on the feedback in the store, evaluate it against the "
                                       "live adapter on held-out feedback and a regression probe, and publish it "
                                       "(activated only when the gate promotes it).")
    train.add_argument("--model", help="same choice and offline fallback as `serve`")
    train.add_argument("--data-dir", help=f"default: {config.DATA_DIR_HELP}")
    add_flags(train.add_argument_group("training"), TrainSettings)
    watching = train.add_argument_group("--watch", "the background trainer's loop (what `serve` starts)")
    watching.add_argument("--watch", action="store_true",
                          help="keep running: train whenever enough new feedback arrived")
    add_flags(watching, WatchSettings)
    _backend_args(train, "the run's answers are sampled (rejection sampling, the gate); scoring and training "
                         "stay here")

    users = sub.add_parser("users", help="manage who may log in (logins are on once a user exists)",
                           description="Manage the users file. Without users the app runs as one local admin "
                                       "and only listens on 127.0.0.1; with users, everyone logs in.")
    users_sub = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = users_sub.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name")
    add.add_argument("--role", choices=["user", "admin"], default="user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (for scripts)")
    add.add_argument("--replace", action="store_true", help="change the password or role of an existing user")
    listing = users_sub.add_parser("list", help="list users and roles")
    remove = users_sub.add_parser("remove", help="remove a user (their conversations stay in the store)")
    remove.add_argument("name")
    for action in (add, listing, remove):
        action.add_argument("--data-dir", help=f"where the users file lives (default: {config.DATA_DIR_HELP})")

    ask = sub.add_parser("ask", help="ask one question and print the reply",
                         description="Ask one question (optionally about images); prints only the reply.")
    ask.add_argument("question")
    ask.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    ask.add_argument("--data-dir", help=f"where the adapters are (default: {config.DATA_DIR_HELP})")
    _adapter_args(ask)
    _model_args(ask)
    _generation_args(ask)

    demo = sub.add_parser("demo-model", help="build or evaluate the offline demo model",
                          description="The built-in demo model: a tiny Idefics3 trained on the shapes world.")
    demo_sub = demo.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = demo_sub.add_parser("build", help="train it from scratch (seeded, about 10 minutes on 2 CPU cores)")
    build.add_argument("--out", default=str(config.DEMO_MODEL_DIR), help="output folder (default: %(default)s)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    evaluate = demo_sub.add_parser("eval", help="accuracy per question type on fresh held-out images")
    evaluate.add_argument("--model-dir", default=str(config.DEMO_MODEL_DIR))
    evaluate.add_argument("--per-type", type=int, default=100, help="questions per type (default 100)")
    evaluate.add_argument("--temperature", type=float, default=0.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print the full result as JSON")
    export.add_parser(sub)
    adapters_cli.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")


def _load(args):
    from chatapp.serving.engine import load_for_serving

    result = load_for_serving(config.requested_model(args.model), device=args.device, dtype=args.dtype,
                              quantization=args.quantize, vision_dtype=args.vision_dtype)
    if result.notice:
        print(f"notice: {result.notice}", file=sys.stderr)
    return result


def cmd_serve(args) -> int:
    from chatapp.web.server import serve

    return serve(args)


def cmd_users(args) -> int:
    import getpass

    from chatapp.web.users import Users

    users = Users(config.data_dir(args.data_dir))
    if args.action == "list":
        for user in users.list():
            print(f"{user.name}\t{user.role}")
        if not users.list():
            print("no users: the app runs as the single local admin, on 127.0.0.1 only", file=sys.stderr)
        return 0
    if args.action == "remove":
        users.remove(args.name)
        print(f"removed {args.name}", file=sys.stderr)
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    user = users.add(args.name, password, args.role, replace=args.replace)
    print(f"added {user.name} ({user.role}); logins are on", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from chatapp.learning.registry import Registry
    from chatapp.feedback.store import Store
    from chatapp.learning.sampler import BackendSpec
    from chatapp.learning.trainer import train

    data = config.data_dir(args.data_dir)
    settings = from_args(TrainSettings, args).validate()
    backend = BackendSpec.from_args(args)
    if args.watch:
        from chatapp.core.errors import EngineError
        from chatapp.learning.watcher import watch

        watch_settings = from_args(WatchSettings, args).validate()
        if backend:
            try:
                backend.check()
            except EngineError as error:  # each run checks again: the server may come up later
                print(f"warning: {error}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        watch(data, config.requested_model(args.model), settings, watch_settings,
              log=lambda m: print(m, file=sys.stderr, flush=True), backend=backend)
        return 0
    if backend:
        backend.check()  # a server that is down fails here, in seconds, before the model loads
    result = train(Store(data), Registry.for_data_dir(data), config.requested_model(args.model), settings,
                   log=lambda m: print(m, file=sys.stderr), backend=backend)
    print(json.dumps({"run": result.run_id, "method": result.method, "decision": result.decision,
                      "reason": result.reason, "version": result.version}))
    return 0


def cmd_ask(args) -> int:
    from transformers.utils import logging as hf_logging

    from chatapp.feedback.images import load_image

    hf_logging.disable_progress_bar()
    params = config.validate_generation(**{param.name: getattr(args, param.name) for param in config.SAMPLING_PARAMS})
    content = [{"type": "image", "image": load_image(p)} for p in args.image]
    content.append({"type": "text", "text": args.question})
    engine = _load(args).engine
    from chatapp.learning.registry import activate_adapter

    activate_adapter(engine, config.data_dir(args.data_dir), args.adapter)
    reply = engine.generate([{"role": "user", "content": content}], params, system_prompt=args.system_prompt or None)
    print(reply.text)
    return 0


def cmd_demo_model(args) -> int:
    from chatapp.demo import demo_model, evaluation

    if args.action == "build":
        cfg = demo_model.BuildConfig(seed=args.seed)
        if args.steps:
            cfg.max_steps = args.steps
        demo_model.build(Path(args.out), cfg, log=lambda m: print(m, file=sys.stderr))
        return 0
    result = evaluation.evaluate(Path(args.model_dir), per_type=args.per_type, seed=args.seed,
                                 temperature=args.temperature)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'question type':<14} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for qtype, r in result["per_type"].items():
        print(f"{qtype:<14} {r['correct']:>8} {r['total']:>6} {r['accuracy']:>9.1%}")
    print(f"{'overall':<14} {'':>8} {result['items']:>6} {result['overall']:>9.1%}")
    shares = ", ".join(f"{s} {v:.0%}" for s, v in result["style_share"].items())
    print(f"styles at temperature {args.temperature}: {shares}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from chatapp.core.config import ParameterError
    from chatapp.core.errors import EngineError, RequestError
    from chatapp.feedback.images import ImageError
    from chatapp.web.users import UserError

    handler = {"serve": cmd_serve, "ask": cmd_ask, "users": cmd_users, "export": export.run, "train": cmd_train, "adapters": adapters_cli.run,
               "demo-model": cmd_demo_model}[args.command]
    try:
        return handler(args)
    except (ParameterError, EngineError, ImageError, UserError, RequestError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
