"""Settings and limits, in one place.

Invariants:
- Every bound on user-controlled generation input is a named constant here, checked only in
  `validate_generation()`; the engine, the CLI and the web page all call it.
- Nothing here imports torch or gradio: both the web layer and the engine import this module.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: chatapp/core/config.py -> ../..
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = PROJECT_ROOT / "data" / "demo-model"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_SYSTEM_PROMPT = ""

# Generation limits (inclusive).
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0
TOP_K_MIN, TOP_K_MAX = 0, 1000  # 0 = off
TOP_P_MIN, TOP_P_MAX = 0.01, 1.0  # 1.0 = off
MAX_NEW_TOKENS_MIN, MAX_NEW_TOKENS_MAX = 1, 2048
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 1.0, 2.0  # 1.0 = off
SEED_MIN, SEED_MAX = 0, 2**32 - 1
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_REPETITION_PENALTY = 1.0

# Request limits.
MAX_MESSAGE_CHARS = 4000
MAX_SYSTEM_PROMPT_CHARS = 2000
MAX_IMAGES_PER_MESSAGE = 4
MAX_CONVERSATION_MESSAGES = 200  # messages on one conversation's path; a new chat starts fresh
MAX_COMMENT_CHARS = 2000
MAX_TITLE_CHARS = 80
FEEDBACK_REASONS = ("wrong", "unhelpful", "too long", "unsafe", "other")

# Web server limits: waiting requests beyond QUEUE_MAX_SIZE are refused with "queue full";
# generation events run CHAT_CONCURRENCY at a time (the engine itself generates one reply at a
# time per model, the rest wait for it), quick events (votes, lists) FEEDBACK_CONCURRENCY at a time.
QUEUE_MAX_SIZE = 64
CHAT_CONCURRENCY = 4
FEEDBACK_CONCURRENCY = 8


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder for the database, images and adapters: argument, else $CHATAPP_DATA_DIR, else ./data."""
    return Path(explicit or os.environ.get("CHATAPP_DATA_DIR") or PROJECT_ROOT / "data").resolve()


def requested_model(explicit: str | None = None) -> str | None:
    """The model the user named (argument, else $CHATAPP_MODEL), or None when they named none."""
    return explicit or os.environ.get("CHATAPP_MODEL") or None


class ParameterError(ValueError):
    """A user-supplied value is out of bounds; the message says which, the bounds and the value."""


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


def _number(name: str, value, kind, low, high):
    if isinstance(value, bool) or value is None:
        raise ParameterError(f"{name} must be a number between {low} and {high}, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number between {low} and {high}, got {value!r}") from None
    if kind is int and float(value) != number:
        raise ParameterError(f"{name} must be a whole number between {low} and {high}, got {value!r}")
    if number != number or not low <= number <= high:  # NaN fails the first test
        raise ParameterError(f"{name} must be between {low} and {high}, got {value!r}")
    return number


def validate_generation(temperature=DEFAULT_TEMPERATURE, top_k=DEFAULT_TOP_K, top_p=DEFAULT_TOP_P,
                        max_new_tokens=DEFAULT_MAX_NEW_TOKENS, repetition_penalty=DEFAULT_REPETITION_PENALTY,
                        seed=None) -> GenerationParams:
    """The one place generation inputs are checked. Raises ParameterError with a readable message."""
    return GenerationParams(
        temperature=_number("temperature", temperature, float, TEMPERATURE_MIN, TEMPERATURE_MAX),
        top_k=_number("top_k", top_k, int, TOP_K_MIN, TOP_K_MAX),
        top_p=_number("top_p", top_p, float, TOP_P_MIN, TOP_P_MAX),
        max_new_tokens=_number("max_new_tokens", max_new_tokens, int, MAX_NEW_TOKENS_MIN, MAX_NEW_TOKENS_MAX),
        repetition_penalty=_number("repetition_penalty", repetition_penalty, float,
                                   REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX),
        seed=None if seed is None or seed == "" else _number("seed", seed, int, SEED_MIN, SEED_MAX),
    )


def sampling_kwargs(params: GenerationParams) -> dict:
    """`generate()` keyword arguments for these parameters. Greedy passes no sampling arguments at all,
    so transformers does not warn about flags it would ignore."""
    kwargs: dict = {"max_new_tokens": params.max_new_tokens}
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    return kwargs
