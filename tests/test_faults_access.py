"""Faults and attacks on who may see what (issue 16, findings 1 and 8): stored images reach only
their conversation's owner and admins; logins are throttled per (name, address) and per address,
take as long for unknown names as for known ones, hash off the event loop, keep bounded counters,
and sessions end when their user's entry in the users file changes.

The server tests run the real app over real HTTP (httpx, Gradio's login form and cookies); a second
client address on the loopback (127.0.0.2) plays the attacker."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import statistics
import time
from types import SimpleNamespace

import httpx
import pytest

import fault_figures
from chatapp.demo import shapes
from chatapp.feedback.store import Store
from chatapp.web.users import (MAX_FAILED_LOGINS, MAX_FAILED_LOGINS_PER_ADDRESS, MAX_THROTTLE_KEYS, LOGIN_WINDOW_S,
                               LoginThrottle, Users, address_key)
from support import start_server, stop_server

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "root": "root-secret-333"}


# ---------------------------------------------------------------- logins, without a server

def test_a_lockout_holds_for_the_attackers_address_only(tmp_path):
    users = Users(tmp_path)
    users.add("root", PASSWORDS["root"], role="admin")
    for _ in range(MAX_FAILED_LOGINS):
        assert not users.authenticate("root", "guess", "203.0.113.9")
    assert not users.authenticate("root", PASSWORDS["root"], "203.0.113.9")  # the attacker's pair is blocked
    assert users.authenticate("root", PASSWORDS["root"], "198.51.100.7")  # the admin elsewhere is not
    assert users.throttled("root", "203.0.113.9") and not users.throttled("root", "198.51.100.7")


def test_one_address_trying_many_names_is_throttled_as_a_whole():
    now = [1000.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for i in range(MAX_FAILED_LOGINS_PER_ADDRESS):
        assert not throttle.blocked(f"name{i}", "203.0.113.9")
        throttle.failed(f"name{i}", "203.0.113.9")
    assert throttle.blocked("someone-new", "203.0.113.9") and not throttle.blocked("someone-new", "198.51.100.7")
    # an IPv6 client counts by its /64: changing the last 64 bits does not reset its count
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") != address_key("2001:db8:0:1::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    now[0] += LOGIN_WINDOW_S + 1  # the window passes
    assert not throttle.blocked("someone-new", "203.0.113.9")


def test_the_failure_counters_are_bounded():
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for i in range(MAX_THROTTLE_KEYS + 500):  # a flood of distinct names from distinct addresses
        throttle.failed(f"n{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) <= MAX_THROTTLE_KEYS
    now[0] += LOGIN_WINDOW_S + 1
    throttle.failed("late", "192.0.2.1")  # counters that left the window are dropped as others fail
    assert len(throttle) == 2


def test_a_name_that_is_no_user_name_cannot_grow_the_counters(tmp_path):
    users = Users(tmp_path)
    users.add("alice", PASSWORDS["alice"])
    for size in (100, 10_000):
        assert not users.authenticate("x" * size, "guess", "192.0.2.1")
    assert len(users.throttle) == 2  # one shared key for non-names, one for the address


def _median_login_s(users: Users, name: str, tries: int = 5) -> float:
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        users.authenticate(name, "wrong-password", "192.0.2.50")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_unknown_names_take_as_long_as_known_ones(tmp_path):
    users = Users(tmp_path)
    users.add("alice", PASSWORDS["alice"])
    users.authenticate("nobody", "warm-up", "192.0.2.49")  # the dummy hash is made on first use
    known, unknown = _median_login_s(users, "alice"), _median_login_s(users, "nobody-at-all")
    # before: ~57 ms against ~2 ms (no hash for unknown names)
    assert 0.5 < unknown / known < 2, (known, unknown)


def test_the_password_hash_runs_off_the_event_loop(tmp_path):
    users = Users(tmp_path)
    users.add("alice", PASSWORDS["alice"])
    assert inspect.iscoroutinefunction(users.login)  # Gradio awaits a coroutine function, calls others inline
    one_hash_s = _median_login_s(users, "alice", tries=3)

    async def logins_while_ticking():
        gaps, done = [], False

        async def tick():
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.01)
        results = await asyncio.gather(*(users.login("alice", "wrong") for _ in range(4)),
                                       users.login("alice", PASSWORDS["alice"]))
        done = True
        await ticker
        return results, max(gaps)

    results, worst_gap = asyncio.run(logins_while_ticking())
    assert results == [False] * 4 + [True]
    # inline, the five hashes would stall the loop back to back (five hashes long); off it, the loop
    # keeps ticking every few milliseconds
    assert worst_gap < one_hash_s, (worst_gap, one_hash_s)


def test_changed_users_names_the_removed_and_changed_and_logins_stay_on(tmp_path):
    users = Users(tmp_path)
    for name in ("alice", "bob", "root"):
        users.add(name, PASSWORDS[name], role="admin" if name == "root" else "user")
    users.keep_logins_on()
    assert users.changed_users() == set()
    Users(tmp_path).remove("bob")  # another process (the CLI) changes the file
    Users(tmp_path).add("alice", "a-new-password", replace=True)
    Users(tmp_path).add("carol", "carol-secret-5")  # a new user ends nobody's session
    assert users.changed_users() == {"alice", "bob"}
    assert users.changed_users() == set()
    Users(tmp_path).add("root", PASSWORDS["root"], role="user", replace=True)  # a role change ends sessions too
    assert users.changed_users() == {"root"}
    for name in ("alice", "root", "carol"):
        Users(tmp_path).remove(name)
    assert users.changed_users() == {"alice", "root", "carol"}
    # the last user is gone: logins stay required, nobody becomes the built-in admin
    assert users.enabled and users.get(None) is None and users.get("local") is None
    assert Users(tmp_path).get(None).name == "local"  # (what a server started now would do: loopback only)


def test_the_page_names_images_by_route_and_refuses_to_edit_one():
    from chatapp.core.errors import RequestError
    from chatapp.web.access import editable_prefix
    from chatapp.web.ui import render

    conversation = {"messages": [
        {"id": 7, "role": "user", "text": "Which?", "images": ["/data/images/ab/ab.png", "/data/images/cd/cd.png"],
         "siblings": [7], "position": 1},
        {"id": 8, "role": "assistant", "text": "Red.", "siblings": [8], "position": 1, "model": "demo"}]}
    entries = render(conversation)[0]
    assert [e["content"][:40] for e in entries[:2]] == ['<img src="chatapp/image/7/0" alt="image ',
                                                        '<img src="chatapp/image/7/1" alt="image ']
    assert "/data/images" not in str(entries)  # no server path reaches the page
    with pytest.raises(RequestError, match="image cannot be edited"):
        editable_prefix(entries, 1)
    assert editable_prefix(entries, 2) == entries[:2]  # the text entry


# ---------------------------------------------------------------- the real app over HTTP

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    users = Users(data)
    for name in PASSWORDS:
        users.add(name, PASSWORDS[name], role="admin" if name == "root" else "user")
    store = Store(data)  # alice's conversation with an image, stored before the server starts
    image = shapes.render(shapes.Scene((shapes.Shape("circle", "green", 22, 22, 10),)))
    stored = store.save_image(image)
    conversation_id = store.create_conversation(store.ensure_user("alice", "user"), "alice's picture")
    message_id = store.add_message(conversation_id, None, "user", "What is this?", image_shas=[stored.sha256])
    cache = tmp_path_factory.mktemp("gradio-cache")  # this server's own upload folder, to look into
    proc, url = start_server(data, GRADIO_TEMP_DIR=cache)
    yield SimpleNamespace(url=url, data=data, message_id=message_id, image=stored.path, cache=cache)
    stop_server(proc)


@contextlib.contextmanager
def session(url: str, name: str | None = None, address: str = "127.0.0.1"):
    """An HTTP client from `address`, logged in as `name` (Gradio's login form sets the session cookie)."""
    with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=60) as client:
        if name is not None:
            response = client.post("/login", data={"username": name, "password": PASSWORDS[name]})
            assert response.status_code == 200, (name, response.status_code, response.text)
        yield client


