"""Hot-swap: the serving process follows the registry's active pointer.

Invariants:
- A daemon thread reads the registry's ACTIVE pointer every `interval` seconds (default 0.25 s, so
  a change made by the gate, an admin or a rollback reaches the chat well within 2 seconds) and
  hands a changed version to `Engine.follow()`, which never waits for or interrupts the answer
  being streamed: that one finishes on the adapter it started with, the next one starts on the new.
- A version that fails validation (another base, altered files, missing metadata) is not served:
  the engine keeps answering with what it had, and the reason is logged once and kept in
  `last_error` for the admin page. So is a version that passed validation but that peft could not
  load: the engine tries it once (at the first answer after the switch), falls back to the version
  it had, and records why in `Engine.adapter_errors`, which the next check reports here. The
  follower itself never dies of an error.
- Reading the pointer is the only I/O; the weights are loaded by the first generation that uses
  the new version, under the engine's generation lock. A model-server backend (`openai_backend`)
  loads the version into the server inside `follow()` and switches only once it is there; when it
  cannot, the chat stays on its version and `last_error` says why (a passing failure, such as the
  server being down, is tried again at a later check).
"""
from __future__ import annotations

import sys
import threading
import time

FOLLOW_INTERVAL_S = 0.25
_NOTHING = object()


class ActiveFollower:
    def __init__(self, engine, registry, base_fingerprint: str | None, interval: float = FOLLOW_INTERVAL_S,
                 log=lambda message: print(message, file=sys.stderr)):
        self.engine, self.registry, self.fingerprint = engine, registry, base_fingerprint
        self.interval, self.log = interval, log
        self.last_error: str | None = None
        self.switches: list[dict] = []  # (time, from, to) of each switch made, newest last
        self._refused = _NOTHING  # the version last refused (None is a valid version: the base)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # versions an A/B test names are loaded on demand, validated the same way
        engine.adapter_source = lambda version: registry.validate(version, base_fingerprint)

    def start(self) -> "ActiveFollower":
        self._thread = threading.Thread(target=self._run, name="chatapp-follow-active", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def check(self) -> str | None:
        """One look at the pointer; switch when it changed. Returns the version being served."""
        try:
            wanted = self.registry.active()
        except Exception as error:  # a pointer being replaced or unreadable: look again next time
            self._note(f"could not read the active adapter: {error}")
            return self.engine.adapter
        if wanted == self.engine.adapter:
            self._refused = _NOTHING
            return wanted
        if wanted == self._refused:
            return self.engine.adapter
        try:
            path = self.registry.validate(wanted, self.fingerprint) if wanted else None
        except Exception as error:
            self._refused = wanted
            self._note(f"not serving adapter {wanted}: {error}")
            return self.engine.adapter
        load_error = getattr(self.engine, "adapter_errors", {}).get(wanted)
        if load_error is not None:  # it passed the checks but peft could not load it (see Engine)
            self._refused = wanted
            self._note(f"not serving adapter {wanted}: peft could not load it ({load_error}); still answering "
                       f"with {self.engine.adapter or 'the base model'}")
            return self.engine.adapter
        was = self.engine.adapter
        self.engine.follow(wanted, path)
        if self.engine.adapter != wanted:  # a model server that could not load it (openai_backend): no switch
            reason = (self.engine.adapter_errors.get(wanted) or getattr(self.engine, "load_failures", {}).get(wanted)
                      or "it could not be loaded")
            if wanted in self.engine.adapter_errors:
                self._refused = wanted
            self._note(f"not serving adapter {wanted}: {reason}; still answering with {was or 'the base model'}")
            return was
        self.switches.append({"at": time.time(), "from": was, "to": wanted})
        self.last_error = None
        self.log(f"chatapp: now answering with adapter {wanted or 'none (base model)'} (was {was or 'base'})")
        return wanted

    def _note(self, message: str) -> None:
        if message != self.last_error:
            self.last_error = message
            self.log(f"chatapp: {message}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
