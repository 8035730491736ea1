"""Crashes (issue 16, part 1): kill -9 of the server at 20 random points of a scripted chat load, and of
the trainer at 20 random points of its runs, with the real app, the real trainer, SQLite, peft and a
browser. After each kill and restart: every acknowledged message and vote is in the store,
`PRAGMA integrity_check` is ok, the active adapter loads (the restarted server answers with it; the
trainer's next run starts from it, and peft loads every listed version here), no leftover counts as a
version, and the runs table claims nothing false. The figures end the session's "fault suite" line.

The points are drawn by seeded generators (`CHATAPP_CRASH_SEED`, default 16), each kind several times:
- server: mid-stream (/chat), mid-vote, mid-regenerate, mid-compare (or its pick), mid-edit (the page's
  edit, in Chromium) and while the follower swaps an adapter (published here, activated through the
  registry or the server's /activate), each under the load of two concurrent API clients;
- trainer: data preparation, loading, TRL steps, the gate, saving the adapter (timed after the
  "publishing" line), publishing and activating (the registry's SIGKILL points, `CHATAPP_CRASH_AT`).
Processes are forked from a zygote that imported the libraries once (tests/crash_support.py); the
last server start is the plain `python app.py`.
"""
import collections
import copy
import json
import os
import random
import shutil
import threading
import time

import pytest
import torch

import crash_support as cs
import fault_figures
import support
from chatapp.core import config
from chatapp.demo import shapes
from chatapp.learning import simulate
from chatapp.learning.fingerprint import base_fingerprint
from chatapp.learning.registry import Registry
from chatapp.learning.trainer import SCRATCH_NAME, run_lock
from chatapp.serving.engine import Engine

SEED = int(os.environ.get("CHATAPP_CRASH_SEED", "16"))
KILLS = 20
SERVER_KINDS = ("stream", "vote", "regenerate", "compare", "edit", "swap")
TRAINER_POINTS = ("preparing", "loading", "training", "gate", "saving", "publishing", "activating")
PUBLISH_HOOKS = ("after-weights", "after-metadata", "before-rename", "after-rename")
ACTIVATE_HOOKS = ("before-active-replace", "after-active-replace")
TRAIN_MARKERS = {"loading": "train: loading the model", "training": "train: training",
                 "gate": "train: evaluating (gate)", "saving": "train: publishing"}


