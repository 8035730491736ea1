"""Proof that users' votes change the model, end to end on the demo model through the real path:
store (chats and votes as the chat service records them) -> prefs -> trainer (TRL) -> gate ->
registry -> engine.

- style: answers sampled at temperature 1 are voted up when they are in the liked style and
  correct, down otherwise (200 votes from 5 users); after training, the liked style's share of
  sampled answers on held-out images rises from about 1/3 to >= 90% while greedy accuracy drops by
  at most 2 points. The style is a parameter (CHATAPP_PROOF_STYLES, default "terse"; the README
  lists all three).
- correctness: answers sampled at a high temperature are voted up when right, down when wrong;
  sampled accuracy at that temperature rises.
- poisoning: random votes, and inverted correctness votes (wrong answers up), are rejected by the
  gate and the active adapter stays as it was.
The first two take ~4 minutes a case, so they run when asked (CHATAPP_PROOF=1): see `opt_in`.
"""
import os
import shutil

import pytest

from chatapp.learning import simulate
from chatapp.learning.registry import Registry
from chatapp.serving.engine import Engine
from chatapp.feedback.store import Store
from chatapp.learning.settings import TrainSettings
from chatapp.learning.trainer import train

pytestmark = pytest.mark.slow  # every case trains


USERS = [f"user{i}" for i in range(5)]
LOGGED, VOTES = 600, 200
HOT = 2.0  # the "high temperature" of the correctness test: the demo model is right ~70% of the time
STYLES = os.environ.get("CHATAPP_PROOF_STYLES", "terse").split(",")
# The style test passes for every style with the default recipe (two rounds of rejection sampling,
# 4-, 8- and 12-epoch candidates, LoRA on attention and MLP, the gate picks; 2026-12-03): terse
# 0.35 -> 0.93 (greedy 0.993 -> 0.973), plain 0.29 -> 0.98 (0.993), chatty 0.36 -> 0.99 (0.977). The
# correctness test does not pass today: the gate that judges image and text-only questions apart rejects
# its run (with or without LoRA on the MLP; under the older gate it gave 0.70 -> 0.74, docs/learning.md). Each case
# takes ~5 minutes on 2 cores, more than the CI suite's budget allows for four of them, so CI runs
# them only when asked:
# CHATAPP_PROOF=1 [CHATAPP_PROOF_STYLES=terse,plain,chatty] pytest tests/test_votes_change_the_model.py
opt_in = pytest.mark.skipif(os.environ.get("CHATAPP_PROOF") != "1",
                            reason="~5 minutes a case; run with CHATAPP_PROOF=1")


def measure(data, version, items, temperature, seeds=1):
    """Accuracy and style shares of answers at `temperature`; with `seeds` > 1, one answer per item and
    seed, and the accuracy averaged over them."""
    engine = Engine.load("demo")
    if version:
        engine.use_adapter(version, Registry.for_data_dir(data).validate(version, None))
    runs = [simulate.measure(engine.model, engine.processor, items, temperature=temperature, seed=seed)
            for seed in range(seeds)]
    return dict(runs[0], accuracy=sum(r["accuracy"] for r in runs) / seeds, accuracies=[r["accuracy"] for r in runs])


@pytest.fixture(scope="module")
def held_out():
    return simulate.held_out_items(60)  # 300 questions on images no chat used


def logged_store(root, name, engine, temperature, seed):
    data = root / name
    store = Store(data)
    logged = simulate.log_chats(store, engine.model, engine.processor, LOGGED, seed=seed, users=USERS,
                                temperature=temperature)
    return data, store, logged


@pytest.fixture(scope="module")
def warm(tmp_path_factory, demo_engine):
    """Chats at temperature 1 (for the style test)."""
    return logged_store(tmp_path_factory.mktemp("warm"), "base", demo_engine, 1.0, seed=21)


@pytest.fixture(scope="module")
def hot(tmp_path_factory, demo_engine):
    """Chats at a high temperature, where the demo model makes mistakes (correctness, poisoning)."""
    return logged_store(tmp_path_factory.mktemp("hot"), "base", demo_engine, HOT, seed=22)


def fork(source, tmp_path):
    """A copy of a logged data dir (votes differ per test)."""
    data = tmp_path / "data"
    shutil.copytree(source, data)
    return data, Store(data)


@opt_in
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.proof
def test_style_votes_move_the_sampled_style(warm, held_out, tmp_path, style, record_property):
    source, _, logged = warm
    data, store = fork(source, tmp_path)
    counts = simulate.vote(store, logged[:VOTES], simulate.style_rule(style))
    before_sampled = measure(data, None, held_out, 1.0)
    before_greedy = measure(data, None, held_out, 0.0)
    result = train(store, Registry.for_data_dir(data), "demo", log=print)
    assert result.decision == "promoted", result.reason
    assert Registry.for_data_dir(data).active() == result.version
    after_sampled = measure(data, result.version, held_out, 1.0)
    after_greedy = measure(data, result.version, held_out, 0.0)
    figures = {"votes": counts, "share_before": before_sampled["style_share"][style],
               "share_after": after_sampled["style_share"][style], "greedy_before": before_greedy["accuracy"],
               "greedy_after": after_greedy["accuracy"], "method": result.method}
    print(f"\nstyle {style}: {figures}")
    record_property("figures", figures)
    assert 0.2 < figures["share_before"] < 0.5
    # LoRA on attention and MLP (the default since 2026-12-03): terse 0.93, plain 0.98, chatty 0.99; with
    # attention only, judged by today's gate, terse reached 0.87 and chatty was rejected (docs/learning.md)
    assert figures["share_after"] >= 0.90
    assert figures["greedy_after"] >= figures["greedy_before"] - 0.02 - 1e-9


@opt_in
@pytest.mark.proof
def test_correctness_votes_raise_sampled_accuracy(hot, held_out, tmp_path):
    source, _, logged = hot
    data, store = fork(source, tmp_path)
    counts = simulate.vote(store, logged[:VOTES], simulate.correctness_rule)
    # three answers per question (900): one sample of 300 moves by a few points from seed to seed
    before = measure(data, None, held_out, HOT, seeds=3)
    result = train(store, Registry.for_data_dir(data), "demo", log=print)
    assert result.decision == "promoted", result.reason
    after = measure(data, result.version, held_out, HOT, seeds=3)
    print(f"\ncorrectness at temperature {HOT}: votes {counts}, sampled accuracy {before['accuracy']:.3f} -> "
          f"{after['accuracy']:.3f} (per seed {before['accuracies']} -> {after['accuracies']})")
    assert counts["down"] >= 10
    assert after["accuracy"] >= before["accuracy"] + 0.03


@pytest.mark.parametrize("poison", ["random", "inverted"])
def test_poisoned_votes_are_rejected(hot, tmp_path, poison):
    source, _, logged = hot
    data, store = fork(source, tmp_path)
    registry = Registry.for_data_dir(data)
    rule = simulate.random_rule(7) if poison == "random" else simulate.inverted(simulate.correctness_rule)
    counts = simulate.vote(store, logged[:VOTES], rule)
    result = train(store, registry, "demo", log=print)
    print(f"\n{poison} votes {counts}: {result.decision}: {result.reason}")
    assert result.decision == "rejected"
    assert registry.active() is None  # the live model is unchanged (the base, here)
    assert store.run(result.run_id)["status"] == "rejected"
