"""The `rs` recipe (the default `auto` when there are thumbs or pairs): rejection sampling.

The votes train a KTO *scorer* (a LoRA whose implicit reward, log p_scorer - log p_base, ranks
answers like the voters did; with no thumbs of both kinds, the preference pairs train it, each
chosen answer a liked row and each rejected one a disliked row); the policy samples `best_of`
answers to each logged prompt outside the held-out split (voted or not; with few of them, also to
their questions asked about their other images, `data.crossed_prompts`); the best answer by the
scorer is kept when its reward is above the midpoint between liked and disliked training answers
(with fewer prompts than `rs_keep_rows`, several distinct answers per prompt, the best first); a
LoRA is trained (TRL SFT) on the kept answers, with the policy's own greedy answers to a few
text-only openers (`ANCHOR_PROMPTS`, about `anchor_share` of the rows) so that what nobody voted on
stays as it was. With `rs_rounds` = 2 (the default) a second round samples from the first round's
candidate, whose answers are mostly in the liked style already, so the kept set is purer, and trains
fresh LoRAs on it for `epochs` and for each of `rs_extra_epochs` (8, 12); the gate publishes the
best that passes. This moved the demo model's answer style where plain KTO/DPO on the same votes
barely moved it or wrecked accuracy (see docs/learning.md).

Invariants:
- The candidates are trained for the temperature users chat at (`Data.temperature`): their SFT loss
  is taken on logits / T, and the gate samples at T.
- A scorer that cannot rank the held-out votes (the gate's AUC bar) or pairs (`gate.pair_shortfall`)
  ends the run with NoCandidate before any sampling; so does a round that keeps fewer answers than one batch.
- Each round trains fresh LoRAs on that round's answers only; the model comes back with the
  "scorer" and the last round's candidates ("candidate", "candidate-eN"), the "candidate" active.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from chatapp.feedback import prefs
from chatapp.learning.data import Data
from chatapp.learning.settings import DEFAULT_LR, TrainSettings
from chatapp.learning.trl_runs import Progress, lora_config, rename_adapter, train_trl


class NoCandidate(Exception):
    """The run ended without a candidate to judge: recorded as rejected, nothing published."""

    def __init__(self, reason: str, metrics: dict):
        super().__init__(reason)
        self.metrics = metrics


def rejection_sampling(base, processor, data: Data, settings: TrainSettings, progress: Progress, live_path,
                       sampler=None):
    """Returns the model with its adapters, the scorer's adapter name, the recipe's metrics and the
    names of the candidates for the gate. `sampler` (learning/sampler.py; default: in this process) draws
    the best-of-N answers; scoring and training run here."""
    # torch and scipy come in when a run starts, not when an idle `train --watch` imports the trainer
    from chatapp.learning import gate, modelops
    from chatapp.learning.sampler import InProcessSampler

    sampler = sampler or InProcessSampler()

    # 1. the scorer: KTO on the votes; with no thumbs of both kinds, KTO on the preference pairs, each
    # pair's chosen answer a liked row and its rejected one a disliked row (reference: the base,
    # adapters disabled). DPO on the same pairs moved the scorer far from the base (liked answers'
    # reward -128, disliked -308, against +1.0 / -121 for thumbs in regime a); ranked by that reward,
    # the kept answers mixed the plain style in and regime d's candidate reached 0.66; with KTO on
    # the pairs: liked +1.0, disliked -84 and 0.95 (docs/learning.md, the matrix).
    from_pairs = scorer_from_pairs(data)
    train_rows = scorer_rows(data)
    progress.phase = "training the scorer (kto" + (" on the pairs)" if from_pairs else ")")
    desirable, undesirable = prefs.kto_weights(prefs.Rows("kto", train_rows))
    model = train_trl("kto", base, processor, train_rows, settings, progress, DEFAULT_LR["scorer"],
                      settings.scorer_epochs, peft_config=lora_config(settings),
                      extra={"beta": settings.beta, "desirable_weight": desirable,
                             "undesirable_weight": undesirable}, schedule="constant")
    rename_adapter(model, model.active_adapter, "scorer")
    model.eval()
    train_items = gate.kto_items(train_rows)
    progress.start("scoring the votes", 0)
    train_rewards = gate.rewards(model, processor, train_items, "scorer")
    liked = train_rewards[[i for i, it in enumerate(train_items) if it["label"]]]
    disliked = train_rewards[[i for i, it in enumerate(train_items) if not it["label"]]]
    midpoint = float((liked.mean() + disliked.mean()) / 2)
    threshold = float(liked.mean()) if settings.keep == "liked" else midpoint
    # The gate's first check, on the scorer before any sampling: votes that do not predict held-out
    # votes (random ones) cannot make a candidate that passes it, so the run stops here, minutes early.
    held = gate.preference_metrics(model, processor, [] if from_pairs else data.kto_held.rows,
                                   data.dpo_held.rows if from_pairs else [], "scorer")
    shortfall = (gate.pair_shortfall if from_pairs else gate.auc_shortfall)(held, gate.GateSettings())
    if shortfall:
        what = "preferences" if from_pairs else "votes"
        raise NoCandidate(f"the {what} do not predict each other (a scorer trained on them: {shortfall})",
                          {"scorer": held})

    # 2. best-of-N sampled answers on logged prompts, from the current policy; 3. the candidate: LoRA SFT
    # on the kept answers. With rs_rounds > 1 the next round samples from this round's candidate (whose
    # answers are mostly in the liked style already, so the kept set is purer) and trains a new one.
    if live_path:
        model.load_adapter(str(live_path), adapter_name="live")
    policy = "live" if live_path and settings.start_from == "active" else None
    prompts = [{"prompt": p["prompt"], "images": modelops.load_images(p["images"])} for p in data.prompts]
    anchors = _anchor_rows(model, processor, policy, settings, sampler)
    metrics = {"rs": {"scorer_held_out_auc": held.get("auc"), "scorer_from": "pairs" if from_pairs else "thumbs",
                      "scorer_held_out_pair_accuracy": held.get("pair_accuracy"), "midpoint": midpoint,
                      "liked_reward": float(liked.mean()),
                      "disliked_reward": float(disliked.mean()), "prompts": len(prompts), "rounds": []}}
    for round_number in range(1, settings.rs_rounds + 1):
        of_rounds = f" (round {round_number} of {settings.rs_rounds})" if settings.rs_rounds > 1 else ""
        kept, round_metrics = _best_of_n(model, processor, prompts, data.prompts, policy, threshold, settings,
                                         progress, of_rounds, extra_threshold=float(liked.mean()), sampler=sampler,
                                         phase=f"rejection sampling round {round_number}")
        metrics["rs"]["rounds"].append(round_metrics)
        metrics["rs"].update(samples=round_metrics["samples"], kept=round_metrics["kept"],
                             kept_examples=round_metrics["kept_examples"])
        if len(kept) < settings.batch_size:
            raise NoCandidate(f"rejection sampling kept only {len(kept)} answers of {len(prompts)} prompts "
                              f"(the scorer finds too few sampled answers better than the votes' midpoint)", metrics)
        last = round_number == settings.rs_rounds
        trained = settings.candidates("rs") if last else {"candidate": settings.epochs}
        for name, epochs in trained.items():
            if name in model.peft_config:  # a fresh LoRA each round, trained on that round's answers
                model.delete_adapter(name)
            if live_path and settings.start_from == "active":
                model.load_adapter(str(live_path), adapter_name=name, is_trainable=True)
            else:
                model.add_adapter(name, lora_config(settings, settings.candidate_modules))
            model.set_adapter(name)
            model.train()
            progress.phase = "training the candidate (sft)" + of_rounds + (
                f", {epochs} epochs" if len(trained) > 1 else "")
            train_trl("sft", model, processor, kept + _share(anchors, len(kept), settings.anchor_share), settings,
                      progress, settings.learning_rate or DEFAULT_LR["rs"],
                      epochs, temperature=data.temperature)
            model.eval()
        if not last:
            # the next round samples from a frozen copy of this candidate
            rename_adapter(model, "candidate", "policy")
            policy = "policy"
    if "policy" in model.peft_config:
        model.delete_adapter("policy")
    model.set_adapter("candidate")
    return model, "scorer", metrics, list(trained)


# Text-only openers any chat model meets, none of them a question the demo model's gate probe asks
ANCHOR_PROMPTS = ("Good morning!", "Can you help me?", "Tell me about yourself.", "How does this work?",
                  "Thanks!", "What are you?")


def _anchor_rows(model, processor, policy, settings: TrainSettings, sampler) -> list[dict]:
    """The policy's own greedy answers to ANCHOR_PROMPTS, as SFT rows: trained beside the kept answers they
    keep what users did not ask about as it was. Without them, a candidate trained on image answers alone
    rewrote text-only ones ("I can answer questions about, and it is blue!": the correctness proof's
    candidate lost 61 points on the probe's text-only questions, docs/learning.md)."""
    if not settings.anchor_share:
        return []
    items = [{"prompt": [{"role": "user", "content": [prefs.text_part(q)]}], "images": []} for q in ANCHOR_PROMPTS]
    answers = sampler.sample(model, processor, items, 1, policy=policy, temperature=0.0,
                             max_new_tokens=settings.max_new_tokens, seed=settings.seed, phase="anchors",
                             progress=lambda n: None)
    return [{"images": [], "prompt": item["prompt"], "completion": prefs.assistant_message(group[0])}
            for item, group in zip(items, answers) if group and group[0]]


def anchor_repeats(rows: int, share: float, anchors: int = len(ANCHOR_PROMPTS)) -> int:
    """How many times each of `anchors` anchor rows goes beside `rows` kept answers: about `share` of
    them, each at least once (0 when anchors are off). The cost estimate counts with it too."""
    return max(1, round(share * rows / anchors)) if share and anchors else 0


def _share(anchors: list[dict], rows: int, share: float) -> list[dict]:
    """Anchor rows repeated to about `share` of `rows` (at least each once)."""
    return anchors * anchor_repeats(rows, share, len(anchors))


def scorer_from_pairs(data: Data) -> bool:
    """The scorer learns from preference pairs when the training split lacks thumbs of both kinds."""
    return {row["label"] for row in data.kto_train.rows} != {True, False}


def scorer_rows(data: Data) -> list[dict]:
    """The KTO rows the scorer trains on: the thumbs, or the pairs' answers when `scorer_from_pairs`."""
    return pair_rows(data.dpo_train.rows) if scorer_from_pairs(data) else data.kto_train.rows


def pair_rows(pairs: list[dict]) -> list[dict]:
    """KTO rows from DPO pairs: each pair's chosen answer liked, its rejected answer disliked."""
    return [dict({k: v for k, v in pair.items() if k not in ("chosen", "rejected")},
                 completion=pair[side], label=side == "chosen")
            for pair in pairs for side in ("chosen", "rejected")]


def _best_of_n(model, processor, prompts: list[dict], stored_prompts: list[dict], policy, threshold: float,
               settings: TrainSettings, progress: Progress, of_rounds: str = "",
               extra_threshold: float = float("inf"), sampler=None,
               phase: str = "rejection sampling") -> tuple[list[dict], dict]:
    """Sample `best_of` answers per prompt from adapter `policy` (None: the base), score them with the
    "scorer" adapter, and keep per prompt the best answer whose reward clears `threshold`."""
    from chatapp.learning import modelops
    from chatapp.learning.sampler import InProcessSampler

    sampler = sampler or InProcessSampler()
    progress.start(f"sampling {settings.best_of} answers to {len(prompts)} prompts{of_rounds}",
                   len(prompts) * settings.best_of)
    done = [0]

    def advance(n):
        done[0] += n
        progress.step(done[0])

    samples = sampler.sample(model, processor, prompts, settings.best_of, policy=policy,
                             temperature=settings.rs_temperature, max_new_tokens=settings.max_new_tokens,
                             seed=settings.seed, phase=phase, progress=advance)
    flat = [dict(p, completion=a) for p, group in zip(prompts, samples) for a in group if a]
    owners = [i for i, group in enumerate(samples) for a in group if a]
    progress.start("scoring the samples" + of_rounds, 0)
    with modelops.adapter(model, "scorer"):
        scorer_logps = modelops.completion_logps(model, processor, flat)
    with modelops.adapter(model, None):
        base_logps = modelops.completion_logps(model, processor, flat)
    sample_rewards = scorer_logps - base_logps
    # Among a prompt's answers that clear the threshold, keep the one the base finds likely, nudged by the
    # reward: the largest reward alone favours rare (often wrong) answers whose base probability is tiny,
    # the base likelihood alone lets other styles through (measured: docs/learning.md, recipe table).
    # Per token ("mix-mean", the default): summed, the shortest answer wins, and in the liked form it is
    # often the one that leaves things out ("Red." for a red and a blue square). Regime a: summed, the
    # candidate lost 2.2 points on the gate's 1,000 image questions (rejected); per token it loses 1.0 on the
    # bench's 300 and is promoted, preference 0.84 (docs/learning.md, the matrix).
    # With few prompts (every answer voted, no unvoted chats) one answer each is a few dozen rows: keep up
    # to `per_prompt` distinct answers per prompt, the best first, so the candidate sees more than one
    # wording of the liked form (docs/learning.md, the regime matrix).
    per_prompt = min(settings.best_of, max(1, -(-settings.rs_keep_rows // max(1, len(prompts)))))
    passing: dict[int, dict[str, float]] = {}
    extra_ok: dict[tuple[int, str], bool] = {}
    if os.environ.get("CHATAPP_RS_DUMP"):  # experiments: every sample with its scores
        Path(os.environ["CHATAPP_RS_DUMP"]).write_text(json.dumps({"threshold": threshold, "samples": [
            [o, it["completion"], r, sl, bl] for o, it, r, sl, bl in zip(owners, flat, sample_rewards.tolist(),
                                                                        scorer_logps.tolist(), base_logps.tolist())]}))
    mix = base_logps + settings.reward_weight * sample_rewards
    ranks = {"likelihood": scorer_logps, "base": base_logps, "reward": sample_rewards, "mix": mix,
             "mix-mean": mix / modelops.token_counts(processor, [it["completion"] for it in flat])}[settings.select]
    ranks = ranks.tolist()
    for owner, item, reward, rank in zip(owners, flat, sample_rewards.tolist(), ranks):
        if reward > threshold:
            answers = passing.setdefault(owner, {})
            answers[item["completion"]] = max(rank, answers.get(item["completion"], rank))
            extra_ok[owner, item["completion"]] = reward > extra_threshold
    # the best answer of a prompt clears the midpoint; the extra ones must be as good as the liked answers
    # (above the midpoint, a prompt's second-best was often another style: regime b, docs/learning.md)
    kept = [{"images": stored_prompts[i]["images"], "prompt": stored_prompts[i]["prompt"],
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": text}]}]}
            for i, answers in sorted(passing.items())
            for n, text in enumerate(sorted(answers, key=answers.get, reverse=True)[:per_prompt])
            if n == 0 or extra_ok[i, text]]
    return kept, {"samples": len(flat), "kept": len(kept), "kept_prompts": len(passing), "per_prompt": per_prompt,
                  "kept_examples": [k["completion"][0]["content"][0]["text"] for k in kept[:12]]}
