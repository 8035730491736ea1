"""Faults and attacks on the inputs (issue 16, findings 3, 4, 9, 10): every endpoint input is checked
for type and bounds, bad input gets a clear error that names nothing internal, nothing is stored for
a refusal and the server keeps answering; control characters are removed; lists, conversations and
temp files are bounded; and the smaller ones (a flag sent as text, a locked database, a trainer that
dies after activating, a PNG with a large metadata chunk).

The bad requests go over HTTP as raw JSON (`/gradio_api/call/<endpoint>`), as any client may send
them: Infinity, NaN, lone surrogates and numbers beyond 64 bits are valid there, and gradio_client
refuses to encode some of them."""
import io
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

import fault_figures
from chatapp.core import config
from chatapp.core.errors import RequestError
from chatapp.feedback import store_base
from chatapp.feedback.images import load_image
from chatapp.feedback.store import Store
from chatapp.learning.ab import ABTest
from chatapp.web.users import Users
from support import start_server, stop_server

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "root": "root-secret-333"}
INF, NAN = float("inf"), float("nan")
CHAT_PARAMS = ("conversation_id", "text", "image", "temperature", "top_k", "top_p", "max_new_tokens", "seed",
               "image_detail", "system_prompt")
CHAT_DEFAULTS = dict(conversation_id="", text="What color is the circle?", image=None, temperature=0, top_k=50,
                     top_p=1.0, max_new_tokens=16, seed=None, image_detail="auto", system_prompt="")
INTERNALS = ("Traceback", "Errno", "object at 0x", "/tmp", "/work", "/root", "/home", "sqlite", "NoneType",
             "has no attribute", "not iterable", "codec")


