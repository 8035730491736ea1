"""The background trainer: a loop that watches the store and starts a training run when enough new
feedback arrived (or on a schedule, or when an admin asks), and the supervisor that keeps that loop
running beside the web server.

Invariants:
- The loop runs in its own process (`python -m chatapp train --watch`), never in the web server's:
  training cannot slow or crash the chat beyond what the OS scheduler allows (the run itself is
  niced, SCHED_IDLE and limited to few torch threads by `trainer.limit_resources`).
- One run at a time: `trainer.run_lock` (an OS file lock, released by the kernel however the
  process dies). A run whose process died is marked failed (`Store.fail_stale_runs`), by the
  supervisor as soon as it notices and by the next loop; it is never published (publishing is the
  last step of a run and is atomic, see `adapters`), and it is retried after `retry_s`.
- "New labels" are votes, preferred siblings and compare picks given or changed after the start of
  the newest run that finished its work (promoted or rejected); so feedback given during a run
  counts toward the next one (a run is never restarted for them), and a failed run does not reset
  the count.
- A run that falls due on labels or the schedule starts only once no new label came for `quiet_s`
  (a burst of votes makes one run with all of them, not several half-informed ones), and at the
  latest `max_wait_s` after it fell due (so a steady trickle still trains); an admin's request
  starts at once. The decision is a pure function of the labels' times, the runs and the settings
  (`decide`; `replay` runs it over simulated time).
- The loop writes its state (idle / training / waiting, and why) to the store's `trainer` setting
  every poll, so the admin page can say what it is doing; it exits when its parent (the server
  that started it) goes away.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from chatapp.core.clock import now_iso
from chatapp.feedback.store import TRAINER_SETTING, Store
from chatapp.learning.settings import WatchSettings

TRAINER_LOG = "trainer.log"


def _epoch_s(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


@dataclass(frozen=True)
class TriggerState:
    """What the trigger decides on, read from the store at one moment (times in epoch seconds)."""
    now: float
    label_times: tuple[float, ...] = ()  # the new labels, oldest first
    last_done_at: float | None = None  # when the newest run that did its work finished (the schedule)
    failed_run: int | None = None  # the newest run, when it failed
    failed_at: float | None = None
    requested_by: str | None = None  # an admin's open "train now"


def decide(state: TriggerState, settings: WatchSettings) -> tuple[str | None, str]:
    """Why a run should start now ("request", "labels", "schedule") or None, with a readable status.
    Pure: the same state and settings give the same answer (tests replay bursts with it)."""
    new = len(state.label_times)
    if state.failed_run is not None and state.now - state.failed_at < settings.retry_s:
        wait = settings.retry_s - (state.now - state.failed_at)
        return None, f"run {state.failed_run} failed; retrying in {wait:.0f} s ({new} new labels)"
    if state.requested_by:
        return "request", f"training now: asked by {state.requested_by}"
    if new >= settings.train_after:
        reason, due_at = "labels", state.label_times[settings.train_after - 1]
        message = f"training now: {new} new labels (threshold {settings.train_after})"
    elif settings.train_every_s and new > 0 and (
            state.last_done_at is None or state.now - state.last_done_at >= settings.train_every_s):
        reason = "schedule"
        due_at = max(state.label_times[0], (state.last_done_at or 0.0) + settings.train_every_s)
        message = f"training now: scheduled every {settings.train_every_s:.0f} s ({new} new labels)"
    else:
        return None, f"waiting for feedback: {new} of {settings.train_after} new labels"
    # a burst of votes makes one run: wait until none came for quiet_s, but at most max_wait_s
    quiet_for, waited = state.now - state.label_times[-1], state.now - due_at
    if quiet_for < settings.quiet_s and waited < settings.max_wait_s:
        return None, (f"waiting for a quiet moment: {new} new labels, the last {quiet_for:.0f} s ago (a run starts "
                      f"after {settings.quiet_s:.0f} s without one, at the latest in "
                      f"{settings.max_wait_s - waited:.0f} s)")
    if quiet_for < settings.quiet_s:
        message += f"; labels still arriving after the longest wait ({settings.max_wait_s:.0f} s)"
    return reason, message


def trigger_state(store, now: float | None = None) -> TriggerState:
    """The store's side of the trigger. New labels are those given or changed after the start of
    the newest run that did its work, so labels given during a run count toward the next one."""
    last = store.last_run()
    newest = store.runs(limit=1)
    failed = newest[0] if newest and newest[0]["status"] == "failed" else None
    request = store.open_training_request()
    return TriggerState(
        now=time.time() if now is None else now,
        label_times=tuple(_epoch_s(t) for t in store.label_times(last["started_at"] if last else None)),
        last_done_at=_epoch_s(last["finished_at"]) if last else None,
        failed_run=failed["id"] if failed else None,
        failed_at=_epoch_s(failed.get("finished_at") or failed.get("updated_at")) if failed else None,
        requested_by=request["requested_by"] if request else None)


def due(store, settings: WatchSettings, now: float | None = None) -> tuple[str | None, str]:
    """`decide` on the store's state now."""
    return decide(trigger_state(store, now), settings)


