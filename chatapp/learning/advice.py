"""What more feedback would help, in words a person understands, when a run ends rejected.

The gate's reason names the bar a candidate missed (an AUC, a p-value, probe points); an admin needs
to know what to do about it: how much more feedback, and of what kind. `advise` reads the run's data
and the reason and answers that; the trainer appends it to the reason stored with the run (so the
admin tab, `adapters list` and the log all show it).

Invariants:
- Pure: the advice is a function of the counts in `Data`, the metrics and the reason; no model.
- Only figures this run measured or counted are quoted; the "about N more" estimates come from the
  constants below, which the regime matrix measured (docs/learning.md).
"""
from __future__ import annotations

# Measured in bench/learning.py's matrix (docs/learning.md): the runs that met their targets learned from
# ~480 distinct prompts (regime a); 48 voted prompts were not enough (regime b).
ENOUGH_PROMPTS = 200
# A held-out set of ~40 votes (200 votes, 20% held out) let the gate tell the terse preference from luck.
ENOUGH_HELD_OUT = 40
ENOUGH_HELD_OUT_PAIRS = 20


def _more(have: int, enough: int, fraction: float) -> int:
    """Labels to add so that `fraction` of all of them (the held-out share) reaches `enough`."""
    return max(1, round(enough / max(fraction, 1e-6)) - round(have / max(fraction, 1e-6)))


def advise(data, reason: str, metrics: dict | None = None, held_out_fraction: float = 0.2) -> str:
    """One sentence or a few, '; '-joined: what feedback would most likely turn this rejection around."""
    metrics = metrics or {}
    tips: list[str] = []
    thumbs = bool(data.kto_held.rows or data.kto_train.rows)
    held = len(data.kto_held) if thumbs else len(data.dpo_held)
    enough_held = ENOUGH_HELD_OUT if thumbs else ENOUGH_HELD_OUT_PAIRS
    kind = "votes (thumbs up and down)" if thumbs else "preference picks (regenerate + prefer, or compare)"
    if ("could be chance" in reason or "held-out rows" in reason or "no held-out feedback" in reason) \
            and held < enough_held:
        tips.append(f"only {held} held-out {'votes' if thumbs else 'pairs'} to check a candidate against: about "
                    f"{_more(held, enough_held, held_out_fraction)} more {kind} would let the gate tell a "
                    f"real preference from luck")
    elif "do not predict each other" in reason:
        tips.append("the labels disagree with each other (random clicks, or a user voting against the rest "
                    f"look like this): more {kind} from users who vote consistently would help")
    elif "held-out AUC" in reason and "<" in reason:
        # the scorer ranked the votes (else the run ends before sampling), but the candidate trained on its
        # picks does not (regime f: two preferences at once, chats at temperature 1.5)
        tips.append(f"the candidate's answers do not follow the held-out {'votes' if thumbs else 'picks'}, though "
                    f"the scorer's did: more {kind} on new prompts would help")
    prompts = data.logged_prompts
    if prompts < ENOUGH_PROMPTS:
        tips.append(f"only {prompts} prompts to learn from: about {ENOUGH_PROMPTS - prompts} more voted prompts "
                    f"(new images or questions, not more votes on the same ones), or {ENOUGH_PROMPTS} logged "
                    f"unvoted chats, would help")
    elif "regression accuracy" in reason:
        # measured (docs/learning.md): a lower --lr or fewer adapted modules did not lose less; the lost
        # questions were answered in the liked form but wrong ("Red." for a red and a blue square)
        tips.append("the candidate answers some questions worse than the model did (in the liked form, but "
                    f"wrong or leaving things out): more {kind} that mark such answers down would teach the scorer "
                    "to tell right from wrong; to accept the trade, activate it anyway (adapters activate V --force)")
    if "kept only" in reason:
        tips.append("the scorer found few sampled answers better than the voted ones: more liked answers "
                    "(thumbs up on answers in the wanted form) would help")
    if "beyond chance" in reason and not tips:
        tips.append(f"the candidate's answers moved too little to tell from sampling noise: more {kind} on new "
                    f"prompts would help")
    elif "sampled answers do not move" in reason and not tips:
        tips.append(f"the candidate's answers did not move toward the labels: more {kind} would help")
    return "; ".join(tips)


def with_advice(reason: str, advice: str) -> str:
    return f"{reason}. What would help: {advice}" if advice else reason
