"""A real OpenAI-compatible model server for the `openai` backend's tests: `transformers serve` in its
own process (the choice is explained in docs/architecture.md, "Backends").

Invariants:
- `BackendServer.start()` (or `ready()` after `start(wait=False)`) returns once the server answers
  /health, or raises with its log.
- With CHATAPP_TEST_BACKEND_URL set, that server is used instead and nothing is started; tests that
  must kill and restart the server skip then (`managed` is False).
- The server loads models by the request's `model` field (local folders), so one server serves the
  demo model, a copy of it and every adapter version staged for it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support import free_port, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
BACKEND_URL_ENV = "CHATAPP_TEST_BACKEND_URL"
START_TIMEOUT_S = 180


class BackendServer:
    def __init__(self, log: Path):
        self.log = log
        self.given = os.environ.get(BACKEND_URL_ENV)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def managed(self) -> bool:
        return not self.given

    @property
    def url(self) -> str:
        return self.given or f"http://127.0.0.1:{self.port}/v1"

    def start(self, wait: bool = True) -> "BackendServer":
        """Start the server; with wait=False return at once (`ready()` waits), so the app can start beside it."""
        if not self.managed:
            return self
        # the console script of the transformers installed beside this python (`transformers serve`)
        command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
                   "serve", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                   "--model-timeout", "3600", "--log-level", "warning"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1"), stdout=log,
                                         stderr=subprocess.STDOUT)
        return self.ready() if wait else self

    def ready(self) -> "BackendServer":
        if not self.managed:
            return self
        health = self.url[:-3] + "/health"
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            try:
                urllib.request.urlopen(health, timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("the model server did not start: " + self.log.read_text()[-3000:])

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
