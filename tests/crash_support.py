"""Helpers of the kill -9 suite (tests/test_faults_crash.py): a fork server for the app and the trainer,
SIGKILL, and the checks made on a data dir after each kill.

Invariants:
- `Zygote` is one child process that imports what `python app.py` / `python -m chatapp train` import
  (gradio, torch, transformers, peft, trl, chatapp) once, then forks one process per order, which runs
  `chatapp.cli.main(argv)`: the same code as the real command, without paying ~5 s of imports (~15 s
  on a loaded machine) at each of the suite's ~40 restarts. The zygote starts no thread before it
  forks (fork-safe), and reaps its children at once, so a killed process's pid is gone (not a zombie
  that `os.kill(pid, 0)` would still find alive: the store's stale-run check relies on that).
- A forked child writes its output to the order's log file and, when it returns by itself, its exit
  status to `<log>.exit`; a process killed with SIGKILL writes nothing more.
- The checks only read (sqlite3 on the file, the registry's folder) and return what they found;
  `Registry(...)` opening the folder removes `.tmp-*` / `.trash-*` leftovers, which `leftovers()`
  counts first.
"""
from __future__ import annotations

import itertools
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from support import ROOT, free_port, subprocess_env

ZYGOTE = r"""
import json, os, signal, sys, tempfile, traceback
import gradio, torch, transformers, peft, trl, datasets, scipy.stats  # noqa: F401  (the slow imports, once)
import chatapp.cli, chatapp.web.server, chatapp.web.ui, chatapp.serving.engine, chatapp.learning.trainer  # noqa
import chatapp.learning.rejection, chatapp.learning.trl_runs, chatapp.learning.gate  # noqa: F401


def reap(*_):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


signal.signal(signal.SIGCHLD, reap)
print("ready", flush=True)
for line in sys.stdin:
    order = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(order["env"])
        tempfile.tempdir = None  # TMPDIR may differ per order
        code = 1
        try:
            code = chatapp.cli.main(order["argv"]) or 0
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(order["log"] + ".exit", "w") as f:
                f.write(str(code))
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Zygote:
    """`Zygote().spawn(argv, log)` -> pid of a fresh process running `chatapp.cli.main(argv)`."""

    def __init__(self, timeout: float = 300):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=subprocess_env(HF_HUB_OFFLINE="1"))
        line = self._read_line(timeout)
        if line != "ready":
            self.close()
            raise RuntimeError(f"the zygote did not start: {line!r}")

    def _read_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the zygote did not answer")
        return self.proc.stdout.readline().strip()

    def spawn(self, argv: list[str], log: Path, **env) -> int:
        for stale in (log, Path(f"{log}.exit")):
            stale.unlink(missing_ok=True)
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log),
                                          "env": {k: str(v) for k, v in env.items()}}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read_line(30))["pid"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while alive(pid):
        if time.time() > deadline:
            raise AssertionError(f"process {pid} is still there {timeout} s after SIGKILL")
        time.sleep(0.01)


def kill9(pid: int) -> bool:
    """SIGKILL `pid` and wait until it is gone; False when it had already ended."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    wait_gone(pid)
    return True


def exit_status(log: Path) -> int | None:
    """The exit status a zygote child wrote when it returned by itself; None when it was killed."""
    path = Path(f"{log}.exit")
    return int(path.read_text()) if path.exists() else None


def start_server(zygote: Zygote, data: Path, args=(), timeout: float = 120) -> tuple[int, str]:
    """The app (`serve`, --no-trainer) on a free port, forked from the zygote; returns once it answers HTTP."""
    port = free_port()
    log = data / "server.log"
    pid = zygote.spawn(["serve", "--port", port, "--data-dir", data, "--no-trainer", *args], log)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return pid, url
        except OSError:
            if not alive(pid):
                break
            time.sleep(0.1)
    kill9(pid)
    raise RuntimeError("server did not start: " + (log.read_text() if log.exists() else "(no log)"))


