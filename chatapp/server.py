"""Start the web app: check who may connect, open the store, load the model, build the page, serve it.

Invariants:
- Without users the server listens on a loopback address only (`users.check_bind`); with users,
  Gradio's login is on and failed logins are throttled per user name (`Users.login`).
- The model is loaded once, before the port opens; a model the user named that cannot be loaded
  stops the start with a clear error (status 2), the default model falls back to the demo one
  with a notice on stderr and in the page.
"""
from __future__ import annotations

import sys

from . import config
from .images import MAX_IMAGE_BYTES
from .store import IMAGES_DIR, Store
from .users import Users, check_bind


def serve(args) -> int:
    from .chat import ChatService
    from .engine import load_for_serving
    from .ui import build_app

    data = config.data_dir(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    users = Users(data)
    check_bind(args.host, users)
    store = Store(data)
    loaded = load_for_serving(config.requested_model(args.model), device=args.device, dtype=args.dtype,
                              quantization=args.quantize)
    if loaded.notice:
        print(f"notice: {loaded.notice}", file=sys.stderr)
    from .__main__ import activate_adapter

    version = activate_adapter(loaded.engine, data, args.adapter)
    print(f"chatapp: answering with adapter {version or 'none (base model)'}", file=sys.stderr)
    app = build_app(ChatService(loaded.engine, store), users, loaded.notice)
    logins = "logins on" if users.enabled else "single local user, no login"
    print(f"chatapp: serving {loaded.engine.model_id} on http://{args.host}:{args.port} "
          f"({logins}; data in {data})", file=sys.stderr)
    app.queue(max_size=config.QUEUE_MAX_SIZE).launch(
        server_name=args.host, server_port=args.port, max_file_size=MAX_IMAGE_BYTES, show_error=True,
        auth=users.login if users.enabled else None,
        auth_message="Log in with the name and password an admin gave you." if users.enabled else None,
        allowed_paths=[str(data / IMAGES_DIR)])
    return 0
