"""Issue 15, items 4 and 5: a burst of votes makes one run (the background trainer's quiet-period
rule, `watcher.decide`, replayed over simulated time and once in the real loop), and every run
states what it will cost before it starts (`cost`: measured units x the run's work), stored with
the run, and fitted to `train --budget` or refused with the estimate named."""
import random
import threading

import pytest

from chatapp.core.errors import RequestError
from chatapp.feedback.store import Store
from chatapp.learning import cost, simulate, watcher
from chatapp.learning.registry import Registry
from chatapp.learning.settings import TrainSettings, WatchSettings
from chatapp.learning.trainer import train

OLD_RULE = dict(quiet_s=0)  # what the trigger did before: start as soon as the threshold is met
RUN_S = 60  # a default run on the demo model takes about a minute


def burst(votes=200, over_s=180, start_s=10, seed=0) -> list[float]:
    """Votes arriving at random over `over_s` seconds, as when a group votes through a batch of chats."""
    rng = random.Random(seed)
    return sorted(start_s + rng.uniform(0, over_s) for _ in range(votes))


# ---------------------------------------------------------------- the quiet-period rule, replayed

def test_a_burst_of_votes_makes_one_run_with_all_of_them():
    settings = WatchSettings(train_after=50)
    new_rule = watcher.replay(burst(), settings, RUN_S, until=3600)
    old_rule = watcher.replay(burst(), WatchSettings(train_after=50, **OLD_RULE), RUN_S, until=3600)
    assert [run["labels"] for run in new_rule] == [200]
    last_vote = max(burst())
    assert last_vote + settings.quiet_s <= new_rule[0]["start"] <= last_vote + settings.quiet_s + settings.poll_s
    # the old rule: a run at the 50th vote (or the poll after it), then one for each threshold's worth that
    # arrived meanwhile, and the last few votes wait for more: 3 runs of 51, 73 and 67 votes
    assert len(old_rule) >= 3 and 50 <= old_rule[0]["labels"] < 55 and sum(r["labels"] for r in old_rule) < 200


def test_a_steady_trickle_still_trains_after_the_longest_wait():
    settings = WatchSettings(train_after=10, quiet_s=60, max_wait_s=900)
    trickle = [30.0 * i for i in range(1, 240)]  # one vote every 30 s for two hours: never quiet for 60 s
    runs = watcher.replay(trickle, settings, RUN_S, until=7200)
    due_at = trickle[settings.train_after - 1]  # the 10th vote
    assert due_at + 900 <= runs[0]["start"] <= due_at + 900 + settings.poll_s
    assert len(runs) >= 4 and all(b["start"] - a["start"] <= RUN_S + 900 + 300 + settings.poll_s
                                  for a, b in zip(runs, runs[1:]))


def test_votes_during_a_run_wait_for_the_next_run_and_its_quiet_moment():
    settings = WatchSettings(train_after=20, quiet_s=60)
    first, during = burst(40, over_s=30, seed=1), burst(30, over_s=40, start_s=120, seed=2)
    runs = watcher.replay(first + during, settings, run_s=200, until=3600)
    # the first run starts once the first burst is over and takes 200 s; the second burst, which
    # arrived while it trained, makes one more run right after (its votes were quiet long before)
    assert [run["labels"] for run in runs] == [40, 30]
    assert runs[1]["start"] == pytest.approx(runs[0]["start"] + 200, abs=settings.poll_s)


def test_an_admin_request_does_not_wait_for_quiet_and_the_store_state_is_read_right(tmp_path):
    store = Store(tmp_path)
    user = store.ensure_user("alice")
    conversation = store.create_conversation(user, "t")
    question = store.add_message(conversation, None, "user", "What shape is it?")
    for _ in range(3):
        store.set_vote(user, store.add_message(conversation, question, "assistant", "A circle."), "up")
    settings = WatchSettings(train_after=3, quiet_s=60)
    reason, message = watcher.due(store, settings)
    assert reason is None and message.startswith("waiting for a quiet moment: 3 new labels, the last 0 s ago")
    state = watcher.trigger_state(store)
    assert watcher.due(store, settings, now=state.label_times[-1] + 61)[0] == "labels"
    store.request_training("root")
    assert watcher.due(store, settings) == ("request", "training now: asked by root")


