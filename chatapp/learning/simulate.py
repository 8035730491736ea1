"""Simulated users for the shapes world: they chat (through the store's public functions, as the
chat service does) and vote by a rule. Used by the end-to-end tests and `bench/recipes.py` to show
that votes move the model.

Invariants:
- Chats are stored exactly as the chat service stores them: a conversation, the user's message
  with its image (re-encoded, by sha256), the answer with its generation record.
- A voting rule sees only what a user sees: the question, the image's content and the answer.
- A judge (`JUDGES`: example, answer -> liked) is a simulated user's preference; the same function
  votes in the store and measures the held-out preference share (`measure`), so "before -> after"
  is the share of sampled answers that user would like.
- Pairs (`log_pairs`) are stored as the chat service stores them: a regenerated answer is a sibling
  under the same user message, a compare request two siblings with a comparison row; a user states
  a preference only when the judge tells the two answers apart.
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
    question_id: int = 0  # the user message it answers


def _png_roundtrip(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return load_image(buffer.getvalue(), "shape.png")


def _prompt_item(example: shapes.Example, image) -> dict:
    return {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}],
            "images": [image]}


def log_chats(store, model, processor, n: int, *, seed: int, users: list[str], temperature: float = 1.0,
              model_id: str = config.DEMO_MODEL_NAME, adapter: str | None = None,
              repeats: int = 1) -> list[LoggedAnswer]:
    """`n` one-question chats about fresh shapes images, answered by sampling, spread over `users`.
    With `repeats` > 1 each question (same image, same words) is asked in that many conversations,
    by different users, each answered by its own sample: n * repeats chats."""
    rng = random.Random(seed)
    examples = [shapes.random_example(rng, QUESTION_MIX[i % len(QUESTION_MIX)]) for i in range(n)]
    images = [shapes.render(ex.scene) for ex in examples]
    items = [_prompt_item(ex, img) for ex, img in zip(examples, images)]
    answers = modelops.sample_answers(model, processor, items, repeats, temperature=temperature, seed=seed)
    user_ids = [store.ensure_user(name) for name in users]
    logged = []
    params = config.validate_generation(temperature=temperature).as_dict()
    for i, (ex, img, group) in enumerate(zip(examples, images, answers)):
        stored = store.save_image(_png_roundtrip(img))
        for r, answer in enumerate(group):
            user_id = user_ids[(i + r) % len(user_ids)]
            conversation = store.create_conversation(user_id, ex.question)
            question = store.add_message(conversation, None, "user", ex.question, image_shas=[stored.sha256])
            answer_id = store.add_message(conversation, question, "assistant", answer,
                                          generation=_generation(model_id, adapter, params, seed))
            logged.append(LoggedAnswer(answer_id, user_id, ex, answer, question))
    return logged


def _generation(model_id, adapter, params, seed) -> dict:
    return {"model_id": model_id, "adapter_version": adapter, "params": params, "seed": seed,
            "system_prompt": "", "finish_reason": "stop"}


def log_pairs(store, model, processor, logged: list[LoggedAnswer], judge, *, seed: int, temperature: float = 1.0,
              model_id: str = config.DEMO_MODEL_NAME) -> dict:
    """For each logged chat, a second sampled answer to the same message; then every other chat is a
    regenerate (the user prefers the answer `judge` likes when it likes exactly one) and the rest are
    compare requests (picked a or b likewise, else "tie" when both are liked, "both_bad" when neither).
    Returns the counts of pairs stated by each route and of undecided ones."""
    items = [_prompt_item(e.example, shapes.render(e.example.scene)) for e in logged]
    seconds = modelops.sample_answers(model, processor, items, 1, temperature=temperature, seed=seed + 1)
    params = config.validate_generation(temperature=temperature).as_dict()
    counts = {"prefer": 0, "compare": 0, "undecided": 0}
    for i, (entry, [second]) in enumerate(zip(logged, seconds)):
        conversation = store.message(entry.message_id)["conversation_id"]
        second_id = store.add_message(conversation, entry.question_id, "assistant", second,
                                      generation=_generation(model_id, None, params, seed + 1))
        first_liked, second_liked = judge(entry.example, entry.answer), judge(entry.example, second)
        if i % 2 == 0:
            if first_liked != second_liked:
                store.prefer(entry.user_id, entry.message_id if first_liked else second_id)
                counts["prefer"] += 1
            else:
                counts["undecided"] += 1
            continue
        comparison = store.create_comparison(entry.user_id, entry.question_id, entry.message_id, second_id)
        if first_liked != second_liked:
            store.pick(comparison, "a" if first_liked else "b")
            counts["compare"] += 1
        else:
            store.pick(comparison, "tie" if first_liked else "both_bad")
            counts["undecided"] += 1
    return counts


def style_rule(style: str):
    """Up when the answer is in `style` and correct, down otherwise."""
    return judged(JUDGES[style])


# ---------------------------------------------------------------- preferences (judges)

SHORT_WORDS = 6  # "short": at most this many words (terse and most plain answers; no chatty one)
# a preference that is none of the three styles: the wanted style depends on the question
STYLE_BY_QUESTION = {"exists": "terse", "count": "terse", "color": "plain", "shapes": "chatty", "describe": "chatty"}


def _style_judge(style: str):
    return lambda example, answer: shapes.answer_style(answer) == style and shapes.grade(example, answer)


def short_and_correct(example: shapes.Example, answer: str) -> bool:
    """Two preferences at once: right, and at most SHORT_WORDS words."""
    return len(answer.split()) <= SHORT_WORDS and shapes.grade(example, answer)


def style_by_question(example: shapes.Example, answer: str) -> bool:
    """Right, in the style STYLE_BY_QUESTION wants for this kind of question (terse yes/no and counts,
    plain colours, chatty lists and descriptions): no single built-in style."""
    wanted = STYLE_BY_QUESTION.get(example.qtype)
    return wanted is not None and shapes.answer_style(answer) == wanted and shapes.grade(example, answer)


JUDGES = {**{style: _style_judge(style) for style in shapes.STYLES}, "short-correct": short_and_correct,
          "per-question": style_by_question, "correct": lambda example, answer: shapes.grade(example, answer)}


def judged(judge):
    """A voting rule from a judge."""
    return lambda entry: judge(entry.example, entry.answer)


def correctness_rule(entry: LoggedAnswer) -> bool:
    return shapes.grade(entry.example, entry.answer)


def noisy(rule, flip: float, seed: int):
    """`rule` with each vote flipped with probability `flip` (careless clicks)."""
    rng = random.Random(seed)
    return lambda entry: rule(entry) != (rng.random() < flip)


def against(rule, user_id: int):
    """`rule` for everyone but `user_id`, who votes the opposite of everyone else."""
    return lambda entry: rule(entry) != (entry.user_id == user_id)


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


def measure(model, processor, items, *, temperature: float, seed: int = 0, judge=None) -> dict:
    """Accuracy and style shares of one answer per item; with `judge`, also the share it likes
    ("preference")."""
    answers = modelops.sample_answers(model, processor, items, 1, temperature=temperature, seed=seed)
    styles = {s: 0 for s in shapes.STYLES}
    correct = liked = 0
    for item, [answer] in zip(items, answers):
        styles[shapes.answer_style(answer)] += 1
        correct += shapes.grade(item["example"], answer)
        liked += bool(judge and judge(item["example"], answer))
    n = max(1, len(items))
    out = {"items": len(items), "accuracy": correct / n, "style_share": {s: c / n for s, c in styles.items()}}
    if judge is not None:
        out["preference"] = liked / n
    return out
