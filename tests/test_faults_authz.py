"""An authorization matrix (issue 16, part 5): every event of the running app, public API endpoints
and the page's private events alike, and the owner-checked image route, called over HTTP as
anonymous, the owner of a conversation (alice), another user (bob) and an admin (root). The table
of expected / observed outcomes is printed (`pytest -s`) and written to artifacts/authz_matrix.md.

- The events are read from the app's own `/config` (its `dependencies`, private ones included, by
  fn_index), so a new event without a row in EXPECTED fails the test.
- Every event is called the way the page calls it (`POST /gradio_api/queue/join` with its fn_index,
  then the session's event stream), with the login cookie of the role. Bob and root send alice's
  ids, and alice's page state where an event takes the page state (Gradio takes a State input from
  the server's copy for the session, never from the request: the matrix shows it).
- Outcomes: ok; denied (the answer for someone else's object or an admin action: "... is not
  yours", "for admins only"); refused (nothing to act on in the caller's own session, or a value the
  caller was never offered: Gradio checks a radio's value against the caller's own choices before
  the handler runs); 401 (no login); no-op (an event without a function: the Stop and New chat
  buttons' cancellations); for the image route the HTTP status. An "error" (an incident, or a
  failure without a message) is never expected. Nothing any role but the owner receives contains
  alice's text.
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
from types import SimpleNamespace

import httpx
import pytest

import fault_figures
from chatapp.core import config
from chatapp.demo import shapes
from chatapp.feedback.store import Store
from chatapp.web.users import Users
from support import ARTIFACTS, start_server, stop_server

pytestmark = pytest.mark.slow

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "root": "root-secret-333"}
ROLES = {"anonymous": None, "owner": "alice", "other": "bob", "admin": "root"}
MARKER = "alice-private-7f3a"  # in alice's texts: nobody else may receive it
DENIED = re.compile(r"not yours|for admins only|log in again")
SAMPLING = {"temperature": 0, "max_new_tokens": 6}

# event (api_name in /config) -> expected outcome for anonymous, owner, other, admin
ANYONE = ("401", "ok", "ok", "ok")  # no object of anyone else's is involved: the caller's own, or nothing
OWNED = ("401", "ok", "denied", "denied")  # alice's object, named by id: admins get no way into chats either
OWN_STATE = ("401", "ok", "refused", "refused")  # acts on the session's page state: others' is empty
ADMIN = ("401", "denied", "denied", "ok")
ADMIN_REFUSED = ("401", "denied", "denied", "refused")  # passes the admin check, then nothing to do
NO_FUNCTION = ("401", "no-op", "no-op", "no-op")
# alice's conversation id as the sidebar radio's value: not among bob's or root's choices
NOT_OFFERED = ("401", "ok", "refused", "refused")
EXPECTED = {
    # the public API (api.py, admin_page.register)
    "chat": OWNED, "regenerate": OWNED, "compare": OWNED, "vote": OWNED, "prefer": OWNED, "compare_pick": OWNED,
    "conversations": ANYONE, "conversation": OWNED, "feedback_stats": ADMIN,
    "admin_status": ADMIN, "runs": ADMIN, "train_now": ADMIN, "adapters": ADMIN, "activate": ADMIN,
    "rollback": ADMIN_REFUSED, "ab_status": ADMIN, "ab_start": ADMIN_REFUSED, "ab_stop": ADMIN,
    # the chat page's private events (ui.py)
    "load": ANYONE, "load_1": ANYONE, "send": ANYONE, "lambda": ANYONE, "lambda_1": ANYONE,
    "unnamed": NO_FUNCTION, "unnamed_1": NO_FUNCTION, "unnamed_2": NO_FUNCTION, "new_chat": ANYONE,
    "new_chat_1": ANYONE, "open_conversation": NOT_OFFERED,
    "regenerate_1": OWN_STATE, "regenerate_2": OWN_STATE, "edit": OWN_STATE, "like": OWN_STATE,
    "save_feedback": OWN_STATE, "select_message": OWN_STATE, "previous_sibling": OWN_STATE,
    "next_sibling": OWN_STATE, "prefer_1": OWN_STATE, "pick_a": OWN_STATE, "pick_b": OWN_STATE,
    "pick_tie": OWN_STATE, "pick_both_bad": OWN_STATE,
    # the admin tab's private events (admin_page.py)
    "refresh_status": ADMIN, "refresh_tables": ADMIN, "refresh_status_1": ADMIN, "refresh_tables_1": ADMIN,
    "refresh_tables_2": ADMIN, "refresh_tables_3": ADMIN, "refresh_tables_4": ADMIN, "train_now_1": ADMIN,
    "activate_1": ADMIN, "rollback_1": ADMIN_REFUSED, "export": ADMIN, "ab_start_1": ADMIN_REFUSED,
    "ab_stop_1": ADMIN,
}
IMAGE_ROUTE = "GET /chatapp/image/<message>/<n>"
SETUP = "send (setup)"
IMAGE_EXPECTED = ("401", "200", "404", "200")


def sampling() -> list:
    return [SAMPLING.get(p.name, p.default) for p in config.WEB_SAMPLING_PARAMS]


def calls(ids) -> list[tuple[str, list, dict | None]]:
    """(event, data, event_data) in the order a role makes them. `S` stands for a State input: the
    request carries alice's page state there, which Gradio ignores. SETUP steps run for the owner
    only (a comparison of her own before each pick); the matrix counts an event's first call."""
    S = {"conversation_id": ids.conversation, "entry_ids": ids.entries, "selected_id": ids.answer,
         "feedback_id": ids.answer, "comparison_id": ids.comparison}
    api = sampling()
    answer_entry = ids.entries.index(ids.answer)
    question_entry = answer_entry - 1
    return [
        ("load", [], None), ("load_1", [], None),
        ("open_conversation", [ids.conversation, S], None),
        ("select_message", [S], {"index": answer_entry, "value": "x"}),
        ("previous_sibling", [S], None), ("next_sibling", [S], None), ("prefer_1", [S], None),
        ("like", [S], {"index": answer_entry, "value": "x", "liked": True}),
        ("save_feedback", [["too long"], "ok", S], None),
        ("regenerate_1", [S, *api], None), ("regenerate_2", [S, *api], None),
        ("edit", [S, *api], {"index": question_entry, "value": "What is it?", "previous_value": "x"}),
        *[step for pick in ("a", "b", "tie", "both_bad") for step in (
            (SETUP, [{"text": "Which is it?", "files": []}, S, *api, "", True], None),  # send, compare mode
            (f"pick_{pick}", [S], None))],
        ("send", [{"text": "Is it round?", "files": []}, S, *api, "", False], None),
        ("lambda", [], None), ("lambda_1", [], None), ("unnamed", [], None), ("unnamed_1", [], None),
        ("unnamed_2", [], None), ("new_chat", [], None), ("new_chat_1", [], None),
        ("refresh_status", [S], None), ("refresh_tables", [], None), ("refresh_status_1", [S], None),
        ("refresh_tables_1", [], None), ("refresh_tables_2", [], None), ("refresh_tables_3", [], None),
        ("refresh_tables_4", [], None), ("train_now_1", [], None), ("activate_1", ["base"], None),
        ("rollback_1", [], None), ("export", ["kto"], None), ("ab_start_1", ["base", False, 20], None),
        ("ab_stop_1", [], None),
        ("chat", [ids.conversation, "Is it round?", None, *api, ""], None),
        ("regenerate", [ids.answer, *api], None),
        ("compare", [ids.conversation, "Which is it?", None, *api, ""], None),
        ("vote", [ids.answer, "up", [], ""], None), ("prefer", [ids.sibling], None),
        ("compare_pick", [ids.comparison, "a"], None), ("conversations", [], None),
        ("conversation", [ids.conversation], None), ("feedback_stats", [], None),
        ("admin_status", [], None), ("runs", [], None), ("train_now", [], None), ("adapters", [], None),
        ("activate", ["base"], None), ("rollback", [], None), ("ab_status", [], None),
        ("ab_start", ["base", False, 20], None), ("ab_stop", [], None),
    ]


