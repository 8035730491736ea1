"""The statistics behind promotion, as pure functions: the A/B maths (Wilson interval, standing,
decision) and the evaluation gate's AUC, p-value, verdict and choice among candidates.
No model, no store: each case is a handful of numbers with the answer worked out by hand or
taken from the literature."""
import pytest

from chatapp.learning import ab, gate

# ---------------------------------------------------------------- Wilson's score interval

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I (method 3),
# and the 8/10 example of the task: 95% intervals to four places.
TEXTBOOK = [((8, 10), (0.4902, 0.9433)), ((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)),
            ((0, 20), (0.0, 0.1611)), ((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize("counts, interval", TEXTBOOK)
def test_wilson_matches_published_intervals(counts, interval):
    assert ab.wilson(*counts) == pytest.approx(interval, abs=5e-5)


def test_wilson_edges_stay_inside_0_1():
    assert ab.wilson(0, 0) == (0.0, 1.0)  # no data: anything is possible
    low, high = ab.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=5e-5)
    low, high = ab.wilson(10, 10)
    assert low == pytest.approx(0.7225, abs=5e-5) and high == pytest.approx(1.0) and high <= 1.0
    # symmetric: k successes of n mirror n - k
    assert ab.wilson(3, 10) == pytest.approx(tuple(1 - x for x in reversed(ab.wilson(7, 10))))
    # a wider z gives a wider interval; more data a narrower one
    assert ab.wilson(8, 10, z=2.576)[0] < ab.wilson(8, 10)[0]
    assert ab.wilson(80, 100)[0] > ab.wilson(8, 10)[0]


# ---------------------------------------------------------------- standing and the policy

def picks(**counts) -> list[dict]:
    """Rows shaped like Store.ab_picks: `winner` is the version picked, or "tie" / "both_bad"."""
    winners = {"candidate": "v2", "live": "v1", "base": None, "tie": "tie", "both_bad": "both_bad"}
    return [{"winner": winners[side]} for side, n in counts.items() for _ in range(n)]


def test_standing_counts_ties_and_both_bad_as_half():
    result = ab.standing(picks(candidate=6, live=2, tie=1, both_bad=1), "v2", "v1")
    assert (result.picks, result.candidate_wins, result.live_wins, result.ties) == (10, 6, 2, 2)
    assert result.win_rate == pytest.approx(0.7)
    assert (result.low, result.high) == pytest.approx(ab.wilson(7, 10))
    assert result.as_dict() == {"candidate": "v2", "live": "v1", "picks": 10, "candidate_wins": 6, "live_wins": 2,
                                "ties": 2, "win_rate": 0.7, "ci_low": round(result.low, 4),
                                "ci_high": round(result.high, 4)}


def test_standing_of_the_base_model_and_of_no_picks():
    # the candidate is the base model: a pick of the base (winner None) is its win
    result = ab.standing(picks(base=3, live=1), None, "v1")
    assert (result.candidate_wins, result.live_wins, result.ties) == (3, 1, 0)
    assert result.as_dict()["candidate"] == "base"
    empty = ab.standing([], "v2", None)
    assert (empty.picks, empty.win_rate, empty.low, empty.high) == (0, 0.5, 0.0, 1.0)
    assert empty.as_dict()["live"] == "base"


def test_the_policy_waits_for_enough_picks_then_needs_the_whole_interval_on_one_side():
    few = ab.standing(picks(candidate=19), "v2", "v1")
    decision, reason = ab.decide(few, min_votes=20)
    assert decision == "wait" and reason.endswith("needs 20 picks to decide")
    assert reason.startswith("v2 vs v1: 19 wins, 0 losses, 0 ties in 19 picks; win rate 100% (95% CI ")

    # 15 of 20: the interval (0.53, 0.89) lies above 1/2
    assert ab.decide(ab.standing(picks(candidate=15, live=5), "v2", "v1"))[0] == "promote"
    # 14 of 20: 0.70 but the interval (0.48, 0.85) still reaches below 1/2
    decision, reason = ab.decide(ab.standing(picks(candidate=14, live=6), "v2", "v1"))
    assert decision == "wait" and reason.endswith("no clear winner yet")
    decision, reason = ab.decide(ab.standing(picks(candidate=5, live=15), "v2", "v1"))
    assert decision == "keep" and reason.endswith("the live version wins clearly")
    # ties alone never decide
    assert ab.decide(ab.standing(picks(tie=200), "v2", "v1"))[0] == "wait"
    assert ab.decide(ab.standing(picks(candidate=15, live=5), "v2", "v1"), min_votes=21)[0] == "wait"


# ---------------------------------------------------------------- the gate: AUC and its p-value

def test_auc_counts_ties_as_half_and_needs_both_labels():
    assert gate.auc([], [1.0]) is None and gate.auc([1.0], []) is None
    assert gate.auc_and_p([], [1.0]) == (None, None)
    assert gate.auc([1.0], [1.0]) == 0.5
    assert gate.auc([2.0, 1.0], [1.0]) == 0.75
    assert gate.auc([0.0, 0.1], [0.5, 0.9]) == 0.0


def test_auc_p_value_is_the_exact_one_sided_rank_test_for_small_samples():
    # complete separation of 3 and 3: one labelling in C(6, 3) = 20 does as well
    value, p = gate.auc_and_p([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert value == 1.0 and p == pytest.approx(1 / 20)
    value, p = gate.auc_and_p([0.0, 1.0, 2.0], [3.0, 4.0, 5.0])
    assert value == 0.0 and p == pytest.approx(1.0)  # one-sided: the wrong way round is no evidence
    # 4 of 5 against 1 of 5 with one crossing: U = 24 of 25; P(U >= 24) = 2 / C(10, 5)
    value, p = gate.auc_and_p([9.0, 8.0, 7.0, 6.0, 4.0], [5.0, 3.0, 2.0, 1.0, 0.0])
    assert value == pytest.approx(24 / 25) and p == pytest.approx(2 / 252)


def test_auc_shortfall_names_the_bar_that_is_missed():
    settings = gate.GateSettings(min_auc=0.6, max_auc_p=0.05)
    assert gate.auc_shortfall({}, settings) is None  # no thumbs: nothing to judge here
    assert gate.auc_shortfall({"auc": 0.59, "auc_p": 0.0001}, settings) == "held-out AUC 0.59 < 0.6"
    chance = gate.auc_shortfall({"auc": 0.7, "auc_p": 0.08, "liked": 10, "disliked": 6}, settings)
    assert chance == "held-out AUC 0.70 could be chance, p = 0.08 > 0.05 with 10 liked / 6 disliked"
    assert gate.auc_shortfall({"auc": 0.7, "auc_p": 0.05, "liked": 10, "disliked": 6}, settings) is None


# ---------------------------------------------------------------- the gate's verdict

GOOD = {"auc": 0.8, "auc_p": 0.001, "liked": 20, "disliked": 20, "pair_accuracy": 0.7, "probe_accuracy": 0.95,
        "sampled_score": 0.4}
LIVE = {"auc": 0.6, "auc_p": 0.1, "liked": 20, "disliked": 20, "pair_accuracy": 0.6, "probe_accuracy": 0.96,
        "sampled_score": 0.1}


def verdict(cand=None, live=None, rows=40, live_is_base=False, **settings):
    return gate.verdict(dict(GOOD, **(cand or {})), dict(LIVE, **(live or {})), gate.GateSettings(**settings),
                        held_out_rows=rows, live_is_base=live_is_base)


def test_a_better_candidate_without_regression_is_promoted():
    assert verdict() == ("promoted", "better on held-out feedback, no regression")
    # exactly the allowed regression still passes; a hair more does not
    assert verdict(cand={"probe_accuracy": 0.94}, live={"probe_accuracy": 0.96})[0] == "promoted"
    decision, reason = verdict(cand={"probe_accuracy": 0.93}, live={"probe_accuracy": 0.96})
    assert decision == "rejected"
    assert reason == "regression accuracy 0.930 vs live 0.960 (drop 3.0 points > 2.0)"



def test_a_regression_on_image_questions_is_not_hidden_by_text_questions():
    # regime d of the matrix: 2.4 points lost on image questions, none on text ones, 2.0 on the whole probe
    cand = {"probe_accuracy": 0.956, "probe_parts": {"image questions": 0.952, "text questions": 1.0}}
    live = {"probe_accuracy": 0.976, "probe_parts": {"image questions": 0.976, "text questions": 1.0}}
    decision, reason = verdict(cand=cand, live=live)
    assert decision == "rejected"
    assert reason == "regression accuracy on image questions 0.952 vs live 0.976 (drop 2.4 points > 2.0)"
    # each part is judged: a loss on text questions alone is named too
    cand["probe_parts"] = {"image questions": 0.976, "text questions": 0.96}
    assert verdict(cand=cand, live=live)[1] == ("regression accuracy on text questions 0.960 vs live 1.000 "
                                                "(drop 4.0 points > 2.0)")
    # figures recorded before the parts existed are judged on the whole probe
    assert verdict(cand={"probe_accuracy": 0.956}, live=live)[0] == "promoted"

@pytest.mark.parametrize("cand, live, rows, reason", [
    ({}, {}, 7, "only 7 held-out rows (need 8)"),
    ({"auc": 0.55}, {}, 40, "held-out AUC 0.55 < 0.6"),
    ({"auc": 0.65, "auc_p": 0.2}, {}, 40, "held-out AUC 0.65 could be chance, p = 0.20 > 0.05 with 20 liked / 20 disliked"),
    ({"auc": 0.7}, {"auc": 0.7}, 40, "held-out AUC 0.70 is not above the live policy's 0.70"),
    ({"pair_accuracy": 0.6}, {}, 40, "held-out pair accuracy 0.60 is not above 0.60"),
    ({"sampled_score": 0.1}, {}, 40,
     "sampled answers do not move toward the votes (scorer reward 0.100 vs live 0.100)"),
])
def test_each_unmet_bar_rejects_with_its_reason(cand, live, rows, reason):
    assert verdict(cand, live, rows) == ("rejected", reason)


def test_sampled_answers_must_beat_the_live_policy_beyond_chance():
    live = {"sampled_per_prompt": [0.0] * 12, "sampled_score": 0.0}
    # higher on every held-out prompt: Wilcoxon p = 1/4096
    better = [0.1 * (i + 1) for i in range(12)]
    assert verdict({"sampled_per_prompt": better, "sampled_score": sum(better) / 12}, live)[0] == "promoted"
    # a higher mean carried by a few prompts, the rest a toss-up: could be sampling noise
    mixed = [2.0, 1.5, -0.2, 0.3, -0.4, 0.1, -0.1, 0.2, -0.3, -0.2, 0.1, -0.1]
    decision, reason = verdict({"sampled_per_prompt": mixed, "sampled_score": sum(mixed) / 12}, live)
    assert decision == "rejected"
    p_value = gate.signed_rank_p(mixed)
    assert 0.05 < p_value < 0.5
    assert reason == (f"sampled answers do not move toward the votes beyond chance (scorer reward 0.242 vs live "
                      f"0.000, higher on 6 of 12 held-out prompts, p = {p_value:.2f} > 0.05)")
    assert gate.signed_rank_p([0.0] * 5) == 1.0


def test_every_unmet_bar_is_named_in_order():
    decision, reason = verdict({"auc": 0.5, "pair_accuracy": 0.5, "probe_accuracy": 0.5, "sampled_score": 0.0}, rows=3)
    assert decision == "rejected"
    assert [part.split(" ")[0:2] for part in reason.split("; ")] == [
        ["only", "3"], ["held-out", "AUC"], ["held-out", "pair"], ["regression", "accuracy"], ["sampled", "answers"]]


def test_against_the_base_model_the_bars_are_chance():
    # the base policy's implicit reward is zero for every answer: no AUC of its own, pairs at chance
    live = {"auc": None, "pair_accuracy": 0.9}
    assert verdict({"auc": 0.62}, live, live_is_base=True)[0] == "promoted"
    assert verdict({"pair_accuracy": 0.55}, live, live_is_base=True)[0] == "promoted"
    assert verdict({"pair_accuracy": 0.5}, live, live_is_base=True) == \
        ("rejected", "held-out pair accuracy 0.50 is not above 0.50")
    # a live adapter's own pair accuracy is the bar
    assert verdict({"pair_accuracy": 0.85}, live)[1] == "held-out pair accuracy 0.85 is not above 0.90"


def test_without_labelled_feedback_there_is_no_verdict_for_preference():
    cand = {k: v for k, v in GOOD.items() if k not in ("auc", "pair_accuracy")}
    assert gate.verdict(cand, LIVE, gate.GateSettings(), held_out_rows=40, live_is_base=False) == \
        ("rejected", "no held-out feedback with both labels to judge preference")


def test_checks_the_candidate_was_not_measured_for_are_skipped():
    cand = {"auc": 0.8, "auc_p": 0.001, "liked": 20, "disliked": 20}
    assert gate.verdict(cand, {}, gate.GateSettings(), held_out_rows=40, live_is_base=True)[0] == "promoted"


# ---------------------------------------------------------------- choosing among candidates

def judged(decision, **metrics):
    return {"decision": decision, "candidate": metrics}


def test_choose_prefers_the_promoted_candidate_the_scorer_rates_highest():
    verdicts = {"candidate": judged("promoted", sampled_score=0.1, auc=0.9),
                "candidate-e2": judged("rejected", sampled_score=0.9, auc=0.95),
                "candidate-e3": judged("promoted", sampled_score=0.3, auc=0.7)}
    assert gate.choose(verdicts) == "candidate-e3"
    # equal scorer rewards: the higher held-out AUC, then pair accuracy
    tied = {"a": judged("promoted", sampled_score=0.2, auc=0.7), "b": judged("promoted", sampled_score=0.2, auc=0.8)}
    assert gate.choose(tied) == "b"
    no_scores = {"a": judged("promoted", auc=None, pair_accuracy=0.6), "b": judged("promoted", pair_accuracy=0.7)}
    assert gate.choose(no_scores) == "b"


def test_choose_reports_the_first_candidate_when_none_is_promoted():
    verdicts = {"candidate": judged("rejected", sampled_score=0.0), "candidate-e2": judged("rejected", sampled_score=1)}
    assert gate.choose(verdicts) == "candidate"
