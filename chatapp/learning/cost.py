"""What a training run will cost, stated before it starts: the work it will do (sampled answers x
prompt tokens, scoring passes, optimizer steps), turned into minutes with unit costs measured on the
loaded model, and fitted to a `--budget`.

    Shape (counts from the run's data) x Units (measured by `calibrate`) -> estimate -> fit(budget)

Invariants:
- Units are measured on this machine, never assumed: `calibrate` times the run's own operations on
  the loaded model with the run's threads and settings, on a few of the run's own rows
  (`modelops.sample_answers`, `modelops.completion_logps`, and a real TRL step of each kind the
  method trains, on a LoRA that is unloaded afterwards: the base comes back unchanged, without a
  second copy of its weights). What loading and calibrating took is part of the estimate.
- `estimate` is pure: counts x units. Where a count is only known during the run (the answers
  rejection sampling keeps, at most one per prompt) its upper bound is used, so estimates err long.
- A budget is met by sampling on fewer prompts (rs) or by capping the optimizer steps (kto, dpo,
  sft), never by touching the held-out split or the gate; below one batch of prompts (rs) or one
  epoch (the others) the run is refused (OverBudget) with the estimate and its parts.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from chatapp.core.errors import RequestError
from chatapp.learning.rejection import ANCHOR_PROMPTS, anchor_repeats
from chatapp.learning.settings import DEFAULT_LR, TrainSettings
from chatapp.learning.trl_runs import _steps as phase_steps
from chatapp.learning.trl_runs import lora_config, train_trl

TIMED_STEPS = 3  # calibration steps per kind; the first is warm-up and is not timed
SAMPLE_BATCH = 64  # modelops.sample_answers' default batch
KINDS = {"rs": ("kto", "sft"), "kto": ("kto",), "dpo": ("dpo",), "sft": ("sft",)}


class OverBudget(RequestError):
    """The run cannot be cut to fit its budget; `estimate` is the full run's."""

    def __init__(self, message: str, estimate: "Estimate"):
        super().__init__(message)
        self.estimate = estimate


@dataclass
class Units:
    """Seconds per unit of work, measured on the loaded model (`calibrate`)."""
    sample_s: float  # one sampled answer (max_new_tokens at most), batched as the run batches them
    score_s: float  # one scoring pass (log-probabilities of one answer given its prompt)
    step_s: dict[str, float]  # one optimizer step of each TRL kind (batch x grad_accum rows)
    prompt_tokens: int  # of the prompt the sampling was timed on
    load_s: float = 0.0  # spent before the estimate: loading the model
    calibrate_s: float = 0.0  # and measuring these units

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Shape:
    """The counts a run's cost depends on."""
    method: str
    kto_train: int
    kto_held: int = 0
    dpo_train: int = 0
    dpo_held: int = 0
    sft_train: int = 0
    prompts: int = 0  # logged prompts rejection sampling samples on
    probe: int = 0  # the gate's regression probe (greedy answers per policy)
    style_prompts: int = 0  # the gate's sampled check (rs): prompts x GateSettings.style_samples
    has_live: bool = False
    scorer_from_pairs: bool = False  # rs: the scorer trains on the pairs' answers (no thumbs of both kinds)

    @classmethod
    def of(cls, method: str, data, probe: int, has_live: bool) -> "Shape":
        from chatapp.learning.gate import GateSettings
        from chatapp.learning.rejection import scorer_from_pairs

        return cls(method, len(data.kto_train), len(data.kto_held), len(data.dpo_train), len(data.dpo_held),
                   len(data.sft_train), len(data.prompts), probe,
                   min(GateSettings().style_prompts, len(data.held_prompts)), has_live,
                   method == "rs" and scorer_from_pairs(data))


