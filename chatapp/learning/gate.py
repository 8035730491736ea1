"""The evaluation gate: is a candidate adapter better than the live one (or the base)?

Invariants:
- Judged only on feedback training never saw (the held-out split of `prefs`) and on a fixed
  regression probe, never on the training rows.
- Preference: the implicit reward of an answer under a policy is log p_policy(answer) - log
  p_base(answer). On held-out thumbs, the AUC of that reward (liked above disliked) must reach
  `min_auc`, be above chance with a one-sided p-value below `max_auc_p` (a few dozen held-out votes
  make an AUC of 0.65 by luck about one time in twenty), and beat the live policy's AUC; on held-out
  pairs, chosen must beat rejected more often than under the live policy.
- Behaviour: a vote-only metric passes a collapsed adapter, so the candidate must also keep its
  regression accuracy within `max_regression` of the live policy's (demo model: greedy accuracy on
  fixed shapes questions; other models: an optional JSONL of prompts, images and expected
  keywords), on the probe's image questions and its text-only questions apart.
- When a scorer is given, the candidate's sampled answers on held-out prompts must score higher than
  the live policy's by more than chance: per held-out prompt, the mean scorer reward of the
  candidate's answers minus the live policy's, one-sided Wilcoxon signed-rank p below
  `max_sampled_p`. A gain that the held-out prompts cannot tell from sampling noise is not promoted
  (regime b of the matrix: a candidate that moved the preference 0.35 -> 0.38 was promoted on a
  higher mean alone).
- The decision and every number behind it are returned, so the registry can record them; the
  decision is a pure function of those numbers and the settings (`verdict`).
- The AUC's p-value is Mann-Whitney U's (scipy): exact for small samples without ties, otherwise
  the normal approximation with tie correction.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from scipy.stats import binomtest, mannwhitneyu, wilcoxon

from chatapp.learning import modelops

PROBE_SEED = 424242


@dataclass
class GateSettings:
    min_auc: float = 0.6
    max_auc_p: float = 0.05  # the held-out AUC must be this unlikely under random votes
    max_regression: float = 0.02  # accuracy points (0.02 = 2 points) the candidate may lose
    min_held_out: int = 8  # held-out rows needed to judge preference at all
    regression_set: str | None = None  # JSONL for models other than the demo model
    style_prompts: int = 48
    style_samples: int = 4
    # the candidate's sampled answers must outscore the live policy's on held-out prompts this clearly
    # (one-sided Wilcoxon signed-rank over prompts): a smaller gain could be sampling noise
    max_sampled_p: float = 0.05
    temperature: float = 1.0  # of the sampled-answers check: the one users chat at (the trainer's)

    def as_dict(self) -> dict:
        return asdict(self)


def auc_and_p(positives: list[float], negatives: list[float]) -> tuple[float, float] | tuple[None, None]:
    """P(random positive > random negative), ties counting half, and the one-sided p-value of an AUC
    at least that high when the scores know nothing of the labels: Mann-Whitney U (AUC = U / (n * m);
    exact for small tie-free samples, else the normal approximation with tie correction).
    (None, None) when either side is empty."""
    if not positives or not negatives:
        return None, None
    result = mannwhitneyu(positives, negatives, alternative="greater")
    return float(result.statistic) / (len(positives) * len(negatives)), float(result.pvalue)


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(random positive > random negative), ties count half."""
    return auc_and_p(positives, negatives)[0]


def auc_shortfall(metrics: dict, settings: "GateSettings") -> str | None:
    """Why held-out thumbs do not show a preference (None when they do): the AUC is below the bar or
    could be chance."""
    value = metrics.get("auc")
    if value is None:
        return None
    if value < settings.min_auc:
        return f"held-out AUC {value:.2f} < {settings.min_auc}"
    if metrics["auc_p"] > settings.max_auc_p:
        return (f"held-out AUC {value:.2f} could be chance, p = {metrics['auc_p']:.2f} > {settings.max_auc_p} "
                f"with {metrics['liked']} liked / {metrics['disliked']} disliked")
    return None


def pair_shortfall(metrics: dict, settings: "GateSettings") -> str | None:
    """Why held-out pairs do not show a preference (None when they do, or when there are none): chosen
    beats rejected no more often than `min_auc`, or as often could be chance (one-sided binomial)."""
    value = metrics.get("pair_accuracy")
    if value is None:
        return None
    if value < settings.min_auc:
        return f"held-out pair accuracy {value:.2f} < {settings.min_auc}"
    if metrics.get("pair_p") is not None and metrics["pair_p"] > settings.max_auc_p:
        return (f"held-out pair accuracy {value:.2f} could be chance, p = {metrics['pair_p']:.2f} > "
                f"{settings.max_auc_p} with {metrics['pairs']} pairs")
    return None


