"""The shapes world: synthetic images, questions, answers in three styles, and a grader.

Invariants:
- Everything is a pure function of a `random.Random` passed in, so a seed reproduces the data.
- An image holds 1-3 filled, non-overlapping shapes on white; a (shape, color) pair appears
  at most once per image.
- Every answer template exists in each of `STYLES`, and `answer_style()` recovers the style
  from the text alone: chatty answers end with "!", plain answers open with a full-sentence
  opener (`PLAIN_OPENERS`), terse answers do neither. Later issues vote on styles, so this
  classification must stay exact for every template.
- `grade()` checks content, not style: the right colors / shapes / count / yes-no are named
  and no wrong one is.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
STYLES = ("terse", "plain", "chatty")
QUESTION_TYPES = ("color", "count", "shapes", "exists", "describe", "capabilities")
PLAIN_OPENERS = ("The ", "There ", "Yes, there", "No, there", "I ")
RADIUS = (7, 12)  # half-size of a shape in pixels of the 64 px canvas
SQUARE_HALF = 0.85  # a square's half side, in radii

RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: int  # centre
    y: int
    r: int  # half-size


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def sorted_shapes(self) -> list[Shape]:
        """Canonical order used by every answer: by shape kind, then color."""
        return sorted(self.shapes, key=lambda s: (SHAPES.index(s.kind), COLORS.index(s.color)))

    def colors_of(self, kind: str) -> list[str]:
        return [s.color for s in self.sorted_shapes() if s.kind == kind]

    def kinds(self) -> list[str]:
        return [k for k in SHAPES if any(s.kind == k for s in self.shapes)]

    def has(self, color: str, kind: str) -> bool:
        return any(s.kind == kind and s.color == color for s in self.shapes)


@dataclass(frozen=True)
class Example:
    """One question about a scene (or about the assistant when `scene` is None)."""
    qtype: str
    question: str
    answer: str
    style: str
    scene: Scene | None
    subject: tuple = ()  # e.g. ("circle",) or ("red", "circle"): what the question asks about


# ---------------------------------------------------------------- images

def random_scene(rng: random.Random, n_shapes: int | None = None) -> Scene:
    n = n_shapes or rng.randint(1, 3)
    placed: list[Shape] = []
    combos = [(k, c) for k in SHAPES for c in COLORS]
    rng.shuffle(combos)
    tries = 0
    while len(placed) < n:
        tries += 1
        if tries > 500:  # extremely unlikely; restart with a fresh layout
            return random_scene(rng, n)
        kind, color = combos[len(placed)]
        r = rng.randint(*RADIUS)
        x, y = rng.randint(r + 1, IMAGE_SIZE - r - 2), rng.randint(r + 1, IMAGE_SIZE - r - 2)
        if all((x - s.x) ** 2 + (y - s.y) ** 2 > (r + s.r + 3) ** 2 for s in placed):
            placed.append(Shape(kind, color, x, y, r))
    return Scene(tuple(placed))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw at 4x and downsample, so edges are anti-aliased like a real picture."""
    k = 4
    img = Image.new("RGB", (size * k, size * k), "white")
    draw = ImageDraw.Draw(img)
    scale = size * k / IMAGE_SIZE
    for s in scene.shapes:
        x, y, r, fill = s.x * scale, s.y * scale, s.r * scale, RGB[s.color]
        if s.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s.kind == "square":
            h = r * SQUARE_HALF
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------- language helpers

def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _kind_phrases(scene: Scene) -> list[str]:
    """'a circle', 'two squares' in canonical order."""
    out = []
    for kind in scene.kinds():
        n = sum(1 for s in scene.shapes if s.kind == kind)
        out.append(_a(kind) if n == 1 else f"{NUMBER_WORDS[n]} {PLURAL[kind]}")
    return out


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------- questions and answers

QUESTION_FORMS = {
    "color": ["What color is the {shape}?", "What colour is the {shape}?", "Which color is the {shape}?",
              "what color is the {shape}"],
    "count": ["How many shapes are there?", "How many shapes do you see?", "Count the shapes.",
              "how many shapes are there"],
    "shapes": ["What shapes do you see?", "Which shapes are in the image?", "What shapes are there?",
               "what shapes do you see"],
    "exists": ["Is there a {color} {shape}?", "Do you see a {color} {shape}?", "Is there a {color} {shape} in the image?",
               "is there a {color} {shape}"],
    "describe": ["Describe the image.", "What is in the image?", "Describe this picture.", "describe the image"],
    "capabilities": ["Hello!", "Hi", "What can you do?", "Who are you?", "Help", "hello", "what can you do"],
}


