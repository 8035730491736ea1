"""The chat page: its handlers as plain functions, then the real app (`python app.py`) in headless
Chromium: image question, streamed answer, thumbs with a reason, regenerate, prefer, reload and
reopen, compare mode, edit; the store is checked afterwards."""
import json

import gradio as gr
import pytest

from chatapp.demo import shapes
from chatapp.web.chat import ChatService
from chatapp.feedback.store import Store
from chatapp.web.ui import ChatPage, PageState, render
from chatapp.web.users import Users
from support import set_slider, start_server, stop_server


@pytest.fixture
def upload_dir(tmp_path):
    """A folder inside Gradio's upload cache: the handlers accept only files a request uploaded there."""
    import tempfile
    from pathlib import Path

    from gradio.utils import get_upload_folder

    Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=get_upload_folder(), prefix="chatapp-test-"))


@pytest.fixture
def image_file(upload_dir):
    scene = shapes.Scene((shapes.Shape("circle", "blue", 20, 24, 10), shapes.Shape("square", "red", 46, 40, 9)))
    path = upload_dir / "two.png"
    shapes.render(scene).save(path)
    return path


@pytest.fixture
def page(demo_engine, tmp_path):
    store = Store(tmp_path / "data")
    return ChatPage(ChatService(demo_engine, store), Users(tmp_path / "data"))


def _run(generator):
    """Drain a streaming handler; returns the list of update dicts it yielded."""
    return list(generator)


def test_send_streams_stores_and_renders(page, image_file):
    page.build("demo")  # creates the components the handlers update
    request = gr.Request(username=None)
    updates = _run(page.send({"text": "What color is the circle?", "files": [str(image_file)]}, PageState(),
                             0, 50, 1.0, 64, "", "auto", "", False, request))
    assert len(updates) >= 3  # the user's turn shown, streamed text, the final rebuild
    final = updates[-1]
    state = final[page.state]
    assert state.conversation_id is not None and len(state.entry_ids) == 3  # image, text, answer
    entries = final[page.chatbot].value if hasattr(final[page.chatbot], "value") else final[page.chatbot]
    assert "blue" in json.dumps(entries).lower() and "adapter none" in json.dumps(entries)
    assert "model `demo`" in final[page.info]
    conversation = page.service.conversation(page.users.get(None), state.conversation_id)
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert len(conversation["messages"][0]["images"]) == 1


def test_send_refuses_bad_input_and_stores_nothing(page, image_file, upload_dir):
    page.build("demo")
    request = gr.Request(username=None)
    fake = upload_dir / "fake.png"
    fake.write_bytes(b"GIF89a not really")
    cases = [({"text": "  ", "files": []}, "type a message"),
             ({"text": "x" * 5000, "files": []}, "limit is 4000"),
             ({"text": "hi", "files": [str(fake)]}, "fake.png")]
    for message, error in cases:
        with pytest.raises(gr.Error, match=error):
            _run(page.send(message, PageState(), 0, 50, 1.0, 64, "", "auto", "", False, request))
    with pytest.raises(gr.Error, match="temperature"):
        _run(page.send({"text": "hi", "files": []}, PageState(), 9, 50, 1.0, 64, "", "auto", "", False, request))
    assert page.service.store.feedback_stats()["messages"] == 0


def test_render_marks_siblings_votes_and_images():
    conversation = {"messages": [
        {"id": 1, "role": "user", "text": "What?", "images": ["/x.png"], "siblings": [1], "position": 1},
        {"id": 3, "role": "assistant", "text": "Red.", "siblings": [2, 3], "position": 2, "model": "demo",
         "adapter": "v3", "vote": {"vote": "up"}, "preferred": True}]}
    entries, ids, feedback, last = render(conversation)
    assert ids == [1, 1, 3] and feedback == ["Like"] and last == 3
    assert '<img src="chatapp/image/1/0"' in entries[0]["content"]  # the owner-only route, never a file path
    assert "answer 2 of 2" in entries[2]["content"] and "adapter v3" in entries[2]["content"]