def schedule(rng: random.Random, kinds: tuple, n: int) -> list[str]:
    """n kill points: every kind at least n // len(kinds) times, the rest drawn, in a random order."""
    points = list(kinds) * (n // len(kinds)) + [rng.choice(kinds) for _ in range(n % len(kinds))]
    rng.shuffle(points)
    return points


@pytest.fixture(scope="module")
def zygote():
    forks = cs.Zygote()
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def demo():
    engine = Engine.load("demo")
    return engine, base_fingerprint(engine.model)


def metadata(fingerprint: str) -> dict:
    return {"base_model": "demo", "base_fingerprint": fingerprint, "method": "sft-lora",
            "gate": {"decision": "manual", "reason": "crash test"}}


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server_setup(tmp_path_factory, demo):
    """A copy of the demo model whose answers never end before max_new_tokens (so a kill lands inside
    a stream), two LoRA adapter folders (random B: they change the answers), and shapes images."""
    engine, _ = demo
    root = tmp_path_factory.mktemp("crash-server")
    model = root / "slow-demo"
    shutil.copytree(config.DEMO_MODEL_DIR, model)
    generation = json.loads((model / "generation_config.json").read_text())
    generation["min_new_tokens"] = 1000
    (model / "generation_config.json").write_text(json.dumps(generation))
    from peft import LoraConfig, get_peft_model

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = get_peft_model(copy.deepcopy(engine.model),
                              LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj)"))
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        lora.save_pretrained(root / f"lora{seed}")
        folders.append(root / f"lora{seed}")
    rng = random.Random(SEED)
    images = []
    for i in range(3):
        path = root / f"shape{i}.png"
        shapes.render(shapes.random_scene(rng)).save(path)
        images.append(path)
    return model, folders, images


class Load:
    """Two API clients chatting, voting, regenerating, preferring and comparing on their own answers
    until the server dies, recording in the ledger what the server acknowledged."""

    def __init__(self, url: str, ledger: cs.Ledger, images, seed: int, owned: dict, stop: threading.Event):
        self.url, self.ledger, self.images, self.owned, self.stop = url, ledger, images, owned, stop
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(random.Random(seed * 10 + i), i), daemon=True)
                        for i in range(2)]
        for thread in self.threads:
            thread.start()

    def _run(self, rng: random.Random, name: int) -> None:
        from gradio_client import Client, handle_file

        try:
            client = Client(self.url, verbose=False)
        except Exception as error:
            if not self.stop.is_set():
                self.errors.append(f"client: {error}")
            return
        mine = self.owned.setdefault(name, [])  # this client's finished answers: (message, conversation, question)
        while not self.stop.is_set():
            action = rng.choice(("chat", "chat", "vote", "vote", "regenerate", "prefer", "compare")) if mine else "chat"
            sampling = dict(temperature=1.0, max_new_tokens=rng.randint(4, 16), seed=rng.randint(0, 10**6))
            if action == "chat":
                conversation = rng.choice(mine)[1] if mine and rng.random() < 0.5 else ""
                image = handle_file(str(rng.choice(self.images))) if rng.random() < 0.3 else None
                final = self.stream(client, "/chat", conversation_id=str(conversation), text="What is there?",
                                    image=image, **sampling)
            elif action == "regenerate":
                final = self.stream(client, "/regenerate", message_id=rng.choice(mine)[0], **sampling)
            elif action == "compare":
                final = self.stream(client, "/compare", conversation_id=str(rng.choice(mine)[1]),
                                    text="Which colors?", **sampling)
                if final and final["meta"].get("comparison_id"):
                    self.quick(client, ("pick", final["meta"]["comparison_id"]), rng.choice(("a", "b", "tie")),
                               "/compare_pick", comparison_id=final["meta"]["comparison_id"])
            elif action == "vote":
                message_id = rng.choice(mine)[0]
                vote = rng.choice(("up", "down", "none"))
                self.quick(client, ("vote", message_id), None if vote == "none" else vote, "/vote",
                           message_id=message_id, vote=vote, reasons=[], comment="")
                final = None
            else:
                message_id, _, question = rng.choice(mine)
                result = self.quick(client, ("prefer", question), message_id, "/prefer", message_id=message_id)
                final = None
                if result is None and not self.stop.is_set():  # no sibling yet: refused, never a preference
                    self.ledger.label(("prefer", question)).pending.discard(message_id)
            if final and final.get("message_id"):
                mine.append((final["message_id"], final["conversation_id"], final["user_message_id"]))

    def stream(self, client, endpoint: str, **kwargs) -> dict | None:
        request = f"{threading.current_thread().name} {endpoint}"
        keys = {}  # a comparison streams two answers

        def seen(output):
            side = output.get("side")
            if side not in keys:
                keys[side] = self.ledger.new_answer(f"{request} side {side}")
            self.ledger.streamed(keys[side], output)
        try:
            job = client.submit(api_name=endpoint, **kwargs)
        except Exception:
            return None
        return cs.wait_job(job, self.url, self.stop, seen, errors=self.errors)

    def quick(self, client, key: tuple, value, endpoint: str, **kwargs):
        self.ledger.sent(key, value)
        try:
            job = client.submit(api_name=endpoint, **kwargs)
        except Exception:
            return None
        result = cs.wait_job(job, self.url, self.stop, errors=self.errors)
        if result is not None:
            self.ledger.acked(key, value)
        return result

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


