"""A run's data: the store's feedback as TRL rows, the held-out split, the prompts to sample on, and
the method the data allows.

    store -> prefs (rows, held-out split, per-user cap) -> Data -> choose_method

Invariants:
- Rows come only from `prefs` (the exporter uses the same functions); the per-user cap applies to
  the training split only, so the held-out rows stay as users gave them.
- The held-out split is by prompt: every row about the same image(s) (or, without images, the same
  prompt) is on one side, the side `prefs.is_held_out` gives the group's earliest rated answer. So
  an image asked about in several conversations never feeds training and the gate at once; where
  each image is rated once this is exactly `prefs.split`.
- Prompts of held-out groups never reach rejection sampling: the gate's sampled check runs on them.
  With fewer logged prompts than `rs_cross_prompts`, the training side's single-image questions are
  also asked about its other images (`crossed_prompts`), up to that many prompts in all and never
  more than `rs_prompts`: held-out images and questions stay out.
- The candidate's temperature is the one users chat at: the settings' when given, else the one the
  voted answers were sampled at (their generation records), else 1.
- A run sees images at one detail, the one most of its image rows were asked at (their generation
  records; a record from before the setting means "high", the processor's full splitting): the
  trainer sets the processor to it (`modelops.use_image_detail`), so every prompt is rebuilt exactly
  as it was generated. Image rows asked at the other detail are left out, counted in `skipped`.
- Too little feedback for the method raises NotEnoughFeedback before anything is loaded or recorded.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from chatapp.core import config
from chatapp.core.errors import RequestError
from chatapp.feedback import prefs
from chatapp.learning.settings import METHODS, TrainSettings


class NotEnoughFeedback(RequestError):
    pass


@dataclass
class Data:
    kto_train: prefs.Rows
    kto_held: prefs.Rows
    dpo_train: prefs.Rows
    dpo_held: prefs.Rows
    sft_train: prefs.Rows
    prompts: list[dict]  # logged prompts for rejection sampling (held-out prompts excluded)
    held_prompts: list[dict]  # prompts of held-out rated answers (for the gate's sampled check)
    temperature: float  # the sampling temperature the candidate is trained and judged for
    image_detail: str = config.IMAGE_DETAIL_BEFORE_THE_SETTING  # "low" or "high": how the run's images are seen
    crossed: int = 0  # of `prompts`, the last ones: logged questions asked about other training images

    @property
    def logged_prompts(self) -> int:
        """Distinct prompts users sent (outside the held-out split), without the crossed ones."""
        return len(self.prompts) - self.crossed

    def first_prompts(self, n: int) -> "Data":
        """This data sampling on its first `n` prompts (the logged ones come first, then the crossed)."""
        import dataclasses

        kept = self.prompts[:n]
        return dataclasses.replace(self, prompts=kept, crossed=max(0, len(kept) - self.logged_prompts))

    def summary(self) -> dict:
        return {"image_detail": self.image_detail, "kto_train": len(self.kto_train), "kto_held_out": len(self.kto_held),
                "dpo_train": len(self.dpo_train), "dpo_held_out": len(self.dpo_held),
                "sft_train": len(self.sft_train), "logged_prompts": self.logged_prompts, "crossed_prompts": self.crossed,
                "temperature": self.temperature}

    def feedback_ids(self) -> list[int]:
        """The rated messages the training rows came from (recorded with a published adapter)."""
        return sorted({prefs.rated_id(p) for p in self.kto_train.provenance + self.dpo_train.provenance})


def image_detail_of(store, message_id: int) -> str:
    """The image detail an answer was generated at ("low" or "high"), from its generation record."""
    detail = ((store.generation(message_id) or {}).get("params") or {}).get("image_detail")
    return detail if detail in ("low", "high") else config.IMAGE_DETAIL_BEFORE_THE_SETTING


def _answers(provenance: dict) -> list[int]:
    """The answers a row was built from: the rated one (KTO, SFT), both of a pair (DPO)."""
    return [provenance[key] for key in ("message_id", "chosen_id", "rejected_id") if provenance.get(key)]


def _at_detail(rows: prefs.Rows, detail: str, details: dict) -> prefs.Rows:
    """`rows` without the image rows whose answers were generated at another detail."""
    out = prefs.Rows(rows.fmt, skipped=Counter(rows.skipped))
    for row, provenance in zip(rows.rows, rows.provenance):
        if row["images"] and any(details[i] != detail for i in _answers(provenance)):
            out.skipped[f"asked at another image detail than this run's ({detail})"] += 1
            continue
        out.rows.append(row)
        out.provenance.append(provenance)
    return out


def prompt_group(row: dict) -> str:
    """What a row is about, for the held-out split: its images' contents, else its prompt."""
    if row["images"]:
        return "images:" + ",".join(sorted(prefs.image_sha(path) for path in row["images"]))
    return "prompt:" + json.dumps(row["prompt"], sort_keys=True)


def _held_out_groups(all_rows, fraction: float) -> set[str]:
    earliest: dict[str, int] = {}
    for rows in all_rows:
        for row, provenance in zip(rows.rows, rows.provenance):
            group, rated = prompt_group(row), prefs.rated_id(provenance)
            earliest[group] = min(rated, earliest.get(group, rated))
    return {group for group, rated in earliest.items() if prefs.is_held_out(rated, fraction)}


def _split(rows: prefs.Rows, held_groups: set[str]) -> tuple[prefs.Rows, prefs.Rows]:
    train, held = prefs.Rows(rows.fmt, skipped=Counter(rows.skipped)), prefs.Rows(rows.fmt)
    for row, provenance in zip(rows.rows, rows.provenance):
        side = held if prompt_group(row) in held_groups else train
        side.rows.append(row)
        side.provenance.append(provenance)
    return train, held