def sampled_shortfall(cand: dict, live: dict, settings: "GateSettings") -> str | None:
    """Why the candidate's sampled answers do not move toward the labels (None when they do): per held-out
    prompt, its answers' mean scorer reward must beat the live policy's, with a one-sided Wilcoxon
    signed-rank p-value below `max_sampled_p`. Figures without per-prompt scores (older runs) fall back to
    the mean alone."""
    mean, live_mean = cand["sampled_score"], live["sampled_score"]
    if mean <= live_mean:
        return f"sampled answers do not move toward the votes (scorer reward {mean:.3f} vs live {live_mean:.3f})"
    ours, theirs = cand.get("sampled_per_prompt"), live.get("sampled_per_prompt")
    if not ours or not theirs or len(ours) != len(theirs):
        return None
    differences = [a - b for a, b in zip(ours, theirs)]
    higher = sum(d > 0 for d in differences)
    p_value = signed_rank_p(differences)
    if p_value > settings.max_sampled_p:
        return (f"sampled answers do not move toward the votes beyond chance (scorer reward {mean:.3f} vs live "
                f"{live_mean:.3f}, higher on {higher} of {len(differences)} held-out prompts, p = {p_value:.2f} > "
                f"{settings.max_sampled_p})")
    return None


def signed_rank_p(differences: list[float]) -> float:
    """One-sided p-value that the differences lean positive by chance (Wilcoxon signed-rank; zero
    differences dropped; 1.0 when none is left)."""
    if not any(differences):
        return 1.0
    return float(wilcoxon(differences, alternative="greater").pvalue)


def rewards(model, processor, items: list[dict], policy: str | None) -> torch.Tensor:
    """Implicit reward of each item's completion under `policy` (an adapter name; None = base: zeros)."""
    if policy is None or not items:
        return torch.zeros(len(items))
    with modelops.adapter(model, policy):
        policy_logps = modelops.completion_logps(model, processor, items)
    with modelops.adapter(model, None):
        base_logps = modelops.completion_logps(model, processor, items)
    return policy_logps - base_logps


def kto_items(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "images": modelops.load_images(r["images"]),
             "completion": r["completion"][0]["content"][0]["text"], "label": r["label"]} for r in rows]


def preference_metrics(model, processor, kto_rows: list[dict], dpo_rows: list[dict], policy: str | None) -> dict:
    metrics: dict = {}
    items = kto_items(kto_rows)
    if items:
        r = rewards(model, processor, items, policy)
        liked = [float(x) for x, it in zip(r, items) if it["label"]]
        disliked = [float(x) for x, it in zip(r, items) if not it["label"]]
        metrics["auc"], p_value = auc_and_p(liked, disliked)
        metrics["liked"], metrics["disliked"] = len(liked), len(disliked)
        if liked and disliked:
            metrics["margin"] = sum(liked) / len(liked) - sum(disliked) / len(disliked)
            metrics["auc_p"] = p_value
    if dpo_rows:
        chosen = [{"prompt": r["prompt"], "images": modelops.load_images(r["images"]),
                   "completion": r["chosen"][0]["content"][0]["text"]} for r in dpo_rows]
        rejected = [dict(c, completion=r["rejected"][0]["content"][0]["text"]) for c, r in zip(chosen, dpo_rows)]
        rc, rr = rewards(model, processor, chosen, policy), rewards(model, processor, rejected, policy)
        metrics["pair_accuracy"] = float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())
        metrics["pairs"] = len(dpo_rows)
        # ties count half, as in the accuracy: the binomial test on the rounded-down wins
        wins = int(((rc > rr).sum() + 0.5 * (rc == rr).sum()).item())
        metrics["pair_p"] = float(binomtest(wins, len(dpo_rows), 0.5, alternative="greater").pvalue)
    return metrics


# ---------------------------------------------------------------- regression probe

def demo_probe(per_type: int) -> list[dict]:
    """Fixed shapes questions (the same images every run) with their examples for grading."""
    from chatapp.demo.evaluation import held_out_examples

    probe = []
    for example, image in held_out_examples(PROBE_SEED, per_type):
        content = ([{"type": "image", "text": None}] if image is not None else []) + [
            {"type": "text", "text": example.question}]
        probe.append({"prompt": [{"role": "user", "content": content}],
                      "images": [image] if image is not None else [], "example": example})
    return probe


