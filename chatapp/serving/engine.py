"""Load an image-text-to-text model and stream its replies: the in-process backend (`backend.ChatBackend`;
`openai_backend` is the other one).

Invariants:
- Never imports gradio. The web layer and the CLI call `Engine.stream()`; both get the same
  validation (`config.validate_generation`) and the same metadata.
- Models load through `loading.load_model` (any Hugging Face image-text-to-text model, from a hub
  id, a local folder or 'demo'); conversations are checked and trimmed by `messages`, tokens
  handed over and stopped by `streaming`.
- One generation at a time per loaded model (`Engine._lock`); other callers wait their turn.
  The seed is set under that lock, so a seeded reply does not depend on other threads.
- Conversations reach the model's own chat template with `content` always a list of parts.
- When a conversation is longer than the context, the oldest turns go first; the system prompt
  and the newest user turn are always kept, and the reply's metadata says how many were dropped.
- A stop request ends generation within one token (a stopping criterion checked every step).
- A reply starts from the longest prefix of its prompt that the same adapter version computed
  before (`self.cache`, serving/cache.py: KV caches and image features under a byte budget);
  greedy output is the same as with `self.cache = None`, where every prompt is computed whole.
- Adapters: each generation answers from one adapter version (or the base), chosen when it
  starts and recorded in its metadata; `follow()` changes the default for generations that start
  later without waiting for the one streaming now (hot-swap), and never fails a request: a followed
  version peft cannot load is tried once, recorded in `adapter_errors`, and the engine keeps answering
  from the last default version that loaded.
- Images are seen at one detail per reply (`resolved`): the request's, else the server's default
  (`self.image_detail`, `serve --image-detail`), else low on a CPU and high on an accelerator; the
  reply's metadata records the resolved value, and the serving cache keys image features on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from chatapp.core import config
from chatapp.core.config import GenerationParams, ParameterError
from chatapp.core.errors import EngineError, ModelLoadError  # noqa: F401 (re-exported)
from chatapp.serving.backend import AdapterLoadError  # noqa: F401 (re-exported: peft refused a version)
from chatapp.serving.cache import ServingCache, plan as plan_cached
from chatapp.serving.loading import load_model
from chatapp.serving.messages import (image_detail_kwargs, normalize_messages, oldest_turn_length,
                                      resolve_image_detail, split_system)
from chatapp.serving.streaming import (IncrementalDecoder, Reply, ReplyMeta, StopSignal, StreamEvent, TokenQueue,
                                       seed_sampling)


MAX_LOADED_ADAPTERS = 8  # LoRA weights kept in memory for A/B and quick switches; the oldest go first
DEFAULT_ADAPTER = object()  # stream(adapter=...) default: the engine's current version


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
        # Versions peft could not load, with the reason: never tried again (a published version never
        # changes), and the hot-swap follower reports them instead of switching to them.
        self.adapter_errors: dict[str, str] = {}
        self._loaded_default: str | None = None  # the last default version that loaded: where a failed switch falls back
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
        self.cache = ServingCache(config.SERVING_CACHE_BYTES)  # None: every reply computes its whole prompt
        self.image_detail = config.IMAGE_DETAIL.default  # what a request's "auto" means here ("auto": by device)
        self._prompt_images: list = []  # the images of the prompt prepare() built last, in order

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
            self.adapter = self._loaded_default = version

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
        if version in self.adapter_errors:
            raise AdapterLoadError(f"adapter {version} cannot be loaded: {self.adapter_errors[version]}")
        path = self._paths.get(version)
        if not self._peft or version not in self.model.peft_config:
            if path is None and self.adapter_source is not None:
                path = self._paths[version] = self.adapter_source(version)
            if path is None:
                raise EngineError(f"adapter {version} is not loaded and no folder was given")
            self._load_adapter(version, path)
        if self.model.active_adapter != version:
            self.model.set_adapter(version)
            self.model.eval()
        self._last_used[version] = time.monotonic()
        self._unload_extra(keep={version, self.adapter, self._loaded_default})

    def _load_adapter(self, version: str, path) -> None:
        """Load a validated version folder into peft. A folder peft refuses (e.g. target modules the base
        does not have) leaves the model as it was; the reason is kept in `adapter_errors`, named by
        version (never by the folder's absolute path)."""
        from peft import PeftModel

        try:
            if not self._peft:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version).eval()
                self._peft = True
            else:
                self.model.load_adapter(str(path), adapter_name=version)
        except Exception as error:  # peft and safetensors raise many kinds; all mean "not this version"
            reason = (str(error) or type(error).__name__).replace(str(path), version).strip()
            self.adapter_errors[version] = reason
            self._paths.pop(version, None)
            raise AdapterLoadError(f"adapter {version} cannot be loaded: {reason}") from None

    def _select_for_request(self, version: str | None, named: bool) -> str | None:
        """Select the version a generation answers from and return it. The engine's default version
        (named=False) that fails to load is dropped for the last default that loaded, so a broken
        version never fails a chat; a version the request named fails the request."""
        try:
            self._select(version)
        except AdapterLoadError:
            if named:
                raise
            fallback = self._loaded_default if self._loaded_default != version else None
            if self.adapter == version:  # unless a newer version was followed meanwhile
                self.adapter = fallback
            version = fallback
            self._select(version)
        if not named:
            self._loaded_default = version
        return version

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
        model, processor = load_model(name, device=device, dtype=dtype, quantization=quantization)
        return cls(model, processor, model_id=name, max_context_tokens=max_context_tokens)

    # ------------------------------------------------------------ prompt

    def resolved(self, params: GenerationParams) -> GenerationParams:
        """`params` with the image detail resolved to low or high (see the module's invariants)."""
        detail = resolve_image_detail(params.image_detail, self.image_detail, self.model.device.type)
        return params if detail == params.image_detail else dataclasses.replace(params, image_detail=detail)

    def _encode(self, system: list[dict], turns: list[dict], image_detail: str = "high"):
        messages = system + turns
        template = [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image" else p
                                                    for p in m["content"]]} for m in messages]
        images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
        prompt = self.processor.apply_chat_template(template, add_generation_prompt=True)
        kwargs = {"images": [images]} if images else {}
        self._prompt_images = images
        if images:
            kwargs.update(image_detail_kwargs(self.processor, image_detail))
        return self.processor(text=[prompt], return_tensors="pt", **kwargs)

    def prepare(self, messages: list[dict], params: GenerationParams, system_prompt: str | None = None):
        """Model inputs for the conversation, dropping the oldest turns until the prompt leaves room
        for the reply (max_new_tokens, but at most half the context). Returns (inputs, messages
        dropped, max_new_tokens that fit)."""
        system, turns = split_system(normalize_messages(messages), system_prompt)
        reserve = min(params.max_new_tokens, self.max_context_tokens // 2)
        budget = self.max_context_tokens - reserve
        dropped = 0
        while True:
            inputs = self._encode(system, turns, self.resolved(params).image_detail)
            length = inputs["input_ids"].shape[1]
            if length <= budget:
                return inputs, dropped, min(params.max_new_tokens, self.max_context_tokens - length)
            if len(turns) == 1:
                raise ParameterError(
                    f"the message needs {length} tokens and the model's context of {self.max_context_tokens} "
                    f"tokens leaves {budget} for it after room for the reply: shorten the message or the "
                    "system prompt, send fewer images, or lower max_new_tokens")
            n = oldest_turn_length(turns)
            turns, dropped = turns[n:], dropped + n

    # ------------------------------------------------------------ generation

    def stream(self, messages: list[dict], params: GenerationParams | None = None, *,
               system_prompt: str | None = None, stop: StopSignal | None = None,
               generate_overrides: dict | None = None, adapter=DEFAULT_ADAPTER) -> Iterator[StreamEvent]:
        """Stream a reply to the conversation. Closing the iterator early stops the generation.
        `adapter`: the version to answer from (None = the base); by default the engine's current one,
        read when the generation starts. `generate_overrides` adds raw `generate()` arguments
        (benchmarks use it to fix the length)."""
        params = self.resolved(params or GenerationParams())
        stop = stop or StopSignal()
        with self._lock:
            started = time.perf_counter()
            version = self.adapter if adapter is DEFAULT_ADAPTER else adapter
            # a request naming the default version (as the chat service does) may fall back like the default
            version = self._select_for_request(version, named=version != self.adapter)
            seed = params.seed if params.seed is not None else secrets.randbelow(config.SEED_MAX)
            streamer = TokenQueue(stop)
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
                    prepared["images"] = len(self._prompt_images)
                    kwargs = dict(inputs, **config.sampling_kwargs(params), streamer=streamer,
                                  stopping_criteria=[stop], pad_token_id=self._pad_id)
                    kwargs["max_new_tokens"] = max_new_tokens
                    kwargs.update(generate_overrides or {})
                    seed_sampling(device, seed)
                    base_only = self.model.disable_adapter() if self._peft and version is None \
                        else contextlib.nullcontext()
                    with torch.inference_mode(), base_only:
                        # The same prompt, from the longest prefix this adapter version (named and where
                        # it was loaded from) computed before.
                        weights = (version, str(self._paths.get(version)) if version is not None else None)
                        cached = self.cache is not None and plan_cached(self.cache, self.model, self.processor, inputs,
                                                                        self._prompt_images, weights,
                                                                        image_detail=params.image_detail)
                        if cached:
                            kwargs = {k: v for k, v in kwargs.items() if k not in inputs} | cached.kwargs
                        output = self.model.generate(**kwargs)
                    if cached:
                        cached.finish(output)
                finally:
                    streamer.end()

            job = self.generation_thread.submit(run)
            decoder = IncrementalDecoder(self.processor.tokenizer)
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
                stop_requested_at_token=stop.requested_at_token, images=prepared.get("images", 0),
            )
        yield StreamEvent(delta="", text=text.rstrip(), tokens=count, done=True, meta=meta)

    def generate(self, messages: list[dict], params: GenerationParams | None = None, **kwargs) -> Reply:
        """The whole reply at once (same path as `stream`)."""
        return Reply.collect(self.stream(messages, params, **kwargs), EngineError("generation ended without a result"))


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