class Round:
    """One kill of the server: the main client's target action, interrupted by SIGKILL at a random point."""

    def __init__(self, number, kind, rng, data, pid, url, ledger, registry_state, browser, server_setup, fingerprint,
                 stop: threading.Event):
        from gradio_client import Client

        self.number, self.kind, self.rng, self.pid, self.url, self.ledger = number, kind, rng, pid, url, ledger
        self.client_data = data
        self.published, self.browser, self.fingerprint = registry_state, browser, fingerprint
        self.lora_folders = server_setup[1]
        self.client = Client(url, verbose=False)
        self.stop = stop  # set at the kill: the load's clients stop, and their failures from then on are expected
        self.in_flight = False
        self.note = ""

    def kill(self) -> None:
        self.stop.set()
        assert cs.kill9(self.pid), "the server had died before the kill"

    def follow(self, job, key: int, enough) -> None:
        """Record the job's outputs until `enough(outputs)` or it ends."""
        seen = 0
        deadline = time.time() + 300
        while time.time() < deadline:
            done, outputs = job.done(), job.outputs()
            for output in outputs[seen:]:
                self.ledger.streamed(key, output)
            seen = len(outputs)
            if done or enough(outputs):
                return
            time.sleep(0.005)
        raise AssertionError(f"round {self.number}: the {self.kind} did not stream")

    def drain(self, job, key: int, keys=None) -> None:
        """After the kill: every output the client holds was sent by the server, so it was acknowledged."""
        for output in job.outputs():
            self.ledger.streamed((keys or {}).get(output.get("side"), key), output)

    def short_answer(self, text: str) -> dict:
        final = self.client.predict(conversation_id="", text=text, temperature=1.0, max_new_tokens=4,
                                    api_name="/chat")
        self.ledger.streamed(self.ledger.new_answer(), final)
        return final

    def run(self) -> None:
        getattr(self, f"target_{self.kind}")()

    def _streamed_target(self, endpoint: str, outputs_before_kill: int, keys=None, **kwargs):
        key = self.ledger.new_answer(f"target {endpoint}")
        job = self.client.submit(api_name=endpoint, temperature=1.0, seed=self.rng.randint(0, 10**6), **kwargs)
        self.follow(job, key, lambda outputs: len(outputs) >= outputs_before_kill)
        self.in_flight = not job.done()
        self.kill()
        self.drain(job, key, keys)
        return job

    def target_stream(self) -> None:
        self._streamed_target("/chat", self.rng.randint(1, 40), conversation_id="",
                              text=f"Round {self.number}: tell me everything.", max_new_tokens=200)

    def target_regenerate(self) -> None:
        answered = [e["message_id"] for e in self.ledger.answers.values() if e["message_id"]]
        self._streamed_target("/regenerate", self.rng.randint(1, 40), message_id=self.rng.choice(answered),
                              max_new_tokens=200)

    def target_compare(self) -> None:
        key_a, key_b = self.ledger.new_answer("target /compare a"), self.ledger.new_answer("target /compare b")
        keys = {"a": key_a, "b": key_b}
        job = self.client.submit(api_name="/compare", conversation_id="", text=f"Round {self.number}: compare.",
                                 temperature=1.0, max_new_tokens=40, seed=self.rng.randint(0, 10**6))
        limit = self.rng.randint(1, 90)  # 40 tokens a side: side a, side b, or the pick after both
        seen = 0
        while not job.done() and len(job.outputs()) < limit:
            outputs = job.outputs()
            for output in outputs[seen:]:
                self.ledger.streamed(keys.get(output.get("side"), key_a), output)
            seen = len(outputs)
            time.sleep(0.005)
        if not job.done():
            self.in_flight = True
            self.kill()
            self.drain(job, key_a, keys)
            return
        self.drain(job, key_a, keys)
        final = job.result()
        comparison = final["meta"]["comparison_id"]
        pick = self.rng.choice(("a", "b", "tie", "both_bad"))
        self.ledger.sent(("pick", comparison), pick)
        pick_job = self.client.submit(comparison_id=comparison, pick=pick, api_name="/compare_pick")
        time.sleep(self.rng.uniform(0, 0.02))
        self.in_flight = not pick_job.done()
        self.note = "pick"
        self.kill()
        if cs.wait_job(pick_job, self.url, self.stop) is not None:
            self.ledger.acked(("pick", comparison), pick)

    def target_vote(self) -> None:
        answers = [self.short_answer(f"Round {self.number}: vote {i}.")["message_id"] for i in range(3)]
        votes_before_kill = self.rng.randint(0, 6)
        for i in range(votes_before_kill + 1):
            message_id, vote = self.rng.choice(answers), self.rng.choice(("up", "down", "none"))
            key = ("vote", message_id)
            self.ledger.sent(key, None if vote == "none" else vote)
            job = self.client.submit(message_id=message_id, vote=vote, reasons=[], comment="", api_name="/vote")
            if i == votes_before_kill:
                time.sleep(self.rng.uniform(0, 0.02))
                self.in_flight = not job.done()
                self.kill()
            if cs.wait_job(job, self.url, self.stop) is not None:
                self.ledger.acked(key, None if vote == "none" else vote)

    def target_swap(self) -> None:
        registry = Registry.for_data_dir(self.client_data)
        version = registry.publish(self.rng.choice(self.lora_folders), metadata(self.fingerprint))
        self.published.append(version)
        target = version if self.rng.random() < 0.7 else self.rng.choice(self.published[:-1] + ["base"])
        value = None if target == "base" else target
        self.ledger.sent(("active",), value)
        through_api = self.rng.random() < 0.5
        self.note = f"{target} via {'/activate' if through_api else 'the registry'}"
        if through_api:
            job = self.client.submit(version=target, api_name="/activate")
            if self.rng.random() < 0.5:  # kill while /activate is being served
                time.sleep(self.rng.uniform(0, 0.05))
                self.in_flight = not job.done()
                self.kill()
            if cs.wait_job(job, self.url, self.stop) is not None:
                self.ledger.acked(("active",), value)
        else:
            if value is None:
                registry.deactivate("crash test")
            else:
                registry.activate(value, "crash test", base_fingerprint=self.fingerprint, force=True)
            self.ledger.acked(("active",), value)
        if not self.stop.is_set():
            time.sleep(self.rng.uniform(0, 0.6))  # the follower looks every 0.25 s; the next answer loads it
            self.in_flight = f"now answering with adapter {target if value else 'none'}" not in (
                self.client_data / "server.log").read_text()
            self.kill()

    def target_edit(self) -> None:
        from playwright.sync_api import expect

        title = f"Round {self.number}: a question to edit"
        self.short_answer(title)
        edited = f"Round {self.number}: the edited question"
        page = self.browser.new_page(viewport={"width": 1200, "height": 1000})
        try:
            page.goto(self.url)
            page.locator("#conversations").get_by_text(title).click()
            bots, users = page.locator('[data-testid="bot"]'), page.locator('[data-testid="user"]')
            expect(bots).to_have_count(1, timeout=60_000)
            old = bots.last.inner_text()
            users.last.hover()
            page.get_by_role("button", name="Edit").last.click()
            page.locator("#chatbot textarea").first.fill(edited)
            self.ledger.edits[edited] = False
            page.locator("#chatbot").get_by_role("button", name="Submit").click()
            deadline = time.time() + 120
            while time.time() < deadline:  # acknowledged: the answer to the edited question is streaming in
                shown_users, shown_bots = users.all_inner_texts(), bots.all_inner_texts()
                if (shown_users and edited in shown_users[-1] and shown_bots and shown_bots[-1].strip()
                        and shown_bots[-1] != old):
                    break
                time.sleep(0.01)
            else:
                raise AssertionError(f"round {self.number}: the edit's answer never showed")
            self.ledger.edits[edited] = True
            time.sleep(self.rng.uniform(0, 0.5))
            self.kill()
        finally:
            page.close()
        found = cs.rows(self.client_data / "chatapp.db", "SELECT g.finish_reason FROM messages m JOIN messages a ON "
                        "a.parent_id = m.id JOIN generations g ON g.message_id = a.id WHERE m.text = ?", [edited])
        self.in_flight = bool(found) and found[0]["finish_reason"] == "cut_off"


