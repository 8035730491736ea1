"""Load (issue 16, part 4): 32 logged-in users, each doing 50 mixed actions (chat, vote, regenerate,
compare and pick, reopen a conversation) against the real app in its own process for about two
minutes, through `gradio_client` (one client per user, one thread each).

What counts: every action is acknowledged or refused. A refusal other than the documented busy
message (api.BUSY_MESSAGE, docs/api.md) is an error; the test wants 0 errors. Every acknowledged
action is then looked up in the database: the messages, the comparisons and their picks, and each
user's final vote on each answer (a user's actions run in order, so their last acknowledged vote is
the one that must be stored); anything missing is lost, and the test wants 0 lost. The p99 of the
vote calls' round trips (client side: queueing, the write, the reply) is printed and recorded."""
from __future__ import annotations

import random
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

import fault_figures
from chatapp.demo import shapes
from chatapp.feedback.store import DB_NAME
from chatapp.web.api import BUSY_MESSAGE
from chatapp.web.users import Users
from support import start_server, stop_server

pytestmark = pytest.mark.slow

USERS = 32
ACTIONS_PER_USER = 50
DURATION_S = 120  # the actions of each user are spread over this, as far as the server keeps up
SHORT = dict(temperature=0.7, max_new_tokens=4)  # the engine answers one request at a time: keep answers short
# (action, weight); the first action of every user is a chat with an image
MIX = (("chat", 22), ("vote", 38), ("regenerate", 8), ("compare", 5), ("reopen", 27))
LOGINS_AT_ONCE = 4  # logging in is setup, not load: the server hashes two passwords at a time


@dataclass
class Ledger:
    """What one user's client was told: the acknowledged rows, refusals, errors, vote round trips."""
    name: str
    conversations: list = field(default_factory=list)
    answers: list = field(default_factory=list)  # message ids of acknowledged answers
    votes: dict = field(default_factory=dict)  # message id -> last acknowledged vote
    picks: dict = field(default_factory=dict)  # comparison id -> acknowledged pick
    actions: int = 0
    acknowledged: int = 0
    busy: int = 0
    errors: list = field(default_factory=list)
    vote_ms: list = field(default_factory=list)


def password(name: str) -> str:
    return f"{name}-load-secret"


def log_in(url: str, name: str, logins: threading.Semaphore, tries: int = 3):
    from gradio_client import Client

    with logins:
        for attempt in range(tries):
            try:
                return Client(url, auth=(name, password(name)), verbose=False)
            except Exception:  # gradio_client's login waits 5 s: a slow machine may need another go
                if attempt == tries - 1:
                    raise


def run_user(url: str, name: str, image, seed: int, start_at: float, logins: threading.Semaphore) -> Ledger:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    ledger, rng = Ledger(name), random.Random(seed)
    client = log_in(url, name, logins)
    actions, weights = zip(*MIX)

    def chat(first: bool):
        if first or not ledger.conversations or rng.random() < 0.3:
            done = client.predict(conversation_id="", text="What color is the circle?",
                                  image=handle_file(str(image)) if first else None, api_name="/chat", **SHORT)
            ledger.conversations.append(done["conversation_id"])
        else:
            done = client.predict(conversation_id=str(rng.choice(ledger.conversations)), text="And its shape?",
                                  api_name="/chat", **SHORT)
        ledger.answers.append(done["message_id"])

    def vote():
        message_id, value = rng.choice(ledger.answers), rng.choice(("up", "down", "none"))
        started = time.perf_counter()
        reasons = [] if value == "none" else rng.choice(([], ["too long"]))  # reasons go with a vote only
        client.predict(message_id=message_id, vote=value, reasons=reasons, comment="", api_name="/vote")
        ledger.vote_ms.append((time.perf_counter() - started) * 1000)
        ledger.votes[message_id] = value

    def regenerate():
        done = client.predict(message_id=rng.choice(ledger.answers), api_name="/regenerate", **SHORT)
        ledger.answers.append(done["message_id"])

    def compare():
        done = client.predict(conversation_id=str(rng.choice(ledger.conversations)), text="Which shape is it?",
                              api_name="/compare", **SHORT)
        meta = done["meta"]
        ledger.answers += [meta["a_message_id"], meta["b_message_id"]]
        pick = rng.choice(("a", "b", "tie", "both_bad"))
        client.predict(comparison_id=meta["comparison_id"], pick=pick, api_name="/compare_pick")
        ledger.picks[meta["comparison_id"]] = pick

    def reopen():
        listed = client.predict(api_name="/conversations")
        assert {c["id"] for c in listed} >= set(ledger.conversations), "a conversation of the user's is missing"
        shown = client.predict(conversation_id=rng.choice(ledger.conversations), api_name="/conversation")
        assert shown["messages"], "a reopened conversation shows no messages"

    run = {"chat": lambda: chat(False), "vote": vote, "regenerate": regenerate, "compare": compare, "reopen": reopen}
    step_s = DURATION_S / ACTIONS_PER_USER
    for i in range(ACTIONS_PER_USER):
        time.sleep(max(0.0, start_at + (i + rng.random()) * step_s - time.monotonic()))
        action = "first chat" if i == 0 else rng.choices(actions, weights)[0]
        ledger.actions += 1
        try:
            chat(True) if i == 0 else run[action]()
            ledger.acknowledged += 1
        except AppError as error:
            if str(error) == BUSY_MESSAGE:
                ledger.busy += 1
            else:
                ledger.errors.append(f"{name} {action}: {error}")
        except Exception as error:  # a dropped connection, a timeout, a failed check: all count
            ledger.errors.append(f"{name} {action}: {type(error).__name__}: {error}")
    client.close()
    return ledger