class Http:
    """One logged-in user talking to the API as raw JSON over HTTP."""

    def __init__(self, url: str, name: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=120)
        response = self.client.post("login", data={"username": name, "password": PASSWORDS[name]})
        assert response.status_code == 200, response.text

    def call(self, endpoint: str, data: list) -> tuple[str, object]:
        """("complete", the last output) or ("error", the message shown)."""
        body = json.dumps({"data": data})  # Infinity, NaN and \\ud800 escapes are what json writes for them
        response = self.client.post(f"gradio_api/call/{endpoint}", content=body,
                                    headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        event_id = response.json()["event_id"]
        kind, payload = None, None
        with self.client.stream("GET", f"gradio_api/call/{endpoint}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: ") and kind in ("complete", "error"):
                    payload = json.loads(line[len("data: "):])
        if kind == "error":
            return kind, (payload or {}).get("error") if isinstance(payload, dict) else payload
        return kind, payload[-1] if isinstance(payload, list) and payload else payload


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    users = Users(data)
    for name, password in PASSWORDS.items():
        users.add(name, password, role="admin" if name == "root" else "user")
    proc, url = start_server(data)
    yield url, data
    stop_server(proc)


@pytest.fixture(scope="module")
def alice(app):
    return Http(app[0], "alice")


@pytest.fixture(scope="module")
def root(app):
    return Http(app[0], "root")


@pytest.fixture(scope="module")
def answer(app, alice):
    """One answered question of alice's, and one image stored by bob (a file that exists in the data dir)."""
    from gradio_client import Client, handle_file

    url, data = app
    image = data.parent / "bob-circle.png"
    Image.new("RGB", (64, 64), "green").save(image)
    bob = Client(url, auth=("bob", PASSWORDS["bob"]), verbose=False)
    bob.predict(conversation_id="", text="What is this?", image=handle_file(str(image)), temperature=0,
                max_new_tokens=8, api_name="/chat")
    kind, done = alice.call("chat", [CHAT_DEFAULTS[p] for p in CHAT_PARAMS])
    assert kind == "complete" and done["done"], done
    return done


def chat(**changes):
    values = dict(CHAT_DEFAULTS, **changes)
    return "chat", lambda ids, data: [values[p] for p in CHAT_PARAMS]


def vote(message_id="answer", vote="down", reasons=None, comment=""):
    return "vote", lambda ids, data: [ids.get(message_id, message_id), vote, reasons, comment]


def endpoint(name, *values):
    return name, lambda ids, data: [v(ids, data) if callable(v) else ids.get(v, v) if isinstance(v, str) else v
                                    for v in values]


def stored_image(ids, data):
    return {"path": str(next((data / "images").rglob("*.png")))}


BAD = [  # (case, (endpoint, data builder), fragments every message must hold)
    ("top_k Infinity", chat(top_k=INF), ["top_k"]),
    ("seed Infinity", chat(seed=INF), ["seed"]),
    ("max_new_tokens Infinity", chat(max_new_tokens=INF), ["max_new_tokens"]),
    ("max_new_tokens -Infinity", chat(max_new_tokens=-INF), ["max_new_tokens"]),
    ("temperature NaN", chat(temperature=NAN), ["temperature"]),
    ("top_p NaN", chat(top_p=NAN), ["top_p"]),
    ("temperature true", chat(temperature=True), ["temperature", "number"]),
    ("temperature as words", chat(temperature="hot"), ["temperature", "number"]),
    ("top_k as a list", chat(top_k=[5]), ["top_k", "number"]),
    ("max_new_tokens as an object", chat(max_new_tokens={"n": 1}), ["max_new_tokens", "number"]),
    ("seed 2**70", chat(seed=2**70), ["seed"]),
    ("top_k 1e400 as text", chat(top_k="1e400"), ["top_k"]),
    ("top_k 2.5", chat(top_k=2.5), ["top_k", "whole number"]),
    ("conversation id 2**70", chat(conversation_id=str(2**70)), ["too large"]),
    ("conversation id 2**70 as a number", chat(conversation_id=2**70), ["too large"]),
    ("conversation id as a list", chat(conversation_id=[1]), ["must be a number"]),
    ("message as a number", chat(text=5), ["message must be text"]),
    ("message as a list", chat(text=["hi"]), ["message must be text"]),
    ("message with a lone surrogate", chat(text="a\ud800b"), ["surrogate"]),
    ("system prompt as a number", chat(system_prompt=5), ["system prompt must be text"]),
    ("system prompt as a list", chat(system_prompt=["be nice"]), ["system prompt must be text"]),
    ("system prompt with a lone surrogate", chat(system_prompt="\udfff"), ["surrogate"]),
    ("a forged server path as the image", chat(image={"path": "/etc/passwd"}), ["uploaded"]),
    # marked as a file, the path is refused by Gradio itself before the handler runs: an error, no details
    ("a forged file path marked as a file", chat(image={"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}),
     None),
    ("another user's stored image by path", ("chat", lambda ids, data: [
        "", "What is this?", stored_image(ids, data), 0, 50, 1.0, 16, None, "auto", ""]), ["uploaded"]),
    ("a path to the users file", ("chat", lambda ids, data: [
        "", "hi", {"path": str(data / "users.json")}, 0, 50, 1.0, 16, None, "auto", ""]), ["uploaded"]),
    ("a path with ../ out of the upload folder", chat(image={"path": "/tmp/gradio/../../etc/hostname"}), ["uploaded"]),
    ("a number as the image", chat(image=5), ["uploaded"]),
    ("a message id of 2**70", vote(message_id=2**70), ["too large"]),
    ("a message id of Infinity", vote(message_id=INF), ["whole number"]),
    ("a message id of true", vote(message_id=True), ["must be a number"]),
    ("a message id in exponent form", vote(message_id="1e3"), ["must be a number"]),
    ("reasons as a number", vote(reasons=5), ["reasons must be a list"]),
    ("reasons as text", vote(reasons="wrong"), ["reasons must be a list"]),
    ("20,000 reasons", vote(reasons=["wrong"] * 20_000), ["at most 5 reasons"]),
    ("a reason that is a number", vote(reasons=[5]), ["unknown reason"]),
    ("a comment as a number", vote(comment=5), ["comment must be text"]),
    ("a comment with a lone surrogate", vote(comment="ok \ud83d"), ["surrogate"]),
    ("a vote as a list", vote(vote=["up"]), ["vote must be one of"]),
    ("no vote", vote(vote=None), ["vote must be one of"]),
    ("regenerate message 'abc'", endpoint("regenerate", "abc", 0, 50, 1.0, 16, None, "auto"), ["must be a number"]),
    ("regenerate with seed Infinity", endpoint("regenerate", "answer", 0, 50, 1.0, 16, INF, "auto"), ["seed"]),
    ("prefer message 2**64", endpoint("prefer", 2**64), ["too large"]),
    ("compare pick of comparison 2**70", endpoint("compare_pick", 2**70, "a"), ["too large"]),
    ("conversation -Infinity", endpoint("conversation", -INF), ["whole number"]),
    ("conversation 1.5", endpoint("conversation", 1.5), ["whole number"]),
]
ADMIN_BAD = [
    ("a 300-character version name", endpoint("activate", "v" + "9" * 300), ["version"]),
    ("an unknown version", endpoint("activate", "v999999"), ["no adapter v999999 in adapters/"]),
    ("a version as a number", endpoint("activate", 3), ["version must be text"]),
    ("an A/B candidate that does not exist", endpoint("ab_start", "v999999", False, 20), ["no adapter v999999"]),
    ("an A/B candidate of 300 characters", endpoint("ab_start", "x" * 300, False, 20), ["version"]),
    ("an A/B auto flag that is neither", endpoint("ab_start", "base", "maybe", 20), ["auto must be true or false"]),
    ("A/B min votes Infinity", endpoint("ab_start", "base", False, INF), []),
    ("an adapter name ../x", endpoint("activate", "../x"), ["version"]),
    ("an adapter name v0", endpoint("activate", "v0"), ["v0"]),
    ("an adapter name v1/../v2", endpoint("activate", "v1/../v2"), ["version"]),
    ("an A/B candidate ../x", endpoint("ab_start", "../x", False, 20), ["version"]),
]


def snapshot(data) -> dict:
    store = Store(data)
    counts = {table: store.count(f"SELECT count(*) AS n FROM {table}")
              for table in ("conversations", "messages", "feedback", "feedback_events", "images", "comparisons")}
    counts["settings"] = store.query("SELECT key, value FROM settings ORDER BY key")
    counts["files"] = sorted(p.name for p in (data / "images").rglob("*") if p.is_file())
    store.close()
    return counts


def check_refused(app, who, answer, case, build, fragments):
    url, data = app
    endpoint_name, data_for = build
    ids = {"answer": answer["message_id"]}
    before = snapshot(data)
    kind, message = who.call(endpoint_name, data_for(ids, data))
    assert kind == "error", f"{case}: accepted: {message}"
    if fragments is None:  # refused by Gradio before any handler: show_error=False keeps its internals in
        assert message is None, f"{case}: {message}"
    else:
        assert isinstance(message, str) and message, f"{case}: no message shown"
        for fragment in fragments:
            assert fragment.lower() in message.lower(), f"{case}: {message}"
    for internal in INTERNALS + (str(data),):
        assert internal.lower() not in (message or "").lower(), f"{case}: {message}"
    assert snapshot(data) == before, f"{case}: something was stored"
    kind, mine = who.call("conversations", [])  # the server keeps answering
    assert kind == "complete" and isinstance(mine, list)
    REFUSED.append(case)
    fault_figures.record("bad input", cases=len(BAD) + len(ADMIN_BAD), refused=len(REFUSED))


REFUSED: list[str] = []  # the cases refused clearly with nothing stored, for the fault suite's summary


@pytest.mark.slow
@pytest.mark.parametrize("case, build, fragments", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_clearly_and_stores_nothing(app, alice, answer, case, build, fragments):
    check_refused(app, alice, answer, case, build, fragments)


@pytest.mark.slow
@pytest.mark.parametrize("case, build, fragments", ADMIN_BAD, ids=[c[0] for c in ADMIN_BAD])
def test_bad_admin_input_is_refused_clearly(app, root, answer, case, build, fragments):
    check_refused(app, root, answer, case, build, fragments)


def test_there_are_at_least_30_bad_input_cases():
    assert len(BAD) + len(ADMIN_BAD) >= 30


# ---------------------------------------------------------------- hostile images and text, through the server

def image_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def animated(fmt: str, frames: int, side: int) -> bytes:
    """Frames of one palette index each, `side` pixels square (each case its own size: stored images
    are deduplicated by content)."""
    images = [Image.new("P", (side, side), i % 256) for i in range(frames)]
    return image_bytes(images[0], fmt, save_all=True, append_images=images[1:])


def png_with_text_chunk(size: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * size)
    return image_bytes(Image.new("RGB", (16, 16), "blue"), "PNG", pnginfo=info)


def oriented_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 40 x 20 pixels are shown as 20 x 40
    return image_bytes(Image.new("RGB", (40, 20), "green"), "JPEG", exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = Image.new("P", (24, 24), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return image_bytes(image, "PNG", transparency=0)


# (case, the upload's bytes, its name, what a stored image must be when it is accepted: size or None)
HOSTILE_IMAGES = [
    ("an animated GIF of 2,000 frames", lambda: animated("GIF", 2000, 8), "anim.gif", (8, 8)),
    ("an APNG of 3 frames", lambda: animated("PNG", 3, 10), "anim.png", (10, 10)),
    ("a PNG with a 50 MB text chunk", lambda: png_with_text_chunk(50 * 2**20), "big-text.png", (16, 16)),
    ("a CMYK JPEG", lambda: image_bytes(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"), "cmyk.jpg", (30, 20)),
    ("a 16-bit PNG", lambda: image_bytes(Image.new("I;16", (30, 20), 40000), "PNG"), "deep.png", (30, 20)),
    ("a 1x1 PNG", lambda: image_bytes(Image.new("RGB", (1, 1), "red"), "PNG"), "dot.png", (1, 1)),
    ("an 8192x1 PNG", lambda: image_bytes(Image.new("RGB", (8192, 1), "red"), "PNG"), "line.png", (8192, 1)),
    ("a WebP bomb (16383 x 16383, one colour)", lambda: image_bytes(Image.new("RGB", (16383, 16383)), "WEBP",
                                                                      lossless=True), "bomb.webp", None),
    ("a palette PNG with transparency", palette_with_transparency, "palette.png", (24, 24)),
    ("an oriented JPEG", oriented_jpeg, "turned.jpg", (20, 40)),
]


def upload(who: Http, name: str, data: bytes) -> tuple[dict | None, str]:
    """The uploaded file as /chat takes it, or None and the message of a refused upload (files over
    MAX_IMAGE_BYTES are refused by the upload route itself: 413)."""
    response = who.client.post("gradio_api/upload", files=[("files", (name, data))])
    if response.status_code == 413:
        return None, response.text
    assert response.status_code == 200, response.text
    [path] = response.json()
    return {"path": path, "meta": {"_type": "gradio.FileData"}}, ""


def assert_refused_clearly(case: str, message, data, before: dict) -> None:
    """A refusal shows a message that names nothing internal, and nothing was stored."""
    assert isinstance(message, str) and message, f"{case}: no message shown"
    for internal in INTERNALS + (str(data),):
        assert internal.lower() not in message.lower(), f"{case}: {message}"
    assert snapshot(data) == before, f"{case}: something was stored"


def accepted_or_refused_clearly(app, who, case, data_for_call) -> tuple[str, object, list[Path]]:
    """Sends one request; a refusal must be clear, name nothing internal and store nothing. Returns the
    outcome, its payload and the image files it stored."""
    url, data = app
    before = snapshot(data)
    kind, payload = who.call("chat", data_for_call)
    if kind == "error":
        assert_refused_clearly(case, payload, data, before)
        new_files = []
    else:
        assert kind == "complete" and payload["done"], f"{case}: {payload}"
        new_files = [p for p in (data / "images").rglob("*") if p.is_file() and p.name not in before["files"]]
    kind_after, mine = who.call("conversations", [])  # the server keeps answering
    assert kind_after == "complete" and isinstance(mine, list)
    return kind, payload, new_files


@pytest.mark.slow
@pytest.mark.parametrize("case, make, name, size", HOSTILE_IMAGES, ids=[c[0] for c in HOSTILE_IMAGES])
def test_hostile_images_are_refused_clearly_or_stored_as_plain_rgb(app, alice, case, make, name, size):
    url, data = app
    before = snapshot(data)
    image, refusal = upload(alice, name, make())
    if image is None:  # refused at the upload: clearly, and nothing reached the store
        assert_refused_clearly(case, refusal, data, before)
        assert "size" in refusal.lower(), refusal
        kind, stored = "error", []
    else:
        kind, payload, stored = accepted_or_refused_clearly(
            app, alice, case, [dict(CHAT_DEFAULTS, image=image)[p] for p in CHAT_PARAMS])
    OUTCOMES[case] = kind
    fault_figures.record("hostile images", cases=len(OUTCOMES),
                         accepted=sum(k == "complete" for k in OUTCOMES.values()),
                         refused=sum(k == "error" for k in OUTCOMES.values()))
    if size is None:  # no plain image of that size may be made: it must be refused
        assert kind == "error", f"{case}: accepted"
    if kind == "complete":
        [file] = stored
        with Image.open(file) as kept:
            assert kept.mode == "RGB" and kept.size == size, f"{case}: stored {kept.mode} {kept.size}"
            assert not kept.info.get("comment"), f"{case}: its metadata was kept"


OUTCOMES: dict[str, str] = {}  # hostile image case -> "complete" (accepted) or "error" (refused)


@pytest.mark.slow
@pytest.mark.parametrize("case, text", [
    ("a 100 KB line of emoji", "\U0001F600" * 25_000),
    ("4,000 emoji (the message limit in characters)", "\U0001F600" * 4000),
], ids=["100 KB of emoji", "4000 emoji"])
def test_long_emoji_text_is_refused_clearly_or_answered(app, alice, case, text):
    kind, payload, _ = accepted_or_refused_clearly(app, alice, case, [dict(CHAT_DEFAULTS, text=text)[p]
                                                                       for p in CHAT_PARAMS])
    if kind == "error":
        assert "message" in payload.lower(), payload  # it says what to change


@pytest.mark.slow
def test_invalid_utf8_over_raw_http_is_refused_and_the_server_keeps_answering(app, alice):
    url, data = app
    before = snapshot(data)
    body = b'{"data": ["", "caf\xe9 \xff\xfe", null, 0, 50, 1.0, 16, null, "auto", ""]}'
    response = alice.client.post("gradio_api/call/chat", content=body, headers={"content-type": "application/json"})
    if response.status_code == 200:  # queued: the event stream must end in a clear error or a stored answer
        event_id = response.json()["event_id"]
        text = alice.client.get(f"gradio_api/call/chat/{event_id}").text
        assert "Traceback" not in text
    else:
        assert 400 <= response.status_code < 500, response.text
        assert snapshot(data) == before
    kind, mine = alice.call("conversations", [])
    assert kind == "complete" and isinstance(mine, list)


# ---------------------------------------------------------------- finding 4: control characters

@pytest.mark.slow
def test_control_characters_are_removed_and_newlines_kept(app, alice, answer):
    url, data = app
    sent = "a\x00b\u202ec\x1b[31mred\x1b[0m\td\r\ne\x07\u2066f\u2069\x9b"
    kind, done = alice.call("chat", [dict(CHAT_DEFAULTS, text=sent, system_prompt="Be\x00 \u202ebrief\x1b[1m.\n")[p]
                                     for p in CHAT_PARAMS])
    assert kind == "complete", done
    kind, voted = alice.call("vote", [done["message_id"], "down", ["wrong", "wrong", "other"], "no\x1b]0;x\x07 \u202eway"])
    assert kind == "complete", voted
    store = Store(data)
    assert store.message(done["user_message_id"])["text"] == "abcred\td\nef"
    assert store.conversation(done["conversation_id"])["system_prompt"] == "Be brief."
    current = store.vote(store.ensure_user("alice"), done["message_id"])
    assert current["comment"] == "no way" and current["reasons"] == ["wrong", "other"]  # each reason once


# ---------------------------------------------------------------- finding 3: the boundary itself

def test_what_a_user_sent_is_echoed_only_in_short():
    from chatapp.web.inputs import parse_id, validate_choice, validate_version

    for refuse in (lambda: validate_choice("a" * 100_000, ("a", "b"), "pick"), lambda: parse_id("x" * 100_000, "id"),
                   lambda: validate_version("v" + "9" * 100_000), lambda: config.validate_generation(top_k="9" * 10**5)):
        with pytest.raises(ValueError) as caught:
            refuse()
        assert len(str(caught.value)) < 200, str(caught.value)[:300]


def test_an_unexpected_error_reaches_the_user_as_a_generic_message_with_an_incident(caplog):
    import gradio as gr

    from chatapp.web.api import as_gradio_errors

    @as_gradio_errors
    def broken(path):
        open(path)  # an error no handler expects, naming a server path

    @as_gradio_errors
    def streaming(path):
        yield 1
        open(path)

    missing = "/srv/secret/data/nothing-here.png"
    for call in (lambda: broken(missing), lambda: list(streaming(missing))):
        with caplog.at_level(logging.ERROR, logger="chatapp.web"), pytest.raises(gr.Error) as caught:
            call()
        shown = caught.value.message
        assert "went wrong on the server" in shown and "/srv" not in shown and "Errno" not in shown
        incident = shown.split("incident ")[1].split(")")[0]
        logged = [r for r in caplog.records if incident in r.getMessage()]
        assert logged and "/srv/secret" in str(logged[0].exc_info[1])  # the detail is in the server's log


def test_a_database_locked_past_the_timeout_reads_busy(tmp_path, monkeypatch):
    import gradio as gr

    from chatapp.web.api import BUSY_MESSAGE, as_gradio_errors

    store = Store(tmp_path)
    monkeypatch.setattr(store_base, "BUSY_TIMEOUT_S", 0.2)  # a shorter wait; the lock itself is real
    store.close()
    holder = sqlite3.connect(tmp_path / store_base.DB_NAME)
    holder.execute("BEGIN IMMEDIATE")  # another process writing for longer than the timeout
    try:
        @as_gradio_errors
        def save():
            Store(tmp_path).set_setting("x", 1)

        with pytest.raises(gr.Error) as caught:
            save()
        assert caught.value.message == BUSY_MESSAGE
    finally:
        holder.rollback()
        holder.close()
    Store(tmp_path).set_setting("x", 1)  # and it works again once the lock is gone


# ---------------------------------------------------------------- finding 9: bounds and quotas

def test_conversations_per_user_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_CONVERSATIONS_PER_USER", 3)
    store = Store(tmp_path)
    alice, bob = store.ensure_user("alice"), store.ensure_user("bob")
    for n in range(3):
        store.create_conversation(alice, f"chat {n}")
    with pytest.raises(RequestError, match="3 conversations"):
        store.create_conversation(alice, "one too many")
    assert len(store.conversations(alice)) == 3
    store.create_conversation(bob, "bob's first")  # a quota per user


def test_temp_files_of_failed_image_writes_are_removed(tmp_path):
    images = tmp_path / "images" / "ab"
    images.mkdir(parents=True)
    stale, fresh = images / ".tmp-ab12.png-0001", images / ".tmp-ab34.png-0002"
    stale.write_bytes(b"half an image")
    fresh.write_bytes(b"being written now")
    old = time.time() - config.STALE_TEMP_FILE_S - 60
    os.utime(stale, (old, old))
    Store(tmp_path)
    assert not stale.exists() and fresh.exists()


# ---------------------------------------------------------------- finding 10: the smaller ones

def test_an_ab_flag_sent_as_text_is_read_as_written(tmp_path):
    from chatapp.web.inputs import parse_flag

    assert parse_flag("false", "auto") is False and parse_flag("TRUE", "auto") is True
    assert parse_flag(False, "auto") is False
    for bad in ("no", "", 0, 1, None, [True]):
        with pytest.raises(RequestError, match="true or false"):
            parse_flag(bad, "auto")
    test = ABTest(Store(tmp_path))
    with pytest.raises(TypeError):
        test.start("v1", "root", auto="false")
    test.start("v1", "root", auto=False)
    assert test.running()["auto"] is False


def test_a_run_that_died_after_activating_keeps_its_decision(tmp_path):
    store = Store(tmp_path)
    dead_pid = 2**22 + 12345  # above the kernel's pid_max default of 2**22: no such process
    live = store.create_run("kto", {}, None)
    store.update_run(live, candidate_version="v2", decision="promoted", reason="gate: better", pid=dead_pid)
    inactive = store.create_run("kto", {}, None)
    store.update_run(inactive, candidate_version="v3", decision="promoted", reason="gate: better", pid=dead_pid)
    unpublished = store.create_run("kto", {}, None)
    store.update_run(unpublished, pid=dead_pid)
    assert sorted(store.fail_stale_runs(live_version="v2")) == [live, inactive, unpublished]
    kept = store.run(live)
    assert kept["status"] == "promoted" and kept["candidate_version"] == "v2" and "died" in kept["error"]
    assert store.run(inactive)["status"] == "failed" and "v3, which is not active" in store.run(inactive)["error"]
    assert store.run(unpublished)["status"] == "failed"


@pytest.mark.parametrize("chunk", ["ztxt", "icc"])
def test_a_png_with_a_large_metadata_chunk_is_accepted(chunk):
    info = PngImagePlugin.PngInfo()
    extra = {}
    if chunk == "ztxt":
        info.add_text("comment", "x" * 1_500_000, zip=True)  # over Pillow's 1 MB limit once inflated
    else:
        extra["icc_profile"] = b"\0" * 1_500_000
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG", pnginfo=info, **extra)
    image = load_image(buffer.getvalue())
    assert image.size == (8, 8) and image.getpixel((3, 3)) == (255, 0, 0) and not image.info


@pytest.mark.slow
def test_uploaded_files_do_not_outlive_their_age(tmp_path, monkeypatch, demo_engine):
    """One upload request may carry many files (Gradio takes up to 1000); the cache sweep removes
    them once they are `UPLOAD_CACHE_MAX_AGE_S` old instead of keeping them until shutdown."""
    import httpx

    from chatapp.web.chat import ChatService
    from chatapp.web.ui import build_app
    from support import free_port

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
    monkeypatch.setattr(config, "UPLOAD_CACHE_SWEEP_S", 1)  # shorter times; the sweep itself is Gradio's
    monkeypatch.setattr(config, "UPLOAD_CACHE_MAX_AGE_S", 2)
    app = build_app(ChatService(demo_engine, Store(tmp_path / "data")), Users(tmp_path / "data"))
    port = free_port()
    app.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        png = io.BytesIO()
        Image.new("RGB", (8, 8), "blue").save(png, format="PNG")
        files = [("files", (f"f{n}.png", png.getvalue(), "image/png")) for n in range(200)]
        uploaded = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files=files, timeout=60).json()
        assert len(uploaded) == 200 and all(os.path.exists(p) for p in uploaded)
        deadline = time.time() + 30
        while time.time() < deadline and any(os.path.exists(p) for p in uploaded):
            time.sleep(0.5)
        assert not any(os.path.exists(p) for p in uploaded)
    finally:
        app.close()


# ---------------------------------------------------------------- flooding, and a client that leaves

@pytest.mark.slow
def test_20_parallel_streams_from_one_user_are_answered_or_refused_as_busy(app):
    from concurrent.futures import ThreadPoolExecutor

    url, data = app
    before = snapshot(data)
    clients = [Http(url, "alice") for _ in range(20)]
    request = [dict(CHAT_DEFAULTS, text="How many shapes are there?", max_new_tokens=32)[p] for p in CHAT_PARAMS]
    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(lambda client: client.call("chat", request), clients))
    answered = [payload for kind, payload in outcomes if kind == "complete"]
    refused = [payload for kind, payload in outcomes if kind != "complete"]
    for message in refused:  # only a clear "busy" may turn one away
        assert isinstance(message, str) and ("busy" in message.lower() or "queue" in message.lower()), message
    assert all(done["done"] and done["message_id"] for done in answered)
    after = snapshot(data)
    assert after["conversations"] - before["conversations"] == len(answered)  # a refusal stores nothing
    assert after["messages"] - before["messages"] == 2 * len(answered)
    fault_figures.record("flooding", streams=20, answered=len(answered), busy=len(refused))
    kind, mine = clients[0].call("conversations", [])
    assert kind == "complete" and isinstance(mine, list)


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_keeps_the_message_and_the_answer_shown(app, alice):
    url, data = app
    before = snapshot(data)
    request = [dict(CHAT_DEFAULTS, text="Describe the image.", temperature=1.0, max_new_tokens=64)[p]
               for p in CHAT_PARAMS]
    response = alice.client.post("gradio_api/call/chat", content=json.dumps({"data": request}),
                                 headers={"content-type": "application/json"})
    event_id = response.json()["event_id"]
    with alice.client.stream("GET", f"gradio_api/call/chat/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: ") and line != "event: heartbeat":
                break  # the first update: the client leaves here, closing the connection
    deadline = time.time() + 30
    while time.time() < deadline:  # the server notices and ends the reply; both rows stay
        store = Store(data)
        rows = store.query("SELECT role, text FROM messages ORDER BY id DESC LIMIT 2")
        store.close()
        if snapshot(data)["messages"] - before["messages"] == 2 and rows[0]["role"] == "assistant":
            break
        time.sleep(0.2)
    assert [r["role"] for r in rows] == ["assistant", "user"] and rows[1]["text"] == "Describe the image."
    kind, mine = alice.call("conversations", [])  # the server keeps answering
    assert kind == "complete" and isinstance(mine, list)