def check_after_server_kill(data, ledger: cs.Ledger, published: list[str], fingerprint: str, figures) -> list[str]:
    """Everything acknowledged is stored (the labels then settle on what is stored); the store is whole;
    the registry holds exactly the published versions, all valid. Returns the losses found."""
    db = data / "chatapp.db"
    lost = []
    status = cs.integrity(db)
    if status != "ok":
        lost.append(f"integrity_check: {status}")
    stored_questions = {r["id"] for r in cs.rows(db, "SELECT id FROM messages WHERE role = 'user'")}
    lost += [f"question {m} is not stored" for m in ledger.user_messages - stored_questions]
    lost += [problem for problem in map(lambda entry: cs.answer_lost(db, entry), ledger.answers.values()) if problem]
    for comparison, (a, b) in ledger.comparisons.items():
        if cs.rows(db, "SELECT id FROM comparisons WHERE id = ? AND a_id = ? AND b_id = ?", [comparison, a, b]) == []:
            lost.append(f"comparison {comparison} is not stored")
    for text, acknowledged in ledger.edits.items():
        if acknowledged and not cs.rows(db, "SELECT a.id FROM messages m JOIN messages a ON a.parent_id = m.id "
                                            "WHERE m.kind = 'edit' AND m.text = ?", [text]):
            lost.append(f"the edit {text!r} or its answer is not stored")
    figures["registry_leftovers"] += len(cs.leftovers(data / "adapters"))
    registry = Registry.for_data_dir(data)  # opening it cleans up
    for key, label in ledger.labels.items():
        if key[0] == "vote":
            stored = [r["vote"] for r in cs.rows(db, "SELECT vote FROM feedback WHERE message_id = ?", [key[1]])]
        elif key[0] == "prefer":
            stored = [r["chosen_id"] for r in cs.rows(db, "SELECT chosen_id FROM preferences WHERE parent_id = ?",
                                                      [key[1]])]
        elif key[0] == "pick":
            stored = [r["pick"] for r in cs.rows(db, "SELECT pick FROM comparisons WHERE id = ?", [key[1]])]
        else:
            stored = [registry.active()]
        stored = stored[0] if stored else None
        if stored not in label.allowed():
            lost.append(f"{key}: stored {stored!r}, acknowledged {label.acked!r}, sent {sorted(map(str, label.pending))}")
        label.settle(stored)
    if registry.versions() != published or cs.version_folders(registry.root) != published or cs.leftovers(registry.root):
        lost.append(f"registry: versions {registry.versions()}, folders {cs.version_folders(registry.root)}, "
                    f"published {published}")
    for version in published:
        registry.validate(version, fingerprint)
    return lost