def jsonl_probe(path: str) -> list[dict]:
    """A user-supplied regression set: one JSON object per line with "prompt" (text), optional "image"
    (a path, relative to the file) and "expect" (keywords that must all appear in the answer)."""
    folder = Path(path).parent
    probe = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        images = [modelops.load_images([str(folder / entry["image"])])[0]] if entry.get("image") else []
        content = ([{"type": "image", "text": None}] if images else []) + [{"type": "text", "text": entry["prompt"]}]
        probe.append({"prompt": [{"role": "user", "content": content}], "images": images,
                      "expect": [k.lower() for k in entry.get("expect", [])]})
    return probe


PROBE_PARTS = ("image questions", "text questions")


def probe_accuracy(model, processor, probe: list[dict], policy: str | None, sampler=None) -> dict[str, float]:
    """Greedy accuracy of `policy` on the probe: overall ("all") and on each part of `PROBE_PARTS` the
    probe has (questions with an image, text-only ones). `sampler` (learning/sampler.py; default: in this
    process) draws the answers."""
    from chatapp.demo import shapes
    from chatapp.learning.sampler import InProcessSampler

    answers = (sampler or InProcessSampler()).sample(model, processor, probe, 1, policy=policy, temperature=0,
                                                     phase="gate probe")
    graded: dict[str, list[bool]] = {}
    for item, [reply] in zip(probe, answers):
        if "example" in item:
            correct = shapes.grade(item["example"], reply)
        else:
            correct = all(k in reply.lower() for k in item["expect"])
        graded.setdefault(PROBE_PARTS[0] if item["images"] else PROBE_PARTS[1], []).append(bool(correct))
    every = [c for part in graded.values() for c in part]
    return {"all": sum(every) / max(1, len(every)), **{part: sum(c) / len(c) for part, c in graded.items()}}


def sampled_scores(model, processor, prompts: list[dict], policy: str | None, scorer: str, samples: int,
                   seed: int = 0, temperature: float = 1.0, sampler=None) -> list[float]:
    """Per prompt, the mean scorer reward of `samples` answers sampled at `temperature` from `policy` (by
    `sampler`, learning/sampler.py; default: in this process); the scoring runs here."""
    from chatapp.learning.sampler import InProcessSampler

    answers = (sampler or InProcessSampler()).sample(model, processor, prompts, samples, policy=policy,
                                                     temperature=temperature, seed=seed, phase="gate sampled answers")
    items = [dict(p, completion=a) for p, group in zip(prompts, answers) for a in group]
    owners = [i for i, group in enumerate(answers) for _ in group]
    scores = rewards(model, processor, items, scorer).tolist() if items else []
    per_prompt = [[s for s, owner in zip(scores, owners) if owner == i] for i in range(len(prompts))]
    return [sum(group) / len(group) if group else 0.0 for group in per_prompt]


# ---------------------------------------------------------------- the decision

def measure(model, processor, policy: str | None, *, held_kto: list[dict], held_dpo: list[dict],
            probe: list[dict], settings: GateSettings, scorer: str | None = None,
            style_prompts: list[dict] = (), sampler=None) -> dict:
    """Every number the gate judges one policy by (an adapter name; None = the base model); `sampler`
    draws its answers (learning/sampler.py; default: in this process)."""
    metrics = preference_metrics(model, processor, held_kto, held_dpo, policy)
    if probe:
        parts = probe_accuracy(model, processor, probe, policy, sampler)
        metrics["probe_accuracy"] = parts.pop("all")
        metrics["probe_parts"] = parts
    if scorer and style_prompts:
        per_prompt = sampled_scores(model, processor, style_prompts, policy, scorer, settings.style_samples, seed=1,
                                    temperature=settings.temperature, sampler=sampler)
        metrics["sampled_per_prompt"] = per_prompt
        metrics["sampled_score"] = sum(per_prompt) / max(1, len(per_prompt))
    return metrics


