"""The server's own cost per reply (issue 13 item 5): time to first text through the real server for
the demo model, where it goes, and the same through a bare Gradio server, in one run.

    python bench/overhead.py [--requests 30] [--warmup 5] [--tokens 8]

The same text question (greedy, 8-token replies), each time in a new conversation, measured as:

- model: `Engine.generate` in this process, the reply's `time_to_first_token_s` (the prompt's
  template and processing included: what the model itself needs);
- handler: `ChatService.chat` in this process on its own store (validation, the store's writes, the
  prompt's history, the engine) up to its first event;
- bare Gradio: a server holding one `gr.api` generator with /chat's parameters that yields a dict at
  once, same queue settings, through the raw protocol below: Gradio's own floor, the plain library;
- chatapp: the real app (`app.py --model demo --no-trainer`, a fresh data dir) through the raw
  protocol: POST /gradio_api/queue/join, then the SSE stream of /gradio_api/queue/data on one
  keep-alive connection, up to the first `process_generating` message (the first text);
- gradio_client: `Client.submit(..., api_name="/chat")` against the real app, up to the first dict.

Prints p50/p95 of each; the breakdown of chatapp's p50 (model first token = the server's own
generation records; Gradio's queue + SSE = the bare server's p50; ours = the rest); gradio_client's own
share (client - chatapp); each server's CPU per request (/proc, all its threads: wall time on a busy
machine stretches with the load, CPU time much less); and chatapp's p50 against the goal (60 ms).
Inside the real server each request is also split by the store's own timestamps (one clock,
microseconds): sent -> conversation row (Gradio's queue and thread hand-off, our validation) -> user
message (our writes before the model) -> the model's first token -> first text at the client.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_S = 0.060  # the demo model's p50 time to first text through the server (issue 13)
QUESTION = "What can you do?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bare_server(port: int) -> None:
    """Gradio alone: /chat's parameters, a generator that yields at once, the app's queue settings."""
    import gradio as gr
    from gradio.data_classes import FileData

    from chatapp.core import config

    def chat(conversation_id: str = "", text: str = "", image: FileData | None = None, temperature: float = 0.7,
             top_k: int = 50, top_p: float = 1.0, max_new_tokens: int = 256, seed: int | None = None,
             image_detail: str = "auto", system_prompt: str = "") -> Iterator[dict]:
        yield {"conversation_id": 1, "text": "I can", "done": False}
        yield {"conversation_id": 1, "text": "I can answer.", "done": True}

    # this module's annotations are strings (__future__); Gradio reads the objects, as api.py sets them
    chat.__annotations__ = {"conversation_id": str, "text": str, "image": FileData | None, "temperature": float,
                            "top_k": int, "top_p": float, "max_new_tokens": int, "seed": int | None,
                            "image_detail": str, "system_prompt": str, "return": Iterator[dict]}

    with gr.Blocks() as app:
        gr.api(chat, api_name="chat", concurrency_limit=config.CHAT_CONCURRENCY, concurrency_id="generate")
    app.queue(max_size=config.QUEUE_MAX_SIZE).launch(server_name="127.0.0.1", server_port=port, show_error=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *command, "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(requests: int, warmup: int, tokens: int) -> tuple[list[float], list[float]]:
    """(model TTFTs, handler TTFTs) in this process, seconds."""
    from chatapp.core.config import validate_generation
    from chatapp.feedback.store import Store
    from chatapp.serving.engine import Engine
    from chatapp.web.chat import ChatService
    from chatapp.web.users import LOCAL

    engine = Engine.load("demo")
    params = validate_generation(temperature=0, max_new_tokens=tokens)
    model, handler = [], []
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    for i in range(warmup + requests):
        reply = engine.generate(messages, params)
        if i >= warmup:
            model.append(reply.meta.time_to_first_token_s)
    with tempfile.TemporaryDirectory() as folder:
        service = ChatService(engine, Store(Path(folder)))
        for i in range(warmup + requests):
            started = time.perf_counter()
            events = service.chat(LOCAL, "", QUESTION, [], params)
            next(events)
            first = time.perf_counter() - started
            for _ in events:
                pass
            if i >= warmup:
                handler.append(first)
    engine.generation_thread.shutdown()
    return model, handler


def raw_http(url: str, pid: int, requests: int, warmup: int,
             tokens: int) -> tuple[list[float], list[tuple[float, float]], float]:
    """Gradio's queue protocol by hand. Returns the times to first text, per request (wall clock when sent,
    when the first text came), and the server's CPU seconds per measured request."""
    import httpx

    from chatapp.core import config

    info = json.load(urllib.request.urlopen(url + "config", timeout=10))
    fn_index = next(d["id"] for d in info["dependencies"] if d.get("api_name") == "chat")
    values = {p.name: p.default for p in config.WEB_SAMPLING_PARAMS} | {"temperature": 0, "max_new_tokens": tokens}
    data = ["", QUESTION, None, *(values[p.name] for p in config.WEB_SAMPLING_PARAMS), ""]
    times, stamps, cpu_before = [], [], 0.0
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(warmup + requests):
            if i == warmup:
                cpu_before = cpu_seconds(pid)
            session = uuid.uuid4().hex
            sent, started = time.time(), time.perf_counter()
            joined = client.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                                "session_hash": session, "trigger_id": None,
                                                                "event_data": None})
            joined.raise_for_status()
            first = None
            with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
                for line in stream.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_generating" and first is None:
                        first = time.perf_counter() - started
                    if message.get("msg") == "process_completed":
                        if not message.get("success", True):
                            raise RuntimeError(f"the server refused the request: {message}")
                        break
            if i >= warmup:
                times.append(first)
                stamps.append((sent, sent + first))
    return times, stamps, (cpu_seconds(pid) - cpu_before) / requests