@pytest.mark.slow
@pytest.mark.browser
def test_kill_9_of_the_server_loses_nothing_acknowledged(zygote, demo, server_setup, browser, tmp_path):
    from gradio_client import Client

    _, fingerprint = demo
    model = server_setup[0]
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(SEED)
    kinds = schedule(rng, SERVER_KINDS, KILLS)
    ledger, published, owned = cs.Ledger(), [], {}
    ledger.labels[("active",)] = cs.Label(None)
    figures, lost, started = collections.Counter(), [], time.time()
    for number, kind in enumerate(kinds):
        pid, url = cs.start_server(zygote, data, ("--model", model))
        expected = ledger.labels[("active",)].acked
        stop = threading.Event()
        round_ = Round(number, kind, rng, data, pid, url, ledger, published, browser, server_setup, fingerprint, stop)
        # the restarted server answers, with the active adapter: it loaded
        assert round_.short_answer(f"Round {number}: which adapter?")["adapter"] == (expected or "none"), \
            (data / "server.log").read_text()[-3000:]
        load = Load(url, ledger, server_setup[2], SEED * 100 + number, owned, stop)
        time.sleep(rng.uniform(0.2, 0.6))  # the load gets going
        try:
            round_.run()
        finally:
            stop.set()
            if cs.alive(pid):
                cs.kill9(pid)
            load.end()
        figures[kind] += 1
        figures["in_flight"] += bool(round_.in_flight)
        assert not load.errors, load.errors
        found = check_after_server_kill(data, ledger, published, fingerprint, figures)
        print(f"server kill {number + 1:2}/{KILLS}: {kind:10} {round_.note:24} in flight: {bool(round_.in_flight)}; "
              f"lost: {len(found)}")
        lost += [f"round {number} ({kind}): {problem}" for problem in found]

    # the last restart is the plain `python app.py`
    proc, url = support.start_server(data, ("--no-trainer", "--model", str(model)))
    try:
        answer = Client(url, verbose=False).predict(conversation_id="", text="And now?", temperature=0,
                                                    max_new_tokens=2, api_name="/chat")
        assert answer["adapter"] == (ledger.labels[("active",)].acked or "none")
    finally:
        support.stop_server(proc)
    stored = cs.rows(data / "chatapp.db", "SELECT (SELECT count(*) FROM messages) AS messages, "
                                          "(SELECT count(*) FROM feedback_events) AS votes")[0]
    counts = dict(kills=KILLS, acknowledged_messages=ledger.acks["messages"],
                  acknowledged_votes=ledger.acks["votes"], other_acknowledged=ledger.acks["labels"],
                  lost=len(lost), in_flight_at_kill=figures["in_flight"], stored_messages=stored["messages"],
                  vote_events=stored["votes"], versions=len(published), registry_leftovers=figures["registry_leftovers"],
                  **{f"mid_{kind}": figures[kind] for kind in SERVER_KINDS}, seconds=round(time.time() - started))
    print("server kill -9:", counts)
    fault_figures.record("server kill -9", **counts)
    assert not lost, lost


