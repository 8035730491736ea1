"""The API through `gradio_client` against the real app with logins: the chat/feedback round trip,
isolation between users, admin checks, login throttling, and bad input that gets a clear error
while the server keeps answering and stores nothing."""
import io
import json
import random
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from chatapp.demo import shapes
from chatapp.feedback.store import Store
from chatapp.web.users import MAX_FAILED_LOGINS, Users, check_bind, check_password, hash_password
from support import ROOT, start_server, stop_server, subprocess_env

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "root": "root-secret-333", "carol": "carol-secret-4"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    users = Users(data)
    users.add("alice", PASSWORDS["alice"])
    users.add("bob", PASSWORDS["bob"])
    users.add("carol", PASSWORDS["carol"])
    users.add("root", PASSWORDS["root"], role="admin")
    proc, url = start_server(data)
    yield url, data
    stop_server(proc)


def client(url, name):
    from gradio_client import Client

    return Client(url, auth=(name, PASSWORDS[name]), verbose=False)


@pytest.fixture(scope="module")
def alice(app):
    return client(app[0], "alice")


@pytest.fixture(scope="module")
def bob(app):
    return client(app[0], "bob")


@pytest.fixture(scope="module")
def circle_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "circle.png"
    scene = shapes.Scene((shapes.Shape("circle", "green", 22, 22, 10), shapes.Shape("triangle", "yellow", 44, 44, 11)))
    shapes.render(scene).save(path)
    return path


def expect_error(call, *fragments):
    with pytest.raises(Exception) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


@pytest.mark.slow
def test_api_round_trip_with_login(app, alice, circle_png):
    from gradio_client import handle_file

    url, data = app
    endpoints = set(alice.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/regenerate", "/vote", "/prefer", "/compare", "/compare_pick", "/conversations",
            "/conversation", "/feedback_stats"} <= endpoints
    job = alice.submit(conversation_id="", text="What color is the circle?", image=handle_file(str(circle_png)),
                       temperature=0, api_name="/chat")
    steps = list(job)
    answer = job.result()
    assert answer["done"] and "green" in answer["text"].lower() and answer["adapter"] == "none"
    assert len(steps) >= 2 and not steps[0]["done"]  # streamed
    again = alice.predict(message_id=answer["message_id"], temperature=1.0, seed=3, api_name="/regenerate")
    assert again["done"] and again["message_id"] != answer["message_id"]
    vote = alice.predict(message_id=answer["message_id"], vote="up", reasons=["too long"], comment="ok",
                         api_name="/vote")
    assert vote == {"message_id": answer["message_id"], "vote": "up", "reasons": ["too long"], "comment": "ok"}
    preferred = alice.predict(message_id=again["message_id"], api_name="/prefer")
    assert preferred["rejected"] == [answer["message_id"]]
    follow = alice.predict(conversation_id=str(answer["conversation_id"]), text="How many shapes are there?",
                           temperature=0, api_name="/chat")
    assert "two" in follow["text"].lower() and follow["conversation_id"] == answer["conversation_id"]
    compared = alice.predict(conversation_id=str(answer["conversation_id"]), text="Describe the image.",
                             temperature=1.0, seed=11, api_name="/compare")
    picked = alice.predict(comparison_id=compared["meta"]["comparison_id"], pick="b", api_name="/compare_pick")
    assert picked["message_id"] == compared["meta"]["b_message_id"]
    mine = alice.predict(api_name="/conversations")
    assert [c["id"] for c in mine] == [answer["conversation_id"]]
    conversation = alice.predict(conversation_id=answer["conversation_id"], api_name="/conversation")
    shown = conversation["messages"]
    assert [m["role"] for m in shown] == ["user", "assistant"] * 3
    assert shown[1]["id"] == again["message_id"] and shown[1]["preferred"] and shown[1]["siblings"] == [
        answer["message_id"], again["message_id"]]
    assert len(shown[0]["images"]) == 1 and shown[-1]["id"] == compared["meta"]["b_message_id"]
    assert shown[0]["images"][0].startswith("images/")  # a name in the store, not a server path

    store = Store(data)
    context = store.context(answer["message_id"])
    assert context["prompt"][0]["content"][1] == {"type": "text", "text": "What color is the circle?"}
    assert Image.open(context["prompt"][0]["content"][0]["path"]).size == (64, 64)
    assert store.vote(store.ensure_user("alice"), answer["message_id"])["reasons"] == ["too long"]
    sources = sorted(p["source"] for p in store.preference_pairs())
    assert sources == ["compare", "siblings"]