@pytest.mark.slow
def test_a_stored_image_reaches_its_owner_and_admins_only(app):
    url, message_id, image_path = app.url, app.message_id, app.image
    route = f"/chatapp/image/{message_id}/0"
    with session(url, "alice") as alice, session(url, "bob") as bob, session(url, "root") as root, \
            session(url) as anonymous:
        mine = alice.get(route)
        assert mine.status_code == 200 and mine.content == image_path.read_bytes()
        assert mine.headers["content-type"] == "image/png" and "private" in mine.headers["cache-control"]
        assert root.get(route).content == image_path.read_bytes()
        assert bob.get(route).status_code == 404
        assert anonymous.get(route).status_code == 401
        # the same answer for a missing image, a missing message and nonsense
        for other in (f"/chatapp/image/{message_id}/1", "/chatapp/image/999999/0", f"/chatapp/image/{2**70}/0",
                      "/chatapp/image/abc/0", f"/chatapp/image/{message_id}/-1", f"/chatapp/image/{message_id}/9999"):
            assert alice.get(other).status_code == 404, other
        # Gradio's file route no longer serves the images folder, to anyone (before: 200 for bob)
        sha = hashlib.sha256(image_path.read_bytes()).hexdigest()
        assert image_path.name == f"{sha}.png"
        for client in (alice, bob, root):
            assert client.get(f"/gradio_api/file={image_path}").status_code == 403
        assert anonymous.get(f"/gradio_api/file={image_path}").status_code in (401, 403)
    fault_figures.record("access", image_requests=15, image_leaks=0)


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_shows_stored_images_through_the_owner_route(app, browser):
    from playwright.sync_api import expect

    url, message_id = app.url, app.message_id
    page = browser.new_page()
    page.goto(url)
    page.fill('input[type="text"]', "alice")
    page.fill('input[type="password"]', PASSWORDS["alice"])
    page.click('button:has-text("Login")')
    page.locator("#conversations").get_by_text("alice's picture").click(timeout=60_000)
    image = page.locator("#chatbot img.chatapp-image")
    expect(image).to_have_count(1, timeout=30_000)
    assert image.get_attribute("src") == f"chatapp/image/{message_id}/0"
    page.wait_for_function("() => document.querySelector('#chatbot img.chatapp-image').naturalWidth > 0")
    assert image.evaluate("img => img.naturalWidth") == 64  # the stored 64x64 image, loaded with alice's cookie
    page.close()
    # showing it put no copy in Gradio's upload folder (before: a copy there, served to anyone logged in)
    stored = app.image.read_bytes()
    assert not [p for p in app.cache.rglob("*") if p.is_file() and p.read_bytes() == stored]


