"""Broken storage (issue 16, part 3), against the real app in its own process: a database held by
another process's exclusive transaction for 40 s, a full disk, a read-only data dir. Each gives the
user one clear message (api.BUSY_MESSAGE, DISK_FULL_MESSAGE, READ_ONLY_MESSAGE), nothing is
half-written, and service resumes when the cause is gone.

How the faults are made (we run as root in a container, so chmod stops nothing):
- The lock: a second process opens the database with Python's sqlite3 and holds `BEGIN EXCLUSIVE`
  for 40 s. The database is in WAL mode, where readers go on reading; writers wait up to the
  store's BUSY_TIMEOUT_S (30 s), all queued writers on one deadline, then get the busy message.
- The full disk: the data dir is a 16 MiB tmpfs (`mount -t tmpfs -o size=16m`), filled by a filler
  file until the kernel answers ENOSPC; deleting the filler is the cause going away.
- The read-only data dir: a read-only bind mount over it (`mount --bind` + `remount,bind,ro`),
  made writable again with `remount,bind,rw`. Linux refuses to make a mount read-only while files
  are open for writing through it, so a bind mount over the running server's dir refuses only new
  files (stored images, a new SQLite connection): writes through SQLite's open descriptors still
  land, as the test says. A server started on a read-only dir refuses to start, with the reason.
Without the right to mount (an unprivileged CI runner) the disk and read-only cases skip, saying so.

The three cases run concurrently: the disk and read-only tests take the `held_database` fixture,
which starts the 40 s lock and its requests first, and the lock test collects them last."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

import fault_figures
from chatapp.demo import shapes
from chatapp.feedback.store import BUSY_TIMEOUT_S, DB_NAME
from chatapp.web.api import BUSY_MESSAGE, DISK_FULL_MESSAGE, READ_ONLY_MESSAGE
from support import start_server, stop_server, subprocess_env

pytestmark = pytest.mark.slow
HOLD_S = 40
TMPFS_SIZE = "16m"
GREEDY = dict(temperature=0, max_new_tokens=8)
ROW_TABLES = ("conversations", "messages", "message_images", "images", "generations", "feedback", "feedback_events",
              "comparisons")
# Slack over the documented timeout for a refused write: the request's queueing and the reply's trip
SLACK_S = 15

HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
print("released", flush=True)
"""


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def attempt(call, **kwargs) -> SimpleNamespace:
    """Run one API call: its result or error message, and how long it took."""
    from gradio_client.exceptions import AppError

    start = time.perf_counter()
    try:
        result, error = call(**kwargs), None
    except AppError as exc:
        result, error = None, str(exc)
    return SimpleNamespace(result=result, error=error, seconds=time.perf_counter() - start,
                           finished_at=time.monotonic())


def connect(db_path: Path):
    """A connection closed at the end of the block (an open one would keep its mount busy)."""
    return contextlib.closing(sqlite3.connect(db_path))


def rows(db_path: Path) -> dict:
    with connect(db_path) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ROW_TABLES}


def assert_whole(data: Path) -> None:
    """Nothing half-written: the database is sound, every conversation has a message, every answer its
    generation record, every image row its file and every image file its row, and no temp files remain."""
    with connect(data / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("SELECT count(*) FROM conversations c WHERE NOT EXISTS "
                          "(SELECT 1 FROM messages m WHERE m.conversation_id = c.id)").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM messages m WHERE role = 'assistant' AND NOT EXISTS "
                          "(SELECT 1 FROM generations g WHERE g.message_id = m.id)").fetchone() == (0,)
        stored = {row[0] for row in db.execute("SELECT path FROM images")}
    files = {str(p.relative_to(data)) for p in (data / "images").rglob("*") if p.is_file()}
    assert files == stored, (files, stored)  # also: no .tmp-* file left behind


def image_file(folder: Path, name: str, x: int) -> Path:
    path = folder / f"{name}.png"
    shapes.render(shapes.Scene((shapes.Shape("circle", "green", x, 30, 12),))).save(path)
    return path


def chat(c, text, conversation_id="", image=None):
    from gradio_client import handle_file

    return c.predict(conversation_id=str(conversation_id), text=text,
                     image=handle_file(str(image)) if image else None, api_name="/chat", **GREEDY)


