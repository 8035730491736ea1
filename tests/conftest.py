"""Shared fixtures (helpers that are not fixtures live in support.py). Tests never reach the model
hub: HF_HUB_OFFLINE is set and the hub cache points at an empty temp folder, so the default model is
never found and the demo model is used."""
from __future__ import annotations

import os
import random
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