@pytest.mark.slow
def test_nobody_can_lock_out_another_address(app):
    url = app.url
    with session(url, address="127.0.0.2") as attacker:
        for _ in range(MAX_FAILED_LOGINS):
            assert attacker.post("/login", data={"username": "root", "password": "guess"}).status_code == 400
        # the right password from the attacker's address is refused now ...
        assert attacker.post("/login", data={"username": "root", "password": PASSWORDS["root"]}).status_code == 400
    # ... while the admin, elsewhere, logs in (before: locked out by name for everyone)
    with session(url, "root") as root:
        assert root.get("/gradio_api/login_check").status_code == 200
    fault_figures.record("access", attacker_lockouts_of_others=0)


@pytest.mark.slow
def test_sessions_end_with_their_user_and_the_last_user_leaves_no_admin_behind(app):
    url, data, message_id = app.url, app.data, app.message_id
    route = f"/chatapp/image/{message_id}/0"
    with session(url, "alice") as alice, session(url, "bob") as bob, session(url, "root") as root:
        assert bob.get("/gradio_api/login_check").status_code == 200
        Users(data).remove("bob")  # as `python -m chatapp users remove bob` would, while the server runs
        assert bob.get("/gradio_api/login_check").status_code == 401
        assert bob.get("/config").status_code == 401
        assert alice.get(route).status_code == 200 and root.get("/gradio_api/login_check").status_code == 200
        Users(data).add("alice", "alice-new-secret", replace=True)  # a new password ends alice's sessions
        assert alice.get(route).status_code == 401
        Users(data).remove("alice")
        Users(data).remove("root")  # the users file is empty now
        # before: every open session became the built-in admin `local`
        assert root.get("/gradio_api/login_check").status_code == 401 and root.get(route).status_code == 401
    with session(url) as anonymous:
        assert anonymous.get("/config").status_code == 401
        assert anonymous.get(route).status_code == 401
        assert anonymous.post("/login", data={"username": "local", "password": ""}).status_code in (400, 422)
    fault_figures.record("access", sessions_left_after_user_change=0)