@pytest.mark.slow
def test_users_see_and_touch_only_their_own(app, alice, bob, circle_png):
    url, _ = app
    answer = alice.predict(conversation_id="", text="Hello!", temperature=0, api_name="/chat")
    comparison = alice.predict(conversation_id="", text="What can you do?", temperature=1.0, api_name="/compare")
    mine = {c["id"] for c in alice.predict(api_name="/conversations")}
    assert answer["conversation_id"] in mine
    assert not mine & {c["id"] for c in bob.predict(api_name="/conversations")}
    not_yours = "does not exist or is not yours"
    expect_error(lambda: bob.predict(conversation_id=answer["conversation_id"], api_name="/conversation"), not_yours)
    expect_error(lambda: bob.predict(message_id=answer["message_id"], vote="down", api_name="/vote"), not_yours)
    expect_error(lambda: bob.predict(message_id=comparison["meta"]["a_message_id"], api_name="/prefer"), not_yours)
    expect_error(lambda: bob.predict(message_id=answer["message_id"], api_name="/regenerate"), not_yours)
    expect_error(lambda: bob.predict(conversation_id=str(answer["conversation_id"]), text="hi",
                                     api_name="/chat"), not_yours)
    expect_error(lambda: bob.predict(comparison_id=comparison["meta"]["comparison_id"], pick="a",
                                     api_name="/compare_pick"), not_yours)
    # admin actions are checked in the handler, whatever the page shows
    expect_error(lambda: bob.predict(api_name="/feedback_stats"), "admins only")
    expect_error(lambda: alice.predict(api_name="/feedback_stats"), "admins only")
    stats = client(url, "root").predict(api_name="/feedback_stats")
    assert stats["conversations"] >= 2 and stats["messages"] >= 4
    # alice's message is untouched by bob's attempts
    conversation = alice.predict(conversation_id=answer["conversation_id"], api_name="/conversation")
    assert conversation["messages"][-1]["vote"] is None


@pytest.mark.slow
def test_login_is_required_and_throttled(app):
    from gradio_client import Client

    url, _ = app
    with pytest.raises(Exception):
        Client(url, verbose=False).predict(api_name="/conversations")
    with pytest.raises(Exception):
        Client(url, auth=("carol", "wrong-password"), verbose=False)
    for _ in range(MAX_FAILED_LOGINS - 1):
        with pytest.raises(Exception):
            Client(url, auth=("carol", "wrong-password"), verbose=False)
    # the right password is refused now, for this name only
    with pytest.raises(Exception):
        Client(url, auth=("carol", PASSWORDS["carol"]), verbose=False)
    assert client(url, "bob").predict(api_name="/conversations") is not None


# ---------------------------------------------------------------- bad input

def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A 30000 x 30000 PNG header over a few bytes of data: a decompression bomb."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = png_bytes(shapes.render(shapes.random_scene(random.Random(1))))
    files = {
        "renamed.png": b"this is a text file, not an image\n" * 20,
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "bomb.png": bomb_png(),
        "huge-sides.png": png_bytes(Image.new("1", (9000, 10))),
        "image.bmp": (lambda b: (Image.new("RGB", (8, 8)).save(b, format="BMP"), b.getvalue())[1])(io.BytesIO()),
        "image.tiff": (lambda b: (Image.new("RGB", (8, 8)).save(b, format="TIFF"), b.getvalue())[1])(io.BytesIO()),
        "script.svg.png": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "too-big.png": random.Random(0).randbytes(11 * 1024 * 1024),
    }
    paths = {}
    for name, payload in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(payload)
    return paths