def answer(qtype: str, style: str, scene: Scene | None, subject: tuple = ()) -> str:
    """The reference answer for a question in one style."""
    if qtype == "capabilities":
        return {
            "terse": "Upload an image and ask about its shapes, colors or count.",
            "plain": "I can answer questions about the shapes, colors and count of shapes in an image you upload.",
            "chatty": "Hi there! Upload a picture and ask me about its shapes, their colors, how many there are, or to describe it!",
        }[style]
    assert scene is not None
    if qtype == "color":
        (kind,) = subject
        colors = scene.colors_of(kind)
        if not colors:
            return {"terse": f"No {kind}.", "plain": f"There is no {kind} in the image.",
                    "chatty": f"Hmm, I don't see any {kind} in this picture!"}[style]
        if len(colors) == 1:
            return {"terse": f"{_cap(colors[0])}.", "plain": f"The {kind} is {colors[0]}.",
                    "chatty": f"I can see {_a(kind)}, and it is {colors[0]}!"}[style]
        n = NUMBER_WORDS[len(colors)]
        return {"terse": f"{_cap(_join(colors))}.", "plain": f"The {PLURAL[kind]} are {_join(colors)}.",
                "chatty": f"I can see {n} {PLURAL[kind]}: {_join(colors)}!"}[style]
    if qtype == "count":
        n = len(scene.shapes)
        word = NUMBER_WORDS[n]
        if n == 1:
            return {"terse": "One.", "plain": "There is one shape.", "chatty": "I count just one shape in this picture!"}[style]
        return {"terse": f"{_cap(word)}.", "plain": f"There are {word} shapes.",
                "chatty": f"I count {word} shapes in this picture!"}[style]
    if qtype == "shapes":
        listed = _join(_kind_phrases(scene))
        return {"terse": f"{_cap(listed)}.", "plain": f"I see {listed}.",
                "chatty": f"Ooh, I can spot {listed} here!"}[style]
    if qtype == "exists":
        color, kind = subject
        if scene.has(color, kind):
            return {"terse": "Yes.", "plain": f"Yes, there is {_a(color)} {kind}.",
                    "chatty": f"Yes! I can spot {_a(color)} {kind} right there!"}[style]
        return {"terse": "No.", "plain": f"No, there is no {color} {kind}.",
                "chatty": f"Nope, I don't see any {color} {kind}, sorry!"}[style]
    if qtype == "describe":
        listed = _join([_a(f"{s.color} {s.kind}") for s in scene.sorted_shapes()])
        return {"terse": f"{_cap(listed)}.", "plain": f"The image shows {listed} on a white background.",
                "chatty": f"What a nice picture! I can see {listed} on a white background!"}[style]
    raise ValueError(f"unknown question type {qtype!r}")


def make_example(rng: random.Random, qtype: str, scene: Scene | None, style: str | None = None) -> Example:
    style = style or rng.choice(STYLES)
    form = rng.choice(QUESTION_FORMS[qtype])
    subject: tuple = ()
    if qtype == "color":
        # Mostly shapes that are present; sometimes an absent one, so "no circle" is learned too.
        present = scene.kinds()
        kind = rng.choice(present) if rng.random() < 0.85 or len(present) == 3 else rng.choice(
            [k for k in SHAPES if k not in present])
        subject = (kind,)
    elif qtype == "exists":
        if rng.random() < 0.5:
            s = rng.choice(scene.shapes)
            subject = (s.color, s.kind)
        else:
            # Hard negatives: the color or the shape is in the image, but not together.
            absent = [(c, k) for k in SHAPES for c in COLORS if not scene.has(c, k)]
            hard = [(c, k) for c, k in absent
                    if any(s.color == c or s.kind == k for s in scene.shapes)]
            subject = rng.choice(hard if hard and rng.random() < 0.8 else absent)
    question = form.format(shape=subject[-1] if subject else "", color=subject[0] if subject else "")
    return Example(qtype, question, answer(qtype, style, scene, subject), style, scene, subject)


def random_example(rng: random.Random, qtype: str | None = None, style: str | None = None) -> Example:
    qtype = qtype or rng.choice(QUESTION_TYPES)
    scene = None if qtype == "capabilities" else random_scene(rng)
    return make_example(rng, qtype, scene, style)


# ---------------------------------------------------------------- classify and grade

_WORD = re.compile(r"[a-z]+")


def answer_style(text: str) -> str:
    text = text.strip()
    if text.endswith("!") or "!" in text:
        return "chatty"
    if text.startswith(PLAIN_OPENERS):
        return "plain"
    return "terse"


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("colour", "color"))


def _singular(word: str) -> str:
    return {v: k for k, v in PLURAL.items()}.get(word, word)


def mentioned_pairs(text: str) -> list[tuple[str, str]]:
    """(color, shape) pairs written as '<color> <shape>' in the text."""
    words = [_singular(w) for w in _words(text)]
    return [(a, b) for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES]


def mentioned_kind_counts(text: str) -> dict[str, int]:
    """{'circle': 2, 'square': 1} from '... two circles and a square ...'."""
    words = _words(text)
    counts: dict[str, int] = {}
    for i, word in enumerate(words):
        kind = _singular(word)
        if kind in SHAPES:
            n = WORD_NUMBERS.get(words[i - 1], 1) if i else 1
            counts[kind] = counts.get(kind, 0) + n
    return counts


def grade(example: Example, reply: str) -> bool:
    """True when the reply names the right content and nothing wrong."""
    words = [_singular(w) for w in _words(reply)]
    colors = {w for w in words if w in COLORS}
    shapes = {w for w in words if w in SHAPES}
    scene, q = example.scene, example.qtype
    if q == "capabilities":
        return "shape" in " ".join(words) and ("image" in words or "picture" in words)
    if q == "color":
        expected = set(scene.colors_of(example.subject[0]))
        if not expected:
            return not colors and ("no" in words or "don" in words) and example.subject[0] in shapes
        return colors == expected
    if q == "count":
        counts = {WORD_NUMBERS[w] for w in words if w in WORD_NUMBERS}
        return counts == {len(scene.shapes)}
    if q == "shapes":
        return mentioned_kind_counts(reply) == {k: sum(1 for s in scene.shapes if s.kind == k) for k in scene.kinds()}
    if q == "exists":
        yes = any(w in ("yes",) for w in words)
        no = any(w in ("no", "nope") for w in words)
        return yes != no and yes == scene.has(*example.subject)
    if q == "describe":
        return sorted(mentioned_pairs(reply)) == sorted((s.color, s.kind) for s in scene.shapes) \
            and colors == {s.color for s in scene.shapes} and shapes == set(scene.kinds())
    raise ValueError(q)