def server_split(data: Path, stamps: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Each raw-HTTP request's time inside the real server, split by the store's timestamps. The
    requests' conversations are the newest len(stamps) ones, oldest first."""
    from datetime import datetime

    from chatapp.feedback.store import Store
    from chatapp.web.users import LOCAL

    store = Store(data)
    conversations = sorted(store.conversations(store.ensure_user(LOCAL.name, LOCAL.role), limit=10_000),
                           key=lambda c: c["id"])
    split: dict[str, list[float]] = {"Gradio in + validation": [], "our writes before the model": [],
                                     "model first token": [], "first token to the client": []}
    for conversation, (sent, first) in zip(conversations[-len(stamps):], stamps):
        user_message, answer = store.path_to(store.conversation(conversation["id"])["leaf_id"])[-2:]
        created = datetime.fromisoformat(conversation["created_at"]).timestamp()
        asked = datetime.fromisoformat(user_message["created_at"]).timestamp()
        ttft = store.generation(answer["id"])["time_to_first_token_s"]
        for name, value in zip(split, (created - sent, asked - created, ttft, first - asked - ttft)):
            split[name].append(value)
    return split


def client_times(url: str, requests: int, warmup: int, tokens: int) -> list[float]:
    from gradio_client import Client

    client = Client(url, verbose=False)
    times = []
    for i in range(warmup + requests):
        started = time.perf_counter()
        job = client.submit(conversation_id="", text=QUESTION, temperature=0, max_new_tokens=tokens, api_name="/chat")
        first = None
        for _ in job:
            if first is None:
                first = time.perf_counter() - started
        if i >= warmup:
            times.append(first)
    client.close()
    return times


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="measured requests per way")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured requests first, per way")
    parser.add_argument("--tokens", type=int, default=8, help="max_new_tokens of each reply")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)  # the baseline's process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.port)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    model, handler = in_process(args.requests, args.warmup, args.tokens)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        proc, url = start(["bench/overhead.py", "--bare-server"], folder / "bare.log")
        try:
            bare, _, bare_cpu = raw_http(url, proc.pid, args.requests, args.warmup, args.tokens)
        finally:
            stop(proc)
        data = folder / "data"
        data.mkdir()
        proc, url = start(["app.py", "--model", "demo", "--no-trainer", "--data-dir", str(data)], folder / "app.log")
        try:
            raw, stamps, app_cpu = raw_http(url, proc.pid, args.requests, args.warmup, args.tokens)
            split = server_split(data, stamps)
            client = client_times(url, args.requests, args.warmup, args.tokens)
        finally:
            stop(proc)
    ways = {"model": model, "handler (in process)": handler, "bare Gradio": bare, "chatapp": raw,
            "gradio_client": client}
    p50 = {name: statistics.median(values) for name, values in ways.items()}
    load = max(load_before, os.getloadavg()[0])
    print(f"demo model, {args.tokens}-token greedy replies to a text question, {args.requests} requests per way "
          f"after {args.warmup} unmeasured; {os.cpu_count()} CPUs, load average up to {load:.1f}; "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{'time to first text':<22} {'p50':>8} {'p95':>9}")
    for name, values in ways.items():
        print(f"{name:<22} {p50[name] * 1000:>6.1f} ms {percentile(values, 0.95) * 1000:>6.1f} ms")
    model_in_server = statistics.median(split["model first token"])
    ours = p50["chatapp"] - p50["bare Gradio"] - model_in_server
    print(f"breakdown of chatapp's p50: model first token {model_in_server * 1000:.1f} ms; Gradio queue + SSE "
          f"(bare Gradio) {p50['bare Gradio'] * 1000:.1f} ms; ours {ours * 1000:.1f} ms; gradio_client's own "
          f"share on top {(p50['gradio_client'] - p50['chatapp']) * 1000:.1f} ms")
    print(f"in process: our handler adds {(p50['handler (in process)'] - p50['model']) * 1000:.1f} ms to the "
          f"model's first token")
    print("inside the server (p50 of each part): "
          + "; ".join(f"{name} {statistics.median(values) * 1000:.1f} ms" for name, values in split.items()))
    print(f"server CPU per request (all threads): chatapp {app_cpu * 1000:.1f} ms, bare Gradio {bare_cpu * 1000:.1f} ms")
    verdict = "met" if p50["chatapp"] <= GOAL_S else "NOT met"
    print(f"chatapp p50 time to first text {p50['chatapp'] * 1000:.1f} ms = {p50['chatapp'] / GOAL_S:.2f} of the "
          f"{GOAL_S * 1000:.0f} ms goal ({verdict}); through gradio_client {p50['gradio_client'] * 1000:.1f} ms = "
          f"{p50['gradio_client'] / GOAL_S:.2f} of it")
    from bench.results import save_results  # a namespace package under ROOT, which is on sys.path (above)

    figures = {"requests": args.requests, "tokens": args.tokens, "load_average": load, "goal_s": GOAL_S,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
               "p50_s": p50, "p95_s": {name: percentile(values, 0.95) for name, values in ways.items()},
               "ours_s": ours, "server_split_p50_s": {k: statistics.median(v) for k, v in split.items()},
               "server_cpu_per_request_s": {"chatapp": app_cpu, "bare_gradio": bare_cpu}}
    table = ["| time to first text | p50 | p95 |", "|---|---|---|"]
    table += [f"| {name} | {p50[name] * 1000:.1f} ms | {percentile(values, 0.95) * 1000:.1f} ms |"
              for name, values in ways.items()]
    save_results("overhead", figures, table,
                 f"Demo model, {args.tokens}-token greedy replies, {args.requests} requests per way, load average up "
                 f"to {load:.1f} on {os.cpu_count()} CPUs. Goal: chatapp p50 <= {GOAL_S * 1000:.0f} ms ({verdict}).")


if __name__ == "__main__":
    main()