def wait_for_line(log: Path, marker: str, pid: int, timeout: float = 120) -> bool:
    """Wait until `marker` appears in the log; False when the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and marker in log.read_text(errors="replace"):
            return True
        if not alive(pid):
            return False
        time.sleep(0.005)
    raise AssertionError(f"{marker!r} did not appear in {log.name} within {timeout} s")


# ---------------------------------------------------------------- after a kill

def integrity(db_path: Path) -> str:
    """`PRAGMA integrity_check` of the store (opening it replays its WAL, as the next process would)."""
    with sqlite3.connect(db_path, timeout=30) as db:
        return ";".join(row[0] for row in db.execute("PRAGMA integrity_check"))


def rows(db_path: Path, sql: str, params=()) -> list[dict]:
    with sqlite3.connect(db_path, timeout=30) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, params)]


def leftovers(adapters_dir: Path) -> list[str]:
    """The entries of the registry folder a killed writer may leave: temp and trash folders and files."""
    if not adapters_dir.is_dir():
        return []
    return sorted(p.name for p in adapters_dir.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def version_folders(adapters_dir: Path) -> list[str]:
    """Every folder of the registry that is not a temp or trash one: what could be taken for a version."""
    if not adapters_dir.is_dir():
        return []
    return sorted(p.name for p in adapters_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------- what the clients were told

class Label:
    """One value a client sets again and again (a vote, a preference, a pick, the active adapter): the
    last value the server acknowledged, and the values sent without an answer yet. After a kill the
    stored value must be one of these (`allowed`); `settle` makes the stored value the new baseline."""

    def __init__(self, acked=None):
        self.acked, self.pending = acked, set()

    def allowed(self) -> set:
        return {self.acked} | self.pending

    def settle(self, stored) -> None:
        self.acked, self.pending = stored, set()


class Ledger:
    """Everything the server acknowledged to a client, kept client-side, thread-safe. Acknowledged:
    a streamed answer's first chunk (its question and the answer so far are stored), a returned
    request (a vote, a preference, a pick, an activation)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.user_messages: set[int] = set()
        self.answers: dict[int, dict] = {}   # key -> {"parent", "seen", "message_id"}
        self.labels: dict[tuple, Label] = {}  # ("vote", message_id) / ("prefer", parent) / ("pick", id)
        self.comparisons: dict[int, tuple[int, int]] = {}
        self.edits: dict[str, bool] = {}     # edited text -> acknowledged
        self.acks = {"messages": 0, "votes": 0, "labels": 0}
        self._keys = itertools.count()
        self.requests: dict[int, str] = {}  # key -> the request, for the report of a loss

    def new_answer(self, request: str = "") -> int:
        key = next(self._keys)
        self.requests[key] = f"{request} at {time.strftime('%H:%M:%S')}"
        return key

    def streamed(self, key: int, output: dict) -> None:
        with self.lock:
            if output.get("user_message_id"):
                if output["user_message_id"] not in self.user_messages:
                    self.acks["messages"] += 1
                self.user_messages.add(output["user_message_id"])
            if not output.get("text") and not output.get("done"):
                return
            entry = self.answers.get(key)
            if entry is None:
                self.acks["messages"] += 1
                entry = self.answers[key] = {"parent": output["user_message_id"], "message_id": None}
            entry["seen"] = output["text"]
            entry["history"] = entry.get("history", [])[-4:] + [(output.get("side"), output["text"][:24],
                                                                   output.get("message_id"))]
            entry["request"] = self.requests.get(key, "")
            if output.get("done") and output.get("message_id"):
                entry["message_id"] = output["message_id"]
            meta = output.get("meta") or {}
            if "comparison_id" in meta:
                self.comparisons[meta["comparison_id"]] = (meta["a_message_id"], meta["b_message_id"])

    def label(self, key: tuple) -> Label:
        with self.lock:
            return self.labels.setdefault(key, Label())

    def sent(self, key: tuple, value) -> None:
        with self.lock:
            self.labels.setdefault(key, Label()).pending.add(value)

    def acked(self, key: tuple, value) -> None:
        with self.lock:
            label = self.labels.setdefault(key, Label())
            label.pending.discard(value)
            label.acked = value
            self.acks["votes" if key[0] == "vote" else "labels"] += 1


def wait_job(job, url: str, stop: threading.Event, on_output=None, poll: float = 0.01, errors: list | None = None):
    """Follow a gradio_client job until it ends: `on_output` sees each streamed output as it arrives.
    Returns the job's result, or None when it failed (refused, or the server at `url` was killed); a
    failure the server calls an incident (a bug, not a refusal) before `stop` is set goes to `errors`."""
    seen = 0
    while True:
        done = job.done()
        outputs = job.outputs()
        for output in outputs[seen:]:
            if on_output is not None:
                on_output(output)
        seen = len(outputs)
        if done:
            try:
                return job.result()
            except Exception as error:  # a refusal, or the connection to a killed server
                if errors is not None and not stop.is_set() and "incident" in str(error):
                    errors.append(str(error))
                return None
        if stop.is_set() and not answers_http(url):
            return None
        time.sleep(poll)


def answers_http(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- checking the store against the ledger

def answer_lost(db: Path, entry: dict) -> str | None:
    """Why an acknowledged answer is not in the store as shown, or None. A finished one is there with
    exactly the text shown; one still streaming has a stored answer to the same question whose text
    and the text shown are prefixes of each other (it is saved at most every 0.5 s as it grows)."""
    if entry["message_id"] is not None:
        found = rows(db, "SELECT text FROM messages WHERE id = ? AND role = 'assistant'", [entry["message_id"]])
        if not found or found[0]["text"] != entry["seen"]:
            return f"answer {entry['message_id']}: {found[0]['text'][:40] if found else 'missing'!r}"
        return None
    seen = entry["seen"]
    for child in rows(db, "SELECT id, text FROM messages WHERE parent_id = ? AND role = 'assistant' ORDER BY id",
                      [entry["parent"]]):
        if child["text"] and (seen.startswith(child["text"]) or child["text"].startswith(seen)):
            entry["message_id"], entry["seen"] = child["id"], child["text"]  # what later kills must keep
            return None
    return (f"the answer to message {entry['parent']} shown as {seen[:40]!r} is not stored ({entry.get('request')}; "
            f"last outputs {entry.get('history')})")
