"""Shared fixtures (helpers that are not fixtures live in support.py). Tests never reach the model
hub: HF_HUB_OFFLINE is set and the hub cache points at an empty temp folder, so the default model is
never found and the demo model is used."""
from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from pathlib import Path

import pytest

import fault_figures
from support import ARTIFACTS, BROWSER_ARGS, CHROMIUM

_HF_HOME = tempfile.mkdtemp(prefix="chatapp-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("CHATAPP_MODEL", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_engine():
    from chatapp.serving.engine import Engine

    return Engine.load("demo")


@pytest.fixture(autouse=True)
def keep_the_test_process_priority():
    """A test that calls train() in this process lowers its priority (trainer.limit_resources: nice 10,
    SCHED_IDLE, one torch thread); put it back after the test, or every later test, and every server
    it starts, would inherit the trainer's priority (a live-loop test then took 311 s instead of ~100,
    and a test of the 'nice' priority found SCHED_IDLE already set)."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    yield
    with contextlib.suppress(OSError):  # lowering nice needs root (CI runs as root)
        os.sched_setscheduler(0, policy, param)
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if threads is not None:
        sys.modules["torch"].set_num_threads(threads)


@pytest.fixture
def rng():
    return random.Random(1234)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


def pytest_terminal_summary(terminalreporter):
    """The fault suite ends with one line of its figures (tests/fault_figures.py)."""
    line = fault_figures.summary_line()
    if line:
        terminalreporter.write_line(line)
