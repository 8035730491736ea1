"""Turn the feedback in a `Store` into TRL training rows (KTO, DPO, SFT).

Pure functions: they read the store passed in and nothing else (no files are opened, no gradio,
no torch), so the exporter and the trainer build exactly the same rows.

Invariants:
- A row holds exactly the columns its TRL trainer expects, in TRL's conversational format:
  KTO `images / prompt / completion / label`, DPO `images / prompt / chosen / rejected`,
  SFT `images / prompt / completion`. Where a row came from (message ids, users) is kept in a
  parallel list, `Rows.provenance[i]` for `Rows.rows[i]`, never in the row itself.
- A prompt is `store.context(message_id)` rebuilt for the chat template: each image part becomes a
  `{"type": "image"}` placeholder and its file path goes, in the same order, into `images` (absolute
  paths here; the exporter rewrites them). A non-empty system prompt becomes a leading system message;
  earlier assistant turns stay in the prompt as text.
- Every message part has the same keys, `type` and `text` (None for an image), so rows fit one
  Arrow schema (a struct column unifies its fields anyway; doing it here keeps the in-memory rows
  and the reloaded ones identical).
- A completion is the answer exactly as stored: the engine stores replies stripped, and the chat
  template renders an assistant turn as `Assistant: <text><end_of_utterance>\\n`, so TRL's completion
  (the rendered prompt+answer minus the rendered prompt, which ends in `Assistant:`) is
  `" " + text + "<end_of_utterance>\\n"`: the tokens generation produces. The text is stripped
  again here, so a stored leading space can never turn into two.
- A positive target (a liked KTO answer, a DPO `chosen`, an SFT answer) must be an answer the model
  ended itself: a reply cut off by max_new_tokens or the stop button never produced the
  end-of-utterance token that TRL appends, so it is skipped (and counted in `Rows.skipped`).
- Identical rows (same image files, prompt, completion(s) and label) are kept once, first seen wins;
  the provenance of the dropped copies is listed under `duplicates` of the kept one. Order is the
  store's order (vote id, preference id, comparison id), so the output is deterministic.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("kto", "dpo", "sft")
COLUMNS = {
    "kto": ("images", "prompt", "completion", "label"),
    "dpo": ("images", "prompt", "chosen", "rejected"),
    "sft": ("images", "prompt", "completion"),
}
# Finish reasons (generations.finish_reason) of a reply the model did not end itself.
CUT_OFF = ("length", "stopped", "cut_off")  # cut_off: still streaming, or the server died mid-answer
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass
class Rows:
    """The rows of one format, their provenance (parallel list) and why some feedback gave no row."""
    fmt: str
    rows: list[dict] = field(default_factory=list)
    provenance: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class _Skip(Exception):
    """This piece of feedback gives no row; the message is the reason counted in `Rows.skipped`."""


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part() -> dict:
    return {"type": "image", "text": None}


def assistant_message(text: str) -> list[dict]:
    """A conversational completion: one assistant message holding the answer text."""
    return [{"role": "assistant", "content": [text_part(text)]}]


def image_sha(path: str | Path) -> str:
    """The sha256 of an image file: the store names its files by it; otherwise hash the bytes."""
    path = Path(path)
    if _SHA.fullmatch(path.stem):
        return path.stem
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prompt_from_context(context: dict) -> tuple[list[dict], list[str]]:
    """(prompt messages with image placeholders, image paths in placeholder order) for one answer."""
    messages, images = [], []
    system = (context.get("system_prompt") or "").strip()
    if system:
        messages.append({"role": "system", "content": [text_part(system)]})
    for message in context["prompt"]:
        role = message["role"]
        if role not in ("user", "assistant", "system"):
            raise _Skip(f"unknown role {role!r} in the prompt")
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                if role != "user":
                    raise _Skip("an image outside a user message")
                content.append(image_part())
                images.append(str(part["path"]))
            elif part["type"] == "text":
                content.append(text_part(part["text"].strip() if role == "assistant" else part["text"]))
            else:
                raise _Skip(f"unknown part type {part['type']!r} in the prompt")
        if not content:
            raise _Skip("an empty message in the prompt")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise _Skip("the prompt does not end with a user message")
    return messages, images


def _answer(store, message_id: int, *, positive: bool) -> tuple[dict, str]:
    """(context, answer text) of an assistant message that can be a training target."""
    try:
        context = store.context(message_id)
    except KeyError:
        raise _Skip("the message no longer exists") from None
    if context["role"] != "assistant":
        raise _Skip("feedback on a message that is not an answer")
    text = (context["answer"] or "").strip()
    if not text:
        raise _Skip("an empty answer")
    if positive and (context.get("generation") or {}).get("finish_reason") in CUT_OFF:
        raise _Skip("a preferred answer that was cut off")
    return context, text


def _key(row: dict) -> str:
    """Identity of a row for de-duplication: image contents (sha) instead of paths, everything else as is."""
    keyed = dict(row, images=[image_sha(p) for p in row["images"]])
    return json.dumps(keyed, sort_keys=True, ensure_ascii=False)


def _add(out: Rows, seen: dict[str, int], row: dict, provenance: dict) -> None:
    key = _key(row)
    if key in seen:
        out.provenance[seen[key]]["duplicates"].append(provenance)
        out.skipped["duplicate row"] += 1
        return
    seen[key] = len(out.rows)
    out.rows.append(row)
    out.provenance.append(dict(provenance, duplicates=[]))


def kto_rows(store) -> Rows:
    """One row per current thumb on an answer: up -> label True, down -> label False."""
    out, seen = Rows("kto"), {}
    for vote in store.rated_messages():
        try:
            context, text = _answer(store, vote["message_id"], positive=vote["vote"] == "up")
            prompt, images = prompt_from_context(context)
        except _Skip as skip:
            out.skipped[str(skip)] += 1
            continue
        row = {"images": images, "prompt": prompt, "completion": assistant_message(text),
               "label": vote["vote"] == "up"}
        _add(out, seen, row, {"message_id": vote["message_id"], "user_id": vote["user_id"],
                              "user_name": vote["user_name"], "vote": vote["vote"],
                              "temperature": ((context.get("generation") or {}).get("params") or {}).get("temperature")})
    return out


def dpo_rows(store) -> Rows:
    """One row per (chosen, rejected) pair: a preferred regenerated sibling against each other
    sibling, and each comparison decided a or b (a tie or both-bad gives no pair)."""
    out, seen = Rows("dpo"), {}
    for pair in store.preference_pairs():
        try:
            chosen_msg, rejected_msg = store.message(pair["chosen_id"]), store.message(pair["rejected_id"])
            if chosen_msg is None or rejected_msg is None:
                raise _Skip("the message no longer exists")
            if chosen_msg["parent_id"] != rejected_msg["parent_id"] or chosen_msg["parent_id"] is None:
                raise _Skip("the two answers do not answer the same prompt")
            chosen_ctx, chosen = _answer(store, pair["chosen_id"], positive=True)
            rejected_ctx, rejected = _answer(store, pair["rejected_id"], positive=False)
            if chosen == rejected:
                raise _Skip("chosen and rejected answers are the same text")
            prompt, images = prompt_from_context(chosen_ctx)
            if (prompt, images) != prompt_from_context(rejected_ctx):
                # Same parent, so the same messages; only a differing system prompt can get here.
                raise _Skip("the two answers were generated with different system prompts")
        except _Skip as skip:
            out.skipped[str(skip)] += 1
            continue
        row = {"images": images, "prompt": prompt, "chosen": assistant_message(chosen),
               "rejected": assistant_message(rejected)}
        _add(out, seen, row, {"chosen_id": pair["chosen_id"], "rejected_id": pair["rejected_id"],
                              "user_id": pair["user_id"], "user_name": pair["user_name"],
                              "source": pair["source"]})
    return out


def sft_rows(store) -> Rows:
    """One row per liked answer (a current thumbs-up)."""
    out, seen = Rows("sft"), {}
    for vote in store.rated_messages():
        if vote["vote"] != "up":
            continue
        try:
            context, text = _answer(store, vote["message_id"], positive=True)
            prompt, images = prompt_from_context(context)
        except _Skip as skip:
            out.skipped[str(skip)] += 1
            continue
        row = {"images": images, "prompt": prompt, "completion": assistant_message(text)}
        _add(out, seen, row, {"message_id": vote["message_id"], "user_id": vote["user_id"],
                              "user_name": vote["user_name"]})
    return out


BUILDERS = {"kto": kto_rows, "dpo": dpo_rows, "sft": sft_rows}


def rows(store, fmt: str) -> Rows:
    if fmt not in BUILDERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return BUILDERS[fmt](store)


# ---------------------------------------------------------------- preparing a training run

HELD_OUT_FRACTION = 0.2
MAX_USER_SHARE = 0.3


def rated_id(provenance: dict) -> int:
    """The message a row is about: the rated answer (KTO, SFT) or the chosen one (DPO)."""
    return provenance.get("message_id") or provenance["chosen_id"]


def is_held_out(message_id: int, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Deterministic split by a hash of the rated message: the same message is always on the same side,
    whatever else is in the store, so training never sees the gate's rows."""
    digest = hashlib.sha256(f"chatapp-heldout:{message_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(rows_: Rows, fraction: float = HELD_OUT_FRACTION) -> tuple[Rows, Rows]:
    train, held = Rows(rows_.fmt, skipped=Counter(rows_.skipped)), Rows(rows_.fmt)
    for row, provenance in zip(rows_.rows, rows_.provenance):
        target = held if is_held_out(rated_id(provenance), fraction) else train
        target.rows.append(row)
        target.provenance.append(provenance)
    return train, held


def cap_per_user(rows_: Rows, max_share: float = MAX_USER_SHARE) -> Rows:
    """Keep at most `max_share` of the rows from any one user (their oldest rows first), so one user
    cannot dominate a run. The cap needs at least 1/max_share users to be satisfiable; with fewer (a
    single local user, say) the rows are kept as they are and `skipped` says the cap could not apply."""
    by_user: dict = {}
    for i, provenance in enumerate(rows_.provenance):
        by_user.setdefault(provenance.get("user_id"), []).append(i)
    out = Rows(rows_.fmt, skipped=Counter(rows_.skipped))
    quota = None
    for q in range(max((len(ix) for ix in by_user.values()), default=0), 0, -1):
        if q <= max_share * sum(min(len(ix), q) for ix in by_user.values()):
            quota = q
            break
    if quota is None:
        if rows_.rows:
            out.skipped[f"per-user cap of {max_share:.0%} not applied: only {len(by_user)} user(s)"] += 0
        out.rows, out.provenance = list(rows_.rows), list(rows_.provenance)
        return out
    keep = sorted(i for ix in by_user.values() for i in ix[:quota])
    for i in keep:
        out.rows.append(rows_.rows[i])
        out.provenance.append(rows_.provenance[i])
    if len(rows_.rows) - len(keep):
        out.skipped[f"over the per-user cap of {max_share:.0%}"] += len(rows_.rows) - len(keep)
    return out


def kto_weights(rows_: Rows) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) that balance the labels: the minority label is weighted
    up so that both sides contribute equally to the loss."""
    ups = sum(1 for row in rows_.rows if row["label"])
    downs = len(rows_.rows) - ups
    if not ups or not downs:
        return 1.0, 1.0
    if ups >= downs:
        return 1.0, ups / downs
    return downs / ups, 1.0


def sampling_temperature(rows_: Rows) -> float | None:
    """The temperature the rated answers were sampled at (the median of their generation records), or
    None when none was sampled (greedy answers, or no record)."""
    temperatures = sorted(t for p in rows_.provenance if isinstance(t := p.get("temperature"), (int, float)) and t > 0)
    return float(temperatures[len(temperatures) // 2]) if temperatures else None


def logged_prompts(store, exclude_message_ids: set[int] = frozenset(), limit: int | None = None) -> list[dict]:
    """Distinct prompts users sent that got an answer: {"prompt", "images", "answer_id"}, newest first.
    Prompts of excluded (held-out) answers are left out."""
    excluded_parents = {row["parent_id"] for row in (store.message(i) for i in exclude_message_ids) if row}
    out, seen = [], set()
    for row in store.newest_answers():
        if row["parent_id"] in excluded_parents:
            continue
        try:
            prompt, images = prompt_from_context(store.context(row["answer_id"]))
        except (_Skip, KeyError):
            continue
        key = json.dumps([prompt, [image_sha(p) for p in images]], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"prompt": prompt, "images": images, "answer_id": row["answer_id"]})
        if limit and len(out) >= limit:
            break
    return out
