"""Helpers the test modules share (plain functions and constants; fixtures live in conftest.py).

Invariants:
- No test module imports another: what two of them need is here.
- A child process started through `subprocess_env` imports this checkout's chatapp, unbuffered.
- `start_server` returns only once the app answers HTTP, or raises with the server's log.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"

# Debian's chromium, driven by Playwright (never `playwright install`)
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_server(data: Path, args=("--no-trainer",), log_path: Path | None = None,
                 **env) -> tuple[subprocess.Popen, str]:
    """The real app (`python app.py`) in its own process, by default without the background trainer
    (the live-loop tests start it with their own options); returns the process and its URL. Its log
    goes to `log_path`, by default `server.log` in the data dir."""
    port = free_port()
    log_path = log_path or data / "server.log"
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--data-dir", str(data), *args],
                                cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1", **env), stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start: " + log_path.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def random_lora_folders(base_model, root: Path, scale: float) -> tuple[Path, Path]:
    """A LoRA adapter of `base_model` saved by peft under root/good, its B weights drawn at `scale` so it
    changes the answers, and the same adapter under root/broken with an adapter_config.json naming
    target modules the base does not have (it passes the registry's checks; peft cannot load it)."""
    import copy
    import json
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, lora_alpha=8,
                                                                 target_modules=r".*text_model.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    good, broken = root / "good", root / "broken"
    model.save_pretrained(good)
    shutil.copytree(good, broken)
    adapter_config = json.loads((broken / "adapter_config.json").read_text())
    adapter_config["target_modules"] = ["no_such_projection"]
    (broken / "adapter_config.json").write_text(json.dumps(adapter_config))
    return good, broken


def set_slider(page, elem_id, value, timeout_s: float = 10.0):
    """Types the value into the slider's number box until the slider holds it: the page can put back
    the old value while an event of its own is still running (seen after a compare pick), and the next
    message sends what the slider holds."""
    box, slider = (page.locator(f"#{elem_id} input[type={kind}]") for kind in ("number", "range"))
    deadline = time.time() + timeout_s
    while True:
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(200)
        held = slider.input_value()
        if float(held) == float(value):
            return
        if time.time() > deadline:
            raise AssertionError(f"the {elem_id} slider holds {held}, not {value}")
