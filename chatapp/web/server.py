"""Start the web app: check who may connect, open the store, load the model, build the page, serve it.

Invariants:
- Without users the server listens on a loopback address only (`users.check_bind`); with users,
  Gradio's login is on for as long as the server runs (`Users.keep_logins_on`), failed logins are
  throttled per (name, address) and per address, hashed off the event loop (`Users.login`), and
  sessions end when their user's entry in the users file changes (`access.SessionGuard`).
- Stored images are served only by `access`'s route, to their owner and admins; the images folder
  is a blocked path for Gradio's file route.
- The model is loaded once, before the port opens; a model the user named that cannot be loaded
  stops the start with a clear error (status 2), the default model falls back to the demo one
  with a notice on stderr and in the page.
- With `--backend openai` replies come from a model server (serving/openai_backend.py; `--model` names
  the local copy of its base, for fingerprints and training); a server that is down at start is a
  warning, not a failed start: each message says so until it is back.
- Unless `--adapter` pins a version, the server follows the registry's active pointer (`hotswap`),
  and unless `--no-trainer`, a background trainer runs beside it in its own process (`watcher`),
  training the same model the server serves (with `--backend openai`, sampling its answers on the same
  model server, with the same --backend-* flags).
"""
from __future__ import annotations

import atexit
import shlex
import sys

from chatapp.core import config
from chatapp.feedback.images import MAX_IMAGE_BYTES
from chatapp.feedback.store import IMAGES_DIR, Store
from chatapp.web.users import Users, check_bind


def serve(args) -> int:
    from chatapp.web import access
    from chatapp.web.chat import ChatService
    from chatapp.serving.engine import load_for_serving
    from chatapp.web.ui import build_app

    data = config.data_dir(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    users = Users(data)
    check_bind(args.host, users)
    if users.enabled:
        users.keep_logins_on()
    store = Store(data)
    if getattr(args, "backend", "inprocess") == "openai":
        loaded = openai_backend(args, data)
    else:
        loaded = load_for_serving(config.requested_model(args.model), device=args.device, dtype=args.dtype,
                                  quantization=args.quantize, vision_dtype=getattr(args, "vision_dtype", None))
    if loaded.notice:
        print(f"notice: {loaded.notice}", file=sys.stderr)
    from chatapp.learning.fingerprint import base_fingerprint
    from chatapp.learning.registry import Registry, activate_adapter
    from chatapp.web.admin import AdminService
    from chatapp.serving.hotswap import ActiveFollower
    from chatapp.learning.watcher import TrainerSupervisor

    engine = loaded.engine
    engine.image_detail = config.IMAGE_DETAIL.check(args.image_detail)  # what a request's "auto" means here
    registry = Registry.for_data_dir(data)
    version = activate_adapter(engine, data, args.adapter)
    print(f"chatapp: answering with adapter {version or 'none (base model)'}", file=sys.stderr)
    follower = None
    fingerprint = base_fingerprint(engine.base_model())
    if args.adapter is None:
        follower = ActiveFollower(engine, registry, fingerprint).start()
    else:  # pinned: versions an A/B test names still load on demand
        engine.adapter_source = lambda v: registry.validate(v, fingerprint)
    supervisor = None
    if not args.no_trainer:
        watch_args = ["--train-after", str(args.train_after)]
        if args.train_every:
            watch_args += ["--train-every", str(args.train_every)]
        if getattr(args, "backend", "inprocess") == "openai":  # its sampling goes to the same server as the chat
            from chatapp.learning.sampler import BackendSpec

            watch_args += BackendSpec.from_args(args).as_flags()
        supervisor = TrainerSupervisor(data, engine.model_id, watch_args + shlex.split(args.trainer_args)).start()
        atexit.register(supervisor.stop)
    service = ChatService(engine, store, registry)
    if hasattr(engine, "keep_loaded"):  # a model server keeps the A/B candidate loaded
        engine.keep_loaded = lambda: {(service.ab.running() or {}).get("candidate")} - {None}
    app = build_app(service, users, loaded.notice, AdminService(service, registry, supervisor, follower))
    logins = "logins on" if users.enabled else "single local user, no login"
    print(f"chatapp: serving {loaded.engine.model_id} on http://{args.host}:{args.port} "
          f"({logins}; data in {data})", file=sys.stderr)
    app.queue(max_size=config.QUEUE_MAX_SIZE).launch(
        server_name=args.host, server_port=args.port, max_file_size=MAX_IMAGE_BYTES,
        show_error=False,  # our handlers raise gr.Error (always shown); Gradio's own errors name its internals
        auth=users.login if users.enabled else None,
        auth_message="Log in with the name and password an admin gave you." if users.enabled else None,
        blocked_paths=[str(data / IMAGES_DIR)], app_kwargs=access.app_kwargs(service, users))
    return 0


def openai_backend(args, data):
    """The `openai` backend (serving/openai_backend.py) from serve's --backend-* flags. `--model` names the
    local copy of the same base (default: the demo model): adapters are fingerprinted and trained on it."""
    from chatapp.core.errors import EngineError
    from chatapp.serving.engine import LoadResult
    from chatapp.serving.openai_backend import OpenAIBackend

    if not args.backend_url:
        raise EngineError("--backend openai needs --backend-url, e.g. http://127.0.0.1:8000/v1")
    backend = OpenAIBackend(args.backend_url, local_model=config.requested_model(args.model) or config.DEMO_MODEL_NAME,
                            backend_model=args.backend_model, api_key_env=args.backend_api_key_env,
                            path_map=args.backend_path_map, stage_dir=data / "backend-models",
                            timeout_s=args.backend_timeout, engine=args.backend_engine)
    try:
        print(f"chatapp: generating with {backend.engine()} at {args.backend_url} (model "
              f"{backend.served_model()})", file=sys.stderr)
    except EngineError as error:  # the chat says so too, per message, until the server is back
        print(f"warning: {error}", file=sys.stderr)
    return LoadResult(backend, None)
