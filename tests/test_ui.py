"""The chat page: handlers as plain functions, then the real app in a real browser."""
import random
import subprocess
import sys
import time
import urllib.request

import gradio as gr
import pytest

from chatapp import shapes
from chatapp.ui import ChatHandlers, history_to_messages
from conftest import ROOT, free_port, subprocess_env


@pytest.fixture
def image_file(tmp_path):
    scene = shapes.Scene((shapes.Shape("circle", "blue", 20, 24, 10), shapes.Shape("square", "red", 46, 40, 9)))
    path = tmp_path / "two.png"
    shapes.render(scene).save(path)
    return path


def test_history_becomes_engine_messages(image_file):
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(image_file)}}]},
        {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "What color is the circle?"},
    ]
    messages = history_to_messages(history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text"]
    assert messages[0]["content"][0]["image"].size == (64, 64)


def test_add_user_message_refuses_bad_input(demo_engine, tmp_path, image_file):
    handlers = ChatHandlers(demo_engine)
    with pytest.raises(gr.Error, match="Type a message"):
        handlers.add_user_message({"text": "  ", "files": []}, [])
    with pytest.raises(gr.Error, match="limit"):
        handlers.add_user_message({"text": "x" * 5000, "files": []}, [])
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a not really")
    with pytest.raises(gr.Error, match="fake.png"):
        handlers.add_user_message({"text": "hi", "files": [str(fake)]}, [])
    history, _ = handlers.add_user_message({"text": "What color is the circle?", "files": [str(image_file)]}, [])
    assert history[0]["content"] == {"path": str(image_file)} and history[1]["content"] == "What color is the circle?"


def test_respond_streams_an_answer(demo_engine, image_file):
    handlers = ChatHandlers(demo_engine)
    history, _ = handlers.add_user_message({"text": "What color is the circle?", "files": [str(image_file)]}, [])
    steps = list(handlers.respond(history, 0, 0))
    assert len(steps) >= 2  # streamed, then the final step with the reply's details
    final_history, info = steps[-1]
    assert "blue" in final_history[-1]["content"].lower()
    assert "model `demo`" in info and "adapter `none`" in info
    with pytest.raises(gr.Error, match="temperature"):
        list(handlers.respond(history, 9, 0))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("data")
    log = open(data / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--data-dir", str(data)], cwd=ROOT,
                            env=subprocess_env(HF_HUB_OFFLINE="1"), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((data / "server.log").read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("server did not start: " + (data / "server.log").read_text())
    yield url, data / "server.log"
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def test_serve_prints_the_offline_notice(server):
    _, log = server
    text = log.read_text()
    assert "notice:" in text and "demo model" in text


def test_browser_chat_with_an_image(server, image_file, artifacts):
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        expect(page.locator("#model-notice")).to_contain_text("demo model", timeout=30_000)
        page.get_by_text("Generation settings").click()
        page.locator("#temperature input[type=number]").fill("0")
        page.locator("#temperature input[type=number]").press("Enter")
        page.locator('#message input[data-testid="file-upload"]').set_input_files(str(image_file))
        expect(page.locator("#message img")).to_have_count(1, timeout=15_000)
        page.locator("#message textarea").fill("What color is the circle?")
        page.locator("#message textarea").press("Enter")
        bot = page.locator('[data-testid="bot"]').last
        expect(bot).to_contain_text("blue", timeout=60_000, ignore_case=True)
        expect(page.locator("#reply-info")).to_contain_text("model", timeout=30_000)
        page.screenshot(path=str(artifacts / "chat-page.png"), full_page=True)
        # A second turn in the same conversation, without a new image.
        page.locator("#message textarea").fill("How many shapes are there?")
        page.locator("#message textarea").press("Enter")
        expect(page.locator('[data-testid="bot"]')).to_have_count(2, timeout=60_000)
        expect(page.locator('[data-testid="bot"]').last).to_contain_text("two", timeout=60_000, ignore_case=True)
        browser.close()