def vote(c, message_id, value, comment=""):
    return c.predict(message_id=message_id, vote=value, reasons=[], comment=comment, api_name="/vote")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def mount_or_skip(*args: str) -> None:
    try:
        mount(*args)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        pytest.skip(f"cannot mount here ({getattr(error, 'stderr', '') or error}): the disk and read-only cases "
                    f"need CAP_SYS_ADMIN")


# ---------------------------------------------------------------- the 40 s lock, started first

@pytest.fixture(scope="module")
def held_database(tmp_path_factory):
    data = tmp_path_factory.mktemp("locked")
    proc, url = start_server(data)
    try:
        c = client(url)
        first = chat(c, "What color is the circle?", image=image_file(data.parent, "locked-image", 30))
        vote(c, first["message_id"], "up")
        before = rows(data / DB_NAME)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data / DB_NAME), str(HOLD_S)],
                                  stdout=subprocess.PIPE, text=True, env=subprocess_env())
        assert holder.stdout.readline().strip() == "held"
        held_at = time.monotonic()
        conversation_id, message_id = first["conversation_id"], first["message_id"]
        writes = {
            "new chat": lambda: chat(c, "How many shapes are there?"),
            "follow-up": lambda: chat(c, "And its shape?", conversation_id),
            "regenerate": lambda: c.predict(message_id=message_id, api_name="/regenerate", **GREEDY),
            "vote": lambda: vote(c, message_id, "down"),
            "vote with comment": lambda: vote(c, message_id, "up", "fine"),
        }
        reads = {
            "conversations": lambda: c.predict(api_name="/conversations"),
            "conversation": lambda: c.predict(conversation_id=conversation_id, api_name="/conversation"),
        }
        pool = ThreadPoolExecutor(len(writes) + len(reads))
        futures = {name: pool.submit(attempt, call) for name, call in {**writes, **reads}.items()}
        yield SimpleNamespace(data=data, url=url, client=c, holder=holder, held_at=held_at, before=before,
                              futures=futures, writes=writes, reads=reads, conversation_id=conversation_id,
                              message_id=message_id)
        pool.shutdown(wait=True)
        holder.wait(timeout=HOLD_S + 30)
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- a full disk (while the lock is held)

