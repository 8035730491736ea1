"""The package as others get it: pyproject.toml agrees with the requirements files and lists every
package; an installed copy (no checkout around it) runs from any folder with the demo model inside
it; and the app started from another folder trains in the background (the trainer child used to
die with "No module named chatapp" and restart forever).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from support import ROOT, free_port, stop_server

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEMO_MODEL_FILES = sorted(p.name for p in (ROOT / "data" / "demo-model").iterdir())


def requirements(path: Path) -> dict[str, Requirement]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            found[requirement.name.lower()] = requirement
    return found


def declared(specs: list[str]) -> dict[str, Requirement]:
    return {Requirement(s).name.lower(): Requirement(s) for s in specs}


def pinned_version(requirement: Requirement) -> str | None:
    exact = [s.version for s in requirement.specifier if s.operator == "=="]
    return exact[0] if exact else None


@pytest.mark.parametrize("requirements_file, groups", [
    ("requirements.txt", ("dependencies", "gpu")),
    ("requirements-dev.txt", ("dev",)),
])
def test_pyproject_declares_what_the_requirements_files_pin(requirements_file, groups):
    """Same packages on both sides, and every exact pin lies inside pyproject's range."""
    project = PYPROJECT["project"]
    wanted: dict[str, Requirement] = {}
    for group in groups:
        wanted.update(declared(project[group] if group == "dependencies" else project["optional-dependencies"][group]))
    pinned = requirements(ROOT / requirements_file)
    if requirements_file == "requirements-dev.txt":
        pinned.pop("setuptools")  # for building the wheel in tests without build isolation, not a runtime need
    assert sorted(pinned) == sorted(wanted)
    for name, requirement in pinned.items():
        version = pinned_version(requirement)
        if version is not None:
            assert wanted[name].specifier.contains(version, prereleases=True), \
                f"{requirements_file} pins {name}=={version}, outside pyproject's {wanted[name].specifier}"


def test_every_package_and_the_demo_model_are_in_the_wheel_list():
    setuptools = PYPROJECT["tool"]["setuptools"]
    on_disk = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "chatapp").rglob("__init__.py"))
    assert sorted(set(setuptools["packages"]) - {"chatapp.demo.weights"}) == on_disk
    assert setuptools["package-dir"] == {"chatapp.demo.weights": "data/demo-model"}
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["chatapp.demo.weights"]
    left_out = [name for name in DEMO_MODEL_FILES if not any(Path(name).match(p) for p in patterns)]
    assert not left_out, f"files of data/demo-model/ the wheel would not carry: {left_out}"
    assert PYPROJECT["project"]["scripts"] == {"chatapp": "chatapp.cli:main"}


def env_without_checkout(**extra) -> dict:
    """The test process's environment without PYTHONPATH (so nothing points at the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.mark.slow
def test_the_installed_package_runs_offline_from_another_folder(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "chatapp", source / "chatapp", ignore=ignore)
    shutil.copytree(ROOT / "data" / "demo-model", source / "data" / "demo-model")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "installed"
    # --no-build-isolation: the build uses this venv's setuptools, so it needs no package index.
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)],
                           capture_output=True, text=True, timeout=300, env=env_without_checkout())
    assert built.returncode == 0, built.stdout + built.stderr

    weights = target / "chatapp" / "demo" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == DEMO_MODEL_FILES
    assert (weights / "model.safetensors").stat().st_size == (ROOT / "data/demo-model/model.safetensors").stat().st_size

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = env_without_checkout(PYTHONPATH=str(target))

    def run(*argv, timeout=120):
        result = subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert "demo-model" in run(sys.executable, "-m", "chatapp", "--help")
    assert "when chatapp is installed" in " ".join(run(sys.executable, "-m", "chatapp", "serve", "--help").split())
    assert "serve" in run(str(target / "bin" / "chatapp"), "--help")  # the console script
    paths = run(sys.executable, "-c", "from chatapp.core import config; import chatapp; "
                "print(chatapp.__file__, config.PROJECT_ROOT, config.DEMO_MODEL_DIR, config.data_dir(), sep='\\n')")
    package_file, project_root, demo_dir, data_dir = paths.splitlines()
    assert Path(package_file).resolve() == (target / "chatapp" / "__init__.py").resolve()
    assert project_root == "None"
    assert Path(demo_dir) == weights.resolve()
    assert Path(data_dir) == (elsewhere / "data").resolve()
    # No hub here: the default model cannot load, so the packaged demo model answers.
    assert run(sys.executable, "-m", "chatapp", "ask", "--temperature", "0", "What can you do?").strip()


TRAIN_AFTER = 40
TRAINER_ARGS = ("--method kto --from base --max-steps 4 --epochs 1 --batch-size 4 --min-rows 10 --publish never "
                "--retry-after 1 --poll 0.5 --quiet-for 0 --probe-per-type 10")


@pytest.mark.slow
def test_the_app_started_from_another_folder_trains_in_the_background(tmp_path, demo_engine):
    from chatapp.feedback.store import Store
    from chatapp.learning import simulate

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import chatapp"], cwd=elsewhere, env=env_without_checkout(),
                           capture_output=True)
    if probe.returncode == 0:
        pytest.skip("chatapp is installed in this Python, so a child finds it without help: nothing to show")

    data = tmp_path / "data"
    store = Store(data)
    logged = simulate.log_chats(store, demo_engine.model, demo_engine.processor, TRAIN_AFTER, seed=5,
                                users=[f"user{i}" for i in range(5)], temperature=1.0)
    simulate.vote(store, logged, simulate.style_rule("terse"))
    assert store.labels_since(None) == TRAIN_AFTER

    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--data-dir", str(data),
                                   "--port", str(free_port()), "--train-after", str(TRAIN_AFTER),
                                   "--trainer-args", TRAINER_ARGS],
                                  cwd=elsewhere, env=env_without_checkout(), stdout=log, stderr=subprocess.STDOUT)
    trainer_log = data / "trainer.log"
    try:
        deadline = time.time() + 420
        finished = None
        while time.time() < deadline and finished is None and server.poll() is None:
            finished = next((r for r in store.runs() if r["status"] not in ("running",)), None)
            time.sleep(1)
        logs = (f"server.log:\n{(tmp_path / 'server.log').read_text()[-3000:]}\ntrainer.log:\n"
                + (trainer_log.read_text()[-3000:] if trainer_log.exists() else "(none)"))
        assert server.poll() is None, "the server died\n" + logs
        assert finished is not None, "no training run finished\n" + logs
        assert finished["status"] in ("promoted", "rejected") and not finished["error"], f"{finished}\n{logs}"
        # the failure this guards against is our own package missing in the trainer; a library may log a
        # missing optional module of its own (transformers: "No module named 'kernels'") without harm
        assert "No module named 'chatapp" not in trainer_log.read_text(), logs
    finally:
        stop_server(server)