@pytest.mark.parametrize("settings, message", [
    (WatchSettings(quiet_s=-1), "--quiet-for must be at least 0"),
    (WatchSettings(quiet_s=120, max_wait_s=60), r"--max-wait \(60 s\) must be at least --quiet-for \(120 s\)"),
])
def test_quiet_settings_are_checked(settings, message):
    with pytest.raises(RequestError, match=message):
        settings.validate()


@pytest.mark.slow
def test_the_real_loop_makes_one_attempt_per_burst(tmp_path):
    """`watch` itself, on a real store, while votes arrive 50 ms apart: with the quiet rule it tries
    once, after the burst; without it, it tries again as each vote arrives. The votes are all thumbs
    up, so each try ends at once with "not enough feedback" (no model is loaded)."""
    from chatapp.learning import gate  # noqa: F401 -- a run's first imports, so that a try takes milliseconds

    def attempts(quiet_s: float) -> int:
        data = tmp_path / f"quiet-{quiet_s}"
        store = Store(data)
        user = store.ensure_user("alice")
        conversation = store.create_conversation(user, "t")
        question = store.add_message(conversation, None, "user", "What shape is it?")
        logs, stop = [], threading.Event()
        loop = threading.Thread(target=watcher.watch, args=(data, "demo", TrainSettings(), WatchSettings(
            train_after=3, quiet_s=quiet_s, max_wait_s=max(quiet_s, 600), poll_s=0.05)),
            kwargs=dict(log=logs.append, stop=stop))
        loop.start()
        try:
            for _ in range(30):
                store.set_vote(user, store.add_message(conversation, question, "assistant", "A circle."), "up")
                stop.wait(0.05)
            stop.wait(quiet_s + 1.5)
        finally:
            stop.set()
            loop.join(timeout=30)
        return sum(line.startswith("watch: training now") for line in logs)

    assert attempts(quiet_s=1.0) == 1
    assert attempts(quiet_s=0) >= 3


# ---------------------------------------------------------------- the cost model

UNITS = cost.Units(sample_s=0.5, score_s=0.05, step_s={"kto": 2.0, "sft": 1.0, "dpo": 3.0}, prompt_tokens=1139,
                   load_s=6.0, calibrate_s=30.0)
REGIME_A = cost.Shape("rs", kto_train=160, kto_held=40, prompts=600, probe=0, style_prompts=40)


def test_the_estimate_counts_the_runs_work_part_by_part():
    settings = TrainSettings()  # the default rs: 8 answers a prompt, 2 rounds, candidates of 4, 8 and 12 epochs
    estimate = cost.estimate(REGIME_A, settings, UNITS)
    assert estimate.samples == 2 * 600 * 8
    # the sampled answers and the policy's greedy answers to the six anchor openers
    assert estimate.parts["sampling"] == {"count": 9606, "unit": "answers", "minutes": 9606 * 0.5 / 60}
    assert estimate.parts["training the scorer (kto)"]["count"] == 20 * 10  # 160 rows / batch 8, 10 epochs
    # 600 kept at most, and anchor rows a tenth of that: 660 rows, 83 steps an epoch
    assert estimate.parts["training the candidates (sft)"]["count"] == 83 * (4 + 4 + 8 + 12)
    assert estimate.minutes == pytest.approx(sum(p["minutes"] for p in estimate.parts.values()))
    assert "9600 sampled answers x ~1139 prompt tokens" in estimate.summary()


def test_the_estimate_of_a_pairs_only_run_counts_the_scorer_trained_on_the_pairs():
    """Regime d: no thumbs, so rs's scorer trains with KTO on the pairs' two answers (not zero steps)."""
    shape = cost.Shape("rs", kto_train=0, dpo_train=92, dpo_held=23, prompts=573, style_prompts=23,
                       scorer_from_pairs=True)
    estimate = cost.estimate(shape, TrainSettings(), UNITS)
    assert "training the scorer (kto)" not in estimate.parts
    # 92 pairs, 184 answers / batch 8, 10 epochs
    assert estimate.parts["training the scorer (kto on the pairs)"]["count"] == 23 * 10
    assert estimate.parts["scoring the pairs"]["count"] == 2 * 2 * 92 + 4 * 23
    assert estimate.samples == 2 * 573 * 8