@pytest.fixture
def tmpfs(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    mount_or_skip("-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder))
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the kernel says the disk is full (unbuffered: every byte is asked for)."""
    filler, chunk = folder / "filler.bin", b"\0" * (1 << 16)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, chunk)
        with pytest.raises(OSError, match="No space left"):
            os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_gives_a_clear_error_and_service_resumes_when_space_is_back(held_database, tmpfs, tmp_path):
    data = tmpfs / "data"
    data.mkdir()
    proc, url = start_server(data, log_path=tmp_path / "server.log")
    try:
        c = client(url)
        first = chat(c, "What color is the circle?", image=image_file(tmp_path, "first", 30))
        filler = fill(tmpfs)
        before = rows(data / DB_NAME)
        new_image = image_file(tmp_path, "second", 34)
        refused = attempt(chat, c=c, text="Is there a circle?", image=new_image)
        assert refused.error == DISK_FULL_MESSAGE, refused
        # SQLite may still find room in its WAL file for small writes: each either lands or is refused
        # with the same message, and what was acknowledged is stored
        voted = attempt(vote, c=c, message_id=first["message_id"], value="down")
        follow_up = attempt(chat, c=c, text="And its shape?", conversation_id=first["conversation_id"])
        for outcome in (voted, follow_up):
            assert outcome.error in (None, DISK_FULL_MESSAGE), outcome
        after = rows(data / DB_NAME)
        assert after["images"] == before["images"] and after["message_images"] == before["message_images"]
        assert len(after["conversations"]) == len(before["conversations"])  # the refused chat left none behind
        assert_whole(data)

        filler.unlink()  # the cause is gone
        again = chat(c, "Is there a circle?", image=new_image)
        assert again["done"] and again["message_id"]
        assert vote(c, again["message_id"], "up")["vote"] == "up"
        stored_vote = "SELECT vote FROM feedback WHERE message_id = ?"
        with connect(data / DB_NAME) as db:
            assert db.execute(stored_vote, [again["message_id"]]).fetchone() == ("up",)
            if voted.error is None:
                assert db.execute(stored_vote, [first["message_id"]]).fetchone() == ("down",)
            if follow_up.error is None:
                assert db.execute("SELECT count(*) FROM messages WHERE id = ?",
                                  [follow_up.result["message_id"]]).fetchone() == (1,)
        assert_whole(data)
        landed = sum(o.error is None for o in (voted, follow_up))
        fault_figures.record("storage", disk_full_refused=3 - landed, disk_full_landed=landed)
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- a read-only data dir (while the lock is held)

def remount(folder: Path, mode: str) -> None:
    mount("-o", f"remount,bind,{mode}", str(folder))


def test_a_read_only_data_dir_gives_a_clear_error_and_service_resumes(held_database, tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    data.mkdir()
    try:
        proc, url = start_server(data, log_path=log)
        try:
            c = client(url)
            first = chat(c, "What color is the circle?", image=image_file(tmp_path, "first", 30))
            # over the running server's dir: its open SQLite files stay writable, new files are refused
            mount_or_skip("--bind", str(data), str(data))
            remount(data, "ro")
            before = rows(data / DB_NAME)
            new_image = image_file(tmp_path, "second", 34)
            refused = attempt(chat, c=c, text="Is there a circle?", image=new_image)
            assert refused.error == READ_ONLY_MESSAGE, refused
            voted = attempt(vote, c=c, message_id=first["message_id"], value="down")
            assert voted.error in (None, READ_ONLY_MESSAGE), voted
            assert [row["id"] for row in c.predict(api_name="/conversations")] == [first["conversation_id"]]
            after = rows(data / DB_NAME)
            assert after["images"] == before["images"] and len(after["conversations"]) == len(before["conversations"])
            assert_whole(data)

            remount(data, "rw")  # the cause is gone
            again = chat(c, "Is there a circle?", image=new_image)
            # every worker thread writes again, also one that opened its connection while the dir was read-only
            for value in ("up", "down") * 6:
                assert vote(c, again["message_id"], value)["vote"] == value
            assert_whole(data)
        finally:
            stop_server(proc)

        # a server started on a read-only data dir refuses to start, saying why, and starts once it is writable
        remount(data, "ro")
        with pytest.raises(RuntimeError, match="cannot be written"):
            start_server(data, log_path=log)
        assert "Read-only file system" in log.read_text() and "Traceback" not in log.read_text()
        remount(data, "rw")
        proc, url = start_server(data, log_path=log)
        try:
            c = client(url)
            assert len(c.predict(api_name="/conversations")) == 2
            assert vote(c, again["message_id"], "up")["vote"] == "up"
        finally:
            stop_server(proc)
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False, capture_output=True)
    fault_figures.record("storage", read_only_refused=1 + (voted.error is not None), read_only_start="refused")


# ---------------------------------------------------------------- the 40 s lock, collected last

def test_a_database_held_40_s_by_another_process_gives_busy_and_service_resumes(held_database):
    held = held_database
    outcomes = {name: future.result(timeout=HOLD_S + 120) for name, future in held.futures.items()}
    released_at = held.held_at + HOLD_S
    for name in held.reads:  # WAL: readers are not blocked by the writer
        assert outcomes[name].error is None and outcomes[name].seconds < BUSY_TIMEOUT_S, (name, outcomes[name])
    for name in held.writes:
        outcome = outcomes[name]
        assert outcome.error == BUSY_MESSAGE, (name, outcome)
        # refused within the documented timeout (all queued writers share one deadline), before the release
        assert outcome.seconds <= BUSY_TIMEOUT_S + SLACK_S and outcome.finished_at < released_at, (name, outcome)
    assert held.holder.wait(timeout=HOLD_S + 60) == 0
    assert held.holder.stdout.read().strip() == "released"
    assert rows(held.data / DB_NAME) == held.before  # nothing half-written
    assert_whole(held.data)

    c = held.client  # service resumes
    answer = chat(c, "How many shapes are there?")
    assert vote(c, answer["message_id"], "down")["vote"] == "down"
    with connect(held.data / DB_NAME) as db:
        assert db.execute("SELECT vote FROM feedback WHERE message_id = ?", [answer["message_id"]]).fetchone() == ("down",)
    waits = [outcomes[name].seconds for name in held.writes]
    fault_figures.record("storage", lock_s=HOLD_S, busy=len(waits), busy_after_s=round(max(waits), 1),
                         reads_during_lock=len(held.reads))
