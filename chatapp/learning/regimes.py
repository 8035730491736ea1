"""The data regimes learning must hold in (issue 15's matrix), built with simulated users on the demo
model: each regime fills a store the way the chat service would, and names the preference its users
hold, so `bench/learning.py` and `tests/test_learning_regimes.py` run the same setups through the
product's path (store -> trainer -> gate -> registry).

Invariants:
- A regime is data, not code paths: chats, votes, pairs, noise and the judge; the run that follows
  is the trainer's default (`TrainSettings()` apart from what the caller passes).
- The preference measure ("before -> after") is the share of answers sampled at the users' chat
  temperature, on held-out questions no chat used (`simulate.held_out_items`), that the regime's
  judge likes; greedy accuracy is measured on the same questions. A rejected candidate (published,
  not served) is measured on them too, so the bench's figures can be set beside the gate's probe.
- Everything is a function of the seed: the same seed gives the same store.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chatapp.learning import simulate

USERS = [f"user{i}" for i in range(5)]


@dataclass(frozen=True)
class Regime:
    name: str
    summary: str
    judge: str  # a key of simulate.JUDGES
    chats: int  # distinct questions logged
    repeats: int = 1  # conversations per question (each its own sampled answer)
    votes: int = 0  # the first `votes` chats get a thumb
    pairs: int = 0  # the first `pairs` chats get a second answer and, where the judge tells them apart, a pair
    temperature: float = 1.0  # users chat at
    flip: float = 0.0  # share of votes flipped at random
    against: bool = False  # the last user votes the opposite of everyone else
    poison: str = ""  # "random" | "inverted": votes that must never promote
    target: float = 0.8  # the preference share to reach

    def as_dict(self) -> dict:
        return asdict(self)


REGIMES = {r.name: r for r in (
    Regime("a", "many unvoted chats, few votes", "terse", chats=600, votes=200),
    Regime("b", "few distinct prompts, every answer voted", "terse", chats=60, repeats=3, votes=180),
    Regime("c", "little feedback: 50 votes", "terse", chats=600, votes=50, target=0.7),
    Regime("d", "pairs only: regenerate + prefer, compare picks; no thumbs", "terse", chats=600, pairs=250),
    Regime("e", "noise: 15% of votes flipped, and one user of five voting against the rest", "terse",
           chats=600, votes=200, flip=0.15, against=True, target=0.7),
    Regime("f", "two preferences at once: correct and short, chats at temperature 1.5", "short-correct",
           chats=600, votes=200, temperature=1.5),
    Regime("g", "a preference that is none of the built-in styles: the style depends on the question",
           "per-question", chats=600, votes=200),
    Regime("random", "poisoned: random votes (must never promote)", "terse", chats=600, votes=200, poison="random"),
    Regime("inverted", "poisoned: inverted votes (must never promote)", "terse", chats=600, votes=200,
           poison="inverted"),
)}
MATRIX = ("a", "b", "c", "d", "e", "f", "g")


def build(regime: Regime, store, model, processor, seed: int) -> dict:
    """Log the regime's chats in `store` and give its labels; returns what was given."""
    logged = simulate.log_chats(store, model, processor, regime.chats, seed=seed, users=USERS,
                                temperature=regime.temperature, repeats=regime.repeats)
    judge = simulate.JUDGES[regime.judge]
    rule = simulate.judged(judge)
    if regime.poison:
        rule = simulate.random_rule(seed + 5) if regime.poison == "random" else simulate.inverted(rule)
    if regime.flip:
        rule = simulate.noisy(rule, regime.flip, seed=seed + 7)
    if regime.against:
        rule = simulate.against(rule, store.ensure_user(USERS[-1]))
    given: dict = {"chats": len(logged)}
    if regime.votes:
        counts = simulate.vote(store, logged[:regime.votes], rule)
        given.update(up=counts["up"], down=counts["down"])
    if regime.pairs:
        given.update(simulate.log_pairs(store, model, processor, logged[:regime.pairs], judge, seed=seed,
                                        temperature=regime.temperature))
    return given


