"""The command line, run as a user runs it: a separate process, offline."""
import random
import subprocess
import sys

import pytest

from chatapp.demo import shapes
from support import ROOT, subprocess_env


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "chatapp", *args], capture_output=True, text=True,
                          env=subprocess_env(**env), cwd=ROOT, timeout=300)


def test_help_lists_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("serve", "ask", "demo-model"):
        assert command in out.stdout
    assert "--image" in run_cli("ask", "--help").stdout
    assert "--data-dir" in run_cli("serve", "--help").stdout


@pytest.mark.slow
def test_ask_prints_only_the_correct_answer(tmp_path):
    rng = random.Random(2024)
    for i in range(3):
        ex = shapes.random_example(rng, "color")
        path = tmp_path / f"shapes{i}.png"
        shapes.render(ex.scene).save(path)
        out = run_cli("ask", "--image", str(path), "--model", "demo", "--temperature", "0", ex.question)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("\n") == 1 and shapes.grade(ex, out.stdout.strip()), out.stdout
        assert "notice" not in out.stderr


@pytest.mark.slow
def test_ask_without_a_model_falls_back_to_demo_with_a_notice_on_stderr(tmp_path):
    scene = shapes.Scene((shapes.Shape("circle", "green", 30, 30, 10),))
    path = tmp_path / "circle.png"
    shapes.render(scene).save(path)
    out = run_cli("ask", "--image", str(path), "--temperature", "0", "What color is the circle?",
                  HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    assert "green" in out.stdout.lower() and "notice" not in out.stdout
    assert "HuggingFaceTB/SmolVLM-256M-Instruct" in out.stderr and "demo model" in out.stderr


@pytest.mark.slow
def test_explicit_unknown_model_is_a_clear_error_not_a_fallback():
    out = run_cli("ask", "--model", "no-such-org/no-such-model", "hello")
    assert out.returncode == 2
    assert "could not load model 'no-such-org/no-such-model'" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.slow
def test_env_model_counts_as_named(monkeypatch):
    out = run_cli("ask", "hello", CHATAPP_MODEL="no-such-org/other")
    assert out.returncode == 2 and "no-such-org/other" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--temperature", "5"], "temperature must be between"),
    (["--top-k", "-3"], "top_k must be between"),
    (["--max-new-tokens", "0"], "max_new_tokens must be between"),
])
def test_out_of_range_parameters(args, message):
    out = run_cli("ask", "--model", "demo", *args, "hello")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_text_file_named_png_is_refused(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    out = run_cli("ask", "--model", "demo", "--image", str(fake), "What is this?")
    assert out.returncode == 2 and "fake.png" in out.stderr and "not an image" in out.stderr


def test_train_with_a_model_server_that_is_down_fails_fast_and_clearly(tmp_path):
    """`train --backend openai` checks the server before it loads anything: one line, status 2, in seconds."""
    import time

    started = time.monotonic()
    out = run_cli("train", "--data-dir", str(tmp_path), "--backend", "openai", "--backend-url", "http://127.0.0.1:9/v1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: the model server at http://127.0.0.1:9/v1 is not reachable")
    assert "check --backend-url" in out.stderr and time.monotonic() - started < 30
    from chatapp.feedback.store import Store

    assert Store(tmp_path).runs() == []  # nothing was recorded
    missing = run_cli("train", "--data-dir", str(tmp_path), "--backend", "openai")
    assert missing.returncode == 2 and "--backend openai needs --backend-url" in missing.stderr


def test_serve_passes_its_backend_flags_to_its_background_trainer():
    """The trainer `serve --backend openai` starts samples on the same server, with the same flags."""
    from chatapp.cli import build_parser
    from chatapp.learning.sampler import BackendSpec

    serve = build_parser().parse_args(["serve", "--backend", "openai", "--backend-url", "http://h:8000/v1",
                                       "--backend-model", "m", "--backend-api-key-env", "KEY",
                                       "--backend-path-map", "/data=/srv/data", "--backend-engine", "vllm",
                                       "--backend-timeout", "60"])
    spec = BackendSpec.from_args(serve)
    train = build_parser().parse_args(["train", "--watch", *spec.as_flags()])
    assert BackendSpec.from_args(train) == spec and spec.path_map == ["/data=/srv/data"]
    assert BackendSpec.from_args(build_parser().parse_args(["train"])) is None  # in-process by default
