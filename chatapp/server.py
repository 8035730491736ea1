"""Start the web app: load the model, build the page, serve it.

Invariants:
- The model is loaded once, before the port opens; a model the user named that cannot be loaded
  stops the start with a clear error (status 2), the default model falls back to the demo one
  with a notice on stderr and in the page.
"""
from __future__ import annotations

import sys

from . import config
from .images import MAX_IMAGE_BYTES


def serve(args) -> int:
    from .engine import load_for_serving
    from .ui import build_app

    data = config.data_dir(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    loaded = load_for_serving(config.requested_model(args.model), device=args.device, dtype=args.dtype,
                              quantization=args.quantize)
    if loaded.notice:
        print(f"notice: {loaded.notice}", file=sys.stderr)
    app = build_app(loaded.engine, loaded.notice)
    print(f"chatapp: serving {loaded.engine.model_id} on http://{args.host}:{args.port} (data in {data})",
          file=sys.stderr)
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, max_file_size=MAX_IMAGE_BYTES, show_error=True)
    return 0
