"""A run's data: the store's feedback as TRL rows, the held-out split, the prompts to sample on, and
the method the data allows.

    store -> prefs (rows, held-out split, per-user cap) -> Data -> choose_method

Invariants:
- Rows come only from `prefs` (the exporter uses the same functions); the per-user cap applies to
  the training split only, so the held-out rows stay as users gave them.
- Prompts of held-out rated answers never reach rejection sampling: the gate's sampled check runs
  on them.
- The candidate's temperature is the one users chat at: the settings' when given, else the one the
  voted answers were sampled at (their generation records), else 1.
- Too little feedback for the method raises NotEnoughFeedback before anything is loaded or recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def summary(self) -> dict:
        return {"kto_train": len(self.kto_train), "kto_held_out": len(self.kto_held),
                "dpo_train": len(self.dpo_train), "dpo_held_out": len(self.dpo_held),
                "sft_train": len(self.sft_train), "logged_prompts": len(self.prompts), "temperature": self.temperature}

    def feedback_ids(self) -> list[int]:
        """The rated messages the training rows came from (recorded with a published adapter)."""
        return sorted({prefs.rated_id(p) for p in self.kto_train.provenance + self.dpo_train.provenance})


def prepare_data(store, settings: TrainSettings) -> Data:
    kto_train, kto_held = prefs.split(prefs.kto_rows(store), settings.held_out_fraction)
    dpo_train, dpo_held = prefs.split(prefs.dpo_rows(store), settings.held_out_fraction)
    sft_train, _ = prefs.split(prefs.sft_rows(store), settings.held_out_fraction)
    cap = settings.max_user_share
    kto_train, dpo_train, sft_train = (prefs.cap_per_user(r, cap) for r in (kto_train, dpo_train, sft_train))
    held_ids = {prefs.rated_id(p) for p in kto_held.provenance + dpo_held.provenance}
    prompts = prefs.logged_prompts(store, exclude_message_ids=held_ids, limit=settings.rs_prompts)
    held_prompts = []
    seen = set()
    for row in kto_held.rows + dpo_held.rows:
        key = repr((row["prompt"], row["images"]))
        if key not in seen:
            seen.add(key)
            held_prompts.append({"prompt": row["prompt"], "images": row["images"]})
    temperature = settings.temperature or prefs.sampling_temperature(kto_train) or 1.0
    return Data(kto_train, kto_held, dpo_train, dpo_held, sft_train, prompts, held_prompts, temperature)


def choose_method(settings: TrainSettings, data: Data) -> str:
    method = settings.method
    if method not in METHODS:
        raise RequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "auto":
        labels = {row["label"] for row in data.kto_train.rows}
        if len(data.kto_train) >= settings.min_rows and labels == {True, False} and data.prompts:
            method = "rs"
        elif len(data.dpo_train) >= settings.min_pairs:
            method = "dpo"
        else:
            method = "kto"
    needed = {"rs": (len(data.kto_train), settings.min_rows, "thumbs"),
              "kto": (len(data.kto_train), settings.min_rows, "thumbs"),
              "dpo": (len(data.dpo_train), settings.min_pairs, "preference pairs"),
              "sft": (len(data.sft_train), settings.min_rows, "liked answers")}[method]
    have, need, what = needed
    if have < need:
        raise NotEnoughFeedback(f"not enough feedback to train ({method}): {have} {what} for training "
                                f"(after the held-out split and the per-user cap), need at least {need}")
    if method in ("rs", "kto") and {row["label"] for row in data.kto_train.rows} != {True, False}:
        raise NotEnoughFeedback(f"{method} needs both thumbs up and thumbs down in the training split")
    return method


def dataset(rows: list[dict]):
    """TRL rows as a `datasets.Dataset` whose image paths load as images."""
    import datasets

    table = datasets.Dataset.from_list([dict(r) for r in rows])
    return table.cast_column("images", datasets.Sequence(datasets.Image()))
