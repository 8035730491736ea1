"""The store's connection, its write transactions and its WAL journal: the part of `Store` every
query module (store_conversations, store_labels, store_runs) builds on.

Invariants:
- WAL mode and a busy timeout; each thread has its own connection; every unit of work runs in
  one `BEGIN IMMEDIATE` transaction taken under a process-wide lock (`write()`), so writes from
  the web threads are serialised here and writes from other processes wait for the file lock.
  A crash at any point leaves every committed unit of work and none of the uncommitted ones.
- A unit of work waits at most BUSY_TIMEOUT_S in all for its turn, behind this process's other
  writers and another process's transaction together (the lock and SQLite's busy handler share one
  deadline), then raises `StoreBusy`; queued writers never add up their waits.
- A connection opened while the database file could not be written (SQLite then opens it read-only,
  silently) is replaced at the next unit of work, so writes resume once the data dir is writable again.
- The schema comes only from `migrations.py`; opening a store applies the migrations it lacks.
- Opening a store removes the temp files that image writes which died left in `images/`, and
  fails at once with `StorageError` (a clear message, nothing written) when the data dir cannot be
  written: read-only, full, or not ours.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from sqlite_utils import Database

from chatapp.core import config
from chatapp.core.files import TMP_PREFIX
from chatapp.feedback.migrations import migrations

DB_NAME = "chatapp.db"
IMAGES_DIR = "images"
BUSY_TIMEOUT_S = 30


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


def sweep_stale_temp_files(folder: Path, older_than_s: float = config.STALE_TEMP_FILE_S) -> list[Path]:
    """Remove the `.tmp-*` files a write that died (a kill, a power cut) left under `folder`; a
    younger one may belong to a write in progress in another process, and is left. Returns what went."""
    removed, cutoff = [], time.time() - older_than_s
    for path in folder.rglob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    return removed


class StorageError(PermissionError):
    """The data dir cannot be written (read-only, full, not ours): the message names it and why."""


def check_writable(folder: Path) -> None:
    """Create and remove a small file in `folder`, or raise StorageError saying why that failed."""
    probe = folder / f"{TMP_PREFIX}probe-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as error:
        raise StorageError(f"the data dir {folder} cannot be written ({error.strerror or error}): chatapp keeps "
                           f"its database there; make it writable (or free space) and start again") from None


def _primary_code(error: sqlite3.Error) -> int:
    """SQLite's primary result code (SQLITE_BUSY, SQLITE_FULL, ...) of an error, extended or not."""
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF


class StoreBusy(sqlite3.OperationalError):
    """A write waited BUSY_TIMEOUT_S for the database (another process's transaction held it): nothing
    was written. The message keeps SQLite's own words ("database is locked")."""


_WRITE_LOCKS: dict[Path, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock_for(path: Path) -> threading.RLock:
    """One lock per database file in this process, shared by every Store opened on it."""
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(path, threading.RLock())


class StoreBase:
    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir).resolve()
        check_writable(self.data_dir)
        (self.data_dir / IMAGES_DIR).mkdir(exist_ok=True)
        sweep_stale_temp_files(self.data_dir / IMAGES_DIR)
        self.path = self.data_dir / DB_NAME
        self._local = threading.local()
        self._write_lock = _write_lock_for(self.path)
        with self.write() as db:  # the migration lock: two processes starting at once apply them once
            migrations.apply(db)

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
            self._local.read_only = not os.access(self.path, os.W_OK)
        return db

    @contextlib.contextmanager
    def write(self):
        """One unit of work: everything inside commits together or not at all."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        if not self._write_lock.acquire(timeout=BUSY_TIMEOUT_S):
            raise StoreBusy(f"database is locked: this process's other writes held it for {BUSY_TIMEOUT_S} s")
        try:
            current = getattr(self._local, "db", None)
            if current is not None and self._local.read_only and not current.conn.in_transaction:
                self.close()  # opened read-only: a new connection can write if the file can be written now
            db = self.db
            if db.conn.in_transaction:  # nested unit of work: part of the outer one
                with db.atomic():
                    yield db
                return
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            db.conn.execute(f"PRAGMA busy_timeout = {left_ms}")
            try:
                db.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                if _primary_code(error) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise StoreBusy(f"database is locked: waited {BUSY_TIMEOUT_S} s for another process's write") from error
                raise
            finally:
                db.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
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
        finally:
            self._write_lock.release()

    def query(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, params))

    def one(self, sql: str, params=()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def count(self, sql: str, params=()) -> int:
        """The `n` of a `SELECT count(*) AS n ...` query."""
        return self.one(sql, params)["n"]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
