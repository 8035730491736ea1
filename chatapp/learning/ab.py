"""Online A/B of adapter versions: live win-rates from users' compare picks, and the policy that
promotes a candidate that wins clearly (or demotes a live version that loses clearly).

Invariants:
- Pure functions over rows from the store (`Store.ab_picks`); nothing here writes.
- A win counts 1, a tie or "both bad" counts 1/2 for each side; the interval is Wilson's score
  interval (95% by default), which stays inside [0, 1] and is honest for small samples.
- The policy decides only with at least `min_votes` picks and only when the whole interval lies
  on one side of 1/2: "wins clearly" means the lower bound is above 1/2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
