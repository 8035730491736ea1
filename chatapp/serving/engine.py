"""Load an image-text-to-text model and stream its replies.

Invariants:
- Never imports gradio. The web layer and the CLI call `Engine.stream()`; both get the same
  validation (`config.validate_generation`) and the same metadata.
- Any Hugging Face image-text-to-text model loads through `AutoModelForImageTextToText` +
  `AutoProcessor`, from a hub id or a local folder; the demo model takes the same path.
- One generation at a time per loaded model (`Engine._lock`); other callers wait their turn.
  The seed is set under that lock, so a seeded reply does not depend on other threads.
- Conversations reach the model's own chat template with `content` always a list of parts.
- When a conversation is longer than the context, the oldest turns go first; the system prompt
  and the newest user turn are always kept, and the reply's metadata says how many were dropped.
- A stop request ends generation within one token (a stopping criterion checked every step).
- Adapters: each generation answers from one adapter version (or the base), chosen when it
  starts and recorded in its metadata; `follow()` changes the default for generations that start
  later without waiting for the one streaming now (hot-swap), and never fails a request.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from chatapp.core import config
from chatapp.core.config import GenerationParams, ParameterError
from chatapp.core.errors import EngineError, ModelLoadError  # noqa: F401 (re-exported)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
MAX_LOADED_ADAPTERS = 8  # LoRA weights kept in memory for A/B and quick switches; the oldest go first
DEFAULT_ADAPTER = object()  # stream(adapter=...) default: the engine's current version


# ---------------------------------------------------------------- messages

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


def _split_system(messages: list[dict], system_prompt: str | None) -> tuple[list[dict], list[dict]]:
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if system_prompt:
        system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    if len(system_prompt or "") > config.MAX_SYSTEM_PROMPT_CHARS:
        raise ParameterError(f"the system prompt is longer than {config.MAX_SYSTEM_PROMPT_CHARS} characters")
    if not turns or turns[-1]["role"] != "user":
        raise ParameterError("the conversation must end with a user message")
    return system[:1], turns


def _oldest_turn_length(turns: list[dict]) -> int:
    """How many messages make up the oldest exchange: a user turn and the answers after it."""
    n = 1
    while n < len(turns) and turns[n]["role"] != "user":
        n += 1
    return n


# ---------------------------------------------------------------- stopping and streaming

def _seed_sampling(device, seed: int) -> None:
    """Seed the generator that sampling on `device` draws from. On the CPU only the CPU generator:
    torch.manual_seed also visits every accelerator backend, ~0.1-0.3 ms of each first token."""
    import torch

    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class StopSignal:
    """Set it (from any thread) to end a generation. It remembers how many tokens had been
    produced when it was set, so the one-token promise can be checked."""

    def __init__(self):
        self._event = threading.Event()
        self.produced = 0
        self.requested_at_token: int | None = None
        self._answers: dict = {}

    def set(self) -> None:
        if not self._event.is_set():
            self.requested_at_token = self.produced
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __call__(self, input_ids, scores, **kwargs):
        """generate() asks this after every token (as a stopping criterion): stop every row once set.
        The answer tensor is made once per value, not per token (this runs on every decode step)."""
        import torch

        value = self.is_set()
        cached = self._answers.get(value)
        if cached is None or cached.shape[0] != input_ids.shape[0] or cached.device != input_ids.device:
            cached = self._answers[value] = torch.full((input_ids.shape[0],), value, dtype=torch.bool,
                                                       device=input_ids.device)
        return cached


class _TokenQueue:
    """A transformers streamer that hands new token ids to the consuming thread.

    It wakes the consumer for the first token, for the end, and otherwise at most every
    `interval` seconds: waking another Python thread for every token of a fast model costs
    more than the token itself (measured: a third of the decode speed of the demo model), and
    every 20 ms still cost 2-4% of it (bench/generation.py); 50 ms is still smooth to read."""

    def __init__(self, signal: StopSignal, interval: float = 0.05):
        self.signal = signal
        self.interval = interval
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._pending: list[tuple[float, list[int]]] = []
        self._done = False
        self._prompt_seen = False
        self._notified_at: float | None = None

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        now = time.perf_counter()
        self.signal.produced += len(ids)
        with self._lock:
            self._pending.append((now, ids))
        if self._notified_at is None or now - self._notified_at >= self.interval:
            self._notified_at = now
            self._ready.set()
            time.sleep(0)  # hand the GIL to the consumer now, not after the 5 ms switch interval

    def end(self) -> None:
        with self._lock:
            self._done = True
        self._ready.set()

    def take(self) -> tuple[list[tuple[float, list[int]]], bool]:
        """Block until there is news; return the pending (time, ids) items and whether generation ended."""
        self._ready.wait()
        with self._lock:
            items, self._pending = self._pending, []
            self._ready.clear()
            return items, self._done


class _IncrementalDecoder:
    """Turns a growing list of token ids into text deltas in O(1) per token, holding back
    incomplete UTF-8 (the same windowing text-generation-inference uses)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        decode = lambda a, b: self.tokenizer.decode(self.ids[a:b], skip_special_tokens=True)  # noqa: E731
        prefix = decode(self.prefix_offset, self.read_offset) if self.read_offset > self.prefix_offset else ""
        text = decode(self.prefix_offset, len(self.ids))
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


