"""Checks of what users send, shared by the chat service's actions: ids, message texts, system
prompts, images, and the reasons and comment of a vote.

Invariants:
- Limits come from `config`; a refused input raises `RequestError` with a message for the user,
  before anything is stored.
- Images are loaded and checked (`images.load_image`) all at once, so a message whose third image
  is bad stores none of them.
- Never imports torch or gradio.
"""
from __future__ import annotations

from chatapp.core import config
from chatapp.core.errors import RequestError
from chatapp.feedback.images import load_image

VOTE_CHOICES = ("up", "down", "none")


def parse_id(value, what: str) -> int:
    """Ids arrive as ints, floats or strings from the page and the API."""
    if isinstance(value, bool) or value is None or value == "":
        raise RequestError(f"{what} is required")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise RequestError(f"{what} must be a number, got {value!r}") from None
    if number < 1:
        raise RequestError(f"{what} must be a positive number, got {value!r}")
    return number


def validate_text(text, *, allow_empty: bool = False) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise RequestError("the message must be text")
    text = text.strip()
    if not text and not allow_empty:
        raise RequestError("type a message or attach an image")
    if len(text) > config.MAX_MESSAGE_CHARS:
        raise RequestError(f"the message is {len(text)} characters long; the limit is {config.MAX_MESSAGE_CHARS}")
    return text


def validate_system_prompt(system_prompt) -> str:
    system_prompt = (system_prompt or "").strip()
    if not isinstance(system_prompt, str):
        raise RequestError("the system prompt must be text")
    if len(system_prompt) > config.MAX_SYSTEM_PROMPT_CHARS:
        raise RequestError(f"the system prompt is {len(system_prompt)} characters long; "
                           f"the limit is {config.MAX_SYSTEM_PROMPT_CHARS}")
    return system_prompt


def check_images(image_paths) -> list:
    """The images of one message as checked PIL images (empty entries skipped)."""
    image_paths = [p for p in (image_paths or []) if p]
    if len(image_paths) > config.MAX_IMAGES_PER_MESSAGE:
        raise RequestError(f"at most {config.MAX_IMAGES_PER_MESSAGE} images per message, got {len(image_paths)}")
    return [load_image(path) for path in image_paths]  # all checked before any is stored


def validate_vote(vote: str, reasons, comment) -> tuple[list[str], str]:
    """(reasons, stripped comment) of a vote ("none" takes the vote back and allows neither)."""
    if vote not in VOTE_CHOICES:
        raise RequestError(f"vote must be one of {', '.join(VOTE_CHOICES)}, got {vote!r}")
    reasons = list(reasons or [])
    unknown = [r for r in reasons if r not in config.FEEDBACK_REASONS]
    if unknown:
        raise RequestError(f"unknown reason(s) {unknown}; choose from {', '.join(config.FEEDBACK_REASONS)}")
    comment = comment or ""
    if not isinstance(comment, str):
        raise RequestError("the comment must be text")
    if len(comment) > config.MAX_COMMENT_CHARS:
        raise RequestError(f"the comment is {len(comment)} characters long; the limit is {config.MAX_COMMENT_CHARS}")
    if vote == "none" and (reasons or comment.strip()):
        raise RequestError("reasons and a comment need a vote (up or down)")
    return reasons, comment.strip()