def lost_rows(db_path, ledgers: list[Ledger]) -> list[str]:
    """Every acknowledged row that the database does not have (or has in another state)."""
    lost = []
    with sqlite3.connect(db_path) as db:
        user_ids = dict(db.execute("SELECT name, id FROM users"))
        messages = {row[0]: row[1] for row in db.execute(
            "SELECT m.id, c.user_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.role = 'assistant'")}
        votes = {(row[0], row[1]): row[2] for row in db.execute("SELECT user_id, message_id, vote FROM feedback")}
        picks = {row[0]: (row[1], row[2]) for row in db.execute("SELECT id, user_id, pick FROM comparisons")}
        for ledger in ledgers:
            user_id = user_ids.get(ledger.name)
            lost += [f"{ledger.name} answer {m}" for m in ledger.answers if messages.get(m) != user_id]
            for message_id, value in ledger.votes.items():
                if votes.get((user_id, message_id)) != (None if value == "none" else value):
                    lost.append(f"{ledger.name} vote {value} on {message_id}")
            lost += [f"{ledger.name} pick {p} of {c}" for c, p in ledger.picks.items() if picks.get(c) != (user_id, p)]
    return lost


def test_32_users_x_50_mixed_actions_lose_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    users = Users(data)
    names = [f"user{i:02d}" for i in range(USERS)]
    for name in names:
        users.add(name, password(name))
    image = tmp_path / "circle.png"
    shapes.render(shapes.Scene((shapes.Shape("circle", "green", 30, 30, 12),))).save(image)
    proc, url = start_server(data)
    try:
        start_at = time.monotonic() + 10  # the clients log in first
        logins = threading.Semaphore(LOGINS_AT_ONCE)
        with ThreadPoolExecutor(USERS) as pool:
            ledgers = list(pool.map(lambda i: run_user(url, names[i], image, i, start_at, logins), range(USERS)))
        seconds = time.monotonic() - start_at
    finally:
        stop_server(proc)
    errors = [e for ledger in ledgers for e in ledger.errors]
    lost = lost_rows(data / DB_NAME, ledgers)
    vote_ms = sorted(ms for ledger in ledgers for ms in ledger.vote_ms)
    p99 = statistics.quantiles(vote_ms, n=100)[98]
    figures = dict(users=USERS, actions=sum(l.actions for l in ledgers),
                   acknowledged=sum(l.acknowledged for l in ledgers), errors=len(errors),
                   busy=sum(l.busy for l in ledgers), lost=len(lost), votes=len(vote_ms),
                   vote_p50_ms=round(statistics.median(vote_ms)), vote_p99_ms=round(p99), seconds=round(seconds))
    print("\nload:", ", ".join(f"{k}={v}" for k, v in figures.items()))
    fault_figures.record("load", **figures)
    assert figures["actions"] == USERS * ACTIONS_PER_USER
    assert not errors, errors[:10]
    assert not lost, lost[:10]
    assert figures["acknowledged"] + figures["busy"] == figures["actions"]