@dataclass
class ReplyMeta:
    model_id: str
    adapter: str | None
    params: dict
    seed: int | None
    prompt_tokens: int
    reply_tokens: int
    time_to_first_token_s: float | None
    tokens_per_s: float | None
    total_s: float
    trimmed_messages: int
    finish_reason: str  # "stop" (end of utterance), "length" (max_new_tokens) or "stopped" (stop signal)
    stop_requested_at_token: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamEvent:
    """One step of a streamed reply: `delta` is the new text (may be empty while tokens do not yet
    make a whole character), `text` all of it so far, `tokens` the tokens generated so far.
    The last event has `done=True` and the reply's `meta`."""
    delta: str
    text: str
    tokens: int = 0
    done: bool = False
    meta: ReplyMeta | None = None
    token_times: list = field(default_factory=list)  # perf_counter() at which each new token was produced


@dataclass
class Reply:
    text: str
    meta: ReplyMeta
    events: int = field(default=0)


# ---------------------------------------------------------------- loading

def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if requested:
        if requested not in names:
            raise ParameterError(f"dtype must be one of {', '.join(names)}, got {requested!r}")
        return names[requested]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _quantization_config(quantization: str | None, device: str, dtype):
    if not quantization:
        return None
    if quantization not in ("4bit", "8bit"):
        raise ParameterError(f"quantization must be 4bit or 8bit, got {quantization!r}")
    if not device.startswith("cuda"):
        raise ModelLoadError(
            f"{quantization} loading needs a CUDA GPU and this process runs on {device}. bitsandbytes "
            "quantization is CUDA-only here: on CPU it is slower than float32 and LoRA training on it "
            "silently gets no gradients. Load the model without quantization on this machine.")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def resolve_model_path(name: str) -> str:
    """'demo' means the built-in demo model; an existing folder is used as is; anything else is a hub id."""
    if name == config.DEMO_MODEL_NAME:
        if not (config.DEMO_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(f"the demo model is missing from {config.DEMO_MODEL_DIR}; "
                                 "rebuild it with `python -m chatapp demo-model build`")
        return str(config.DEMO_MODEL_DIR)
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host does not resolve / connect quickly.
    Spares the user the hub client's ~25 s of retries on a machine without network."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


class Engine:
    def __init__(self, model, processor, model_id: str, *, max_context_tokens: int | None = None):
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.adapter: str | None = None  # the version answers come from unless a request names one; None = base
        self.adapter_source = None  # version -> folder, for versions a request names that are not loaded yet
        self._paths: dict[str, object] = {}
        self._last_used: dict[str, float] = {}
        self._peft = False  # becomes a PeftModel holding the loaded adapter versions on first use
        self._lock = threading.Lock()
        # Every generate() of this engine runs on this one thread. Two threads running torch ops
        # slow each other 2-3x on a 2-core machine (their OpenMP teams compete; measured), so the
        # web server's many request threads never run the model themselves.
        self.generation_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatapp-generate")
        text_config = getattr(model.config, "text_config", model.config)
        model_context = getattr(text_config, "max_position_embeddings", None) or 4096
        self.max_context_tokens = min(max_context_tokens or model_context, model_context)
        tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        if isinstance(end_of_utterance, int) and end_of_utterance != tokenizer.unk_token_id:
            self._eos_ids.add(end_of_utterance)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos_ids), 0)

    @property
    def device(self):
        return self.model.device

    # ------------------------------------------------------------ adapters

    def use_adapter(self, version: str | None, path=None) -> None:
        """Answer from adapter `version` by default (loaded from `path` now; None = the base model).
        Waits for the generation lock: an answer being streamed finishes on the adapter it started with."""
        with self._lock:
            if version is not None:
                self._paths[version] = path if path is not None else self._paths.get(version)
                self._select(version)
            self.adapter = version

    def follow(self, version: str | None, path=None) -> None:
        """Make `version` the default for answers that start from now on, without waiting: it is
        loaded (from `path`) by the first generation that uses it. This is the hot-swap."""
        if version is not None:
            self._paths[version] = path if path is not None else self._paths.get(version)
        self.adapter = version

    def _select(self, version: str | None) -> None:
        """Make peft answer from `version` (None: the base, with the adapters disabled at generation).
        Called with the generation lock held."""
        if version is None:
            return
        from peft import PeftModel

        path = self._paths.get(version)
        if not self._peft or version not in self.model.peft_config:
            if path is None and self.adapter_source is not None:
                path = self._paths[version] = self.adapter_source(version)
            if path is None:
                raise EngineError(f"adapter {version} is not loaded and no folder was given")
            if not self._peft:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version).eval()
                self._peft = True
            else:
                self.model.load_adapter(str(path), adapter_name=version)
        if self.model.active_adapter != version:
            self.model.set_adapter(version)
            self.model.eval()
        self._last_used[version] = time.monotonic()
        self._unload_extra(keep={version, self.adapter})

    def _unload_extra(self, keep: set) -> None:
        """Keep at most MAX_LOADED_ADAPTERS loaded: drop the least recently used (never the one
        selected or the default)."""
        loaded = [v for v in self.model.peft_config if v not in keep]
        excess = len(self.model.peft_config) - MAX_LOADED_ADAPTERS
        for version in sorted(loaded, key=lambda v: self._last_used.get(v, 0.0))[:max(0, excess)]:
            self.model.delete_adapter(version)
            self._last_used.pop(version, None)

    def loaded_adapters(self) -> list[str]:
        return sorted(self.model.peft_config) if self._peft else []

    def base_model(self):
        """The model without the peft wrapper (what adapters are fingerprinted against)."""
        return self.model.get_base_model() if self._peft else self.model

    @classmethod
    def load(cls, name: str, *, device: str | None = None, dtype: str | None = None,
             quantization: str | None = None, max_context_tokens: int | None = None) -> "Engine":
        """Load a model by hub id, local folder or 'demo'. Failures raise ModelLoadError with the reason."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = resolve_model_path(name)
        device = pick_device(device)
        torch_dtype = pick_dtype(device, dtype)
        quant = _quantization_config(quantization, device, torch_dtype)
        local = Path(path).exists()
        if not local and not HUB_ID.fullmatch(path):
            raise ModelLoadError(f"model {name!r} is neither a local folder nor a hub id like "
                                 f"'{config.DEFAULT_MODEL}'")
        # A hub model that is not cached, with no hub to reach, fails fast and says so.
        offline = not local and not hub_reachable()
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=offline)
            kwargs = {"dtype": torch_dtype, "local_files_only": offline}
            if quant is not None:
                kwargs.update(quantization_config=quant, device_map={"": device})
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        except Exception as error:  # any failure to load is the user's to act on: say which and why
            where = ("the local folder" if local else
                     "the local cache (the hub is unreachable or HF_HUB_OFFLINE is set)" if offline else "the hub")
            raise ModelLoadError(f"could not load model {name!r} from {where}: {str(error).splitlines()[0]}") from error
        if quant is None:
            model.to(device)
        model.eval()
        return cls(model, processor, model_id=name, max_context_tokens=max_context_tokens)

    # ------------------------------------------------------------ prompt

    def _encode(self, system: list[dict], turns: list[dict]):
        messages = system + turns
        template = [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image" else p
                                                    for p in m["content"]]} for m in messages]
        images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
        prompt = self.processor.apply_chat_template(template, add_generation_prompt=True)
        kwargs = {"images": [images]} if images else {}
        return self.processor(text=[prompt], return_tensors="pt", **kwargs)

    def prepare(self, messages: list[dict], params: GenerationParams, system_prompt: str | None = None):
        """Model inputs for the conversation, dropping the oldest turns until the prompt leaves room
        for the reply (max_new_tokens, but at most half the context). Returns (inputs, messages
        dropped, max_new_tokens that fit)."""
        system, turns = _split_system(normalize_messages(messages), system_prompt)
        reserve = min(params.max_new_tokens, self.max_context_tokens // 2)
        budget = self.max_context_tokens - reserve
        dropped = 0
        while True:
            inputs = self._encode(system, turns)
            length = inputs["input_ids"].shape[1]
            if length <= budget:
                return inputs, dropped, min(params.max_new_tokens, self.max_context_tokens - length)
            if len(turns) == 1:
                raise ParameterError(
                    f"the message needs {length} tokens and the model's context of {self.max_context_tokens} "
                    f"tokens leaves {budget} for it after room for the reply: shorten the message or the "
                    "system prompt, send fewer images, or lower max_new_tokens")
            n = _oldest_turn_length(turns)
            turns, dropped = turns[n:], dropped + n

    # ------------------------------------------------------------ generation

    def stream(self, messages: list[dict], params: GenerationParams | None = None, *,
               system_prompt: str | None = None, stop: StopSignal | None = None,
               generate_overrides: dict | None = None, adapter=DEFAULT_ADAPTER) -> Iterator[StreamEvent]:
        """Stream a reply to the conversation. Closing the iterator early stops the generation.
        `adapter`: the version to answer from (None = the base); by default the engine's current one,
        read when the generation starts. `generate_overrides` adds raw `generate()` arguments
        (benchmarks use it to fix the length)."""
        params = params or GenerationParams()
        stop = stop or StopSignal()
        with self._lock:
            started = time.perf_counter()
            version = self.adapter if adapter is DEFAULT_ADAPTER else adapter
            self._select(version)
            seed = params.seed if params.seed is not None else secrets.randbelow(config.SEED_MAX)
            streamer = _TokenQueue(stop)
            prepared: dict = {}

            def run():
                # The prompt is built here too, so every tensor op of a reply runs on the generation
                # thread (see generation_thread), as in the plain library call it is benchmarked against.
                import torch

                try:
                    inputs, prepared["dropped"], max_new_tokens = self.prepare(messages, params, system_prompt)
                    device = self.model.device
                    if device.type != "cpu":  # the processor's tensors are on the CPU already
                        inputs = inputs.to(device)
                    if "pixel_values" in inputs:
                        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                    prepared["prompt_tokens"] = int(inputs["input_ids"].shape[1])
                    kwargs = dict(inputs, **config.sampling_kwargs(params), streamer=streamer,
                                  stopping_criteria=[stop], pad_token_id=self._pad_id)
                    kwargs["max_new_tokens"] = max_new_tokens
                    kwargs.update(generate_overrides or {})
                    _seed_sampling(device, seed)
                    base_only = self.model.disable_adapter() if self._peft and version is None \
                        else contextlib.nullcontext()
                    with torch.inference_mode(), base_only:
                        self.model.generate(**kwargs)
                finally:
                    streamer.end()

            job = self.generation_thread.submit(run)
            decoder = _IncrementalDecoder(self.processor.tokenizer)
            text, count, first_at, last_at, last_id = "", 0, None, None, None
            completed = False
            try:
                done = False
                while not done:
                    items, done = streamer.take()
                    if not items:
                        continue
                    ids = [i for _, batch in items for i in batch]
                    first_at = first_at or items[0][0]
                    last_at, last_id = items[-1][0], ids[-1]
                    count += len(ids)
                    delta = decoder.push(ids)
                    if not text:  # replies start with a space after "Assistant:"
                        delta = delta.lstrip()
                    text += delta
                    yield StreamEvent(delta=delta, text=text, tokens=count,
                                      token_times=[t for t, batch in items for _ in batch])
                completed = True
            finally:
                if not completed:  # the consumer left early (closed generator): end generation now
                    stop.set()
                failure = job.exception()  # waits for generate() to return
            if isinstance(failure, ParameterError):  # the conversation does not fit: the user's to fix
                raise failure
            if failure is not None:
                raise EngineError(f"generation failed: {failure}") from failure
            finish = "stop" if last_id in self._eos_ids else "stopped" if stop.is_set() else "length"
            ended = time.perf_counter()
            decode_s = (last_at - first_at) if first_at and last_at else 0.0
            meta = ReplyMeta(
                model_id=self.model_id, adapter=version, params=params.as_dict(), seed=seed,
                prompt_tokens=prepared["prompt_tokens"], reply_tokens=count,
                time_to_first_token_s=(first_at - started) if first_at else None,
                tokens_per_s=((count - 1) / decode_s) if count > 1 and decode_s > 0 else None,
                total_s=ended - started, trimmed_messages=prepared["dropped"], finish_reason=finish,
                stop_requested_at_token=stop.requested_at_token,
            )
        yield StreamEvent(delta="", text=text.rstrip(), tokens=count, done=True, meta=meta)

    def generate(self, messages: list[dict], params: GenerationParams | None = None, **kwargs) -> Reply:
        """The whole reply at once (same path as `stream`)."""
        events = 0
        for event in self.stream(messages, params, **kwargs):
            events += 1
            if event.done:
                return Reply(text=event.text, meta=event.meta, events=events)
        raise EngineError("generation ended without a result")  # unreachable: stream always ends with done


# ---------------------------------------------------------------- model choice

@dataclass
class LoadResult:
    engine: Engine
    notice: str | None  # set when the default model could not be loaded and the demo model is used


def load_for_serving(requested: str | None, **kwargs) -> LoadResult:
    """The model the user asked for, or, when they named none, the default model; when the
    default cannot be loaded (no hub, not cached), the demo model with a plain notice.
    A model the user named that cannot be loaded is an error, never a silent fallback."""
    if requested:
        return LoadResult(Engine.load(requested, **kwargs), None)
    try:
        return LoadResult(Engine.load(config.DEFAULT_MODEL, **kwargs), None)
    except ModelLoadError as error:
        reason = str(error)
        notice = (f"{reason[0].upper()}{reason[1:].rstrip('.')}. Using the built-in demo model instead: a tiny "
                  "model that answers questions about images of colored shapes. Name a model with --model "
                  "or CHATAPP_MODEL.")
        return LoadResult(Engine.load(config.DEMO_MODEL_NAME, **kwargs), notice)