def replay(label_times: list[float], settings: WatchSettings, run_s: float, until: float) -> list[dict]:
    """The runs the loop would start, polling every `poll_s` from 0 to `until` (seconds), for labels
    arriving at `label_times`, when each run takes `run_s` and does its work: [{"start", "labels"}]."""
    runs, now, counted_from, last_done_at = [], 0.0, None, None
    times = sorted(label_times)
    while now <= until:
        new = tuple(t for t in times if t <= now and (counted_from is None or t > counted_from))
        reason, _ = decide(TriggerState(now=now, label_times=new, last_done_at=last_done_at), settings)
        if reason is None:
            now += settings.poll_s
            continue
        runs.append({"start": now, "labels": len(new)})
        counted_from, now = now, now + run_s  # the loop is busy training; labels meanwhile wait for the next run
        last_done_at = now
    return runs


def watch(data_dir, model_name: str | None, train_settings, settings: WatchSettings, log=print,
          stop: threading.Event | None = None, backend=None) -> None:
    """The loop of `train --watch`: poll, train when due, repeat until `stop` or the parent is gone.
    `backend`: where each run samples its answers (`train --backend openai`; None: in this process)."""
    from chatapp.learning.registry import Registry
    from chatapp.learning.data import NotEnoughFeedback
    from chatapp.learning.trainer import TrainingBusy, train

    store, registry = Store(data_dir), Registry.for_data_dir(data_dir)
    stop = stop or threading.Event()
    parent = os.getppid()
    blocked_at: int | None = None  # label count when a run last found too little usable feedback

    def status(state: str, message: str, **extra) -> None:
        store.set_setting(TRAINER_SETTING, dict(state=state, message=message, pid=os.getpid(),
                                                at=now_iso("seconds"),
                                                settings=asdict(settings), **extra), "trainer")

    for stale in store.fail_stale_runs(_live_version(data_dir)):
        log(f"watch: run {stale} had died; recorded as ended")
    log(f"watch: watching {data_dir} (train after {settings.train_after} new labels"
        + (f" or every {settings.train_every_s:.0f} s" if settings.train_every_s else "")
        + f", once none came for {settings.quiet_s:.0f} s, at the latest {settings.max_wait_s:.0f} s after)")
    while not stop.is_set():
        if os.getppid() != parent:  # the server that started this loop is gone
            log("watch: parent process ended; stopping")
            return
        reason, message = due(store, settings)
        total = store.labels_since(None)
        if reason and reason != "request" and blocked_at == total:
            reason, message = None, "waiting for feedback: the last try found too few usable rows"
        if reason is None:
            status("idle", message)
            stop.wait(settings.poll_s)
            continue
        request = store.open_training_request() if reason == "request" else None
        status("training", message)
        log(f"watch: {message}")
        run_id = None
        try:
            result = train(store, registry, model_name, train_settings, log=log, backend=backend)
            run_id = result.run_id
            blocked_at = None
            status("idle", f"run {result.run_id}: {result.decision} ({result.reason})")
        except NotEnoughFeedback as error:
            blocked_at = total
            status("idle", f"not enough feedback: {error}")
            log(f"watch: {error}")
        except TrainingBusy as error:
            status("idle", str(error))
            stop.wait(settings.poll_s)
        except Exception as error:  # recorded as failed by train(); the loop goes on
            status("idle", f"the run failed: {type(error).__name__}: {error}")
            log(f"watch: the run failed: {type(error).__name__}: {error}")
        finally:
            if request:
                store.take_training_request(request["id"], run_id)


# ---------------------------------------------------------------- the supervisor (in the server)

def _die_with_parent() -> None:
    """Linux: the trainer gets SIGTERM when the server process dies, even by kill -9."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the loop notices its parent is gone at the next poll


class TrainerSupervisor:
    """Starts `python -m chatapp train --watch ...` beside the server and restarts it when it dies
    (after marking its run failed); stops it when the server stops."""

    def __init__(self, data_dir, model_name: str | None, watch_args: list[str], log=None,
                 restart_s: float = 2.0):
        self.data_dir = Path(data_dir)
        self.command = [sys.executable, "-m", "chatapp", "train", "--watch", "--data-dir", str(self.data_dir),
                        *(["--model", model_name] if model_name else []), *watch_args]
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.restart_s = restart_s
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TrainerSupervisor":
        self._thread = threading.Thread(target=self._run, name="chatapp-trainer-supervisor", daemon=True)
        self._thread.start()
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def _spawn(self) -> subprocess.Popen:
        log_file = open(self.data_dir / TRAINER_LOG, "ab")
        self.starts += 1
        self.log(f"chatapp: background trainer started (log: {self.data_dir / TRAINER_LOG}): "
                 f"{shlex.join(self.command[1:])}")
        # The child must import this very chatapp, wherever the server was started from and whether or
        # not the package is installed: put the folder that holds it first on its path.
        package_parent = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        try:
            return subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, preexec_fn=_die_with_parent, cwd=os.getcwd())
        finally:
            log_file.close()

    def _run(self) -> None:
        store = Store(self.data_dir)
        quick_deaths = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            self.process = self._spawn()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            for stale in store.fail_stale_runs(_live_version(self.data_dir)):
                self.log(f"chatapp: training run {stale} died with the trainer; recorded as ended")
            self.log(f"chatapp: the background trainer exited (status {code}); restarting")
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 30 else 0
            # a trainer that keeps dying at start (bad arguments, broken model) is retried ever more slowly
            self._stopping.wait(min(self.restart_s * (2 ** min(quick_deaths, 5)), 300))

    def stop(self) -> None:
        self._stopping.set()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _live_version(data_dir) -> str | None:
    """The registry's active version, for judging runs that died (None when it cannot be read)."""
    from chatapp.learning.registry import Registry

    try:
        return Registry.for_data_dir(data_dir, cleanup=False).active()
    except Exception:  # an unreadable pointer: no dead run is taken for the live one's
        return None
