"""The README's screenshots, taken from the real app (`python app.py`, demo model) in headless
Chromium: one chat about a shapes image with a thumbs-up, then the admin tab with a finished
training run, its curves and the adapter it published.

Writes docs/chat-page.png and docs/admin-tab.png (committed; rerun this test after changing the
page). Each must stay a small PNG of the viewport, so the README stays light to clone and to read.
"""
import re
import subprocess
import sys

import pytest
from PIL import Image

from chatapp.demo import shapes
from chatapp.feedback.store import Store
from chatapp.learning import simulate
from support import ROOT, start_server, stop_server, subprocess_env

DOCS = ROOT / "docs"
VIEWPORT = {"width": 1100, "height": 750}
MAX_PNG_BYTES = 200_000
# A short real run, so the admin tab has a run, curves and an adapter to show: seconds of training
# on the demo model, with a small gate probe (the default 1,200 questions would be most of the time).
# The gate decides as always: v1 is kept either way, and active only if promoted.
TRAIN = ["--method", "kto", "--from", "base", "--max-steps", "12", "--epochs", "1", "--batch-size", "4",
         "--min-rows", "10", "--probe-per-type", "10"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def save_screenshot(page, name: str):
    """A viewport screenshot as an 8-bit palette PNG (a UI has few colours; RGB PNGs were ~3x larger)."""
    path = DOCS / name
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw))
    Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    raw.unlink()
    return path


def trained_data_dir(data, demo_engine):
    """A data dir with 40 voted chats from simulated users and one finished training run, which
    published v1; returns the version the chat answers with (v1 if the gate promoted it)."""
    store = Store(data)
    logged = simulate.log_chats(store, demo_engine.model, demo_engine.processor, 40, seed=5,
                                users=[f"user{i}" for i in range(5)])
    simulate.vote(store, logged, simulate.style_rule("terse"))
    result = subprocess.run([sys.executable, "-m", "chatapp", "train", "--data-dir", str(data), "--model", "demo",
                             *TRAIN], cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [run] = store.runs()
    store.close()
    assert run["status"] in ("promoted", "rejected"), run
    return "v1" if run["status"] == "promoted" else "none"


def test_screenshots_of_the_chat_page_and_the_admin_tab(browser, tmp_path, demo_engine):
    from playwright.sync_api import expect

    scene = shapes.Scene((shapes.Shape("circle", "blue", 20, 24, 10), shapes.Shape("square", "red", 46, 40, 9),
                          shapes.Shape("triangle", "yellow", 22, 48, 9)))
    image = tmp_path / "shapes.png"
    shapes.render(scene).save(image)
    DOCS.mkdir(exist_ok=True)
    data = tmp_path / "data"
    serving = trained_data_dir(data, demo_engine)
    proc, url = start_server(data, args=())  # with the background trainer, as `python app.py` runs
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        expect(page.locator("#whoami")).to_contain_text("local", timeout=30_000)
        page.locator('#message input[data-testid="file-upload"]').set_input_files(str(image))
        expect(page.locator("#message img")).to_have_count(1, timeout=15_000)
        page.locator("#message textarea").fill("What color is the circle?")
        page.locator("#message textarea").press("Enter")
        answer = page.locator('[data-testid="bot"]').last
        expect(answer).to_contain_text("blue", timeout=60_000, ignore_case=True)
        expect(answer).to_contain_text(f"adapter {serving}", timeout=30_000)
        page.get_by_role("button", name="Like").last.click()
        expect(page.locator("#feedback-panel")).to_be_visible(timeout=10_000)
        page.locator("#comment textarea").fill("Right, thanks.")
        # the conversation and the thumbs panel fill the viewport; the page's header is above them
        page.locator("#chatbot").evaluate("chat => chat.scrollIntoView({block: 'start'})")
        chat_png = save_screenshot(page, "chat-page.png")
        page.locator("#save-feedback").click()
        expect(page.locator("#feedback-panel")).to_be_hidden(timeout=10_000)
        # the "feedback saved" notice would cover the admin tab's first row
        expect(page.locator('[data-testid="toast-body"]')).to_contain_text("saved", timeout=10_000)
        page.locator('[data-testid="toast-close"]').click()
        expect(page.locator('[data-testid="toast-body"]')).to_have_count(0, timeout=10_000)

        page.get_by_role("tab", name="Admin").click()
        expect(page.locator("#admin-serving")).to_have_text("base" if serving == "none" else serving, timeout=30_000)
        expect(page.locator("#admin-run")).to_have_attribute("data-status", re.compile("promoted|rejected"),
                                                             timeout=30_000)
        expect(page.locator("#admin-trainer-state")).not_to_contain_text("not running", timeout=60_000)
        expect(page.locator("#admin-loss-plot canvas, #admin-loss-plot svg").first).to_be_visible(timeout=30_000)
        expect(page.locator("#admin-adapters")).to_contain_text("v1", timeout=30_000)
        expect(page.locator("#admin-totals")).to_contain_text("votes up", timeout=30_000)
        page.evaluate("window.scrollTo(0, 0)")
        admin_png = save_screenshot(page, "admin-tab.png")
        page.close()
    finally:
        stop_server(proc)

    for path in (chat_png, admin_png):
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (VIEWPORT["width"], VIEWPORT["height"]), (path, png.size)
        assert path.stat().st_size < MAX_PNG_BYTES, (path, path.stat().st_size)
