"""The feedback store: one SQLite file (sqlite-utils) under the data dir, plus the images folder.

Invariants:
- WAL mode and a busy timeout; each thread has its own connection; every unit of work runs in
  one `BEGIN IMMEDIATE` transaction taken under a process-wide lock (`Store.write()`), so writes
  from the web threads are serialised here and writes from other processes wait for the file lock.
  A crash at any point leaves every committed unit of work and none of the uncommitted ones.
- The schema comes only from `migrations.py`; opening a store applies the migrations it lacks.
- Images are re-encoded PNG files named by their sha256, written atomically (temp file + rename)
  before the row that points at them is committed; an image file is never rewritten.
- From any rated assistant message, `context()` rebuilds the exact prompt (every message on its
  path with its images, the system prompt) and the answer.
- This module knows nothing about users' rights: callers (the chat service) check them.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from chatapp.feedback.migrations import migrations

DB_NAME = "chatapp.db"
IMAGES_DIR = "images"
BUSY_TIMEOUT_S = 30
VOTES = ("up", "down")
PICKS = ("a", "b", "tie", "both_bad")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh file to WAL needs an exclusive lock, and SQLite does not wait for it through the
    # busy handler: two processes creating the store at once would see "database is locked". Retry.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_WRITE_LOCKS: dict[Path, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock_for(path: Path) -> threading.RLock:
    """One lock per database file in this process, shared by every Store opened on it."""
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(path, threading.RLock())


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path  # absolute


class Store:
    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / IMAGES_DIR).mkdir(exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self._local = threading.local()
        self._write_lock = _write_lock_for(self.path)
        with self.write() as db:  # the migration lock: two processes starting at once apply them once
            migrations.apply(db)

    # ------------------------------------------------------------ connections and transactions

    @property
    def db(self) -> Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across process crashes
            conn.execute("PRAGMA foreign_keys = ON")
            db = self._local.db = Database(conn, execute_plugins=False)
        return db

    @contextlib.contextmanager
    def write(self):
        """One unit of work: everything inside commits together or not at all."""
        with self._write_lock:
            db = self.db
            if db.conn.in_transaction:  # nested unit of work: part of the outer one
                with db.atomic():
                    yield db
                return
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            else:
                try:
                    db.conn.execute("COMMIT")
                except BaseException:
                    # a failed COMMIT (disk full, deferred constraint) leaves the transaction open
                    db.rollback()
                    raise

    def query(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, params))

    def one(self, sql: str, params=()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ------------------------------------------------------------ users

    def ensure_user(self, name: str, role: str = "user") -> int:
        """The user's id, creating the row on first sight; the role follows the users file."""
        with self.write() as db:
            row = self.one("SELECT id, role FROM users WHERE name = ?", [name])
            if row is None:
                return db["users"].insert({"name": name, "role": role, "created_at": now()}).last_pk
            if row["role"] != role:
                db["users"].update(row["id"], {"role": role})
            return row["id"]

    def user(self, user_id: int) -> dict | None:
        return self.one("SELECT * FROM users WHERE id = ?", [user_id])

    # ------------------------------------------------------------ images

    def save_image(self, image) -> StoredImage:
        """Store a checked RGB PIL image (see images.load_image) once, as PNG without metadata."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        relative = Path(IMAGES_DIR) / sha[:2] / f"{sha}.png"
        target = self.data_dir / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        with self.write() as db:
            db["images"].insert({"sha256": sha, "path": str(relative), "width": image.width,
                                 "height": image.height, "bytes": len(data), "created_at": now()}, ignore=True)
        return StoredImage(sha, target)

    def image_path(self, sha: str) -> Path:
        row = self.one("SELECT path FROM images WHERE sha256 = ?", [sha])
        if row is None:
            raise KeyError(sha)
        return self.data_dir / row["path"]

    # ------------------------------------------------------------ conversations and messages

    def create_conversation(self, user_id: int, title: str, system_prompt: str = "") -> int:
        with self.write() as db:
            stamp = now()
            return db["conversations"].insert({"user_id": user_id, "title": title[:80], "leaf_id": None,
                                               "system_prompt": system_prompt or "",
                                               "created_at": stamp, "updated_at": stamp}).last_pk

    def conversation(self, conversation_id: int) -> dict | None:
        return self.one("SELECT * FROM conversations WHERE id = ?", [conversation_id])

    def conversations(self, user_id: int, limit: int = 200) -> list[dict]:
        return self.query("SELECT id, title, created_at, updated_at FROM conversations WHERE user_id = ? "
                          "ORDER BY updated_at DESC, id DESC LIMIT ?", [user_id, limit])

    def add_message(self, conversation_id: int, parent_id: int | None, role: str, text: str, *,
                    kind: str = "chat", image_shas: list[str] = (), generation: dict | None = None) -> int:
        """Append one message (with its images, or with the generation record of an answer) and make it
        the conversation's current leaf, in one transaction."""
        with self.write() as db:
            stamp = now()
            message_id = db["messages"].insert({"conversation_id": conversation_id, "parent_id": parent_id,
                                                "role": role, "text": text, "kind": kind,
                                                "created_at": stamp}).last_pk
            for position, sha in enumerate(image_shas):
                db["message_images"].insert({"message_id": message_id, "position": position, "sha256": sha})
            if generation is not None:
                record = dict(generation, message_id=message_id)
                record["params"] = json.dumps(record.get("params") or {}, sort_keys=True)
                db["generations"].insert(record)
            db["conversations"].update(conversation_id, {"leaf_id": message_id, "updated_at": stamp})
            return message_id

    def set_leaf(self, conversation_id: int, message_id: int) -> None:
        with self.write() as db:
            db["conversations"].update(conversation_id, {"leaf_id": message_id, "updated_at": now()})

    def message(self, message_id: int) -> dict | None:
        return self.one("SELECT * FROM messages WHERE id = ?", [message_id])

    def message_images(self, message_id: int) -> list[Path]:
        rows = self.query("SELECT i.path FROM message_images m JOIN images i ON i.sha256 = m.sha256 "
                          "WHERE m.message_id = ? ORDER BY m.position", [message_id])
        return [self.data_dir / row["path"] for row in rows]

    def generation(self, message_id: int) -> dict | None:
        row = self.one("SELECT * FROM generations WHERE message_id = ?", [message_id])
        if row is not None:
            row["params"] = json.loads(row["params"] or "{}")
        return row

    def children(self, parent_id: int | None, conversation_id: int) -> list[dict]:
        if parent_id is None:
            return self.query("SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS NULL ORDER BY id",
                              [conversation_id])
        return self.query("SELECT * FROM messages WHERE parent_id = ? ORDER BY id", [parent_id])

    def siblings(self, message_id: int) -> list[dict]:
        """The message and every other answer (or edit) to the same parent, oldest first."""
        message = self.message(message_id)
        if message is None:
            return []
        return self.children(message["parent_id"], message["conversation_id"])

    def path_to(self, message_id: int) -> list[dict]:
        """The messages from the conversation's first one down to `message_id`, in order."""
        rows = self.query("""
            WITH RECURSIVE up(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM messages WHERE id = ?
                UNION ALL
                SELECT m.id, m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.parent_id)
            SELECT messages.* FROM up JOIN messages ON messages.id = up.id ORDER BY up.depth DESC""", [message_id])
        return rows

    def context(self, message_id: int) -> dict:
        """Everything a trainer needs about one answer: the prompt messages up to it (content as parts,
        images as absolute paths, in the order the user sent them), the system prompt and the answer."""
        path = self.path_to(message_id)
        if not path:
            raise KeyError(message_id)
        answer = path[-1]
        prompt = []
        for message in path[:-1]:
            parts = [{"type": "image", "path": str(p)} for p in self.message_images(message["id"])]
            if message["text"]:
                parts.append({"type": "text", "text": message["text"]})
            prompt.append({"role": message["role"], "content": parts})
        generation = self.generation(message_id) or {}
        return {"message_id": message_id, "conversation_id": answer["conversation_id"], "prompt": prompt,
                "answer": answer["text"], "role": answer["role"],
                "system_prompt": generation.get("system_prompt") or "", "generation": generation}

    # ------------------------------------------------------------ feedback

    def set_vote(self, user_id: int, message_id: int, vote: str | None, reasons: list[str] = (),
                 comment: str = "") -> None:
        """Record (or change, or with vote None remove) the user's current vote; the history keeps every change."""
        if vote is not None and vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES} or None")
        reasons_json = json.dumps(list(reasons))
        with self.write() as db:
            stamp = now()
            db["feedback_events"].insert({"user_id": user_id, "message_id": message_id, "vote": vote or "none",
                                          "reasons": reasons_json, "comment": comment, "created_at": stamp})
            current = self.one("SELECT id FROM feedback WHERE user_id = ? AND message_id = ?", [user_id, message_id])
            if vote is None:
                if current:
                    db["feedback"].delete(current["id"])
            elif current:
                db["feedback"].update(current["id"], {"vote": vote, "reasons": reasons_json, "comment": comment,
                                                      "updated_at": stamp})
            else:
                db["feedback"].insert({"user_id": user_id, "message_id": message_id, "vote": vote,
                                       "reasons": reasons_json, "comment": comment,
                                       "created_at": stamp, "updated_at": stamp})

    def vote(self, user_id: int, message_id: int) -> dict | None:
        row = self.one("SELECT vote, reasons, comment FROM feedback WHERE user_id = ? AND message_id = ?",
                       [user_id, message_id])
        if row:
            row["reasons"] = json.loads(row["reasons"] or "[]")
        return row

    def prefer(self, user_id: int, chosen_id: int, source: str = "siblings") -> None:
        """The user prefers `chosen_id` over its siblings (one preference per user and prompt)."""
        chosen = self.message(chosen_id)
        with self.write() as db:
            stamp = now()
            current = self.one("SELECT id FROM preferences WHERE user_id = ? AND parent_id = ?",
                               [user_id, chosen["parent_id"]])
            if current:
                db["preferences"].update(current["id"], {"chosen_id": chosen_id, "source": source, "updated_at": stamp})
            else:
                db["preferences"].insert({"user_id": user_id, "parent_id": chosen["parent_id"], "chosen_id": chosen_id,
                                          "source": source, "created_at": stamp, "updated_at": stamp})

    def preferred(self, user_id: int, parent_id: int) -> int | None:
        row = self.one("SELECT chosen_id FROM preferences WHERE user_id = ? AND parent_id = ?", [user_id, parent_id])
        return row["chosen_id"] if row else None

    def create_comparison(self, user_id: int, parent_id: int, a_id: int, b_id: int) -> int:
        with self.write() as db:
            return db["comparisons"].insert({"user_id": user_id, "parent_id": parent_id, "a_id": a_id, "b_id": b_id,
                                             "pick": None, "created_at": now(), "picked_at": None}).last_pk

    def comparison(self, comparison_id: int) -> dict | None:
        return self.one("SELECT * FROM comparisons WHERE id = ?", [comparison_id])

    def pick(self, comparison_id: int, pick: str) -> None:
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS}")
        with self.write() as db:
            db["comparisons"].update(comparison_id, {"pick": pick, "picked_at": now()})

    # ------------------------------------------------------------ reading feedback for export and statistics

    def rated_messages(self) -> list[dict]:
        """Every current vote with its user and message."""
        return self.query("SELECT f.*, u.name AS user_name FROM feedback f JOIN users u ON u.id = f.user_id "
                          "ORDER BY f.id")

    def preference_pairs(self) -> list[dict]:
        """(chosen, rejected) answer pairs: each preferred sibling against each other assistant sibling,
        and each decided comparison (a or b)."""
        pairs = []
        for pref in self.query("SELECT p.*, u.name AS user_name FROM preferences p "
                               "JOIN users u ON u.id = p.user_id ORDER BY p.id"):
            for sibling in self.query("SELECT id FROM messages WHERE parent_id = ? AND role = 'assistant' "
                                      "AND id != ? ORDER BY id", [pref["parent_id"], pref["chosen_id"]]):
                pairs.append({"user_id": pref["user_id"], "user_name": pref["user_name"], "source": "siblings",
                              "chosen_id": pref["chosen_id"], "rejected_id": sibling["id"],
                              "created_at": pref["updated_at"]})
        for comp in self.query("SELECT c.*, u.name AS user_name FROM comparisons c JOIN users u ON u.id = c.user_id "
                               "WHERE c.pick IN ('a', 'b') ORDER BY c.id"):
            chosen, rejected = (comp["a_id"], comp["b_id"]) if comp["pick"] == "a" else (comp["b_id"], comp["a_id"])
            pairs.append({"user_id": comp["user_id"], "user_name": comp["user_name"], "source": "compare",
                          "chosen_id": chosen, "rejected_id": rejected, "created_at": comp["picked_at"]})
        return pairs

    def feedback_stats(self) -> dict:
        votes = {row["vote"]: row["n"] for row in self.query("SELECT vote, count(*) AS n FROM feedback GROUP BY vote")}
        return {"votes": votes,
                "preferences": self.one("SELECT count(*) AS n FROM preferences")["n"],
                "comparisons": self.one("SELECT count(*) AS n FROM comparisons WHERE pick IS NOT NULL")["n"],
                "messages": self.one("SELECT count(*) AS n FROM messages")["n"],
                "conversations": self.one("SELECT count(*) AS n FROM conversations")["n"]}

    # ------------------------------------------------------------ training runs

    def create_run(self, method: str, settings: dict, parent_version: str | None) -> int:
        with self.write() as db:
            stamp = now()
            return db["training_runs"].insert({
                "status": "running", "method": method, "phase": "starting", "step": 0, "total_steps": 0,
                "settings": json.dumps(settings, sort_keys=True, default=str), "parent_version": parent_version,
                "pid": os.getpid(), "started_at": stamp, "updated_at": stamp}).last_pk

    def update_run(self, run_id: int, points: dict | None = None, **fields) -> None:
        """Progress of a run (phase, step, total_steps, loss, eta_s, ...) and optional curve points."""
        for key in ("metrics", "settings"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], sort_keys=True, default=str)
        with self.write() as db:
            stamp = now()
            db["training_runs"].update(run_id, dict(fields, updated_at=stamp))
            if points:
                db["training_points"].insert_all(
                    [{"run_id": run_id, "phase": fields.get("phase") or "", "step": fields.get("step") or 0,
                      "name": name, "value": float(value), "created_at": stamp} for name, value in points.items()])

    def finish_run(self, run_id: int, status: str, **fields) -> None:
        self.update_run(run_id, status=status, finished_at=now(), **fields)

    def run(self, run_id: int) -> dict | None:
        row = self.one("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if row:
            for key in ("metrics", "settings"):
                row[key] = json.loads(row[key]) if row[key] else {}
        return row

    def runs(self, limit: int = 50) -> list[dict]:
        return [self.run(row["id"]) for row in self.query("SELECT id FROM training_runs ORDER BY id DESC LIMIT ?",
                                                           [limit])]

    def run_points(self, run_id: int) -> list[dict]:
        return self.query("SELECT phase, step, name, value FROM training_points WHERE run_id = ? ORDER BY rowid",
                          [run_id])

    def fail_stale_runs(self) -> list[int]:
        """Mark runs whose process is gone (killed, crashed) as failed; returns their ids."""
        stale = []
        for row in self.query("SELECT id, pid FROM training_runs WHERE status = 'running'"):
            if not _process_alive(row["pid"]):
                stale.append(row["id"])
                self.finish_run(row["id"], "failed", error="the training process died (killed or crashed)",
                                phase="failed")
        return stale


    # ------------------------------------------------------------ the live loop

    def labels_since(self, since: str | None) -> int:
        """Labels (current votes, preferred siblings, decided comparisons) given or changed after `since`."""
        since = since or ""
        return (self.one("SELECT count(*) AS n FROM feedback WHERE vote IS NOT NULL AND updated_at > ?", [since])["n"]
                + self.one("SELECT count(*) AS n FROM preferences WHERE updated_at > ?", [since])["n"]
                + self.one("SELECT count(*) AS n FROM comparisons WHERE pick IS NOT NULL AND picked_at > ?",
                           [since])["n"])

    def last_run(self, statuses: tuple = ("promoted", "rejected", "published", "skipped")) -> dict | None:
        """The newest run with one of `statuses` (by default: those that finished their work)."""
        marks = ",".join("?" * len(statuses))
        row = self.one(f"SELECT id FROM training_runs WHERE status IN ({marks}) ORDER BY id DESC LIMIT 1",
                       list(statuses))
        return self.run(row["id"]) if row else None

    def running_run(self) -> dict | None:
        row = self.one("SELECT id FROM training_runs WHERE status = 'running' ORDER BY id DESC LIMIT 1")
        return self.run(row["id"]) if row else None

    def request_training(self, requested_by: str) -> int:
        with self.write() as db:
            open_request = self.one("SELECT id FROM train_requests WHERE run_id IS NULL ORDER BY id LIMIT 1")
            if open_request:  # one open request is enough
                return open_request["id"]
            return db["train_requests"].insert({"requested_by": requested_by, "created_at": now(),
                                                "run_id": None, "taken_at": None}).last_pk

    def open_training_request(self) -> dict | None:
        return self.one("SELECT * FROM train_requests WHERE run_id IS NULL ORDER BY id LIMIT 1")

    def take_training_request(self, request_id: int, run_id: int | None) -> None:
        with self.write() as db:
            db["train_requests"].update(request_id, {"run_id": run_id or 0, "taken_at": now()})

    def setting(self, key: str, default=None):
        row = self.one("SELECT value FROM settings WHERE key = ?", [key])
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value, updated_by: str = "") -> None:
        with self.write() as db:
            db["settings"].upsert({"key": key, "value": json.dumps(value), "updated_by": updated_by,
                                   "updated_at": now()}, pk="key")

    def ab_picks(self, version_a: str | None, version_b: str | None, since: str | None = None) -> list[dict]:
        """Decided comparisons (picked after `since`) whose two answers came from `version_a` and
        `version_b` (either side; None = the base): each with `winner` = the version picked, or
        "tie" / "both_bad"."""
        rows = self.query(
            "SELECT c.id, c.pick, ga.adapter_version AS a_version, gb.adapter_version AS b_version, c.picked_at "
            "FROM comparisons c JOIN generations ga ON ga.message_id = c.a_id "
            "JOIN generations gb ON gb.message_id = c.b_id WHERE c.pick IS NOT NULL AND c.picked_at >= ? "
            "ORDER BY c.id", [since or ""])
        wanted = {version_a, version_b}
        picks = []
        for row in rows:
            if {row["a_version"], row["b_version"]} != wanted or row["a_version"] == row["b_version"]:
                continue
            winner = row["a_version"] if row["pick"] == "a" else row["b_version"] if row["pick"] == "b" else row["pick"]
            picks.append(dict(row, winner=winner))
        return picks


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