def test_a_budget_scales_rejection_sampling_down_to_fewer_prompts():
    settings = TrainSettings()
    full = cost.estimate(REGIME_A, settings, UNITS).minutes
    fitted, shape, estimate = cost.fit(REGIME_A, settings, UNITS, budget_min=full / 3)
    assert settings.batch_size <= shape.prompts < 600 and fitted.rs_prompts == shape.prompts
    assert estimate.minutes <= full / 3 < cost.estimate(cost.Shape(**dict(vars(shape), prompts=shape.prompts + 1)),
                                                        fitted, UNITS).minutes
    assert estimate.scaled.startswith(f"scaled to the {full / 3:g}-minute budget: rejection sampling on "
                                      f"{shape.prompts} of 600 prompts")
    same = cost.fit(REGIME_A, settings, UNITS, budget_min=full + 1)
    assert same[0] is settings and not same[2].scaled


def test_a_budget_caps_the_steps_of_a_plain_run_and_refuses_below_one_epoch():
    shape = cost.Shape("dpo", kto_train=0, dpo_train=48, dpo_held=12)
    settings = TrainSettings(method="dpo", epochs=20)  # 6 steps an epoch, 120 steps
    fitted, _, estimate = cost.fit(shape, settings, UNITS, budget_min=3.0)
    assert 6 <= fitted.max_steps < 120 and estimate.minutes <= 3.0 and "of 120 optimizer steps" in estimate.scaled
    with pytest.raises(cost.OverBudget, match=r"the run would take about [\d.]+ min: .*over the 0.5-minute budget, "
                                              r"and so is the smallest run it can be cut to \(6 of 120 optimizer "
                                              r"steps\): raise --budget") as refused:
        cost.fit(shape, settings, UNITS, budget_min=0.5)
    assert refused.value.estimate.minutes > 0.5


@pytest.fixture(scope="module")
def voted(tmp_path_factory, demo_engine):
    data = tmp_path_factory.mktemp("voted")
    store = Store(data)
    logged = simulate.log_chats(store, demo_engine.model, demo_engine.processor, 60, seed=3,
                                users=[f"user{i}" for i in range(5)])
    simulate.vote(store, logged, simulate.style_rule("terse"))
    return data


QUICK = dict(method="kto", start_from="base", max_steps=4, batch_size=4, min_rows=10, publish="never",
             probe_per_type=10)


@pytest.mark.slow
def test_a_run_states_its_cost_before_training_and_stores_it(voted, tmp_path):
    import shutil

    data = shutil.copytree(voted, tmp_path / "data")
    store, logs = Store(data), []
    result = train(store, Registry.for_data_dir(data), "demo", TrainSettings(**QUICK, budget_min=60), log=logs.append)
    run = store.run(result.run_id)
    estimate = run["estimate"]
    assert estimate["parts"]["training (kto)"]["count"] == 4 and estimate["budget_min"] == 60
    assert estimate["units"]["step_s"]["kto"] > 0 and estimate["units"]["sample_s"] > 0 and not estimate["scaled"]
    line = next(m for m in logs if m.startswith("train: estimate about "))
    assert logs.index(line) < next(i for i, m in enumerate(logs) if m.startswith("train: training (kto)"))


@pytest.mark.slow
def test_a_run_over_its_budget_is_refused_with_the_estimate(voted, tmp_path):
    import shutil

    data = shutil.copytree(voted, tmp_path / "data")
    store = Store(data)
    with pytest.raises(cost.OverBudget, match=r"the run would take about .* over the 0.001-minute budget"):
        train(store, Registry.for_data_dir(data), "demo", TrainSettings(**QUICK, budget_min=0.001), log=print)
    [run] = store.runs()
    assert run["status"] == "failed" and "over the 0.001-minute budget" in run["error"]
    assert run["estimate"]["minutes"] > 0.001 and Registry.for_data_dir(data).versions() == []
