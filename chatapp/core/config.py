"""Settings and limits, in one place.

Invariants:
- Each generation input (the sampling parameters, the image detail and the system prompt) is declared
  once, as a `GenerationParam` here: its type, default, bounds and label. `validate_generation()` (the only
  place sampling values are checked; the engine, the CLI and the web layer all call it),
  `GenerationParams`, the `ask` flags, the page's settings widgets and the API endpoints'
  parameters are all derived from these specs.
- Nothing here imports torch or gradio: both the web layer and the engine import this module.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, make_dataclass
from pathlib import Path

# Where things live. In a checkout (pyproject.toml beside the package) data goes to the checkout's
# data/ and the demo model is the committed data/demo-model/. Installed there is no project root:
# the demo model ships inside the package (chatapp/demo/weights, mapped from data/demo-model by
# pyproject.toml) and data goes to ./data under the current folder.
_ABOVE_PACKAGE = Path(__file__).resolve().parents[2]  # chatapp/core/config.py -> ../..
PROJECT_ROOT: Path | None = _ABOVE_PACKAGE if (_ABOVE_PACKAGE / "pyproject.toml").is_file() else None
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = (PROJECT_ROOT / "data" / "demo-model" if PROJECT_ROOT is not None
                  else Path(__file__).resolve().parents[1] / "demo" / "weights")
DATA_DIR_HELP = "$CHATAPP_DATA_DIR, else data/ in the project's checkout, or ./data when chatapp is installed"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860

# Generation inputs, each declared once.
@dataclass(frozen=True)
class GenerationParam:
    """One user-settable generation input. Bounds are inclusive (for text, of its length); a default
    of None makes the value optional (left out or empty: drawn at random)."""
    name: str
    kind: type  # float, int or str
    default: object
    low: float
    high: float
    label: str
    note: str = ""  # what a special value means, shown wherever the input is offered
    step: float = 1  # of the page's slider
    slider_high: float | None = None  # where the page's slider stops when the full range is too long to drag
    web: bool = True  # the page and the API offer it, not only the CLI
    choices: tuple[str, ...] = ()  # a text input that must be one of these (bounds unused)

    @property
    def optional(self) -> bool:
        return self.default is None

    @property
    def annotation(self):
        return self.kind | None if self.optional else self.kind

    def describe(self, default=...) -> str:
        """Bounds, special value and default in one line (CLI help, API docs); `default` overrides ours."""
        default = self.default if default is ... else default
        bounds = (f"one of {', '.join(self.choices)}" if self.choices else
                  f"at most {self.high} characters" if self.kind is str else f"{self.low} to {self.high}")
        return "; ".join(bit for bit in (bounds, self.note, "" if default in (None, "") else f"default {default}")
                         if bit)

    def check(self, value):
        """A sampling value as `kind` within bounds, else ParameterError naming the input, bounds and value."""
        if self.optional and (value is None or value == ""):
            return None
        if self.choices:
            if not isinstance(value, str) or value not in self.choices:
                raise ParameterError(f"{self.name} must be one of {', '.join(self.choices)}, got {_shown(value)}")
            return value
        return _number(self.name, value, self.kind, self.low, self.high)


TEMPERATURE = GenerationParam("temperature", float, 0.7, 0.0, 2.0, "Temperature", "0 = greedy", step=0.05)
TOP_K = GenerationParam("top_k", int, 50, 0, 1000, "Top-k", "0 = off", slider_high=200)
TOP_P = GenerationParam("top_p", float, 1.0, 0.01, 1.0, "Top-p", "1 = off", step=0.01)
MAX_NEW_TOKENS = GenerationParam("max_new_tokens", int, 256, 1, 2048, "Max new tokens", slider_high=1024)
# CLI only: the page and the API never offered it, and their parameter lists are a published contract.
REPETITION_PENALTY = GenerationParam("repetition_penalty", float, 1.0, 1.0, 2.0, "Repetition penalty", "1 = off",
                                     web=False)
SEED = GenerationParam("seed", int, None, 0, 2**32 - 1, "Seed", "empty = random")
# How finely images are seen (OpenAI's `detail`): low = one frame at the vision encoder's own size (64 tokens
# for SmolVLM), high = the processor's full splitting (SmolVLM: 4x4 frames plus a global one, 1,088 tokens),
# auto = the server's choice (`serve --image-detail`), else low on a CPU and high on a GPU. The engine
# resolves auto; the generation record stores what was used, since training rebuilds that prompt.
IMAGE_DETAIL = GenerationParam("image_detail", str, "auto", 0, 0, "Image detail",
                               "low = one frame, high = full splitting, auto = low on CPU, high on GPU",
                               choices=("low", "high", "auto"))
IMAGE_DETAIL_BEFORE_THE_SETTING = "high"  # what a generation record without image_detail was made with
SAMPLING_PARAMS = (TEMPERATURE, TOP_K, TOP_P, MAX_NEW_TOKENS, REPETITION_PENALTY, SEED,
                   IMAGE_DETAIL)  # GenerationParams' order
WEB_SAMPLING_PARAMS = tuple(param for param in SAMPLING_PARAMS if param.web)
SYSTEM_PROMPT = GenerationParam("system_prompt", str, "", 0, 2000, "System prompt")
# The bounds and defaults other modules name, read off the specs.
DEFAULT_TEMPERATURE, TEMPERATURE_MAX = TEMPERATURE.default, TEMPERATURE.high
DEFAULT_MAX_NEW_TOKENS = MAX_NEW_TOKENS.default
SEED_MAX = SEED.high
MAX_SYSTEM_PROMPT_CHARS = SYSTEM_PROMPT.high

# Request limits.
MAX_MESSAGE_CHARS = 4000
MAX_IMAGES_PER_MESSAGE = 4
MAX_CONVERSATION_MESSAGES = 200  # messages on one conversation's path; a new chat starts fresh
# An answer is saved as it streams, at most this often (and marked cut off until it ends), so a
# crash of the server loses at most this much of what the user was shown.
PARTIAL_ANSWER_SAVE_INTERVAL_S = 0.5
MAX_COMMENT_CHARS = 2000
MAX_TITLE_CHARS = 80
MAX_VERSION_CHARS = 32  # an adapter version name as typed ("v12", "live"); longer is no version
FEEDBACK_REASONS = ("wrong", "unhelpful", "too long", "unsafe", "other")  # a vote has each at most once

# Quotas: what one user or one request may make the server keep.
MAX_CONVERSATIONS_PER_USER = 1000
# Gradio's upload cache: every uploaded file (a request may carry many) is deleted this long after
# it arrived, checked this often; what users sent is kept in the store, re-encoded.
UPLOAD_CACHE_MAX_AGE_S = 3600
UPLOAD_CACHE_SWEEP_S = 300
STALE_TEMP_FILE_S = 600  # a `.tmp-*` file in the images folder this old was left by a failed write

# The serving cache (serving/cache.py): conversation KV caches and image features kept for
# follow-up turns, least recently used out first. A SmolVLM-256M-sized conversation costs ~46 KB per
# token in fp32 (~55 MB with one 17-frame image), its image features ~2.5 MB: 512 MiB holds about
# nine such conversations. 0 turns the cache off.
SERVING_CACHE_BYTES = 512 * 2**20

# Concurrent replies share the model (serving/batching.py): their decode steps run as one batch of
# at most MAX_BATCH_SIZE rows; more requests wait for a row. BATCHING = False serves one reply at a
# time (each holds the model for its whole length, through `generate()`).
BATCHING = True
MAX_BATCH_SIZE = 8
# Prompts that wait together are prefilled together, in one forward pass of at most
# PREFILL_TOGETHER_ROWS rows and PREFILL_TOGETHER_TOKENS prompt tokens, on an accelerator: there one
# prompt's pass waits on kernel launches, and eight cost about what one does. On a CPU they are
# prefilled one at a time (1): prefill is compute bound there, a group ends no sooner than its prompts
# one after another, and the first prompt would wait for the last.
PREFILL_TOGETHER_ROWS = MAX_BATCH_SIZE
PREFILL_TOGETHER_TOKENS = 16384

# Web server limits: waiting requests beyond QUEUE_MAX_SIZE are refused with "queue full";
# generation events run CHAT_CONCURRENCY at a time (as many as the engine batches: their decode
# steps share forward passes; with BATCHING off it generates one reply at a time, the rest wait for
# it), quick events (votes, lists) FEEDBACK_CONCURRENCY at a time.
QUEUE_MAX_SIZE = 64
CHAT_CONCURRENCY = MAX_BATCH_SIZE
FEEDBACK_CONCURRENCY = 8


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder for the database, images and adapters: argument, else $CHATAPP_DATA_DIR, else the
    checkout's data/, or ./data under the current folder when installed (see DATA_DIR_HELP)."""
    default = PROJECT_ROOT / "data" if PROJECT_ROOT is not None else Path.cwd() / "data"
    return Path(explicit or os.environ.get("CHATAPP_DATA_DIR") or default).resolve()


