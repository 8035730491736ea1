"""Batched model operations the trainer and the gate share: sampling answers and scoring them.

Invariants:
- Prompts are conversational messages (the chat template renders them) with images given
  separately as PIL images, in placeholder order: the same rows `prefs` builds and TRL trains on.
- `completion_logps` scores exactly the tokens generation produces after the prompt
  (`" " + answer + "<end_of_utterance>"`-style: the chat template's rendering of the answer minus
  the rendered prompt), so a sampled answer and a voted one are scored the same way.
- Items are batched by their number of images (a processor batch cannot mix), order is kept.
- Images are seen at the processor's image detail, which a run sets once (`use_image_detail`) to
  the detail its answers were generated at, for TRL's collators and these functions alike.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from chatapp.feedback.images import load_image
from chatapp.serving.messages import image_detail_kwargs


def use_image_detail(processor, detail: str) -> None:
    """Make every later call of `processor` see images at `detail` ("low" or "high"), as the engine's
    processor call did when the answers were generated (TRL's collators take no per-call arguments)."""
    for name, value in image_detail_kwargs(processor, detail).items():
        setattr(processor.image_processor, name, value)


def load_images(paths: list[str]) -> list:
    return [load_image(p) for p in paths]


# Prompt tokens per batch. A SmolVLM image is ~1,100 tokens (17 tiles through the vision tower), so
# a batch of 32 such prompts would need tens of GB on a CPU; the demo model's ~40-token prompts still
# fill whole batches. On a GPU a decode step of 3 rows costs about what one of 30 does (it waits on
# kernel launches, not arithmetic: an H200 sampled 3 answers to 1,140-token prompts in a ~9 s batch,
# docs/learning.md), so its batches hold 8 times more: ~5 GB of activations for SmolVLM-256M in bfloat16.
BATCH_TOKENS = 4096
BATCH_TOKENS_ACCELERATOR = 32768


def batch_tokens(device) -> int:
    """Prompt tokens one batch of sampling or scoring may hold on `device` (a torch.device or its name)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return BATCH_TOKENS if kind == "cpu" else BATCH_TOKENS_ACCELERATOR


def _groups(items: list, batch_size: int, processor=None, device="cpu"):
    """Index batches of items with the same number of images, at most `batch_size` each and, given
    the processor, at most `batch_tokens(device)` prompt tokens (measured on each group's first prompt)."""
    by_count: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_count.setdefault(len(item["images"]), []).append(i)
    for indexes in by_count.values():
        size = batch_size
        if processor is not None:
            first = items[indexes[0]]
            text = processor.apply_chat_template(first["prompt"], add_generation_prompt=True)
            tokens = _processor_batch(processor, [text], [first["images"]], "right")["input_ids"].shape[1]
            size = max(1, min(batch_size, batch_tokens(device) // tokens))
        for start in range(0, len(indexes), size):
            yield indexes[start:start + size]


def _processor_batch(processor, texts: list[str], images: list[list], padding_side: str):
    tokenizer = processor.tokenizer
    previous = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return processor(text=texts, images=images if images and images[0] else None, return_tensors="pt",
                         padding=True)
    finally:
        tokenizer.padding_side = previous


def _answer_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def prompt_token_counts(processor, prompts: list[str], fulls: list[str], full_lengths: torch.Tensor) -> torch.Tensor:
    """Tokens of each prompt as the processor expands it, from its full text's (`full_lengths`, images
    expanded): the answer's tokens are counted on the texts with their image placeholders unexpanded,
    so the images are preprocessed once (for the full texts), not twice: on a GPU that preprocessing,
    ~0.45 s a 17-frame image on the host, was most of a scoring pass (docs/learning.md). Exact where
    the answer's tokens do not depend on how the image placeholders before them expand, which holds
    for special image tokens (tests/test_trainer.py checks it against the prompt processed alone)."""
    tokenizer = processor.tokenizer
    answer = [len(full) - len(prompt) for full, prompt in zip(tokenizer(fulls)["input_ids"], tokenizer(prompts)["input_ids"])]
    return full_lengths - torch.tensor(answer, dtype=full_lengths.dtype)


@torch.inference_mode()
def completion_logps(model, processor, items: list[dict], batch_size: int = 32,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sum of log-probabilities of each item's `completion` text given its `prompt` and `images`
    (PIL images). Returns a float tensor in item order."""
    out = torch.zeros(len(items))
    template = processor.apply_chat_template
    for batch in _groups(items, batch_size, processor, model.device):
        prompts = [template(items[i]["prompt"], add_generation_prompt=True) for i in batch]
        fulls = [template(items[i]["prompt"] + [_answer_message(items[i]["completion"])]) for i in batch]
        images = [items[i]["images"] for i in batch]
        inputs = _processor_batch(processor, fulls, images, "right")
        prompt_lengths = prompt_token_counts(processor, prompts, fulls, inputs["attention_mask"].sum(dim=1))
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        # logits only from the position before the earliest completion token on: the prompt's
        # (an image is most of it) would be a (batch, ~1,100, vocabulary) tensor for nothing
        length = inputs["input_ids"].shape[1]
        start = int(prompt_lengths.min()) - 1
        logits = model(**inputs, logits_to_keep=length - start).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = inputs["input_ids"][:, start + 1:]
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        positions = torch.arange(start, length - 1, device=targets.device).unsqueeze(0)
        # position p predicts token p+1: completion tokens start at index prompt_length
        mask = (positions >= (prompt_lengths.to(targets.device).unsqueeze(1) - 1)) & \
            inputs["attention_mask"][:, start + 1:].bool()
        sums = (token_logps * mask).sum(dim=1).cpu()
        for j, i in enumerate(batch):
            out[i] = sums[j]
        if progress:
            progress(len(batch))
    return out


def token_counts(processor, texts: list[str]) -> torch.Tensor:
    """Tokens in each text (at least 1), as a float tensor: to turn summed log-probabilities into per-token ones."""
    ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return torch.tensor([max(1, len(row)) for row in ids], dtype=torch.float)


@torch.inference_mode()
def sample_answers(model, processor, items: list[dict], n: int, *, temperature: float = 1.0, top_k: int = 0,
                   max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[list[str]]:
    """`n` sampled answers (temperature 0: one greedy answer repeated) for each item's prompt."""
    answers: list[list[str]] = [[] for _ in items]
    tokenizer = processor.tokenizer
    end_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<end_of_utterance>",) if t in tokenizer.get_vocab()}
    greedy = temperature == 0
    repeats = 1 if greedy else n
    torch.manual_seed(seed)
    expanded = [i for i in range(len(items)) for _ in range(repeats)]
    flat = [items[i] for i in expanded]
    for batch in _groups(flat, batch_size, processor, model.device):
        prompts = [processor.apply_chat_template(flat[j]["prompt"], add_generation_prompt=True) for j in batch]
        inputs = _processor_batch(processor, prompts, [flat[j]["images"] for j in batch], "left")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": top_k}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   **kwargs)
        new = generated[:, inputs["input_ids"].shape[1]:]
        for j, ids in zip(batch, new.tolist()):
            cut = next((k for k, t in enumerate(ids) if t in end_ids), len(ids))
            answers[expanded[j]].append(tokenizer.decode(ids[:cut], skip_special_tokens=True).strip())
        if progress:
            progress(len(batch))
    if greedy:
        answers = [a * n for a in answers]
    return answers


@contextlib.contextmanager
def adapter(model, name: str | None):
    """Run with one named adapter of a PeftModel active, or with adapters disabled (name None)."""
    if name is None:
        with model.disable_adapter():
            yield model
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(previous)