@dataclass
class Estimate:
    parts: dict[str, dict] = field(default_factory=dict)  # name -> {count, unit, minutes}
    samples: int = 0
    prompt_tokens: int = 0
    budget_min: float | None = None
    scaled: str = ""  # what `fit` changed to meet the budget

    @property
    def minutes(self) -> float:
        return sum(part["minutes"] for part in self.parts.values())

    def add(self, name: str, count: float, unit: str, seconds_each: float) -> None:
        if count:
            self.parts[name] = {"count": int(count), "unit": unit, "minutes": count * seconds_each / 60}

    def summary(self) -> str:
        biggest = sorted(self.parts.items(), key=lambda kv: -kv[1]["minutes"])[:4]
        return (f"about {self.minutes:.1f} min: " + "; ".join(
            f"{name} {p['count']} {p['unit']} {p['minutes']:.1f} min" for name, p in biggest)
            + (f"; {self.samples} sampled answers x ~{self.prompt_tokens} prompt tokens" if self.samples else ""))

    def as_dict(self) -> dict:
        return {"minutes": round(self.minutes, 3), "parts": self.parts, "samples": self.samples,
                "prompt_tokens": self.prompt_tokens, "budget_min": self.budget_min, "scaled": self.scaled}


def estimate(shape: Shape, settings: TrainSettings, units: Units) -> Estimate:
    """The run's work and minutes, part by part (pure)."""
    from chatapp.learning.gate import GateSettings

    gate = GateSettings()
    out = Estimate(prompt_tokens=units.prompt_tokens)
    out.add("loading the model", 1, "load", units.load_s)
    out.add("measuring these units", 1, "calibration", units.calibrate_s)
    candidates = settings.candidates(shape.method)
    if shape.method == "rs":
        if shape.scorer_from_pairs:  # KTO on each pair's two answers; held-out pairs scored as in the gate
            out.add("training the scorer (kto on the pairs)",
                    phase_steps(2 * shape.dpo_train, settings, settings.scorer_epochs), "steps", units.step_s["kto"])
            out.add("scoring the pairs", 2 * 2 * shape.dpo_train + 4 * shape.dpo_held, "passes", units.score_s)
        else:
            out.add("training the scorer (kto)", phase_steps(shape.kto_train, settings, settings.scorer_epochs),
                    "steps", units.step_s["kto"])
            out.add("scoring the votes", 2 * (shape.kto_train + shape.kto_held), "passes", units.score_s)
        samples = settings.rs_rounds * shape.prompts * settings.best_of
        out.samples = samples
        anchors = len(ANCHOR_PROMPTS) if settings.anchor_share else 0
        out.add("sampling", samples + anchors, "answers", units.sample_s)
        out.add("scoring the samples", 2 * samples, "passes", units.score_s)
        # kept answers: at most one per prompt, and the anchor rows beside them
        rows = shape.prompts + anchors * anchor_repeats(shape.prompts, settings.anchor_share)
        steps = (settings.rs_rounds - 1) * phase_steps(rows, settings, settings.epochs) + sum(
            phase_steps(rows, settings, epochs) for epochs in candidates.values())
        out.add("training the candidates (sft)", steps, "steps", units.step_s["sft"])
    else:
        rows = {"kto": shape.kto_train, "dpo": shape.dpo_train, "sft": shape.sft_train}[shape.method]
        out.add(f"training ({shape.method})", phase_steps(rows, settings, settings.epochs), "steps",
                units.step_s[shape.method])
    # the gate measures every candidate and the live policy (the base: no reward passes)
    policies = len(candidates) + 1
    reward_policies = len(candidates) + (1 if shape.has_live else 0)
    style = shape.style_prompts * gate.style_samples if shape.method == "rs" else 0
    out.add("the gate: answers", policies * (shape.probe + style), "answers", units.sample_s)
    out.add("the gate: scoring", reward_policies * 2 * (shape.kto_held + 2 * shape.dpo_held) + policies * 2 * style,
            "passes", units.score_s)
    return out