# ---------------------------------------------------------------- the real app in a browser

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    proc, url = start_server(data)
    yield url, data
    stop_server(proc)


@pytest.mark.slow
def test_serve_prints_the_offline_notice(server):
    _, data = server
    text = (data / "server.log").read_text()
    assert "notice:" in text and "demo model" in text


@pytest.mark.browser
@pytest.mark.slow
def test_browser_chat_vote_regenerate_prefer_reopen(server, browser, image_file, artifacts):
    from playwright.sync_api import expect

    url, data = server
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    expect(page.locator("#model-notice")).to_contain_text("demo model", timeout=30_000)
    expect(page.locator("#whoami")).to_contain_text("local", timeout=30_000)
    page.get_by_text("Generation settings").click()
    set_slider(page, "temperature", 0)
    page.locator('#message input[data-testid="file-upload"]').set_input_files(str(image_file))
    expect(page.locator("#message img")).to_have_count(1, timeout=15_000)
    page.locator("#message textarea").fill("What color is the circle?")
    page.locator("#message textarea").press("Enter")
    answer = page.locator('[data-testid="bot"]').last
    expect(answer).to_contain_text("blue", timeout=60_000, ignore_case=True)
    expect(answer).to_contain_text("demo · adapter none", timeout=30_000)
    expect(page.locator("#reply-info")).to_contain_text("model", timeout=30_000)
    page.screenshot(path=str(artifacts / "chat-page.png"), full_page=True)

    # thumbs up with a reason and a comment
    page.get_by_role("button", name="Like").last.click()
    expect(page.locator("#feedback-panel")).to_be_visible(timeout=10_000)
    page.locator("#reasons").get_by_text("too long").click()
    page.locator("#comment textarea").fill("right, but say it shorter")
    page.locator("#save-feedback").click()
    expect(page.locator("#feedback-panel")).to_be_hidden(timeout=10_000)

    # regenerate (sampled), then prefer the second answer
    set_slider(page, "temperature", 1)
    page.locator("#seed textarea, #seed input").first.fill("7")
    page.locator("#regenerate").click()
    expect(page.locator("#sibling-label")).to_contain_text("Answer 2 of 2", timeout=60_000)
    page.locator("#prefer").click()
    expect(page.locator("#sibling-label")).to_contain_text("preferred", timeout=10_000)
    expect(page.locator('[data-testid="bot"]').last).to_contain_text("preferred", timeout=10_000)
    # the first answer is still there, one click back
    page.locator("#sibling-previous").click()
    expect(page.locator("#sibling-label")).to_contain_text("Answer 1 of 2", timeout=10_000)
    page.locator("#sibling-next").click()
    expect(page.locator("#sibling-label")).to_contain_text("Answer 2 of 2", timeout=10_000)

    # reload: the conversation is in the sidebar and reopens with its image
    page.reload()
    expect(page.locator("#conversations")).to_contain_text("What color is the circle?", timeout=30_000)
    page.locator("#conversations").get_by_text("What color is the circle?").click()
    expect(page.locator('[data-testid="bot"]').last).to_contain_text("preferred", timeout=30_000)
    expect(page.locator("#chatbot img")).to_have_count(1, timeout=10_000)
    page.screenshot(path=str(artifacts / "chat-reopened.png"), full_page=True)
    page.close()

    # the store holds the vote (with reason and comment), the preference and the full context
    store = Store(data)
    votes = store.rated_messages()
    assert len(votes) == 1 and votes[0]["vote"] == "up"
    assert json.loads(votes[0]["reasons"]) == ["too long"] and votes[0]["comment"] == "right, but say it shorter"
    pairs = store.preference_pairs()
    assert len(pairs) == 1 and pairs[0]["rejected_id"] == votes[0]["message_id"]
    chosen = store.context(pairs[0]["chosen_id"])
    first = store.context(votes[0]["message_id"])
    assert chosen["prompt"] == first["prompt"]  # siblings: the same prompt
    [turn] = first["prompt"]
    assert [p["type"] for p in turn["content"]] == ["image", "text"]
    assert turn["content"][1]["text"] == "What color is the circle?"
    from PIL import Image
    assert Image.open(turn["content"][0]["path"]).size == (64, 64)
    assert "blue" in first["answer"].lower()
    assert chosen["generation"]["params"]["temperature"] == 1.0 and chosen["generation"]["seed"] == 7
    assert first["generation"]["params"]["temperature"] == 0.0 and first["generation"]["model_id"] == "demo"


