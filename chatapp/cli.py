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

from chatapp.learning import registry as adapters
from chatapp.core import config
from chatapp.feedback import export


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"hub id, local folder, or '{config.DEMO_MODEL_NAME}' "
                        f"(default: $CHATAPP_MODEL, else {config.DEFAULT_MODEL}, falling back to the demo "
                        "model when that cannot be loaded)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], help="bitsandbytes loading (CUDA only)")


def _watch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-after", type=int, default=50,
                        help="background trainer: start a run when this many new labels (votes, preferences, "
                             "compare picks) arrived since the last run (default 50)")
    parser.add_argument("--train-every", type=float,
                        help="background trainer: also start a run every this many seconds when there is new feedback")


def _adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter version to answer with, or 'none' for the base model "
                        "(default: the data dir's active adapter)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=config.DEFAULT_TEMPERATURE,
                        help=f"0 = greedy (default {config.DEFAULT_TEMPERATURE})")
    parser.add_argument("--top-k", type=int, default=config.DEFAULT_TOP_K, help="0 = off")
    parser.add_argument("--top-p", type=float, default=config.DEFAULT_TOP_P, help="1.0 = off")
    parser.add_argument("--max-new-tokens", type=int, default=config.DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--repetition-penalty", type=float, default=config.DEFAULT_REPETITION_PENALTY)
    parser.add_argument("--seed", type=int, help="same seed, same sampled reply")


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
    serve.add_argument("--data-dir", help="database, images and adapters (default: $CHATAPP_DATA_DIR, else ./data)")
    serve.add_argument("--no-trainer", action="store_true",
                       help="do not start the background trainer (run `train --watch` elsewhere, or train by hand)")
    _watch_args(serve)
    serve.add_argument("--trainer-args", default="",
                       help="extra `train` options for the background trainer, e.g. \"--max-steps 50 --prompts 300\"")
    _adapter_args(serve)

    train = sub.add_parser("train", help="turn the collected feedback into a LoRA adapter (gated, versioned)",
                           description="Train a LoRA adapter on the feedback in the store, evaluate it against the "
                                       "live adapter on held-out feedback and a regression probe, and publish it "
                                       "(activated only when the gate promotes it).")
    train.add_argument("--model", help="same choice and offline fallback as `serve`")
    train.add_argument("--method", choices=["auto", "rs", "kto", "dpo", "sft"], default="auto",
                       help="auto (default): rs (rejection sampling with a vote-trained scorer) when there are "
                            "thumbs up and down, else dpo with enough pairs, else kto")
    train.add_argument("--from", dest="start_from", choices=["active", "base"], default="active",
                       help="start from the live adapter (default) or from the base model")
    train.add_argument("--max-steps", type=int, help="cap the optimizer steps of each training phase")
    train.add_argument("--epochs", type=int, default=4, help="epochs of each training phase (default 4)")
    train.add_argument("--lr", type=float, help="learning rate (default per method)")
    train.add_argument("--best-of", type=int, default=8, help="rs: answers sampled per prompt (default 8)")
    train.add_argument("--prompts", type=int, default=1000, help="rs: logged prompts to sample on (default 1000)")
    train.add_argument("--rs-rounds", type=int, default=2,
                       help="rs: rounds of sampling + SFT; each round after the first samples from the "
                            "previous round's candidate (default 2)")
    train.add_argument("--rs-extra-epochs", type=_epoch_list, default=(8, 12), metavar="N[,N]",
                       help="rs: the last round also trains candidates for these epoch counts on the same answers; "
                            "the gate publishes the best that passes (default 8,12; 'none' for one candidate)")
    train.add_argument("--temperature", type=float,
                       help="the sampling temperature users chat at, which rs/sft candidates are trained and the "
                            "gate's sampled check is run for (default: the one the voted answers were sampled at)")
    train.add_argument("--batch-size", type=int, default=8,
                       help="rows per step (default 8; use 1-2 for real-size models on a CPU: "
                            "~1.4 GB of activations per SmolVLM-256M image row)")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="batches per optimizer step (default 1): --batch-size 1 --grad-accum 8 trains like "
                            "a batch of 8 with one row's memory")
    train.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                       help="recompute activations in the backward pass to save memory (default auto: on for "
                            "models of 50 M parameters or more)")
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--lora-mlp", action="store_true", help="also put LoRA on the MLP projections")
    train.add_argument("--min-rows", type=int, default=20, help="no run below this many training rows")
    train.add_argument("--max-user-share", type=float, default=0.3, help="cap on one user's share of the rows")
    train.add_argument("--publish", choices=["gate", "always", "never"], default="gate",
                       help="gate (default): publish, activate only if promoted; always: activate anyway; never")
    train.add_argument("--regression-set", help="JSONL of prompts/images/expected keywords for the gate "
                                                "(models other than the demo model)")
    train.add_argument("--quantize", choices=["4bit"], help="QLoRA (CUDA only)")
    train.add_argument("--threads", type=int, help="torch threads (default: 1 on 2 cores or fewer)")
    train.add_argument("--priority", choices=["idle", "nice"], default="idle",
                       help="idle (default): Linux SCHED_IDLE + nice 10, the run only uses CPU the chat leaves; "
                            "nice: nice 10 only")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-dir", help="default: $CHATAPP_DATA_DIR, else ./data")
    train.add_argument("--watch", action="store_true",
                       help="keep running: train whenever enough new feedback arrived (what `serve` starts)")
    _watch_args(train)
    train.add_argument("--retry-after", type=float, default=300.0,
                       help="--watch: seconds to wait after a failed run before trying again (default 300)")
    train.add_argument("--poll", type=float, default=2.0, help="--watch: seconds between looks at the store")

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
        action.add_argument("--data-dir", help="where the users file lives (default: $CHATAPP_DATA_DIR, else ./data)")

    ask = sub.add_parser("ask", help="ask one question and print the reply",
                         description="Ask one question (optionally about images); prints only the reply.")
    ask.add_argument("question")
    ask.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    ask.add_argument("--system", default="", help="system prompt")
    ask.add_argument("--data-dir", help="where the adapters are (default: $CHATAPP_DATA_DIR, else ./data)")
    _adapter_args(ask)
    _model_args(ask)
    _sampling_args(ask)

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
    adapters.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")