def fit(shape: Shape, settings: TrainSettings, units: Units, budget_min: float | None):
    """(settings, shape, estimate) meeting `budget_min`: the same run when it fits; else rs samples
    on fewer prompts (not below one batch), the other methods train fewer steps (not below one
    epoch). Raises OverBudget when even that does not fit."""
    full = estimate(shape, settings, units)
    full.budget_min = budget_min
    if budget_min is None or full.minutes <= budget_min:
        return settings, shape, full
    if shape.method == "rs":
        low, high, what = settings.batch_size, shape.prompts, "rejection sampling on {n} of {total} prompts"

        def trial(n: int):
            return dataclasses.replace(settings, rs_prompts=n), dataclasses.replace(shape, prompts=n)
    else:
        rows = {"kto": shape.kto_train, "dpo": shape.dpo_train, "sft": shape.sft_train}[shape.method]
        low = phase_steps(rows, dataclasses.replace(settings, max_steps=None), 1)
        high = phase_steps(rows, settings, settings.epochs)
        what = "{n} of {total} optimizer steps"

        def trial(n: int):
            return dataclasses.replace(settings, max_steps=n), shape
    floor, total, best = low, high, None
    while low <= high:  # the largest n that fits: the estimate grows with n
        middle = (low + high) // 2
        if estimate(trial(middle)[1], trial(middle)[0], units).minutes <= budget_min:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    if best is None:
        raise OverBudget(f"the run would take {full.summary()}. That is over the {budget_min:g}-minute budget, "
                         f"and so is the smallest run it can be cut to ({what.format(n=floor, total=total)}): "
                         "raise --budget, or ask for less (--best-of, --rs-rounds, --rs-extra-epochs none, "
                         "--epochs, or another --method)", full)
    settings, shape = trial(best)
    scaled = estimate(shape, settings, units)
    scaled.budget_min = budget_min
    scaled.scaled = (f"scaled to the {budget_min:g}-minute budget: {what.format(n=best, total=total)} "
                     f"(the full run: about {full.minutes:.1f} min)")
    return settings, shape, scaled


# ---------------------------------------------------------------- measuring the units

class _StepClock:
    """Stands in for trl_runs.Progress during calibration: notes when each step ends, writes nothing."""

    def __init__(self):
        self.phase, self.times = "calibrating", {}

    def log(self, message: str) -> None:
        pass

    def start(self, phase: str, total: int) -> None:
        self.phase = phase

    def step(self, step: int, loss=None, points=None, force: bool = False) -> None:
        if step:
            self.times.setdefault(step, time.perf_counter())


def _prompt_tokens(processor, item: dict) -> int:
    text = processor.apply_chat_template(item["prompt"], add_generation_prompt=True)
    return int(processor(text=[text], images=[item["images"]] if item["images"] else None,
                         return_tensors="pt")["input_ids"].shape[1])


def _step_seconds(kind: str, base, processor, rows: list[dict], settings: TrainSettings, extra: dict,
                  timed_steps: int = TIMED_STEPS) -> float:
    """Seconds per optimizer step of a real TRL `kind` run on a fresh LoRA over `base`, timed from the
    end of step 1 (warm-up) to the end of the last step; the LoRA is unloaded afterwards, so the base
    is as it was. Timed with one micro-batch per step; a step of the run is `grad_accum` of them."""
    clock = _StepClock()
    timed = dataclasses.replace(settings, max_steps=timed_steps, grad_accum=1)
    model = train_trl(kind, base, processor, rows[:settings.batch_size * timed_steps], timed, clock,
                      settings.learning_rate or DEFAULT_LR.get(kind, 1e-3), 1, peft_config=lora_config(settings),
                      extra=extra)
    model.unload()  # the LoRA layers out, the original modules back in place
    base.eval()
    last = max(clock.times)
    return (clock.times[last] - clock.times[1]) / max(1, last - 1) * settings.grad_accum


def _alternating(rows: list[dict]) -> list[dict]:
    """Liked and disliked rows in turn, so that every calibration batch has both (as KTO batches do)."""
    liked = [r for r in rows if r["label"]]
    disliked = [r for r in rows if not r["label"]]
    return [r for pair in zip(liked, disliked) for r in pair] or rows


