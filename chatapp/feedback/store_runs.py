"""The store's training runs (progress, curve points, results), admins' training requests and the
settings table (a `Store` mixin over `StoreBase`).

Invariants:
- A run is "running" from `create_run` until `finish_run`; a running run whose process is gone is
  marked failed by `fail_stale_runs`, never left running; one whose published version is the live
  one keeps its decision (its work is done and serving), with the death noted as its error.
- At most one training request is open (not yet taken by a run) at a time.
- A setting is one JSON value under a key; the keys are named in `store.py`.
"""
from __future__ import annotations

import json
import os

from chatapp.core.clock import now_iso
from chatapp.feedback.store_base import StoreBase

FINISHED_STATUSES = ("promoted", "rejected", "published", "skipped")  # the runs that did their work
JSON_COLUMNS = ("metrics", "settings", "estimate")


class RunQueries(StoreBase):
    # ------------------------------------------------------------ training runs

    def create_run(self, method: str, settings: dict, parent_version: str | None) -> int:
        with self.write() as db:
            stamp = now_iso()
            return db["training_runs"].insert({
                "status": "running", "method": method, "phase": "starting", "step": 0, "total_steps": 0,
                "settings": json.dumps(settings, sort_keys=True, default=str), "parent_version": parent_version,
                "pid": os.getpid(), "started_at": stamp, "updated_at": stamp}).last_pk

    def update_run(self, run_id: int, points: dict | None = None, **fields) -> None:
        """Progress of a run (phase, step, total_steps, loss, eta_s, ...) and optional curve points."""
        for key in JSON_COLUMNS:
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], sort_keys=True, default=str)
        with self.write() as db:
            stamp = now_iso()
            db["training_runs"].update(run_id, dict(fields, updated_at=stamp))
            if points:
                db["training_points"].insert_all(
                    [{"run_id": run_id, "phase": fields.get("phase") or "", "step": fields.get("step") or 0,
                      "name": name, "value": float(value), "created_at": stamp} for name, value in points.items()])

    def finish_run(self, run_id: int, status: str, **fields) -> None:
        self.update_run(run_id, status=status, finished_at=now_iso(), **fields)

    def run(self, run_id: int) -> dict | None:
        row = self.one("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if row:
            for key in JSON_COLUMNS:
                row[key] = json.loads(row[key]) if row.get(key) else {}
        return row

    def runs(self, limit: int = 50) -> list[dict]:
        return [self.run(row["id"]) for row in self.query("SELECT id FROM training_runs ORDER BY id DESC LIMIT ?",
                                                           [limit])]

    def run_points(self, run_id: int) -> list[dict]:
        return self.query("SELECT phase, step, name, value FROM training_points WHERE run_id = ? ORDER BY rowid",
                          [run_id])

    def fail_stale_runs(self, live_version: str | None = None) -> list[int]:
        """Mark runs whose process is gone (killed, crashed) as failed, except one that published
        `live_version` (the registry's active one), which keeps its decision; returns their ids."""
        stale = []
        for row in self.query("SELECT id, pid, candidate_version, decision FROM training_runs "
                              "WHERE status = 'running'"):
            if not _process_alive(row["pid"]):
                stale.append(row["id"])
                version = row["candidate_version"]
                if version and version == live_version and row["decision"]:
                    self.finish_run(row["id"], row["decision"], phase="done",
                                    error=f"the training process died after activating {version}")
                else:
                    after = f" after publishing {version}, which is not active" if version else ""
                    self.finish_run(row["id"], "failed", phase="failed",
                                    error=f"the training process died (killed or crashed){after}")
        return stale

    def last_run(self, statuses: tuple = FINISHED_STATUSES) -> dict | None:
        """The newest run with one of `statuses` (by default: those that finished their work)."""
        marks = ",".join("?" * len(statuses))
        row = self.one(f"SELECT id FROM training_runs WHERE status IN ({marks}) ORDER BY id DESC LIMIT 1",
                       list(statuses))
        return self.run(row["id"]) if row else None

    def running_run(self) -> dict | None:
        row = self.one("SELECT id FROM training_runs WHERE status = 'running' ORDER BY id DESC LIMIT 1")
        return self.run(row["id"]) if row else None

    def label_times(self, since: str | None) -> list[str]:
        """When each label counted by `labels_since(since)` was given or last changed, oldest first:
        what the background trainer's quiet-period rule reads (learning/watcher.py)."""
        return [row["at"] for row in self.query(
            "SELECT updated_at AS at FROM feedback WHERE vote IS NOT NULL AND updated_at > :since "
            "UNION ALL SELECT updated_at FROM preferences WHERE updated_at > :since "
            "UNION ALL SELECT picked_at FROM comparisons WHERE pick IS NOT NULL AND picked_at > :since "
            "ORDER BY at", {"since": since or ""})]

    # ------------------------------------------------------------ training requests

    def request_training(self, requested_by: str) -> int:
        with self.write() as db:
            open_request = self.open_training_request()
            if open_request:  # one open request is enough
                return open_request["id"]
            return db["train_requests"].insert({"requested_by": requested_by, "created_at": now_iso(),
                                                "run_id": None, "taken_at": None}).last_pk

    def open_training_request(self) -> dict | None:
        return self.one("SELECT * FROM train_requests WHERE run_id IS NULL ORDER BY id LIMIT 1")

    def take_training_request(self, request_id: int, run_id: int | None) -> None:
        with self.write() as db:
            db["train_requests"].update(request_id, {"run_id": run_id or 0, "taken_at": now_iso()})

    # ------------------------------------------------------------ settings

    def setting(self, key: str, default=None):
        row = self.one("SELECT value FROM settings WHERE key = ?", [key])
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value, updated_by: str = "") -> None:
        with self.write() as db:
            db["settings"].upsert({"key": key, "value": json.dumps(value), "updated_by": updated_by,
                                   "updated_at": now_iso()}, pk="key")


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