@pytest.mark.browser
@pytest.mark.slow
def test_browser_compare_and_edit(server, browser, image_file, artifacts):
    from playwright.sync_api import expect

    url, data = server
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    expect(page.locator("#whoami")).to_contain_text("local", timeout=30_000)
    # a bad image is refused with a readable message in the page, and nothing is sent
    fake = image_file.parent / "notes.png"
    fake.write_text("not an image at all")
    page.locator('#message input[data-testid="file-upload"]').set_input_files(str(fake))
    expect(page.locator("#message img, #message [data-testid='file']").first).to_be_attached(timeout=15_000)
    page.locator("#message textarea").fill("What is this?")
    page.locator("#message textarea").press("Enter")
    expect(page.locator('[data-testid="toast-body"]').first).to_contain_text("not an image", timeout=30_000)
    expect(page.locator('[data-testid="bot"]')).to_have_count(0)
    expect(page.locator('[data-testid="user"]')).not_to_have_count(0)
    page.locator("#new-chat").click()
    # New chat has landed (it clears the refused message) before the compare request starts
    expect(page.locator('[data-testid="user"]')).to_have_count(0, timeout=30_000)

    page.locator("#compare-mode input").check()
    page.locator('#message input[data-testid="file-upload"]').set_input_files(str(image_file))
    expect(page.locator("#message img")).to_have_count(1, timeout=15_000)
    page.locator("#message textarea").fill("How many shapes are there?")
    page.locator("#message textarea").press("Enter")
    expect(page.locator("#pick-b")).to_be_visible(timeout=60_000)
    expect(page.locator("#compare-a")).not_to_be_empty()
    expect(page.locator("#compare-b")).not_to_be_empty()
    page.screenshot(path=str(artifacts / "chat-compare.png"), full_page=True)
    page.locator("#pick-b").click()
    expect(page.locator("#compare-panel")).to_be_hidden(timeout=10_000)
    expect(page.locator('[data-testid="bot"]')).to_have_count(1, timeout=10_000)
    page.locator("#compare-mode input").uncheck()

    # edit the question: a new branch answered greedily
    page.get_by_text("Generation settings").click()
    set_slider(page, "temperature", 0)
    page.locator('[data-testid="user"]').last.hover()
    page.get_by_role("button", name="Edit").last.click()
    editor = page.locator("#chatbot textarea").first
    editor.fill("What color is the square?")
    page.locator("#chatbot").get_by_role("button", name="Submit").click()
    expect(page.locator('[data-testid="bot"]').last).to_contain_text("red", timeout=60_000, ignore_case=True)
    page.close()

    store = Store(data)
    comparisons = store.query("SELECT * FROM comparisons")
    assert len(comparisons) == 1 and comparisons[0]["pick"] == "b"
    edits = store.query("SELECT * FROM messages WHERE kind = 'edit'")
    assert len(edits) == 1 and edits[0]["text"] == "What color is the square?"
    original = store.query("SELECT * FROM messages WHERE text = 'How many shapes are there?'")[0]
    assert edits[0]["parent_id"] == original["parent_id"]  # a sibling of the edited turn: a branch
    assert store.message_images(edits[0]["id"]) == store.message_images(original["id"])