def labels_text(given: dict) -> str:
    """'200 votes (69 up)' or '112 pairs (61 prefer, 51 compare)'."""
    if "up" in given:
        return f"{given['up'] + given['down']} votes ({given['up']} up)"
    pairs = given.get("prefer", 0) + given.get("compare", 0)
    return f"{pairs} pairs ({given.get('prefer', 0)} prefer, {given.get('compare', 0)} compare)"


def measure(engine, judge: str, temperature: float, items) -> dict:
    """The preference share (answers sampled at `temperature`) and greedy accuracy of what `engine`
    serves now, on `items`."""
    sampled = simulate.measure(engine.model, engine.processor, items, temperature=temperature,
                               judge=simulate.JUDGES[judge])
    greedy = simulate.measure(engine.model, engine.processor, items, temperature=0.0)
    return {"preference": sampled["preference"], "sampled_accuracy": sampled["accuracy"],
            "greedy_accuracy": greedy["accuracy"], "style_share": sampled["style_share"]}


def served(data: Path, version: str | None = None):
    """An engine serving what the app would serve from `data` now (the active version, or the base), or
    the published `version` (a rejected one, as `adapters activate --force` would serve it)."""
    from chatapp.learning.registry import Registry
    from chatapp.serving.engine import Engine

    engine = Engine.load("demo")
    registry = Registry.for_data_dir(data)
    if version := version or registry.active():
        engine.use_adapter(version, registry.validate(version, None))
    return engine


def run(regime: Regime, data: Path, seed: int, items, *, before: dict | None = None, settings=None,
        log=print) -> dict:
    """Build the regime in a fresh store at `data`, run the trainer once (store -> trainer -> gate ->
    registry) and measure what is served before and after. `before`: the base's figures for this
    regime's judge and temperature, when already measured."""
    from chatapp.feedback.store import Store
    from chatapp.learning.registry import Registry
    from chatapp.learning.trainer import train

    engine = served(data)
    store = Store(data)
    given = build(regime, store, engine.model, engine.processor, seed)
    before = before or measure(engine, regime.judge, regime.temperature, items)
    started = time.perf_counter()
    try:
        result = train(store, Registry.for_data_dir(data), "demo", settings, log=log)
        decision, reason, method, metrics = result.decision, result.reason, result.method, result.metrics
        version = result.version
    except Exception as error:  # NotEnoughFeedback and the like: a row with its message, not a crash
        decision, reason, method, metrics = "not run", f"{type(error).__name__}: {error}", "-", {}
        version = None
    seconds = time.perf_counter() - started
    after = measure(served(data), regime.judge, regime.temperature, items)
    # what the gate turned down, on the bench's questions: does the bench agree with the gate's probe?
    rejected = (measure(served(data, version), regime.judge, regime.temperature, items)
                if version and decision != "promoted" else None)
    meets = (decision == "promoted" and after["preference"] >= regime.target
             and after["greedy_accuracy"] >= before["greedy_accuracy"] - 0.02 - 1e-9)
    # a row is right when it meets its target, or is rejected with its reason; poisoned ones must not promote
    ok = decision != "promoted" if regime.poison else (meets or decision != "promoted")
    return {"regime": regime.name, "summary": regime.summary, "judge": regime.judge, "given": given,
            "labels": labels_text(given), "target": regime.target, "before": before, "after": after,
            "method": method, "decision": decision, "reason": reason, "seconds": seconds, "meets_target": meets,
            "ok": ok, "chosen": metrics.get("chosen"), "rs": metrics.get("rs"), "data": metrics.get("data"),
            "rejected_candidate": rejected,
            "candidates": {k: {"decision": v["decision"], "reason": v["reason"]}
                           for k, v in (metrics.get("candidates") or {}).items()}}
