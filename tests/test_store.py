"""The feedback store (chatapp/store.py) on real SQLite files, no mocks.

What these tests prove:
- Concurrency: one Store shared by 32 threads x 300 units of work (messages, votes, vote changes and
  removals) loses and duplicates nothing: every message is there once, in its parent chain; each
  (user, message) has at most one current vote and it is the last one set; feedback_events holds
  exactly one row per set_vote call. Four processes writing to the same file at once, started while
  this process holds the write lock, wait on the busy timeout instead of failing, and lose nothing.
- Crash safety: a writer process killed with SIGKILL (at random moments, and while a unit of work is
  open) leaves a database that passes integrity and foreign key checks, holds every unit the child
  reported as committed, holds no part of any uncommitted unit, and takes new writes.
- Migrations: a database made with only the first migration and filled with rows of the old shape is
  upgraded on opening (new column and index), its rows stay readable through the Store; reopening
  applies nothing again; two processes opening a fresh store at once both succeed and the
  migrations are applied exactly once.
- Functions: context()/path_to() follow parent links through branches and keep images in the order
  sent; siblings(); set_vote change and remove; a later prefer() replaces the earlier one;
  preference_pairs() from siblings and comparisons; save_image() stores identical images once, as
  PNG without metadata; a unit of work rolls back as a whole.
- A failed COMMIT rolls the unit back and leaves the connection usable
  (test_a_failed_commit_does_not_swallow_later_writes; found by this file, fixed in the store).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sqlite_utils import Database

from chatapp.feedback.images import load_image
from chatapp.feedback.migrations import migrations
from chatapp.feedback.store import DB_NAME, Store
from support import ROOT, subprocess_env

FIRST_MIGRATION = "m001_initial"
SECOND_MIGRATION = "m002_feedback_index_and_conversation_system_prompt"
ALL_MIGRATIONS = [m.name for m in migrations.pending(Database(memory=True))]  # later ones included


def square(color, size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def count(store: Store, sql: str, params=()) -> int:
    return store.one(sql, params)["n"]


def applied_migrations(db) -> list[str]:
    return [row["name"] for row in db.query("SELECT name FROM _sqlite_migrations ORDER BY id")]


def png_chunks(data: bytes) -> list[str]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return chunks


def start_child(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_files(paths: list[Path], procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, "children did not get ready"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------- concurrency

THREADS, UNITS = 32, 300


@pytest.mark.slow
def test_32_threads_x_300_units_lose_or_duplicate_nothing(tmp_path):
    store = Store(tmp_path / "data")
    owner = store.ensure_user("owner")
    shared = store.add_message(store.create_conversation(owner, "shared"), None, "user", "everyone rates this")
    twin = store.ensure_user("twin")  # threads 30 and 31 vote as the same user, on the same shared message
    users = [store.ensure_user(f"user{t}") for t in range(THREADS - 2)] + [twin, twin]
    conversations = [store.create_conversation(users[t], f"thread {t}") for t in range(THREADS)]
    start = threading.Barrier(THREADS)
    done, errors = {}, []

    def work(t: int) -> None:
        try:
            rng = random.Random(t)
            messages, votes, parent = [], [], None
            start.wait(timeout=60)
            for i in range(UNITS):
                if i % 2 == 0:
                    parent = store.add_message(conversations[t], parent, ("user", "assistant")[len(messages) % 2],
                                               f"t{t} #{i}")
                    messages.append(parent)
                else:
                    # a third of the votes go to the message every thread rates; the others to one of the
                    # thread's three latest messages, so one message is voted, changed and un-voted
                    target = shared if i % 3 == 0 else rng.choice(messages[-3:])
                    vote, reasons = rng.choice(["up", "down", None]), [f"t{t} #{i}"]
                    store.set_vote(users[t], target, vote, reasons=reasons)
                    votes.append((target, vote, reasons))
            done[t] = messages, votes
        except BaseException as error:  # reported below, with the thread number
            errors.append((t, repr(error)))
            start.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sorted(done) == list(range(THREADS))

    # Messages: each thread's 150 are there once, in order, as one parent chain ending at the leaf.
    assert count(store, "SELECT count(*) AS n FROM messages") == 1 + THREADS * UNITS // 2
    for t, (messages, _) in done.items():
        rows = store.query("SELECT id, text FROM messages WHERE conversation_id = ? ORDER BY id", [conversations[t]])
        assert [row["id"] for row in rows] == messages
        assert [row["text"] for row in rows] == [f"t{t} #{i}" for i in range(0, UNITS, 2)]
        assert [row["id"] for row in store.path_to(messages[-1])] == messages
        assert store.conversation(conversations[t])["leaf_id"] == messages[-1]

    # The history: one event per set_vote call, none lost, none doubled.
    calls = [(users[t], target, vote, reasons) for t, (_, votes) in done.items() for target, vote, reasons in votes]
    events = store.query("SELECT * FROM feedback_events ORDER BY id")
    assert len(events) == len(calls) == THREADS * UNITS // 2
    assert sorted(json.loads(e["reasons"])[0] for e in events) == sorted(reasons[0] for *_, reasons in calls)
    last_event = {(e["user_id"], e["message_id"]): (e["vote"], json.loads(e["reasons"])) for e in events}

    # The current votes: at most one per (user, message), equal to the last vote that thread set.
    assert store.query("SELECT user_id, message_id FROM feedback GROUP BY user_id, message_id "
                       "HAVING count(*) > 1") == []
    expected = {}  # (user, message) -> (vote, reasons) of the last set_vote; vote None = removed
    for t, (_, votes) in done.items():
        for target, vote, reasons in votes:
            expected[(users[t], target)] = (vote, reasons)
    # threads 30 and 31 both vote as the twin on the shared message: the one that committed last wins
    twin_vote, twin_reasons = last_event[(twin, shared)]
    expected[(twin, shared)] = (None if twin_vote == "none" else twin_vote, twin_reasons)
    assert expected[(twin, shared)] in [[(v, r) for target, v, r in done[t][1] if target == shared][-1]
                                        for t in (THREADS - 2, THREADS - 1)]

    assert last_event == {key: (vote or "none", reasons) for key, (vote, reasons) in expected.items()}
    current = {(row["user_id"], row["message_id"]): (row["vote"], json.loads(row["reasons"]))
               for row in store.query("SELECT * FROM feedback")}
    assert current == {key: value for key, value in expected.items() if value[0] is not None}
    for (user, message), (vote, reasons) in expected.items():
        assert store.vote(user, message) == (None if vote is None else {"vote": vote, "reasons": reasons, "comment": ""})


PROCESSES, PROCESS_UNITS, HOLD_S = 4, 300, 1.0

WRITER = """
    import sys, time
    from pathlib import Path
    from chatapp.feedback.store import Store

    data_dir, name, units, shared = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    Path(data_dir, f"ready-{name}").touch()
    while not Path(data_dir, "go").exists():
        time.sleep(0.005)
    started = time.monotonic()
    store = Store(data_dir)  # its first write waits for the transaction the test holds open
    waited = time.monotonic() - started
    user = store.ensure_user(name)
    conversation = store.create_conversation(user, name)
    parent = None
    for i in range(units):
        if i % 2 == 0:
            parent = store.add_message(conversation, parent, "user", f"{name} #{i}")
        else:
            store.set_vote(user, shared, ("up", "down", None)[i // 2 % 3], reasons=[f"{name} #{i}"])
    print(f"{waited:.3f}")
"""


@pytest.mark.slow
def test_processes_writing_at_once_wait_for_each_other(tmp_path):
    data = tmp_path / "data"
    store = Store(data)
    shared = store.add_message(store.create_conversation(store.ensure_user("owner"), "shared"), None, "user", "rate")
    names = [f"proc{p}" for p in range(PROCESSES)]
    procs = [start_child(WRITER, data, name, PROCESS_UNITS, shared) for name in names]
    try:
        wait_for_files([data / f"ready-{name}" for name in names], procs)
        with store.write():  # every child starts while this process holds the write lock
            (data / "go").touch()
            time.sleep(HOLD_S)
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert float(out) >= HOLD_S / 2, "the child did not have to wait for the lock"

    last_vote = ("up", "down", None)[(PROCESS_UNITS - 1) // 2 % 3]
    for name in names:
        user = store.one("SELECT id FROM users WHERE name = ?", [name])["id"]
        conversation = store.one("SELECT id FROM conversations WHERE user_id = ?", [user])["id"]
        texts = [row["text"] for row in store.query("SELECT text FROM messages WHERE conversation_id = ? ORDER BY id",
                                                    [conversation])]
        assert texts == [f"{name} #{i}" for i in range(0, PROCESS_UNITS, 2)]
        reasons = [json.loads(row["reasons"])[0] for row in
                   store.query("SELECT reasons FROM feedback_events WHERE user_id = ? ORDER BY id", [user])]
        assert reasons == [f"{name} #{i}" for i in range(1, PROCESS_UNITS, 2)]
        assert (store.vote(user, shared) or {}).get("vote") == last_vote
    assert count(store, "SELECT count(*) AS n FROM messages") == 1 + PROCESSES * PROCESS_UNITS // 2
    assert count(store, "SELECT count(*) AS n FROM feedback_events") == PROCESSES * PROCESS_UNITS // 2


# ---------------------------------------------------------------------------------------- crash safety

KILLED_WRITER = """
    import sys, time
    from PIL import Image
    from chatapp.feedback.store import Store

    data_dir, run, hold_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(data_dir)
    user = store.ensure_user("writer")
    conversation = store.create_conversation(user, f"run {run}")
    red = store.save_image(Image.new("RGB", (16, 16), "red")).sha256
    blue = store.save_image(Image.new("RGB", (16, 16), "blue")).sha256
    print("ready", flush=True)
    parent, i = None, 0
    while True:
        with store.write():  # one unit: a message, its two images and its vote (with its history row)
            message = store.add_message(conversation, parent, "user", f"unit {i}", image_shas=[red, blue])
            store.set_vote(user, message, "up", reasons=[f"unit {i}"])
            if i == hold_at:
                print("open", message, flush=True)
                time.sleep(60)  # killed here: the unit's rows are written but not committed
        print("committed", message, flush=True)
        parent, i = message, i + 1
"""


def run_and_kill(data: Path, run: int, hold_at: int, delay: float) -> tuple[list[int], int | None]:
    """Start a writer, SIGKILL it `delay` s after it is ready (or once unit `hold_at` is open);
    return the ids it reported as committed and the id of the unit left open, if any."""
    proc = start_child(KILLED_WRITER, data, run, hold_at)
    lines, ready, opened = [], threading.Event(), threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("ready"):
                ready.set()
            elif line.startswith("open"):
                opened.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert (opened if hold_at >= 0 else ready).wait(60), proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    # the kill can cut the last line short ("committed" without its id): only whole lines count
    whole = [words for words in lines if len(words) == 2 and words[1].isdigit()]
    committed = [int(words[1]) for words in whole if words[0] == "committed"]
    open_ids = [int(words[1]) for words in whole if words[0] == "open"]
    return committed, (open_ids[0] if open_ids else None)


@pytest.mark.slow
def test_sigkilled_writer_leaves_a_consistent_database(tmp_path):
    data = tmp_path / "data"
    rng = random.Random(20240607)
    # (hold_at, delay): -1 = kill at a random moment of the write loop; otherwise kill while that unit is open
    plan = [(-1, rng.uniform(0.0, 0.05)), (0, 0.0), (-1, rng.uniform(0.05, 0.3)), (120, 0.05),
            (-1, rng.uniform(0.3, 0.6))]
    runs = {run: run_and_kill(data, run, hold_at, delay) for run, (hold_at, delay) in enumerate(plan)}

    store = Store(data)  # reopening recovers the WAL the killed processes left
    conn = store.db.conn
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    writer = store.one("SELECT id FROM users WHERE name = 'writer'")["id"]
    red, blue = (store.save_image(square(c)).sha256 for c in ("red", "blue"))  # the same shas as the child's

    for run, (committed, open_id) in runs.items():
        conversation = store.one("SELECT * FROM conversations WHERE title = ?", [f"run {run}"])
        rows = store.query("SELECT id, parent_id, text FROM messages WHERE conversation_id = ? ORDER BY id",
                           [conversation["id"]])
        ids = [row["id"] for row in rows]
        # every reported commit is there; at most one more committed before the child could report it
        assert ids[:len(committed)] == committed
        assert len(ids) - len(committed) <= 1
        if open_id is not None:
            # the open unit left nothing; SQLite hands its unused id to a later run's message
            assert ids == committed and len(committed) == plan[run][0]
            later = store.message(open_id)
            assert later is None or later["conversation_id"] != conversation["id"]
        # whole units only: the chain, the leaf, two images in order, one vote and one history row each
        assert [row["text"] for row in rows] == [f"unit {i}" for i in range(len(rows))]
        assert [row["parent_id"] for row in rows] == [None, *ids][:len(ids)]
        assert conversation["leaf_id"] == (ids[-1] if ids else None)
        for row in rows:
            assert store.query("SELECT position, sha256 FROM message_images WHERE message_id = ? ORDER BY position",
                               [row["id"]]) == [{"position": 0, "sha256": red}, {"position": 1, "sha256": blue}]
            assert store.vote(writer, row["id"]) == {"vote": "up", "reasons": [row["text"]], "comment": ""}
            assert count(store, "SELECT count(*) AS n FROM feedback_events WHERE message_id = ?", [row["id"]]) == 1
    assert sum(len(committed) for committed, _ in runs.values()) >= plan[3][0]
    # no row of any unfinished unit anywhere: the child's tables grow in step
    messages = count(store, "SELECT count(*) AS n FROM messages")
    assert count(store, "SELECT count(*) AS n FROM feedback") == messages
    assert count(store, "SELECT count(*) AS n FROM feedback_events") == messages
    assert count(store, "SELECT count(*) AS n FROM message_images") == 2 * messages
    assert count(store, "SELECT count(*) AS n FROM images") == 2
    assert all(store.image_path(sha).is_file() for sha in (red, blue))

    # and it takes new writes, seen by a fresh connection
    conversation = store.create_conversation(writer, "after the crashes")
    message = store.add_message(conversation, None, "user", "still here", image_shas=[blue])
    store.set_vote(writer, message, "down")
    with sqlite3.connect(data / DB_NAME, timeout=5) as fresh:
        assert fresh.execute("SELECT text FROM messages WHERE id = ?", [message]).fetchall() == [("still here",)]
        assert fresh.execute("SELECT vote FROM feedback WHERE message_id = ?", [message]).fetchall() == [("down",)]


# ---------------------------------------------------------------------------------------- migrations

def test_migrations_upgrade_an_older_database(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = Database(data / DB_NAME)
    assert ALL_MIGRATIONS[:2] == [FIRST_MIGRATION, SECOND_MIGRATION]
    migrations.apply(old, stop_before=SECOND_MIGRATION)
    assert applied_migrations(old) == [FIRST_MIGRATION]
    assert "system_prompt" not in old["conversations"].columns_dict

    # rows as the first version of the app wrote them, the image file included
    buffer = io.BytesIO()
    square("green").save(buffer, format="PNG")
    png = buffer.getvalue()
    sha = hashlib.sha256(png).hexdigest()
    relative = Path("images") / sha[:2] / f"{sha}.png"
    (data / relative).parent.mkdir(parents=True)
    (data / relative).write_bytes(png)
    stamp = "2024-05-01T10:00:00.000000+00:00"
    old["users"].insert({"id": 1, "name": "alice", "role": "user", "created_at": stamp})
    old["conversations"].insert({"id": 1, "user_id": 1, "title": "old chat", "leaf_id": 3,
                                 "created_at": stamp, "updated_at": stamp})
    old["messages"].insert_all([
        {"id": 1, "conversation_id": 1, "parent_id": None, "role": "user", "text": "what is it?", "kind": "chat",
         "created_at": stamp},
        {"id": 2, "conversation_id": 1, "parent_id": 1, "role": "assistant", "text": "a green square", "kind": "chat",
         "created_at": stamp},
        {"id": 3, "conversation_id": 1, "parent_id": 1, "role": "assistant", "text": "green", "kind": "regenerate",
         "created_at": stamp}])
    old["images"].insert({"sha256": sha, "path": str(relative), "width": 16, "height": 16, "bytes": len(png),
                          "created_at": stamp})
    old["message_images"].insert({"message_id": 1, "position": 0, "sha256": sha})
    old["generations"].insert({"message_id": 2, "model_id": "demo", "params": json.dumps({"temperature": 0.7}),
                               "seed": 3, "system_prompt": "Be kind."})
    old["feedback"].insert({"id": 1, "user_id": 1, "message_id": 2, "vote": "up", "reasons": '["accurate"]',
                            "comment": "nice", "created_at": stamp, "updated_at": stamp})
    old["feedback_events"].insert({"id": 1, "user_id": 1, "message_id": 2, "vote": "up", "reasons": '["accurate"]',
                                   "comment": "nice", "created_at": stamp})
    old["preferences"].insert({"id": 1, "user_id": 1, "parent_id": 1, "chosen_id": 2, "source": "siblings",
                               "created_at": stamp, "updated_at": stamp})
    old.close()

    store = Store(data)
    assert applied_migrations(store.db) == ALL_MIGRATIONS
    assert migrations.pending(store.db) == []
    # m002: the new column (existing rows get the default) and the new index
    assert store.db["conversations"].columns_dict["system_prompt"] is str
    assert store.conversation(1)["system_prompt"] == ""
    assert ["message_id"] in [index.columns for index in store.db["feedback"].indexes]
    # the old rows, read through the store
    assert store.user(1)["name"] == "alice"
    assert store.conversations(1) == [{"id": 1, "title": "old chat", "created_at": stamp, "updated_at": stamp}]
    assert [m["id"] for m in store.siblings(2)] == [2, 3]
    context = store.context(2)
    assert context["prompt"] == [{"role": "user", "content": [{"type": "image", "path": str(data.resolve() / relative)},
                                                             {"type": "text", "text": "what is it?"}]}]
    assert (context["answer"], context["system_prompt"]) == ("a green square", "Be kind.")
    assert context["generation"]["params"] == {"temperature": 0.7}
    assert store.vote(1, 2) == {"vote": "up", "reasons": ["accurate"], "comment": "nice"}
    assert [(p["user_name"], p["source"], p["chosen_id"], p["rejected_id"], p["created_at"])
            for p in store.preference_pairs()] == [("alice", "siblings", 2, 3, stamp)]
    # and the upgraded database takes writes that use the new column
    conversation = store.create_conversation(1, "new chat", system_prompt="Be brief.")
    assert store.conversation(conversation)["system_prompt"] == "Be brief."
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_a_store_applies_no_migration_again(tmp_path):
    first = Store(tmp_path)
    before = first.query("SELECT * FROM _sqlite_migrations ORDER BY id")
    assert [row["name"] for row in before] == ALL_MIGRATIONS
    first.close()
    for _ in range(2):
        store = Store(tmp_path)
        assert store.query("SELECT * FROM _sqlite_migrations ORDER BY id") == before  # same rows, same applied_at
        assert migrations.pending(store.db) == []
        store.close()


OPENER = """
    import sys, time
    from pathlib import Path
    from chatapp.feedback.store import Store

    data_dir, name = sys.argv[1], sys.argv[2]
    Path(data_dir).parent.joinpath(f"ready-{name}").touch()
    while not Path(data_dir).parent.joinpath("go").exists():
        time.sleep(0.002)
    store = Store(data_dir)
    store.ensure_user(name)
    print(len(store.query("SELECT * FROM _sqlite_migrations")))
"""


def test_two_processes_opening_a_fresh_store_at_once_both_succeed(tmp_path):
    data = tmp_path / "data"  # does not exist yet
    names = ["first", "second"]
    procs = [start_child(OPENER, data, name) for name in names]
    try:
        wait_for_files([tmp_path / f"ready-{name}" for name in names], procs)
        (tmp_path / "go").touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.split() == [str(len(ALL_MIGRATIONS))]
    store = Store(data)
    assert applied_migrations(store.db) == ALL_MIGRATIONS
    assert sorted(row["name"] for row in store.query("SELECT name FROM users")) == names


# ---------------------------------------------------------------------------------------- functions

def test_context_follows_parent_links_through_branches(tmp_path):
    store = Store(tmp_path)
    alice = store.ensure_user("alice")
    conversation = store.create_conversation(alice, "squares", system_prompt="Be brief.")
    red, green, blue = (store.save_image(square(c)) for c in ("red", "green", "blue"))
    first, second = sorted([red, green], key=lambda image: image.sha256, reverse=True)  # sent order != sha order
    generation = {"model_id": "demo", "params": {"temperature": 0.5}, "seed": 7, "system_prompt": "Be brief."}

    u1 = store.add_message(conversation, None, "user", "What are these?", image_shas=[first.sha256, second.sha256])
    a1 = store.add_message(conversation, u1, "assistant", "Two squares.", generation=generation)
    a1b = store.add_message(conversation, u1, "assistant", "Squares, two.", kind="regenerate")
    u2 = store.add_message(conversation, a1, "user", "And this?", image_shas=[blue.sha256])  # goes on from a1, not a1b
    a2 = store.add_message(conversation, u2, "assistant", "A blue one.", generation=generation)
    u2b = store.add_message(conversation, a1, "user", "", kind="edit", image_shas=[blue.sha256, red.sha256])
    a2b = store.add_message(conversation, u2b, "assistant", "Blue, then red.")
    other = store.create_conversation(alice, "other")
    store.add_message(other, None, "user", "another root")

    def image(stored):
        return {"type": "image", "path": str(stored.path)}

    turn1 = {"role": "user", "content": [image(first), image(second), {"type": "text", "text": "What are these?"}]}
    answer1 = {"role": "assistant", "content": [{"type": "text", "text": "Two squares."}]}

    assert [m["id"] for m in store.path_to(a2)] == [u1, a1, u2, a2]
    context = store.context(a2)
    assert context["prompt"] == [turn1, answer1,
                                 {"role": "user", "content": [image(blue), {"type": "text", "text": "And this?"}]}]
    assert (context["message_id"], context["conversation_id"]) == (a2, conversation)
    assert (context["answer"], context["role"], context["system_prompt"]) == ("A blue one.", "assistant", "Be brief.")
    assert context["generation"]["params"] == {"temperature": 0.5} and context["generation"]["seed"] == 7

    assert [m["id"] for m in store.path_to(a2b)] == [u1, a1, u2b, a2b]
    context = store.context(a2b)
    assert context["prompt"] == [turn1, answer1, {"role": "user", "content": [image(blue), image(red)]}]
    assert (context["answer"], context["system_prompt"], context["generation"]) == ("Blue, then red.", "", {})

    assert store.context(a1b)["prompt"] == [turn1] and store.context(a1b)["answer"] == "Squares, two."
    with pytest.raises(KeyError):
        store.context(10_000)

    assert [m["id"] for m in store.siblings(a1)] == [a1, a1b] == [m["id"] for m in store.siblings(a1b)]
    assert [m["id"] for m in store.siblings(u2b)] == [u2, u2b]
    assert [m["id"] for m in store.siblings(u1)] == [u1]  # roots of this conversation only
    assert store.siblings(10_000) == []
    assert store.conversation(conversation)["leaf_id"] == a2b
    store.set_leaf(conversation, a2)
    assert store.conversation(conversation)["leaf_id"] == a2
    assert store.conversation(conversation)["system_prompt"] == "Be brief."
    assert [c["id"] for c in store.conversations(alice)] == [conversation, other]  # last updated first


def test_set_vote_changes_and_removes_the_one_current_vote(tmp_path):
    store = Store(tmp_path)
    alice, bob = store.ensure_user("alice"), store.ensure_user("bob")
    conversation = store.create_conversation(alice, "votes")
    answer = store.add_message(conversation, store.add_message(conversation, None, "user", "hi"), "assistant", "hello")

    store.set_vote(alice, answer, "up")
    assert store.vote(alice, answer) == {"vote": "up", "reasons": [], "comment": ""}
    store.set_vote(alice, answer, "down", reasons=["wrong", "rude"], comment="no")
    assert store.vote(alice, answer) == {"vote": "down", "reasons": ["wrong", "rude"], "comment": "no"}
    store.set_vote(bob, answer, "up")
    assert count(store, "SELECT count(*) AS n FROM feedback WHERE message_id = ?", [answer]) == 2
    store.set_vote(alice, answer, None)
    assert store.vote(alice, answer) is None
    assert store.vote(bob, answer)["vote"] == "up"
    store.set_vote(alice, answer, None)  # removing what is not there only adds to the history
    with pytest.raises(ValueError):
        store.set_vote(alice, answer, "meh")
    assert [e["vote"] for e in store.query("SELECT vote FROM feedback_events WHERE user_id = ? ORDER BY id",
                                            [alice])] == ["up", "down", "none", "none"]
    assert [r["user_name"] for r in store.rated_messages()] == ["bob"]
    assert store.feedback_stats()["votes"] == {"up": 1}


def test_prefer_and_preference_pairs(tmp_path):
    store = Store(tmp_path)
    alice, bob = store.ensure_user("alice"), store.ensure_user("bob")
    conversation = store.create_conversation(alice, "pairs")
    prompt = store.add_message(conversation, None, "user", "a poem")
    a, b, c = (store.add_message(conversation, prompt, "assistant", text) for text in ("A", "B", "C"))

    store.prefer(alice, a)
    store.prefer(alice, c)  # replaces alice's earlier choice under the same prompt
    store.prefer(bob, b, source="compare")
    assert store.preferred(alice, prompt) == c and store.preferred(bob, prompt) == b
    assert count(store, "SELECT count(*) AS n FROM preferences") == 2

    picks = {}
    for user, pair, pick in [(alice, (a, b), "a"), (bob, (b, c), "b"), (alice, (a, c), "tie"),
                             (bob, (a, b), "both_bad"), (alice, (b, c), None)]:
        comparison = store.create_comparison(user, prompt, *pair)
        if pick:
            store.pick(comparison, pick)
        picks[comparison] = pick
    assert [store.comparison(i)["pick"] for i in picks] == list(picks.values())
    with pytest.raises(ValueError):
        store.pick(next(iter(picks)), "both_good")

    pairs = [(p["user_name"], p["source"], p["chosen_id"], p["rejected_id"]) for p in store.preference_pairs()]
    assert pairs == [("alice", "siblings", c, a), ("alice", "siblings", c, b),
                     ("bob", "siblings", b, a), ("bob", "siblings", b, c),
                     ("alice", "compare", a, b), ("bob", "compare", c, b)]
    assert all(p["created_at"] for p in store.preference_pairs())
    assert store.feedback_stats()["preferences"] == 2 and store.feedback_stats()["comparisons"] == 4


def test_save_image_stores_identical_images_once_without_metadata(tmp_path):
    store = Store(tmp_path)
    one, two = store.save_image(square("red")), store.save_image(square("red"))
    assert one == two
    assert hashlib.sha256(one.path.read_bytes()).hexdigest() == one.sha256
    assert one.path == tmp_path.resolve() / "images" / one.sha256[:2] / f"{one.sha256}.png"
    other = store.save_image(square("blue", (24, 8)))
    assert other.sha256 != one.sha256
    assert sorted((tmp_path / "images").rglob("*.*")) == sorted([one.path, other.path])  # no temp files left
    rows = store.query("SELECT sha256, width, height, bytes FROM images ORDER BY width")
    assert rows == [{"sha256": one.sha256, "width": 16, "height": 16, "bytes": one.path.stat().st_size},
                    {"sha256": other.sha256, "width": 24, "height": 8, "bytes": other.path.stat().st_size}]
    assert store.image_path(other.sha256) == other.path
    with pytest.raises(KeyError):
        store.image_path("0" * 64)

    # an upload full of metadata, through the app's path (load_image, then save_image)
    info = PngInfo()
    info.add_text("Author", "someone")
    info.add_itxt("Comment", "private", zip=True)
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    buffer = io.BytesIO()
    square("green").save(buffer, format="PNG", pnginfo=info, exif=exif.tobytes(), dpi=(300, 300))
    assert {"tEXt", "iTXt", "eXIf", "pHYs"} <= set(png_chunks(buffer.getvalue()))
    stored = store.save_image(load_image(buffer.getvalue()))
    for path in (one.path, other.path, stored.path):
        assert set(png_chunks(path.read_bytes())) == {"IHDR", "IDAT", "IEND"}
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and not image.info and not image.getexif()
    assert stored == store.save_image(square("green"))  # the same pixels are the same stored image


def test_a_unit_of_work_rolls_back_as_a_whole(tmp_path):
    store = Store(tmp_path)
    alice = store.ensure_user("alice")
    conversation = store.create_conversation(alice, "atomic")
    first = store.add_message(conversation, None, "user", "kept")

    with pytest.raises(RuntimeError):
        with store.write():
            message = store.add_message(conversation, first, "assistant", "dropped")
            store.set_vote(alice, message, "up")
            raise RuntimeError("the unit fails after its rows are written")
    with pytest.raises(sqlite3.IntegrityError):  # an image that was never stored: the message goes too
        store.add_message(conversation, first, "assistant", "dropped", image_shas=["0" * 64])

    assert [m["text"] for m in store.query("SELECT text FROM messages")] == ["kept"]
    assert count(store, "SELECT count(*) AS n FROM feedback_events") == 0
    assert count(store, "SELECT count(*) AS n FROM message_images") == 0
    assert store.conversation(conversation)["leaf_id"] == first
    assert not store.db.conn.in_transaction
    assert store.add_message(conversation, first, "assistant", "next") > 0


def test_a_failed_commit_does_not_swallow_later_writes(tmp_path):
    store = Store(tmp_path)
    alice = store.ensure_user("alice")
    conversation = store.create_conversation(alice, "commit")
    # A COMMIT can fail (disk full, I/O error, a deferred constraint); a deferred foreign key does it here.
    with pytest.raises(sqlite3.IntegrityError):
        with store.write() as db:
            db.execute("PRAGMA defer_foreign_keys = ON")
            db["messages"].insert({"conversation_id": 10_000, "parent_id": None, "role": "user", "text": "orphan",
                                   "kind": "chat", "created_at": "2024-01-01T00:00:00+00:00"})
    message = store.add_message(conversation, None, "user", "written after the failed commit")
    with sqlite3.connect(tmp_path / DB_NAME, timeout=0.2) as other:
        assert other.execute("SELECT text FROM messages WHERE id = ?", [message]).fetchall() == \
            [("written after the failed commit",)]
        other.execute("BEGIN IMMEDIATE")  # no lock left behind for other writers
        other.rollback()
