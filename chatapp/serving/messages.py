"""Conversations in the engine's one shape, and the rules for fitting them into a context.

Invariants:
- After `normalize_messages` every message's `content` is a list of parts: {"type": "text", "text": str}
  or {"type": "image", "image": PIL.Image}; only user messages hold images. Anything else is a
  ParameterError that says which message and why.
- `split_system` keeps at most one system message (an explicit system prompt replaces the
  conversation's own) and requires the conversation to end with a user message.
- Trimming removes whole exchanges from the oldest end: `oldest_turn_length` is the user turn plus
  the answers after it.
- An image detail reaches the processor only as `image_detail_kwargs`: "low" turns the processor's
  image splitting off (one frame at the vision encoder's size), "high" keeps the processor's own
  setting; "auto" must be resolved first (`resolve_image_detail`).
"""
from __future__ import annotations

import os

from chatapp.core import config
from chatapp.core.config import ParameterError


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Copy messages into the one shape the engine works with: content is a list of
    {"type": "text", "text": str} and {"type": "image", "image": PIL.Image} parts."""
    from PIL import Image

    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ParameterError(f"message {i}: role must be system, user or assistant, got {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ParameterError(f"message {i}: content must be text or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ParameterError(f"message {i}: a text part needs a string 'text'")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                image = part.get("image")
                if isinstance(image, (str, os.PathLike)):
                    with Image.open(image) as opened:
                        image = opened.convert("RGB")
                if not isinstance(image, Image.Image):
                    raise ParameterError(f"message {i}: an image part needs a PIL image or a file path")
                if role != "user":
                    raise ParameterError(f"message {i}: only user messages may hold images")
                parts.append({"type": "image", "image": image})
            else:
                raise ParameterError(f"message {i}: unknown part type {kind!r}")
        if not parts:
            raise ParameterError(f"message {i} is empty")
        out.append({"role": role, "content": parts})
    return out


def split_system(messages: list[dict], system_prompt: str | None) -> tuple[list[dict], list[dict]]:
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if system_prompt:
        system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    if len(system_prompt or "") > config.MAX_SYSTEM_PROMPT_CHARS:
        raise ParameterError(f"the system prompt is longer than {config.MAX_SYSTEM_PROMPT_CHARS} characters")
    if not turns or turns[-1]["role"] != "user":
        raise ParameterError("the conversation must end with a user message")
    return system[:1], turns


def oldest_turn_length(turns: list[dict]) -> int:
    """How many messages make up the oldest exchange: a user turn and the answers after it."""
    n = 1
    while n < len(turns) and turns[n]["role"] != "user":
        n += 1
    return n



def resolve_image_detail(requested: str, server_default: str, device_type: str) -> str:
    """"low" or "high" for a request's image detail: its own unless "auto", else the server's default
    unless that is "auto" too, else by device: low on a CPU (a SmolVLM image is 17 frames through the
    vision tower at high, ~40 s on 2 cores), high on an accelerator."""
    for detail in (requested, server_default):
        config.IMAGE_DETAIL.check(detail)  # ParameterError naming the choices
        if detail != "auto":
            return detail
    return "low" if device_type == "cpu" else "high"


def image_detail_kwargs(processor, detail: str) -> dict:
    """The processor call's arguments for a resolved image detail: Idefics3's `do_image_splitting`
    off for low, and the image resized straight to the encoder's frame (`max_image_size`) instead of
    first to the splitting size (2,048 px for SmolVLM) and then down to one frame: the same frame and
    tokens, pixels within 2/255, ~10x less preprocessing (95 ms -> 9 ms for a small image on this CPU,
    where it was a fifth of a `low` first turn). A processor that never splits images (no such
    setting) sees both details alike."""
    if detail not in ("low", "high"):
        raise ParameterError(f"image detail must be resolved to low or high before processing, got {detail!r}")
    image_processor = getattr(processor, "image_processor", None)
    if detail == "high" or not hasattr(image_processor, "do_image_splitting"):
        return {}
    frame = (getattr(image_processor, "max_image_size", None) or {}).get("longest_edge")
    return {"do_image_splitting": False, **({"size": {"longest_edge": frame}} if frame else {})}