# ---------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def voted(tmp_path_factory, demo):
    """A data dir with 60 sampled shapes chats from 5 users, voted by the terse-and-correct rule, and a
    two-prompt regression set (the demo probe's 300 questions would make every run 2 s longer)."""
    from chatapp.feedback.store import Store

    engine, _ = demo
    data = tmp_path_factory.mktemp("crash-voted") / "data"
    store = Store(data)
    logged = simulate.log_chats(store, engine.model, engine.processor, 60, seed=3, users=[f"user{i}" for i in range(5)])
    simulate.vote(store, logged, simulate.style_rule("terse"))
    store.close()
    probe = data.parent / "probe.jsonl"
    probe.write_text('{"prompt": "What can you do?", "expect": []}\n{"prompt": "Hello", "expect": []}\n')
    return data, probe


def train_argv(data, probe, seed: int) -> list:
    return ["train", "--data-dir", data, "--method", "kto", "--from", "active", "--max-steps", 4, "--batch-size", 4,
            "--min-rows", 10, "--publish", "always", "--priority", "nice", "--threads", 1, "--regression-set", probe,
            "--seed", seed]


class Versions:
    """Every version the registry lists, loaded into one peft model (a version never changes: its files'
    checksums are validated each time), and a forward pass with the active one."""

    def __init__(self, engine):
        self.base, self.model, self.loaded = copy.deepcopy(engine.model), None, set()
        self.inputs = engine.processor.tokenizer("What can you do?", return_tensors="pt")

    def load(self, version: str, path) -> None:
        from peft import PeftModel

        if version in self.loaded:
            return
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=version)
        else:
            self.model.load_adapter(str(path), adapter_name=version)
        self.loaded.add(version)

    def answers_with(self, version: str) -> bool:
        self.model.set_adapter(version)
        with torch.no_grad():
            return bool(torch.isfinite(self.model(input_ids=self.inputs["input_ids"]).logits).all())


def check_after_trainer_kill(data, fingerprint: str, versions: Versions, figures) -> list[str]:
    """The store is whole, the registry lists only complete versions that all load (the active one
    answers), the run lock is free and no run claims what did not happen. Returns what is wrong."""
    from chatapp.feedback.store import FINISHED_STATUSES
    from chatapp.learning.trainer import TrainingBusy

    db, wrong = data / "chatapp.db", []
    status = cs.integrity(db)
    if status != "ok":
        wrong.append(f"integrity_check: {status}")
    figures["registry_leftovers"] += len(cs.leftovers(data / "adapters"))
    registry = Registry.for_data_dir(data)  # opening it cleans up
    listed = registry.versions()
    # a set: the folders list sorts by name (v10 before v2), the registry by number
    if cs.leftovers(registry.root) or set(cs.version_folders(registry.root)) != set(listed):
        wrong.append(f"registry folders {cs.version_folders(registry.root)} + {cs.leftovers(registry.root)}, "
                     f"versions {listed}")
    wrong += [f"{row['version']}: {row['error']}" for row in registry.list() if "error" in row]
    for version in listed:
        versions.load(version, registry.validate(version, fingerprint))
    active = registry.active()
    if active is not None and (active not in listed or not versions.answers_with(active)):
        wrong.append(f"the active version {active} does not load")
    try:
        with run_lock(data):
            pass
    except TrainingBusy:
        wrong.append("the run lock is still held")
    runs = cs.rows(db, "SELECT * FROM training_runs ORDER BY id")
    for run in runs:
        claim = f"run {run['id']} ({run['status']}, {run['phase']}, version {run['candidate_version']})"
        if run["status"] == "running":
            # a dead run is marked at the start of the next one, so only the newest may still say so
            if cs.alive(run["pid"]) or run["id"] != runs[-1]["id"]:
                wrong.append(f"{claim} claims to be running")
        elif run["status"] in FINISHED_STATUSES:
            if run["phase"] != "done" or run["candidate_version"] not in listed:
                wrong.append(f"{claim} claims its work done without its adapter")
        elif run["status"] != "failed" or not run["error"] or (
                run["candidate_version"] and run["candidate_version"] not in listed):
            wrong.append(f"{claim}: {run['error']}")
    claimed = [run["candidate_version"] for run in runs if run["candidate_version"]]
    if len(claimed) != len(set(claimed)):
        wrong.append(f"two runs claim one version: {claimed}")
    figures["orphan_versions"] = len(set(listed) - set(claimed))
    return wrong