class PageSession:
    """One browser tab's worth of HTTP: a login cookie (or none) and a Gradio session."""

    def __init__(self, url: str, name: str | None):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.session_hash = secrets.token_hex(8)
        if name is not None:
            response = self.http.post("/login", data={"username": name, "password": PASSWORDS[name]})
            assert response.status_code == 200, (name, response.text)

    def call(self, fn_index: int, data: list, event_data=None, has_function: bool = True) -> tuple[str, str, str]:
        """(outcome, message, everything received) of one event."""
        joined = self.http.post("/gradio_api/queue/join", json={
            "data": data, "event_data": event_data, "fn_index": fn_index, "session_hash": self.session_hash})
        if joined.status_code != 200:
            return str(joined.status_code), joined.text[:80], joined.text
        event_id, received = joined.json()["event_id"], []
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                received.append(line)
                message = json.loads(line[5:])
                if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                    break
            else:
                return "no answer", "", "\n".join(received)
        output = message.get("output") or {}
        if not has_function:
            return ("no-op" if not output.get("data") else "ok"), "", "\n".join(received)
        if message.get("success"):
            return "ok", "", "\n".join(received)
        error = output.get("error") or ""
        outcome = "denied" if DENIED.search(error) else "error" if not error or "incident" in error else "refused"
        return outcome, error, "\n".join(received)

    def close(self):
        self.http.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    users = Users(data)
    for name in PASSWORDS:
        users.add(name, PASSWORDS[name], role="admin" if name == "root" else "user")
    store = Store(data)  # alice's conversation: a question with an image, two answers, a comparison of them
    alice = store.ensure_user("alice", "user")
    image = store.save_image(shapes.render(shapes.Scene((shapes.Shape("circle", "green", 22, 22, 10),))))
    conversation = store.create_conversation(alice, f"{MARKER} picture")
    question = store.add_message(conversation, None, "user", f"What is this, {MARKER}?", image_shas=[image.sha256])
    record = {"model_id": "demo", "params": {}, "finish_reason": "stop"}
    answers = [store.add_message(conversation, question, "assistant", f"A circle, {MARKER} {n}.", generation=record)
               for n in (1, 2)]
    comparison = store.create_comparison(alice, question, *answers)
    store.close()
    proc, url = start_server(data)
    # the chat entries the page shows: the image, the question, the current answer
    ids = SimpleNamespace(conversation=conversation, question=question, answer=answers[1], sibling=answers[0],
                          comparison=comparison, entries=[question, question, answers[1]])
    yield SimpleNamespace(url=url, data=data, ids=ids)
    stop_server(proc)