def calibrate(base, processor, method: str, data, settings: TrainSettings, load_s: float = 0.0,
              kinds: tuple[str, ...] | None = None, timed_steps: int = TIMED_STEPS, sampler=None) -> Units:
    """The unit costs of this run on the loaded `base` (not a PeftModel): a batch of sampled answers,
    a batch of scoring passes and `timed_steps` steps of each TRL kind the method trains (or of
    `kinds`), on the run's rows. With a model-server `sampler` (`train --backend openai`) the sampled
    answers are timed there, where the run will sample, one wave of its requests in flight."""
    from chatapp.feedback import prefs
    from chatapp.learning import modelops
    from chatapp.learning.rejection import scorer_rows

    started = time.perf_counter()
    step_s = {}
    for kind in kinds or KINDS[method]:
        if kind == "kto":  # rs's scorer trains on the pairs' answers when there are no thumbs of both kinds
            votes = prefs.Rows("kto", scorer_rows(data)) if method == "rs" else data.kto_train
            desirable, undesirable = prefs.kto_weights(votes)
            rows, extra = _alternating(votes.rows), {"beta": settings.beta, "desirable_weight": desirable,
                                                              "undesirable_weight": undesirable}
        elif kind == "dpo":
            rows, extra = data.dpo_train.rows, {"beta": settings.beta}
        else:  # rs trains its candidates on sampled answers of the same shape as the liked ones
            rows, extra = data.sft_train.rows or data.kto_train.rows or [
                dict(images=r["images"], prompt=r["prompt"], completion=r["chosen"]) for r in data.dpo_train.rows], {}
        step_s[kind] = _step_seconds(kind, base, processor, rows, settings, extra, timed_steps)
    sources = data.prompts or data.kto_train.rows or data.dpo_train.rows or data.sft_train.rows
    items = [{"prompt": p["prompt"], "images": modelops.load_images(p["images"])} for p in sources[:SAMPLE_BATCH]]
    tokens = _prompt_tokens(processor, items[0])
    # one batch of answers as the run makes them: best_of per prompt, as many as a batch holds
    batch = max(1, min(SAMPLE_BATCH, modelops.batch_tokens(base.device) // tokens))
    per_prompt = min(settings.best_of, batch)
    prompts = items[:max(1, batch // per_prompt)]
    timer = time.perf_counter()
    if sampler is not None and sampler.describe()["sampler"] != "inprocess":
        from chatapp.learning.sampler import IN_FLIGHT

        # one request alone, then one wave in flight: the way the run sends them (sampler.BackendSampler)
        prompts = prompts[:max(1, (IN_FLIGHT + 1) // per_prompt)]
        sampler.sample(base, processor, prompts, per_prompt, policy=None, temperature=settings.rs_temperature,
                       max_new_tokens=settings.max_new_tokens, seed=settings.seed, phase="cost estimate")
    else:
        modelops.sample_answers(base, processor, prompts, per_prompt, temperature=settings.rs_temperature,
                                max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    sample_s = (time.perf_counter() - timer) / (len(prompts) * per_prompt)
    voted = data.kto_train.rows or data.sft_train.rows
    scored = [{"prompt": r["prompt"], "images": modelops.load_images(r["images"]),
               "completion": r["completion"][0]["content"][0]["text"]} for r in voted[:min(32, batch)]]
    if not scored:  # pairs only: their chosen answers
        scored = [{"prompt": r["prompt"], "images": modelops.load_images(r["images"]),
                   "completion": r["chosen"][0]["content"][0]["text"]} for r in data.dpo_train.rows[:min(32, batch)]]
    timer = time.perf_counter()
    modelops.completion_logps(base, processor, scored)
    score_s = (time.perf_counter() - timer) / max(1, len(scored))
    return Units(sample_s=sample_s, score_s=score_s, step_s=step_s, prompt_tokens=tokens, load_s=load_s,
                 calibrate_s=time.perf_counter() - started)
