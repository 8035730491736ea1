"""Load an image-text-to-text model and stream its replies: the in-process backend (`backend.ChatBackend`;
`openai_backend` is the other one).

Invariants:
- Never imports gradio. The web layer and the CLI call `Engine.stream()`; both get the same
  validation (`config.validate_generation`) and the same metadata.
- Models load through `loading.load_model` (any Hugging Face image-text-to-text model, from a hub
  id, a local folder or 'demo'); conversations are checked and trimmed by `messages`, tokens
  handed over and stopped by `streaming`.
- Concurrent replies share the model (`self.batching`, default `config.BATCHING`): their decode
  steps run in one batch (serving/batching.py, at most `self.batcher.max_batch_size` rows, later
  requests wait); each reply keeps its adapter version, sampling settings and seed (its own
  torch.Generator), and greedy replies are those generated alone up to float reassociation (see
  batching.py). With `batching` False (or a reply batching.py cannot batch: another cache than
  full attention, generation-config processors it does not apply, generate() overrides other than
  min_new_tokens) a generation runs through generate(), holding `Engine._lock` for the whole
  reply, batched steps waiting meanwhile; the seed is set under that lock, so a seeded reply does
  not depend on other threads. `batching` can be switched at any time; it applies to replies that
  start later.
- `Engine._lock` guards the model: adapters load under it, and batched steps each take it.
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
from chatapp.serving.batching import Batcher, Request, cache_batchable
from chatapp.serving.prefill import Prefill
from chatapp.serving.cache import ServingCache, plan as plan_cached
from chatapp.serving.loading import load_model
from chatapp.serving.messages import (image_detail_kwargs, normalize_messages, oldest_turn_length,
                                      resolve_image_detail, split_system)
from chatapp.serving.row_sampling import settings_batchable
from chatapp.serving.streaming import Reply, StopSignal, StreamEvent, TokenQueue, relay, seed_sampling


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
        # where a reply that cannot be batched runs while the batcher's loop holds generation_thread
        # (the loop waits for the model lock meanwhile: one of the two runs torch ops at a time)
        self._side_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatapp-generate-side")
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
        generation_eos = model.generation_config.eos_token_id  # where generate() stops; batched rows stop alike
        self.batcher = Batcher(lambda: self.model, self._lock, self.generation_thread,
                               list(generation_eos) if isinstance(generation_eos, list)
                               else [generation_eos] if generation_eos is not None else [],
                               pad_id=self._pad_id,
                               prefill_rows=config.PREFILL_TOGETHER_ROWS if model.device.type != "cpu" else 1)
        self.batching = config.BATCHING  # False: one reply at a time, through generate()
        self._cache_batchable = cache_batchable(model)

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
        # never a version a batched reply is answering from (a hot-swap leaves those running)
        self._unload_extra(keep={version, self.adapter, self._loaded_default} | self.batcher.versions_in_use())

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
             quantization: str | None = None, max_context_tokens: int | None = None,
             vision_dtype: str | None = None) -> "Engine":
        """Load a model by hub id, local folder or 'demo'. Failures raise ModelLoadError with the reason."""
        model, processor = load_model(name, device=device, dtype=dtype, quantization=quantization,
                                      vision_dtype=vision_dtype)
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
        (benchmarks use it to fix the length; batched replies take `min_new_tokens` only)."""
        params = self.resolved(params or GenerationParams())
        stop = stop or StopSignal()
        if self.batching and self._cache_batchable and settings_batchable(self.model.generation_config) \
                and set(generate_overrides or {}) <= {"min_new_tokens"}:
            yield from self._stream_batched(messages, params, system_prompt, stop, generate_overrides or {}, adapter)
            return
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
                    inputs, max_new_tokens = self._model_inputs(messages, params, system_prompt, prepared)
                    kwargs = dict(inputs, **config.sampling_kwargs(params), streamer=streamer,
                                  stopping_criteria=[stop], pad_token_id=self._pad_id)
                    kwargs["max_new_tokens"] = max_new_tokens
                    kwargs.update(generate_overrides or {})
                    seed_sampling(inputs["input_ids"].device, seed)
                    base_only = self.model.disable_adapter() if self._peft and version is None \
                        else contextlib.nullcontext()
                    with torch.inference_mode(), base_only:
                        cached = self._plan(inputs, version, params)
                        if cached:
                            kwargs = {k: v for k, v in kwargs.items() if k not in inputs} | cached.kwargs
                        output = self.model.generate(**kwargs)
                    if cached:
                        cached.finish(output)
                finally:
                    streamer.end()

            job = self.batcher.submit_unbatched(run, self._side_thread)  # never behind the batcher's loop
            final = yield from relay(streamer, stop, job.exception, self.processor.tokenizer, self._eos_ids, started,
                                     prepared, model_id=self.model_id, adapter=version, params=params.as_dict(),
                                     seed=seed)
        yield final  # with the model free again: a caller acting on the end never waits for this reply

    def _model_inputs(self, messages, params: GenerationParams, system_prompt, prepared: dict):
        """The prompt's model inputs on the model's device, and the reply's max_new_tokens; records
        the prompt's size in `prepared`. Runs on the generation thread."""
        inputs, prepared["dropped"], max_new_tokens = self.prepare(messages, params, system_prompt)
        device = self.model.device
        if device.type != "cpu":  # the processor's tensors are on the CPU already
            inputs = inputs.to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prepared["prompt_tokens"] = int(inputs["input_ids"].shape[1])
        prepared["images"] = len(self._prompt_images)
        return inputs, max_new_tokens

    def _plan(self, inputs, version, params: GenerationParams, encode_images: bool = True):
        """The same prompt, from the longest prefix this adapter version (named and where it was loaded
        from) computed before; None: the whole prompt (no cache, or a layout it does not know)."""
        weights = (version, str(self._paths.get(version)) if version is not None else None)
        return self.cache is not None and plan_cached(self.cache, self.model, self.processor, inputs,
                                                      self._prompt_images, weights,
                                                      image_detail=params.image_detail, encode_images=encode_images)

    def _stream_batched(self, messages, params: GenerationParams, system_prompt, stop: StopSignal,
                        overrides: dict, adapter) -> Iterator[StreamEvent]:
        """`stream` through the batcher: the reply's decode steps share forward passes with other replies.
        Its time to first token counts from this call: waiting for a row and for the prefills queued
        before it included (there is no lock to wait for first)."""
        started = time.perf_counter()
        with self._lock:  # adapters load under the model lock, between batched steps
            version = self.adapter if adapter is DEFAULT_ADAPTER else adapter
            version = self._select_for_request(version, named=version != self.adapter)
        seed = params.seed if params.seed is not None else secrets.randbelow(config.SEED_MAX)
        prepared: dict = {}

        def prepare(together: bool = False) -> Prefill:
            # on the generation thread, under the model lock and this reply's adapter
            from transformers import DynamicCache

            inputs, max_new_tokens = self._model_inputs(messages, params, system_prompt, prepared)
            cached = self._plan(inputs, version, params, encode_images=not together)
            if cached:
                extra = {k: v for k, v in cached.kwargs.items()
                         if k not in ("input_ids", "attention_mask", "past_key_values")}
                return Prefill(inputs["input_ids"], cached.kwargs["past_key_values"], extra, max_new_tokens,
                               on_finish=lambda ids, cache: cached.finish(ids, cache))
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            return Prefill(inputs["input_ids"], DynamicCache(config=self.model.config), extra, max_new_tokens)

        streamer = TokenQueue(stop)
        request = Request(prepare, version, params, seed, stop, streamer,
                          # as generate(): an override, else the model's generation config (a model may set it)
                          min_new_tokens=int(overrides.get("min_new_tokens")
                                             or getattr(self.model.generation_config, "min_new_tokens", None) or 0))
        self.batcher.submit(request)

        def failure():
            request.finished.wait()
            return request.error

        yield (yield from relay(streamer, stop, failure, self.processor.tokenizer, self._eos_ids, started, prepared,
                                model_id=self.model_id, adapter=version, params=params.as_dict(), seed=seed))

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