def test_every_event_and_the_image_route_as_four_roles(app, artifacts):
    with httpx.Client(base_url=app.url, timeout=60) as http:
        assert http.post("/login", data={"username": "root", "password": PASSWORDS["root"]}).status_code == 200
        dependencies = http.get("/config").json()["dependencies"]
    fn_index = {d["api_name"]: d["id"] for d in dependencies}
    has_function = {d["id"]: d["backend_fn"] for d in dependencies}
    assert len(fn_index) == len(dependencies), "two events share an api_name"
    unlisted, gone = set(fn_index) - set(EXPECTED), set(EXPECTED) - set(fn_index)
    fn_index[SETUP] = fn_index["send"]
    assert not unlisted, f"events without an expectation in the matrix: {sorted(unlisted)}"
    assert not gone, f"the matrix names events the app no longer has: {sorted(gone)}"
    script = calls(app.ids)
    assert {name for name, _, _ in script} - {SETUP} == set(EXPECTED), "every event is called"

    observed: dict[str, list] = {name: [] for name in [*EXPECTED, IMAGE_ROUTE]}
    leaks = []
    for role, name in ROLES.items():
        session = PageSession(app.url, name)
        try:
            for event, data, event_data in script:
                if event == SETUP and role != "owner":
                    continue
                outcome, message, received = session.call(fn_index[event], data, event_data,
                                                          has_function[fn_index[event]])
                if role != "owner" and MARKER in received:
                    leaks.append(f"{role} {event}")
                if event == SETUP:
                    assert outcome == "ok", message
                else:
                    observed[event].append((outcome, message))
            route = session.http.get(f"/chatapp/image/{app.ids.question}/0")
            if role != "owner" and MARKER.encode() in route.content:
                leaks.append(f"{role} image route")
            observed[IMAGE_ROUTE].append((str(route.status_code), ""))
        finally:
            session.close()

    expected = {**EXPECTED, IMAGE_ROUTE: IMAGE_EXPECTED}
    mismatches = [(event, role, want, got) for event, cells in observed.items()
                  for role, want, (got, _) in zip(ROLES, expected[event], cells) if want != got]
    table = matrix_table(observed, expected)
    print("\n" + table)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "authz_matrix.md").write_text(
        "# Authorization matrix\n\nWritten by tests/test_faults_authz.py: every event of the app (public API "
        "endpoints, then the page's private events, by their names in /config) and the image route, called as "
        "four roles. Each cell is `expected / observed`, in bold where they differ.\n\n" + table + "\n")
    cells = sum(len(c) for c in observed.values())
    fault_figures.record("authz", events=len(observed), cells=cells, mismatches=len(mismatches), leaks=len(leaks))
    assert not leaks, leaks
    assert not mismatches, "\n".join(f"{e} as {r}: expected {w}, observed {g}: "
                                     f"{dict(zip(ROLES, observed[e]))[r][1]}" for e, r, w, g in mismatches)


def matrix_table(observed: dict, expected: dict) -> str:
    lines = ["| event | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for event, cells in observed.items():
        shown = [f"{want} / {got}" if want == got else f"**{want} / {got}**"
                 for want, (got, _) in zip(expected[event], cells)]
        lines.append(f"| {event} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