def _load(args):
    from chatapp.serving.engine import load_for_serving

    result = load_for_serving(config.requested_model(args.model), device=args.device, dtype=args.dtype,
                              quantization=args.quantize)
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


def _epoch_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch counts like 8 or 6,8 (or none), got {text!r}") from None


def cmd_train(args) -> int:
    from chatapp.learning.registry import Registry
    from chatapp.feedback.store import Store
    from chatapp.learning.trainer import TrainSettings, train

    data = config.data_dir(args.data_dir)
    settings = TrainSettings(method=args.method, start_from=args.start_from, max_steps=args.max_steps,
                             epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                             gradient_checkpointing=args.gradient_checkpointing, learning_rate=args.lr, best_of=args.best_of, rs_prompts=args.prompts,
                             rs_rounds=args.rs_rounds, rs_extra_epochs=args.rs_extra_epochs,
                             lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_mlp=args.lora_mlp,
                             min_rows=args.min_rows, max_user_share=args.max_user_share, publish=args.publish,
                             regression_set=args.regression_set, quantize=args.quantize, threads=args.threads, priority=args.priority,
                             seed=args.seed, temperature=args.temperature)
    settings.validate()
    if args.watch:
        from chatapp.learning.watcher import WatchSettings, watch

        watch_settings = WatchSettings(train_after=args.train_after, train_every_s=args.train_every,
                                       retry_s=args.retry_after, poll_s=args.poll).validate()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        watch(data, config.requested_model(args.model), settings, watch_settings,
              log=lambda m: print(m, file=sys.stderr, flush=True))
        return 0
    result = train(Store(data), Registry.for_data_dir(data), config.requested_model(args.model), settings,
                   log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"run": result.run_id, "method": result.method, "decision": result.decision,
                      "reason": result.reason, "version": result.version}))
    return 0


def cmd_ask(args) -> int:
    from transformers.utils import logging as hf_logging

    from chatapp.feedback.images import load_image

    hf_logging.disable_progress_bar()
    params = config.validate_generation(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        max_new_tokens=args.max_new_tokens,
                                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    content = [{"type": "image", "image": load_image(p)} for p in args.image]
    content.append({"type": "text", "text": args.question})
    engine = _load(args).engine
    from chatapp.learning.registry import activate_adapter

    activate_adapter(engine, config.data_dir(args.data_dir), args.adapter)
    reply = engine.generate([{"role": "user", "content": content}], params, system_prompt=args.system or None)
    print(reply.text)
    return 0


def cmd_demo_model(args) -> int:
    from chatapp.demo import demo_model

    if args.action == "build":
        cfg = demo_model.BuildConfig(seed=args.seed)
        if args.steps:
            cfg.max_steps = args.steps
        demo_model.build(Path(args.out), cfg, log=lambda m: print(m, file=sys.stderr))
        return 0
    result = demo_model.evaluate(Path(args.model_dir), per_type=args.per_type, seed=args.seed,
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

    handler = {"serve": cmd_serve, "ask": cmd_ask, "users": cmd_users, "export": export.run, "train": cmd_train, "adapters": adapters.run,
               "demo-model": cmd_demo_model}[args.command]
    try:
        return handler(args)
    except (ParameterError, EngineError, ImageError, UserError, RequestError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
