"""How well a demo-family model answers: accuracy per question type on fresh held-out images.

Invariants:
- Held-out examples are seeded apart from training (a fixed offset on the seed), so the same
  seed gives the same examples, never ones the model was trained on by construction.
- Greedy at temperature 0 (no sampling arguments); otherwise sampled with a seed per batch.
- Grading is `shapes.grade`: the same rule the tests and the gate use.
"""
from __future__ import annotations

import random
from pathlib import Path

from chatapp.demo import shapes
from chatapp.demo.architecture import chat_messages


def held_out_examples(seed: int, per_type: int) -> list[tuple[shapes.Example, object]]:
    """Fresh examples (seeded apart from training) with their rendered images, style drawn evenly."""
    rng = random.Random(10_000_019 + seed)
    out = []
    for qtype in shapes.QUESTION_TYPES:
        for _ in range(per_type):
            ex = shapes.random_example(rng, qtype)
            out.append((ex, shapes.render(ex.scene) if ex.scene else None))
    return out


def generate_batch(model, processor, items, *, temperature: float = 0.0, max_new_tokens: int = 48,
                   seed: int = 0) -> list[str]:
    """Replies for (example, image) pairs, batched with left padding. Items in one call share image-or-not."""
    import torch

    prompts = [processor.apply_chat_template(chat_messages(ex), add_generation_prompt=True) for ex, _ in items]
    images = [[img] for _, img in items] if items[0][1] is not None else None
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    kwargs = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


def evaluate(model_dir: Path, per_type: int = 100, seed: int = 0, temperature: float = 0.0,
             batch_size: int = 50, progress: bool = True) -> dict:
    """Accuracy per question type and style shares, on freshly generated held-out images."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    items = held_out_examples(seed, per_type)
    results: dict[str, dict] = {}
    styles: dict[str, int] = {s: 0 for s in shapes.STYLES}
    failures = []
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for n, chunk in enumerate(tqdm(chunks, desc="evaluating", unit="batch", disable=not progress)):
        by_kind = [[it for it in chunk if it[1] is not None], [it for it in chunk if it[1] is None]]
        for group in by_kind:
            if not group:
                continue
            replies = generate_batch(model, processor, group, temperature=temperature, seed=seed + n)
            for (ex, _), reply in zip(group, replies):
                ok = shapes.grade(ex, reply)
                r = results.setdefault(ex.qtype, {"correct": 0, "total": 0})
                r["correct"] += ok
                r["total"] += 1
                styles[shapes.answer_style(reply)] += 1
                if not ok and len(failures) < 20:
                    failures.append({"question": ex.question, "expected": ex.answer, "reply": reply})
    for r in results.values():
        r["accuracy"] = r["correct"] / r["total"]
    total = sum(styles.values())
    return {"per_type": results, "style_share": {s: c / total for s, c in styles.items()},
            "overall": sum(r["correct"] for r in results.values()) / total, "failures": failures,
            "temperature": temperature, "items": total}