def landed(log, hook, data) -> str:
    """Where a kill landed, from what the run printed and left behind."""
    if hook:
        return hook
    text = log.read_text(errors="replace") if log.exists() else ""  # killed before it opened its log
    if TRAIN_MARKERS["saving"] in text:
        saving = list((data / SCRATCH_NAME).glob("chatapp-publish-*"))
        return "saving" if saving else "publishing" if cs.leftovers(data / "adapters") else "after publishing"
    for phase in ("gate", "training", "loading"):
        if TRAIN_MARKERS[phase] in text:
            return phase
    return "preparing"


@pytest.mark.slow
def test_kill_9_of_the_trainer_leaves_everything_usable(zygote, demo, voted, tmp_path):
    engine, fingerprint = demo
    data = tmp_path / "data"
    shutil.copytree(voted[0], data)
    temp = tmp_path / "tmp"  # the trainer's TMPDIR: a killed run must leave nothing there
    temp.mkdir()
    rng = random.Random(SEED + 1)
    points = schedule(rng, TRAINER_POINTS, KILLS)
    versions, figures, where, wrong = Versions(engine), collections.Counter(), collections.Counter(), []
    started, attempt = time.time(), 0
    while figures["kills"] < KILLS:
        attempt += 1
        assert attempt <= 2 * KILLS, f"only {figures['kills']} kills in {attempt} runs"
        point = points[figures["kills"]]
        hook = {"publishing": rng.choice(PUBLISH_HOOKS), "activating": rng.choice(ACTIVATE_HOOKS)}.get(point)
        log = tmp_path / f"train-{attempt}.log"
        env = dict(TMPDIR=temp, **({"CHATAPP_CRASH_AT": hook} if hook else {}))
        pid = zygote.spawn(train_argv(data, voted[1], attempt), log, **env)
        if hook:
            cs.wait_gone(pid, timeout=300)  # the registry kills its own process there
        else:
            if point == "preparing" or cs.wait_for_line(log, TRAIN_MARKERS[point], pid, timeout=300):
                time.sleep(rng.uniform(0, {"preparing": 0.15, "loading": 0.3, "training": 0.8, "gate": 0.5,
                                           "saving": 0.03}[point]))
            cs.kill9(pid)
        status = cs.exit_status(log)
        if status is not None:  # it ended before the kill: not a kill; draw the time again
            assert status == 0 and not hook, log.read_text()[-3000:]
            figures["ended_before_the_kill"] += 1
            continue
        figures["kills"] += 1
        where[landed(log, hook, data)] += 1
        found = check_after_trainer_kill(data, fingerprint, versions, figures)
        print(f"trainer kill {figures['kills']:2}/{KILLS}: {point:10} {hook or '':22} "
              f"versions {len(versions.loaded)}; wrong: {len(found)}")
        wrong += [f"kill {figures['kills']} ({point} {hook or ''}): {problem}" for problem in found]

    # the next run starts, marks the dead one and finishes: its version is the active one
    log = tmp_path / "train-final.log"
    pid = zygote.spawn(train_argv(data, voted[1], 0), log, TMPDIR=temp)
    cs.wait_gone(pid, timeout=300)
    assert cs.exit_status(log) == 0, log.read_text()[-3000:]
    wrong += check_after_trainer_kill(data, fingerprint, versions, figures)
    runs = cs.rows(data / "chatapp.db", "SELECT * FROM training_runs ORDER BY id")
    assert runs[-1]["phase"] == "done" and runs[-1]["candidate_version"] == Registry.for_data_dir(data).active()
    assert not [run for run in runs if run["status"] == "running"]
    assert not (data / SCRATCH_NAME).exists()  # the killed runs' temp files went with the next run
    counts = dict(kills=figures["kills"], wrong=len(wrong), runs=len(runs),
                  dead_runs_marked=sum(run["error"] is not None and "died" in run["error"] for run in runs),
                  versions=len(versions.loaded), orphan_versions=figures["orphan_versions"],
                  registry_leftovers=figures["registry_leftovers"],
                  temp_folders_left=len(list(temp.iterdir())), ended_before_the_kill=figures["ended_before_the_kill"],
                  landed=" ".join(f"{k}:{v}" for k, v in sorted(where.items())), seconds=round(time.time() - started))
    print("trainer kill -9:", counts)
    fault_figures.record("trainer kill -9", **counts)
    assert not wrong, wrong
    assert counts["temp_folders_left"] == 0, sorted(p.name for p in temp.iterdir())
