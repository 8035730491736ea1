"""Checks of what users send, shared by the chat service's actions: ids, message texts, system
prompts, images, adapter version names, and the reasons and comment of a vote.

Invariants:
- Every value from a page or an API call is checked here for its type and bounds before it is
  used: an id is a whole number that SQLite can hold, a text is a `str` (not a number, a list or
  None where text is required) without lone surrogates, a list is a list of known strings.
- Limits come from `config`; a refused input raises `RequestError` with a message for the user,
  before anything is stored. Messages show at most a short excerpt of what was sent.
- Text is cleaned the same way everywhere (messages, system prompts, comments): control
  characters, ANSI escape sequences and bidirectional overrides are removed; newlines and tabs are
  kept (a carriage return becomes a newline).
- Images are loaded and checked (`images.load_image`) all at once, so a message whose third image
  is bad stores none of them.
- Never imports torch or gradio.
"""
from __future__ import annotations

import math
import re

from chatapp.core import config
from chatapp.core.errors import RequestError
from chatapp.feedback.images import load_image

VOTE_CHOICES = ("up", "down", "none")
SQLITE_INTEGER_MAX = 2**63 - 1  # ids beyond this cannot even be looked up
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 and C1 controls except tab and newline, DEL, and the invisible direction marks, embeddings,
# overrides and isolates that can make a text read differently from what it holds (U+202E).
_UNWANTED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(value, limit: int = 40) -> str:
    """A short repr of what the user sent, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_id(value, what: str) -> int:
    """Ids arrive as ints, whole floats or digit strings from the page and the API."""
    if value is None or value == "":
        raise RequestError(f"{what} is required")
    if isinstance(value, bool):
        raise RequestError(f"{what} must be a number, got {shown(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise RequestError(f"{what} must be a whole number, got {shown(value)}")
        number = int(value)
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        number = int(value)
    else:
        raise RequestError(f"{what} must be a number, got {shown(value)}")
    if number < 1:
        raise RequestError(f"{what} must be a positive number, got {shown(value)}")
    if number > SQLITE_INTEGER_MAX:
        raise RequestError(f"{what} {shown(value)} is too large to be an id")
    return number


def clean_text(text, what: str) -> str:
    """`text` as stored: a str without lone surrogates, with unwanted control characters removed."""
    if not isinstance(text, str):
        raise RequestError(f"{what} must be text, got {type(text).__name__}")
    if _SURROGATE.search(text):
        raise RequestError(f"{what} holds an invalid character (a lone surrogate); send UTF-8 text")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _UNWANTED.sub("", _ANSI_ESCAPE.sub("", text))


def validate_text(text, *, allow_empty: bool = False) -> str:
    text = clean_text("" if text is None else text, "the message").strip()
    if not text and not allow_empty:
        raise RequestError("type a message or attach an image")
    if len(text) > config.MAX_MESSAGE_CHARS:
        raise RequestError(f"the message is {len(text)} characters long; the limit is {config.MAX_MESSAGE_CHARS}")
    return text


def validate_system_prompt(system_prompt) -> str:
    system_prompt = clean_text("" if system_prompt is None else system_prompt, "the system prompt").strip()
    if len(system_prompt) > config.MAX_SYSTEM_PROMPT_CHARS:
        raise RequestError(f"the system prompt is {len(system_prompt)} characters long; "
                           f"the limit is {config.MAX_SYSTEM_PROMPT_CHARS}")
    return system_prompt


def validate_choice(value, choices, what: str) -> str:
    """One of `choices` (strings), else a RequestError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise RequestError(f"{what} must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def parse_flag(value, what: str) -> bool:
    """A yes/no input: a JSON boolean, or the text "true"/"false" (never bool() of a string)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(f"{what} must be true or false, got {shown(value)}")


def validate_version(version) -> str:
    """An adapter version name as typed ('v3', 'live', 'base'), bounded before any file is named by it."""
    if version is None:
        return ""
    if not isinstance(version, str):
        raise RequestError(f"a version must be text such as v3, live or base, got {type(version).__name__}")
    version = clean_text(version, "the version").strip()
    if len(version) > config.MAX_VERSION_CHARS:
        raise RequestError(f"no such version: version names are at most {config.MAX_VERSION_CHARS} characters "
                           f"(such as v3, live or base)")
    return version


def check_images(image_paths) -> list:
    """The images of one message as checked PIL images (empty entries skipped)."""
    if image_paths is None:
        image_paths = []
    if not isinstance(image_paths, (list, tuple)):
        raise RequestError("images must be a list of uploaded files")
    image_paths = [p for p in image_paths if p]
    if len(image_paths) > config.MAX_IMAGES_PER_MESSAGE:
        raise RequestError(f"at most {config.MAX_IMAGES_PER_MESSAGE} images per message, got {len(image_paths)}")
    return [load_image(path) for path in image_paths]  # all checked before any is stored


def validate_reasons(reasons) -> list[str]:
    """Known reasons, each once, in the order given (a list; None or empty: none)."""
    if reasons is None or reasons == "":
        return []
    if not isinstance(reasons, (list, tuple)):
        raise RequestError(f"reasons must be a list chosen from {', '.join(config.FEEDBACK_REASONS)}, "
                           f"got {type(reasons).__name__}")
    if len(reasons) > len(config.FEEDBACK_REASONS):
        raise RequestError(f"at most {len(config.FEEDBACK_REASONS)} reasons, got {len(reasons)}")
    unknown = [r for r in reasons if not isinstance(r, str) or r not in config.FEEDBACK_REASONS]
    if unknown:
        raise RequestError(f"unknown reason(s) {shown(unknown, 80)}; choose from {', '.join(config.FEEDBACK_REASONS)}")
    return list(dict.fromkeys(reasons))


def validate_vote(vote: str, reasons, comment) -> tuple[list[str], str]:
    """(reasons, stripped comment) of a vote ("none" takes the vote back and allows neither)."""
    vote = validate_choice(vote, VOTE_CHOICES, "vote")
    reasons = validate_reasons(reasons)
    comment = clean_text("" if comment is None else comment, "the comment")
    if len(comment) > config.MAX_COMMENT_CHARS:
        raise RequestError(f"the comment is {len(comment)} characters long; the limit is {config.MAX_COMMENT_CHARS}")
    if vote == "none" and (reasons or comment.strip()):
        raise RequestError("reasons and a comment need a vote (up or down)")
    return reasons, comment.strip()
