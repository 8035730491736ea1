"""Online A/B of adapter versions: live win-rates from users' compare picks, and the policy that
promotes a candidate that wins clearly (or demotes a live version that loses clearly).

Invariants:
- `wilson`, `standing` and `decide` are pure functions over rows from the store (`Store.ab_picks`).
  `ABTest` holds the rest of the policy: which versions answer a compare request during a test,
  recording picks, the standing, and the automatic decision; it alone writes the test's settings
  (`AB_SETTING`, `AB_LAST_SETTING`) and, for that decision, the registry's active pointer.
- During a test the two sides of a comparison are the candidate and the version serving when the
  request starts, in random order: the user learns which was which only after picking.
- A win counts 1, a tie or "both bad" counts 1/2 for each side; the interval is Wilson's score
  interval (95% by default), which stays inside [0, 1] and is honest for small samples.
- The policy decides only with at least `min_votes` picks and only when the whole interval lies
  on one side of 1/2: "wins clearly" means the lower bound is above 1/2.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from chatapp.core.clock import now_iso
from chatapp.feedback.store import AB_LAST_SETTING, AB_SETTING

Z_95 = 1.959964
DEFAULT_MIN_VOTES = 20


def label(version: str | None) -> str:
    return version or "base"


def wilson(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Standing:
    candidate: str | None
    live: str | None
    picks: int
    candidate_wins: int
    live_wins: int
    ties: int  # ties and "both bad"
    win_rate: float  # the candidate's, ties counting half
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"candidate": label(self.candidate), "live": label(self.live), "picks": self.picks,
                "candidate_wins": self.candidate_wins, "live_wins": self.live_wins, "ties": self.ties,
                "win_rate": round(self.win_rate, 4), "ci_low": round(self.low, 4), "ci_high": round(self.high, 4)}


def standing(picks: list[dict], candidate: str | None, live: str | None) -> Standing:
    """The candidate's record against the live version from `Store.ab_picks(candidate, live)` rows."""
    wins = sum(1 for p in picks if p["winner"] == candidate)
    losses = sum(1 for p in picks if p["winner"] == live)
    ties = len(picks) - wins - losses
    score = wins + ties / 2
    rate = score / len(picks) if picks else 0.5
    low, high = wilson(score, len(picks))
    return Standing(candidate, live, len(picks), wins, losses, ties, rate, low, high)


def decide(result: Standing, min_votes: int = DEFAULT_MIN_VOTES) -> tuple[str, str]:
    """("promote" | "keep" | "wait", reason): promote the candidate when it wins clearly; keep the
    live version when the candidate loses clearly; otherwise wait for more picks."""
    summary = (f"{label(result.candidate)} vs {label(result.live)}: {result.candidate_wins} wins, "
               f"{result.live_wins} losses, {result.ties} ties in {result.picks} picks; win rate "
               f"{result.win_rate:.0%} (95% CI {result.low:.0%}-{result.high:.0%})")
    if result.picks < min_votes:
        return "wait", f"{summary}; needs {min_votes} picks to decide"
    if result.low > 0.5:
        return "promote", f"{summary}: the candidate wins clearly"
    if result.high < 0.5:
        return "keep", f"{summary}: the live version wins clearly"
    return "wait", f"{summary}: no clear winner yet"


class ABTest:
    """The A/B test kept in `store` and its policy, which activates versions in `registry` (an
    adapters `Registry`; without one the policy reports but never acts)."""

    def __init__(self, store, registry=None):
        self.store, self.registry = store, registry

    def running(self) -> dict | None:
        return self.store.setting(AB_SETTING)

    def last(self) -> dict | None:
        """The test that ended last, with how it ended."""
        return self.store.setting(AB_LAST_SETTING)

    def start(self, candidate: str | None, started_by: str, auto: bool = False,
              min_votes: int = DEFAULT_MIN_VOTES) -> None:
        """Pit `candidate` (None: the base model) against the live version in every compare request."""
        if not isinstance(auto, bool):  # bool("false") is True: a flag that arrived as text is a caller's bug
            raise TypeError(f"auto must be a bool, got {type(auto).__name__}")
        self.store.set_setting(AB_SETTING, {"candidate": candidate, "auto": auto, "min_votes": min_votes,
                                            "started_by": started_by, "started_at": now_iso()}, started_by)

    def stop(self, stopped_by: str) -> None:
        self.store.set_setting(AB_SETTING, None, stopped_by)

    def sides(self, serving: str | None) -> tuple | None:
        """The versions of side a and side b of a compare request starting now, while `serving`
        answers chats; None when no test applies (none runs, or its candidate went live meanwhile)."""
        test = self.running()
        if not test or test["candidate"] == serving:
            return None
        sides = [test["candidate"], serving]
        random.shuffle(sides)
        return tuple(sides)

    def status(self, serving: str | None = None) -> dict | None:
        """The running test: its settings, the candidate's standing against the live version (the
        registry's active one; `serving` without a registry) and what the policy would do."""
        test = self.running()
        if not test:
            return None
        live = self.registry.active() if self.registry is not None else serving
        picks = self.store.ab_picks(test["candidate"], live, since=test.get("started_at"))
        result = standing(picks, test["candidate"], live)
        decision, reason = decide(result, test.get("min_votes", DEFAULT_MIN_VOTES))
        return dict(test, standing=result.as_dict(), decision=decision, reason=reason)

    def apply_policy(self, serving: str | None = None) -> dict | None:
        """With the policy on (the test's `auto`), promote a candidate that wins clearly, or end the
        test keeping the live version when it wins clearly. Returns the status it acted on."""
        status = self.status(serving)
        if not status or not status.get("auto") or status["decision"] == "wait" or self.registry is None:
            return status
        candidate = status["candidate"]
        if status["decision"] == "promote":
            if candidate is None:
                self.registry.deactivate(reason=f"A/B: {status['reason']}")
            else:
                self.registry.activate(candidate, reason=f"A/B: {status['reason']}", force=True)
        self.store.set_setting(AB_SETTING, None, "A/B policy")
        self.store.set_setting(AB_LAST_SETTING, dict(status, ended="promoted" if status["decision"] == "promote"
                                                     else "kept live"), "A/B policy")
        return status

    def record_pick(self, comparison: dict, pick: str, serving: str | None = None) -> dict:
        """Store the pick of a comparison. Returns the version of each side ("none" for the base),
        revealed now, and when the two differ, the test's status after the policy saw the pick."""
        self.store.pick(comparison["id"], pick)
        version_a, version_b = self.store.comparison_versions(comparison)
        result = {"versions": {"a": version_a or "none", "b": version_b or "none"}}
        if version_a != version_b:
            result["ab"] = self.apply_policy(serving)
        return result