@pytest.mark.slow
def test_bad_input_gets_a_clear_error_and_nothing_is_stored(app, alice, bad_files):
    from gradio_client import handle_file

    url, data = app
    store = Store(data)
    before = (store.feedback_stats(), sorted(p.name for p in (data / "images").rglob("*.png")))
    answer = alice.predict(conversation_id="", text="What can you do?", temperature=0, api_name="/chat")

    def chat(**kwargs):
        params = dict(conversation_id="", text="What color is the circle?", temperature=0)
        params.update(kwargs)
        return lambda: alice.predict(**params, api_name="/chat")

    def image(name):
        return chat(image=handle_file(str(bad_files[name])))

    cases = [  # (what, call, fragments of the expected message)
        ("a text file renamed .png", image("renamed.png"), ["not an image in an accepted format"]),
        ("a truncated PNG", image("truncated.png"), ["truncated or damaged"]),
        ("a zero-byte file", image("empty.png"), ["empty"]),
        ("a decompression bomb", image("bomb.png"), ["too many pixels"]),
        ("an image 9000 pixels wide", image("huge-sides.png"), ["too large"]),
        ("a BMP", image("image.bmp"), ["accepted format"]),
        ("a TIFF", image("image.tiff"), ["accepted format"]),
        ("an SVG renamed .png", image("script.svg.png"), ["accepted format"]),
        ("an 11 MB file", image("too-big.png"), ["size"]),
        ("no text and no image", chat(text="  "), ["type a message"]),
        ("a 5000-character message", chat(text="x" * 5000), ["limit is 4000"]),
        ("a 3000-character system prompt", chat(system_prompt="y" * 3000), ["system prompt", "2000"]),
        ("temperature 5", chat(temperature=5), ["temperature", "2.0"]),
        ("top_k -1", chat(top_k=-1), ["top_k"]),
        ("max_new_tokens 0", chat(max_new_tokens=0), ["max_new_tokens"]),
        ("a negative seed", chat(seed=-5), ["seed"]),
        ("an unknown conversation id", chat(conversation_id="987654"), ["does not exist or is not yours"]),
        ("a conversation id that is not a number", chat(conversation_id="abc"), ["must be a number"]),
        ("a vote on an unknown message", lambda: alice.predict(message_id=987654, vote="up", api_name="/vote"),
         ["does not exist"]),
        ("a vote that is not up/down/none",
         lambda: alice.predict(message_id=answer["message_id"], vote="sideways", api_name="/vote"), ["vote must be"]),
        ("an unknown reason",
         lambda: alice.predict(message_id=answer["message_id"], vote="down", reasons=["boring"], api_name="/vote"),
         ["unknown reason"]),
        ("a 3000-character comment",
         lambda: alice.predict(message_id=answer["message_id"], vote="down", comment="z" * 3000, api_name="/vote"),
         ["comment", "2000"]),
        ("a vote on a user message",
         lambda: alice.predict(message_id=answer["user_message_id"], vote="up", api_name="/vote"),
         ["not an assistant message"]),
        ("prefer an answer that has no sibling",
         lambda: alice.predict(message_id=answer["message_id"], api_name="/prefer"), ["no other answer"]),
        ("a compare pick that is not a/b/tie/both_bad",
         lambda: alice.predict(comparison_id=1, pick="c", api_name="/compare_pick"), []),
        ("a regenerate of message -1", lambda: alice.predict(message_id=-1, api_name="/regenerate"), ["positive"]),
    ]
    report = []
    for what, call, fragments in cases:
        message = expect_error(call, *fragments)
        report.append(f"{what}: {message.splitlines()[-1][:150]}")
        # the server keeps answering after each one
        assert alice.predict(api_name="/conversations")
    assert len(cases) >= 15
    print("\n".join(report))
    after_answer = store.feedback_stats()
    assert after_answer["messages"] == before[0]["messages"] + 2  # only the good question and its answer
    assert after_answer["votes"] == before[0]["votes"]
    assert sorted(p.name for p in (data / "images").rglob("*.png")) == before[1]
    assert not list((data / "images").rglob(".tmp-*"))


# ---------------------------------------------------------------- users file and binding

def test_users_file_hashes_and_throttles(tmp_path):
    users = Users(tmp_path)
    assert not users.enabled and users.get(None).name == "local" and users.get(None).is_admin
    users.add("dora", "a-long-password", role="admin")
    raw = (tmp_path / "users.json").read_text()
    assert "a-long-password" not in raw and json.loads(raw)["users"]["dora"]["password"].startswith("scrypt$")
    assert (tmp_path / "users.json").stat().st_mode & 0o077 == 0
    assert users.enabled and users.get(None) is None and users.get("dora").is_admin
    assert users.authenticate("dora", "a-long-password") and not users.authenticate("dora", "wrong")
    for _ in range(MAX_FAILED_LOGINS):
        users.authenticate("eve", "guess")
    assert users.throttled("eve") and not users.throttled("dora")
    assert users.authenticate("dora", "a-long-password")
    for bad in [("", "a-long-password", "user"), ("x y", "a-long-password", "user"),
                ("frank", "short", "user"), ("frank", "a-long-password", "root"), ("local", "a-long-password", "user")]:
        with pytest.raises(ValueError):
            users.add(*bad)
    with pytest.raises(ValueError, match="exists"):
        users.add("dora", "another-password")
    assert check_password("p4ssword!", hash_password("p4ssword!")) and not check_password("x", hash_password("y"))


@pytest.mark.slow
def test_binding_beyond_loopback_needs_users(tmp_path):
    users = Users(tmp_path)
    check_bind("127.0.0.1", users)
    check_bind("localhost", users)
    with pytest.raises(ValueError, match="users add"):
        check_bind("0.0.0.0", users)
    result = subprocess.run([sys.executable, "-m", "chatapp", "serve", "--host", "0.0.0.0", "--data-dir",
                             str(tmp_path)], cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0 without logins" in result.stderr
    assert "users add" in result.stderr and "Traceback" not in result.stderr
    added = subprocess.run([sys.executable, "-m", "chatapp", "users", "add", "gina", "--role", "admin",
                            "--password-stdin", "--data-dir", str(tmp_path)], input="gina-password\n", cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    check_bind("0.0.0.0", users)  # logins are on now
    listed = subprocess.run([sys.executable, "-m", "chatapp", "users", "list", "--data-dir", str(tmp_path)],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert listed.stdout.split() == ["gina", "admin"]