def prepare_data(store, settings: TrainSettings) -> Data:
    built = [prefs.kto_rows(store), prefs.dpo_rows(store), prefs.sft_rows(store)]
    details = {i: image_detail_of(store, i) for rows in built for row, provenance in zip(rows.rows, rows.provenance)
               if row["images"] for i in _answers(provenance)}
    votes = Counter(details.values())
    image_detail = "low" if votes["low"] > votes["high"] else "high"
    kto, dpo, sft = (_at_detail(rows, image_detail, details) for rows in built)
    held_groups = _held_out_groups((kto, dpo, sft), settings.held_out_fraction)
    (kto_train, kto_held), (dpo_train, dpo_held), (sft_train, _) = (_split(rows, held_groups) for rows in (kto, dpo, sft))
    cap = settings.max_user_share
    kto_train, dpo_train, sft_train = (prefs.cap_per_user(r, cap) for r in (kto_train, dpo_train, sft_train))
    held_ids = {prefs.rated_id(p) for p in kto_held.provenance + dpo_held.provenance}
    prompts = [p for p in prefs.logged_prompts(store, exclude_message_ids=held_ids, limit=settings.rs_prompts)
               if (not p["images"] or image_detail_of(store, p["answer_id"]) == image_detail)
               and prompt_group(p) not in held_groups]
    # --prompts caps the whole: a run asked for 20 prompts samples on 20
    wanted = min(settings.rs_cross_prompts, settings.rs_prompts) - len(prompts)
    crossed = crossed_prompts(prompts, wanted, settings.seed)
    prompts += crossed
    held_prompts = []
    seen = set()
    for row in kto_held.rows + dpo_held.rows:
        key = repr((row["prompt"], row["images"]))
        if key not in seen:
            seen.add(key)
            held_prompts.append({"prompt": row["prompt"], "images": row["images"]})
    temperature = settings.temperature or prefs.sampling_temperature(kto_train) or 1.0
    return Data(kto_train, kto_held, dpo_train, dpo_held, sft_train, prompts, held_prompts, temperature,
                image_detail, len(crossed))


def _single_image_question(prompt: dict):
    """(the prompt's messages, image index) when it is one user message with one image (after an optional
    system prompt), else None."""
    messages = prompt["prompt"]
    users = [m for m in messages if m["role"] == "user"]
    if len(prompt["images"]) != 1 or len(users) != 1 or any(m["role"] == "assistant" for m in messages):
        return None
    return messages


def crossed_prompts(prompts: list[dict], wanted: int, seed: int) -> list[dict]:
    """Up to `wanted` new prompts: the single-image questions of `prompts` asked about their other images.
    With few distinct prompts (every answer voted, no unvoted chats) rejection sampling has a few dozen
    prompts to learn a style from; each question asked about each image gives it many (docs/learning.md,
    regime b). Only `prompts`' own questions and images are used, so the held-out split stays as it is."""
    if wanted <= 0:
        return []
    import hashlib

    questions, images, existing = {}, {}, set()
    for p in prompts:
        messages = _single_image_question(p)
        if messages is None:
            continue
        question, image = json.dumps(messages, sort_keys=True), prefs.image_sha(p["images"][0])
        questions.setdefault(question, messages)
        images.setdefault(image, p["images"][0])
        existing.add((question, image))

    def order(pair):
        return hashlib.sha256(f"{seed}:{pair[0]}:{pair[1]}".encode()).hexdigest()

    pairs = sorted(((q, i) for q in questions for i in images if (q, i) not in existing), key=order)
    return [{"prompt": questions[q], "images": [images[i]], "answer_id": None} for q, i in pairs[:wanted]]


def choose_method(settings: TrainSettings, data: Data) -> str:
    method = settings.method
    if method not in METHODS:
        raise RequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    labels = {row["label"] for row in data.kto_train.rows}
    if method == "auto":
        if len(data.kto_train) >= settings.min_rows and labels == {True, False} and data.prompts:
            method = "rs"
        elif len(data.dpo_train) >= settings.min_pairs and data.prompts:
            method = "rs"  # the pairs train the scorer (plain DPO on a few dozen pairs barely moved the model)
        elif len(data.dpo_train) >= settings.min_pairs:
            method = "dpo"
        else:
            method = "kto"
    if method == "rs" and labels != {True, False} and data.kto_train and len(data.dpo_train) < settings.min_pairs:
        raise NotEnoughFeedback(f"rs needs both thumbs up and thumbs down in the training split, or at least "
                                f"{settings.min_pairs} preference pairs")
    rs_needs = ((len(data.kto_train), settings.min_rows, "thumbs") if labels == {True, False}
                else (len(data.dpo_train), settings.min_pairs, "preference pairs"))  # rejection.scorer_from_pairs
    needed = {"rs": rs_needs,
              "kto": (len(data.kto_train), settings.min_rows, "thumbs"),
              "dpo": (len(data.dpo_train), settings.min_pairs, "preference pairs"),
              "sft": (len(data.sft_train), settings.min_rows, "liked answers")}[method]
    have, need, what = needed
    if have < need:
        raise NotEnoughFeedback(f"not enough feedback to train ({method}): {have} {what} for training "
                                f"(after the held-out split and the per-user cap), need at least {need}")
    if method == "kto" and labels != {True, False}:
        raise NotEnoughFeedback(f"{method} needs both thumbs up and thumbs down in the training split")
    return method


def dataset(rows: list[dict]):
    """TRL rows as a `datasets.Dataset` whose image paths load as images."""
    import datasets

    table = datasets.Dataset.from_list([dict(r) for r in rows])
    return table.cast_column("images", datasets.Sequence(datasets.Image()))