def requested_model(explicit: str | None = None) -> str | None:
    """The model the user named (argument, else $CHATAPP_MODEL), or None when they named none."""
    return explicit or os.environ.get("CHATAPP_MODEL") or None


class ParameterError(ValueError):
    """A user-supplied value is out of bounds; the message says which, the bounds and the value."""


def _is_greedy(params) -> bool:
    return params.temperature == 0


def _as_dict(params) -> dict:
    return asdict(params)


GenerationParams = make_dataclass(
    "GenerationParams", [(param.name, param.annotation, param.default) for param in SAMPLING_PARAMS], frozen=True,
    namespace={"__module__": __name__, "__doc__": "Sampling parameters, one field per SAMPLING_PARAMS spec.",
               "greedy": property(_is_greedy), "as_dict": _as_dict})


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(name: str, value, kind, low, high):
    # only numbers and the text of one: a bool, a list or a dict is a mistake, not a number
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterError(f"{name} must be a number between {low} and {high}, got {_shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ParameterError(f"{name} must be a number between {low} and {high}, got {_shown(value)}") from None
    if number != number or not low <= number <= high:  # NaN fails the first test, infinities the second
        raise ParameterError(f"{name} must be between {low} and {high}, got {_shown(value)}")
    if kind is int:
        if not number.is_integer():
            raise ParameterError(f"{name} must be a whole number between {low} and {high}, got {_shown(value)}")
        return int(value) if isinstance(value, int) else int(number)
    return number


def validate_generation(**values) -> GenerationParams:
    """The one place sampling values are checked: any of SAMPLING_PARAMS by name, the rest take their
    defaults. Raises ParameterError with a readable message; TypeError for a name that is none of them."""
    unknown = values.keys() - {param.name for param in SAMPLING_PARAMS}
    if unknown:
        raise TypeError(f"validate_generation() got unexpected parameters: {', '.join(sorted(unknown))}")
    return GenerationParams(**{param.name: param.check(values.get(param.name, param.default))
                               for param in SAMPLING_PARAMS})


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