def verdict(cand: dict, live_metrics: dict, settings: GateSettings, *, held_out_rows: int,
            live_is_base: bool) -> tuple[str, str]:
    """("promoted" | "rejected", reason) for a candidate's figures against the live policy's (both
    from `measure` on the same data); every unmet bar is named in the reason. Pure: no model."""
    reasons = []
    if held_out_rows < settings.min_held_out:
        reasons.append(f"only {held_out_rows} held-out rows (need {settings.min_held_out})")
    if cand.get("auc") is not None:
        live_auc = live_metrics.get("auc") if live_metrics.get("auc") is not None else 0.5
        if shortfall := auc_shortfall(cand, settings):
            reasons.append(shortfall)
        elif cand["auc"] <= live_auc:
            reasons.append(f"held-out AUC {cand['auc']:.2f} is not above the live policy's {live_auc:.2f}")
    if cand.get("pair_accuracy") is not None:
        live_acc = 0.5 if live_is_base else live_metrics.get("pair_accuracy")
        if cand.get("auc") is None and (shortfall := pair_shortfall(cand, settings)):
            reasons.append(shortfall)  # pairs are the only preference evidence: they must not be chance
        elif cand["pair_accuracy"] <= live_acc:
            reasons.append(f"held-out pair accuracy {cand['pair_accuracy']:.2f} is not above {live_acc:.2f}")
    if cand.get("auc") is None and cand.get("pair_accuracy") is None:
        reasons.append("no held-out feedback with both labels to judge preference")
    if "probe_accuracy" in cand:
        reasons += regression_shortfalls(cand, live_metrics, settings)
    if "sampled_score" in cand and (shortfall := sampled_shortfall(cand, live_metrics, settings)):
        reasons.append(shortfall)
    if reasons:
        return "rejected", "; ".join(reasons)
    return "promoted", "better on held-out feedback, no regression"


def regression_shortfalls(cand: dict, live_metrics: dict, settings: GateSettings) -> list[str]:
    """Where the candidate's probe accuracy drops more than `max_regression` below the live policy's: on
    each part of the probe apart (a loss on image questions must not hide behind text-only questions a
    style adapter cannot touch: regimes d and g of the matrix lost 2.4 points on the image questions
    while the whole probe showed 2.0), or on the whole probe for figures without parts (older runs)."""
    ours, theirs = cand.get("probe_parts") or {}, live_metrics.get("probe_parts") or {}
    compared = [(f"regression accuracy on {part}", ours[part], theirs[part]) for part in PROBE_PARTS
                if part in ours and part in theirs]
    if not compared:
        compared = [("regression accuracy", cand["probe_accuracy"], live_metrics["probe_accuracy"])]
    return [f"{what} {value:.3f} vs live {live:.3f} (drop {(live - value) * 100:.1f} points > "
            f"{settings.max_regression * 100:.1f})" for what, value, live in compared
            if live - value > settings.max_regression + 1e-9]


def decide(model, processor, *, candidate: str, live: str | None, held_kto: list[dict], held_dpo: list[dict],
           probe: list[dict], settings: GateSettings, scorer: str | None = None,
           style_prompts: list[dict] = (), live_metrics: dict | None = None, log=print, sampler=None) -> dict:
    """Compare adapter `candidate` with `live` (None = the base model); both are loaded in `model`.
    `live_metrics`: the live policy's figures from an earlier call on the same data (not measured again)."""
    result: dict = {"settings": settings.as_dict(), "held_out_kto": len(held_kto), "held_out_dpo": len(held_dpo)}
    common = dict(held_kto=held_kto, held_dpo=held_dpo, probe=probe, settings=settings, scorer=scorer,
                  style_prompts=style_prompts, sampler=sampler)
    log(f"gate: {candidate} on held-out feedback ({len(held_kto) + len(held_dpo)} rows), the regression probe "
        f"({len(probe)} items) and sampled answers")
    cand = measure(model, processor, candidate, **common)
    if live_metrics is None:
        log("gate: the live policy, on the same")
        live_metrics = measure(model, processor, live, **common)
    live_metrics = dict(live_metrics)
    result["candidate"], result["live"] = cand, live_metrics
    result["decision"], result["reason"] = verdict(cand, live_metrics, settings,
                                                   held_out_rows=len(held_kto) + len(held_dpo),
                                                   live_is_base=live is None)
    return result


def choose(verdicts: dict[str, dict]) -> str:
    """The candidate to publish, of several judged against the same live policy: among the promoted,
    the one whose sampled answers the scorer rates highest (then the higher held-out AUC); when none
    is promoted, the first (the default settings), so its rejection is what gets recorded."""
    promoted = [name for name, v in verdicts.items() if v["decision"] == "promoted"]
    if not promoted:
        return next(iter(verdicts))

    def merit(name):
        cand = verdicts[name]["candidate"]
        return (cand.get("sampled_score", 0.0), cand.get("auc") or 0.0, cand.get("pair_accuracy") or 0.0)

    return max(promoted, key=merit)


def style_prompt_sample(prompts: list[dict], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return rng.sample(prompts, min(n, len(prompts)))
