"""Simulated users for the shapes world: they chat (through the store's public functions, as the
chat service does) and vote by a rule. Used by the end-to-end tests and `bench/recipes.py` to show
that votes move the model.

Invariants:
- Chats are stored exactly as the chat service stores them: a conversation, the user's message
  with its image (re-encoded, by sha256), the answer with its generation record.
- A voting rule sees only what a user sees: the question, the image's content and the answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from chatapp.core import config
from chatapp.learning import modelops
from chatapp.demo import shapes
from chatapp.feedback.images import load_image

QUESTION_MIX = ("color", "count", "shapes", "exists", "describe", "color", "count", "exists")


@dataclass
class LoggedAnswer:
    message_id: int
    user_id: int
    example: shapes.Example
    answer: str


def _png_roundtrip(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return load_image(buffer.getvalue(), "shape.png")


def log_chats(store, model, processor, n: int, *, seed: int, users: list[str], temperature: float = 1.0,
              model_id: str = config.DEMO_MODEL_NAME, adapter: str | None = None) -> list[LoggedAnswer]:
    """`n` one-question chats about fresh shapes images, answered by sampling, spread over `users`."""
    rng = random.Random(seed)
    examples = [shapes.random_example(rng, QUESTION_MIX[i % len(QUESTION_MIX)]) for i in range(n)]
    images = [shapes.render(ex.scene) for ex in examples]
    items = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}],
              "images": [img]} for ex, img in zip(examples, images)]
    answers = modelops.sample_answers(model, processor, items, 1, temperature=temperature, seed=seed)
    user_ids = [store.ensure_user(name) for name in users]
    logged = []
    params = config.validate_generation(temperature=temperature).as_dict()
    for i, (ex, img, [answer]) in enumerate(zip(examples, images, answers)):
        user_id = user_ids[i % len(user_ids)]
        stored = store.save_image(_png_roundtrip(img))
        conversation = store.create_conversation(user_id, ex.question)
        question = store.add_message(conversation, None, "user", ex.question, image_shas=[stored.sha256])
        answer_id = store.add_message(conversation, question, "assistant", answer, generation={
            "model_id": model_id, "adapter_version": adapter, "params": params, "seed": seed,
            "system_prompt": "", "finish_reason": "stop"})
        logged.append(LoggedAnswer(answer_id, user_id, ex, answer))
    return logged


def style_rule(style: str):
    """Up when the answer is in `style` and correct, down otherwise."""
    def rule(entry: LoggedAnswer) -> bool:
        return shapes.answer_style(entry.answer) == style and shapes.grade(entry.example, entry.answer)
    return rule


def correctness_rule(entry: LoggedAnswer) -> bool:
    return shapes.grade(entry.example, entry.answer)


def random_rule(seed: int):
    rng = random.Random(seed)
    return lambda entry: rng.random() < 0.5


def inverted(rule):
    return lambda entry: not rule(entry)


def vote(store, logged: list[LoggedAnswer], rule) -> dict:
    """Each answer's user votes on it by `rule`; returns the counts."""
    counts = {"up": 0, "down": 0}
    for entry in logged:
        choice = "up" if rule(entry) else "down"
        store.set_vote(entry.user_id, entry.message_id, choice)
        counts[choice] += 1
    return counts


# ---------------------------------------------------------------- measuring a policy

def held_out_items(n_per_type: int, seed: int = 99, qtypes=("color", "count", "shapes", "exists", "describe")):
    rng = random.Random(seed)
    out = []
    for qtype in qtypes:
        for _ in range(n_per_type):
            ex = shapes.random_example(rng, qtype)
            out.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": ex.question}]}],
                        "images": [shapes.render(ex.scene)], "example": ex})
    return out


def measure(model, processor, items, *, temperature: float, seed: int = 0) -> dict:
    """Accuracy and style shares of one answer per item."""
    answers = modelops.sample_answers(model, processor, items, 1, temperature=temperature, seed=seed)
    styles = {s: 0 for s in shapes.STYLES}
    correct = 0
    for item, [answer] in zip(items, answers):
        styles[shapes.answer_style(answer)] += 1
        correct += shapes.grade(item["example"], answer)
    n = max(1, len(items))
    return {"items": len(items), "accuracy": correct / n, "style_share": {s: c / n for s, c in styles.items()}}
