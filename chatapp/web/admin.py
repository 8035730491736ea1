"""Admin actions, shared by the admin tab and the API: training runs and their curves, the adapters
with activate / rollback, feedback statistics, "Train now", export, and the A/B test.

Invariants:
- Every public method takes the calling `User` first and refuses non-admins itself
  (`ChatService.require_admin`); the page hiding the tab is a convenience, not the check.
- Activation, rollback and deactivation go through the registry (atomic pointer); the serving
  process follows the pointer (`hotswap`), so there is one path for the gate, admins and the A/B
  policy alike. Activation checks the version against the served base model's fingerprint. A/B tests are started, stopped and read through the chat service's `ab.ABTest`.
- Reads the store only through its named methods (no SQL here).
- Never imports torch or gradio.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from chatapp.core.clock import compact_stamp
from chatapp.core.errors import RequestError
from chatapp.feedback.store import TRAINER_SETTING
from chatapp.learning import ab
from chatapp.learning.registry import AdapterError
from chatapp.web.chat import ChatService
from chatapp.web.inputs import parse_flag, validate_version
from chatapp.web.users import User

EXPORT_FORMATS = ("kto", "dpo", "sft")


class AdminService:
    def __init__(self, chat: ChatService, registry, supervisor=None, follower=None):
        self.chat, self.store, self.registry, self.ab = chat, chat.store, registry, chat.ab
        self.supervisor, self.follower = supervisor, follower
        self._fingerprint: str | None = None

    def _served_base_fingerprint(self) -> str | None:
        """The fingerprint of the base model this server serves (None without an engine): a version
        trained on another base is refused at activation, not only later by the server."""
        fingerprint = getattr(self.follower, "fingerprint", None) or self._fingerprint
        engine = self.chat.engine
        if fingerprint is None and engine is not None and hasattr(engine, "base_model"):
            from chatapp.learning.fingerprint import base_fingerprint

            fingerprint = self._fingerprint = base_fingerprint(engine.base_model())
        return fingerprint

    def _admin(self, user: User) -> None:
        self.chat.require_admin(user)

    # ------------------------------------------------------------ training

    def status(self, user: User) -> dict:
        """The current (or latest) run with its progress and curve points, and the trainer's state."""
        self._admin(user)
        run = self.store.running_run() or (self.store.runs(limit=1) or [None])[0]
        trainer = self.store.setting(TRAINER_SETTING) or {"state": "not running", "message": "no trainer has reported"}
        if self.supervisor is None and trainer.get("state") != "not running":
            trainer = dict(trainer, message=trainer["message"] + " (trainer started outside this server)")
        elif self.supervisor is not None:
            trainer = dict(trainer, pid=self.supervisor.pid)
        return {"run": _run_summary(run) if run else None,
                "points": self.store.run_points(run["id"]) if run else [],
                "trainer": trainer, "serving": self.chat.serving() or "base",
                "follow_error": getattr(self.follower, "last_error", None)}

    def runs(self, user: User, limit: int = 50) -> list[dict]:
        self._admin(user)
        return [_run_summary(run) for run in self.store.runs(limit=limit)]

    def train_now(self, user: User) -> dict:
        self._admin(user)
        request_id = self.store.request_training(user.name)
        running = self.store.running_run()
        note = f"run {running['id']} is in progress; yours starts after it" if running else "the trainer starts it soon"
        if self.supervisor is None and not self.store.setting(TRAINER_SETTING):
            note = "no background trainer is running: start one with `python -m chatapp train --watch`"
        return {"request": request_id, "message": f"training requested: {note}"}

    # ------------------------------------------------------------ adapters

    def adapters(self, user: User) -> list[dict]:
        self._admin(user)
        return self.registry.list()

    def activate(self, user: User, version) -> dict:
        self._admin(user)
        version = validate_version(version)
        if not version:
            raise RequestError("choose a version to activate")
        try:
            if version.lower() in ("base", "none"):
                self.registry.deactivate(reason=f"deactivated by {user.name}")
            else:
                # an admin may activate a version the gate rejected: that is what the button is for
                self.registry.activate(version, reason=f"activated by {user.name}", force=True,
                                       base_fingerprint=self._served_base_fingerprint())
        except AdapterError as error:
            raise RequestError(str(error)) from None
        return {"active": self.registry.active() or "base"}

    def rollback(self, user: User) -> dict:
        self._admin(user)
        try:
            self.registry.rollback(reason=f"rolled back by {user.name}")
        except AdapterError as error:
            raise RequestError(str(error)) from None
        return {"active": self.registry.active() or "base"}

    # ------------------------------------------------------------ feedback

    def feedback_stats(self, user: User) -> dict:
        """Totals, votes by label, by adapter version and by hour."""
        self._admin(user)
        stats = self.store.feedback_stats()
        stats["by_adapter"] = self.store.votes_by_adapter()
        stats["over_time"] = self.store.votes_by_hour()
        return stats

    def export(self, user: User, fmt: str) -> Path:
        """A zip of the TRL-ready export (`python -m chatapp export`) in a temporary folder."""
        self._admin(user)
        if fmt not in EXPORT_FORMATS:
            raise RequestError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        from chatapp.feedback import export

        stamp = compact_stamp()
        folder = Path(tempfile.mkdtemp(prefix="chatapp-export-"))
        out = folder / f"chatapp-{fmt}-{stamp}"
        export.export(self.store, fmt, out)
        return Path(shutil.make_archive(str(out), "zip", out))

    # ------------------------------------------------------------ A/B

    def ab_status(self, user: User) -> dict:
        self._admin(user)
        return {"test": self.ab.status(self.chat.serving()), "last": self.ab.last()}

    def ab_start(self, user: User, candidate, auto: bool = False, min_votes: int = ab.DEFAULT_MIN_VOTES) -> dict:
        """Pit `candidate` (a version, or 'base') against the live adapter in every compare request."""
        self._admin(user)
        auto = parse_flag(auto, "auto")  # "false" is text, and bool("false") is True
        version = self.chat.resolve_version(validate_version(candidate))
        if version == self.registry.active():
            raise RequestError(f"{ab.label(version)} is the live version already; choose another to test")
        if isinstance(min_votes, bool) or not isinstance(min_votes, int) or not 4 <= min_votes <= 10_000:
            raise RequestError(f"min votes must be a whole number from 4 to 10000, got {min_votes!r}")
        self.ab.start(version, user.name, auto=auto, min_votes=min_votes)
        return self.ab_status(user)

    def ab_stop(self, user: User) -> dict:
        self._admin(user)
        self.ab.stop(user.name)
        return self.ab_status(user)


def _run_summary(run: dict) -> dict:
    metrics = run.get("metrics") or {}
    candidate, live = metrics.get("candidate") or {}, metrics.get("live") or {}
    return {"id": run["id"], "status": run["status"], "method": run["method"], "phase": run["phase"],
            "step": run["step"], "total_steps": run["total_steps"], "loss": run["loss"], "eta_s": run["eta_s"],
            "rows": run["rows"], "decision": run["decision"], "reason": run["reason"] or run.get("error"),
            "version": run["candidate_version"], "parent": run["parent_version"], "started_at": run["started_at"],
            "finished_at": run["finished_at"],
            "auc": candidate.get("auc"), "live_auc": live.get("auc"), "probe": candidate.get("probe_accuracy"),
            "live_probe": live.get("probe_accuracy"),
            # what the run expected to cost before it started (learning/cost.py), in minutes
            "estimate_min": (run.get("estimate") or {}).get("minutes")}
