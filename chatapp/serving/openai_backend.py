"""The `openai` backend: replies come from an OpenAI-compatible model server (vLLM, `transformers serve`,
...) over HTTP; adapter versions are loaded into that server at run time.

Invariants:
- Same contract as the in-process engine (`backend.ChatBackend`): `stream()` yields `StreamEvent`s and
  ends with one carrying a `ReplyMeta` whose `adapter` is the version the server answered from;
  closing the iterator (Stop, a client gone) closes the HTTP stream, which makes the server stop.
- Requests run concurrently (the server batches them); nothing here holds a lock while streaming.
- A version is loaded into the server (`_load`) before the default switches to it (`follow`,
  `use_adapter`) and before a request that names it is sent (A/B sides). A server that refuses a version
  puts it in `adapter_errors` for good (the hot-swap follower reports why); a server that is down or
  failing is retried after LOAD_RETRY_S. Loaded versions beyond the default, the ones `keep_loaded()`
  names (the A/B candidate) and the KEEP_RECENT_VERSIONS most recently used are unloaded.
- A server restarted since a version was loaded answers 404 for it: the version is loaded again and the
  request sent once more, before any text was shown.
- Adapter folders reach the server by path: the same path, or rewritten by `--backend-path-map
  LOCAL=REMOTE`. vLLM loads a version folder as a LoRA (`/v1/load_lora_adapter`); `transformers serve`
  loads models by folder, so each version gets a folder of links (base files + adapter files) under
  `stage_dir`, which transformers loads as a base with an embedded adapter.
- Engines differ in what they honour (`openai_wire.ENGINE_CAPABILITIES`); the engine is detected once
  (`GET /version`: vLLM; a `/load_model` route: transformers serve; else generic) unless given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx

from chatapp.core import config
from chatapp.core.config import GenerationParams, ParameterError
from chatapp.core.errors import EngineError
from chatapp.serving.backend import AdapterLoadError, BackendError
from chatapp.serving.messages import normalize_messages, split_system
from chatapp.serving.openai_wire import (ENGINE_CAPABILITIES, ENGINES, ServerSaid, chunk_delta, error_text,
                                         parse_event, request_body, status_message, transport_message)
from chatapp.serving.streaming import Reply, ReplyMeta, StopSignal, StreamEvent

DEFAULT_TIMEOUT_S = 300.0  # a first token after a large image prompt on a busy CPU server takes minutes
CONNECT_TIMEOUT_S = 5.0
LOAD_RETRY_S = 2.0  # a version the server could not load for a passing reason is tried again after this
KEEP_RECENT_VERSIONS = 3  # loaded versions kept beyond the default and the A/B candidate
DEFAULT_ADAPTER = object()
_BASE_FILES_SKIPPED = {"adapter_config.json", "adapter_model.safetensors"}


def parse_path_map(entries) -> list[tuple[str, str]]:
    """`LOCAL=REMOTE` prefixes, longest first."""
    pairs = []
    for entry in entries or ():
        local, sep, remote = str(entry).partition("=")
        if not sep or not local or not remote:
            raise ParameterError(f"--backend-path-map takes LOCAL=REMOTE, got {entry!r}")
        pairs.append((str(Path(local).resolve()), remote.rstrip("/") or "/"))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


class OpenAIBackend:
    def __init__(self, url: str, *, local_model: str, backend_model: str | None = None,
                 api_key_env: str | None = None, path_map=(), stage_dir=None, timeout_s: float | None = None,
                 engine: str | None = None):
        self.url = url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url
        self.model_id = local_model  # answers are tagged with the model's local name, as in-process
        self.local_model = local_model
        self.backend_model = backend_model
        self.timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
        self.path_map = parse_path_map(path_map)
        self.stage_dir = Path(stage_dir) if stage_dir else None
        if engine is not None and engine not in ENGINES:
            raise ParameterError(f"the backend engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self._engine = engine
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EngineError(f"--backend-api-key-env names ${api_key_env}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S),
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.image_detail = "auto"  # what a request's "auto" means (serve --image-detail); auto: the server's choice
        self.adapter: str | None = None
        self.adapter_source = None  # version -> folder, for versions a request names that are not loaded yet
        self.adapter_errors: dict[str, str] = {}  # versions the server refused, with its reason: not tried again
        self.load_failures: dict[str, str] = {}  # the last passing reason a version could not be loaded
        self.keep_loaded = lambda: set()  # versions never unloaded (the web layer names the A/B candidate)
        self._paths: dict[str, object] = {}
        self._loaded: dict[str, str] = {}  # version -> the model name requests use for it
        self._last_used: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        self._lock = threading.Lock()  # the adapter bookkeeping above; never held while streaming

    # ------------------------------------------------------------ the server

    def engine(self) -> str:
        """vllm, transformers or generic (detected at first use, then kept)."""
        if self._engine is None:
            try:
                version = self.client.get(self.root + "/version", timeout=CONNECT_TIMEOUT_S)
                if version.status_code == 200 and "version" in version.text:
                    self._engine = "vllm"
                else:
                    probe = self.client.get(self.root + "/load_model", timeout=CONNECT_TIMEOUT_S)
                    self._engine = "transformers" if probe.status_code == 405 else "generic"
            except httpx.TransportError as error:
                raise BackendError(transport_message(self.url, error, streaming=False,
                                                     timeout_s=CONNECT_TIMEOUT_S)) from None
        return self._engine

    def ping(self) -> None:
        """Raise BackendError unless the server answers at all (any HTTP status will do)."""
        try:
            # the API root, not /models: transformers serve answers /models by scanning its cache (a 500 offline)
            self.client.get(self.url, timeout=CONNECT_TIMEOUT_S)
        except httpx.TransportError as error:
            raise BackendError(transport_message(self.url, error, streaming=False,
                                                 timeout_s=CONNECT_TIMEOUT_S)) from None

    def remote_path(self, path) -> str:
        """A local path as the server sees it (`--backend-path-map`)."""
        local = str(Path(path).resolve())
        for prefix, remote in self.path_map:
            if local == prefix or local.startswith(prefix + os.sep):
                return remote + local[len(prefix):]
        return local

    def served_model(self) -> str:
        """The base model's name in requests: --backend-model, else the local folder as the server sees it
        (transformers serve loads by folder), else the first model the server lists."""
        if self.backend_model:
            return self.backend_model
        if self.engine() == "transformers":
            from chatapp.serving.loading import resolve_model_path

            path = resolve_model_path(self.local_model)
            self.backend_model = self.remote_path(path) if Path(path).exists() else path
            return self.backend_model
        try:
            listed = self.client.get(self.url + "/models", timeout=CONNECT_TIMEOUT_S)
        except httpx.TransportError as error:
            raise BackendError(transport_message(self.url, error, streaming=False, timeout_s=CONNECT_TIMEOUT_S)) from None
        models = [m.get("id") for m in (listed.json().get("data") or [])] if listed.status_code == 200 else []
        if not models:
            raise BackendError(f"the model server at {self.url} lists no model (HTTP {listed.status_code}); "
                               f"name one with --backend-model")
        self.backend_model = models[0]
        return self.backend_model

    def capabilities(self) -> dict:
        return dict(ENGINE_CAPABILITIES[self.engine()], engine=self.engine())

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------ adapters

    def use_adapter(self, version: str | None, path=None) -> None:
        """Answer from `version` by default, loading it into the server now (raises when it cannot)."""
        if version is not None:
            self._paths[version] = path if path is not None else self._paths.get(version)
            self._model_for(version)
        self.adapter = version

    def follow(self, version: str | None, path=None) -> None:
        """The hot-swap: switch the default to `version` once the server has it. A version the server cannot
        load leaves the default as it was; the reason is in `adapter_errors` or `load_failures`."""
        if version is None:
            self.adapter = None
            return
        self._paths[version] = path if path is not None else self._paths.get(version)
        if version in self.adapter_errors or time.monotonic() < self._retry_at.get(version, 0.0):
            return
        try:
            self._model_for(version)
        except AdapterLoadError:
            return
        except EngineError as error:
            self.load_failures[version] = str(error)
            self._retry_at[version] = time.monotonic() + LOAD_RETRY_S
            return
        self.load_failures.pop(version, None)
        self.adapter = version

    def loaded_adapters(self) -> list[str]:
        return sorted(self._loaded)

    def base_model(self):
        """The local copy of the base (for its fingerprint), loaded on the CPU; not kept."""
        from chatapp.serving.loading import load_model

        return load_model(self.local_model, device="cpu")[0]

    def _model_for(self, version: str | None) -> str:
        """The model name a request for `version` uses, loading the version into the server first."""
        if version is None:
            return self.served_model()
        if version in self.adapter_errors:
            raise AdapterLoadError(f"adapter {version} cannot be loaded: {self.adapter_errors[version]}")
        with self._lock:
            name = self._loaded.get(version)
            if name is not None:
                self._last_used[version] = time.monotonic()
                return name
        path = self._paths.get(version)
        if path is None and self.adapter_source is not None:
            path = self._paths[version] = self.adapter_source(version)
        if path is None:
            raise EngineError(f"adapter {version} is not loaded and no folder was given")
        name = self._load(version, Path(path))
        with self._lock:
            self._loaded[version] = name
            self._last_used[version] = time.monotonic()
        self._unload_extra(keep={version, self.adapter, *self.keep_loaded()})
        return name

    def _refused(self, version: str, reason: str) -> AdapterLoadError:
        self.adapter_errors[version] = reason
        return AdapterLoadError(f"adapter {version} cannot be loaded: {reason}")

    def _load(self, version: str, folder: Path) -> str:
        engine = self.engine()
        digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
        try:
            if engine == "vllm":
                name = f"chatapp-{version}-{digest}"
                response = self.client.post(self.url + "/load_lora_adapter",
                                            json={"lora_name": name, "lora_path": self.remote_path(folder)})
                if response.status_code == 200 or "already" in response.text.lower():
                    return name
                if 400 <= response.status_code < 500:
                    said = error_text(response.content).replace(self.remote_path(folder), version)
                    raise self._refused(version, f"the model server refused it (HTTP {response.status_code}: {said})")
                raise BackendError(status_message(self.url, response.status_code, response.content, name))
            if engine == "transformers":
                name = self.remote_path(self._stage(version, folder, digest))
                with self.client.stream("POST", self.root + "/load_model", json={"model": name}) as response:
                    if response.status_code != 200:
                        response.read()
                        raise BackendError(status_message(self.url, response.status_code, response.content, name))
                    for line in response.iter_lines():
                        event = parse_event(line) or {}
                        if event.get("status") == "error":  # named by version, never by a server path
                            said = error_text(event.get("message", "")).replace(name, version)
                            raise self._refused(version, f"the model server could not load it: "
                                                         f"{said.replace(str(folder), version)}")
                        if event.get("status") == "ready":
                            return name
                raise BackendError(f"the model server at {self.url} stopped loading adapter {version} before it was ready")
        except httpx.TransportError as error:
            raise BackendError(transport_message(self.url, error, streaming=False, timeout_s=self.timeout_s)) from None
        except ServerSaid as said:
            raise BackendError(f"the model server at {self.url} {said}") from None
        raise self._refused(version, f"this model server ({engine}) cannot load adapters at run time; serve with "
                                     f"vLLM (--enable-lora) or transformers serve, or answer in-process")

    def _stage(self, version: str, folder: Path, digest: str) -> Path:
        """A folder transformers serve loads as the base with this version's adapter: links to the base's
        files and the version's adapter files (nothing copied)."""
        from chatapp.serving.loading import resolve_model_path

        base = Path(resolve_model_path(self.local_model))
        if not base.is_dir() or self.stage_dir is None:
            raise self._refused(version, "transformers serve loads adapters here only for a base model in a local "
                                         "folder (--model), with a data dir to stage it in")
        stage = self.stage_dir / f"{version}-{digest}"
        if not (stage / "adapter_config.json").exists():
            tmp = self.stage_dir / f".tmp-{version}-{digest}-{secrets.token_hex(4)}"
            tmp.mkdir(parents=True)
            for source in list(base.iterdir()) + [folder / name for name in _BASE_FILES_SKIPPED]:
                if source.is_file() and (source.parent == folder or source.name not in _BASE_FILES_SKIPPED):
                    (tmp / source.name).symlink_to(source.resolve())
            try:
                tmp.rename(stage)
            except OSError:  # another process staged it meanwhile
                for entry in tmp.iterdir():
                    entry.unlink()
                tmp.rmdir()
        return stage

    def _unload_extra(self, keep: set) -> None:
        with self._lock:
            spare = sorted((v for v in self._loaded if v not in keep), key=lambda v: self._last_used.get(v, 0.0))
            drop = spare[:max(0, len(spare) - KEEP_RECENT_VERSIONS)]
        for version in drop:
            self.unload(version)

    def unload(self, version: str) -> None:
        """Drop `version` from the server now (vLLM); transformers serve frees idle models itself
        (--model-timeout). A version not loaded is left alone."""
        with self._lock:
            name = self._loaded.pop(version, None)
            self._last_used.pop(version, None)
        if name is not None and self.engine() == "vllm":
            try:
                self.client.post(self.url + "/unload_lora_adapter", json={"lora_name": name})
            except httpx.TransportError:
                pass  # the server is gone; so is what it had loaded

    def _forget(self, version: str) -> None:
        with self._lock:
            self._loaded.pop(version, None)

    # ------------------------------------------------------------ generation

    def stream(self, messages: list[dict], params: GenerationParams | None = None, *,
               system_prompt: str | None = None, stop: StopSignal | None = None,
               generate_overrides: dict | None = None, adapter=DEFAULT_ADAPTER) -> Iterator[StreamEvent]:
        """Stream a reply from the server (see the module's invariants)."""
        params = params or GenerationParams()
        stop = stop or StopSignal()
        version = self.adapter if adapter is DEFAULT_ADAPTER else adapter
        system, turns = split_system(normalize_messages(messages), system_prompt)
        seed = params.seed if params.seed is not None else secrets.randbelow(config.SEED_MAX)
        started = time.perf_counter()
        params = self.resolved(params)
        body = request_body(self.engine(), self._model_for(version), system + turns, params, seed,
                            params.image_detail)
        body.update(generate_overrides or {})
        text, count, first_at, last_at, finish, usage = "", 0, None, None, None, {}
        for attempt in (1, 2):
            try:
                with self.client.stream("POST", self.url + "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        if response.status_code == 404 and version is not None and attempt == 1:
                            self._forget(version)  # the server restarted without it: load it again, once
                            body["model"] = self._model_for(version)
                            continue
                        self._refuse(response, body["model"])
                    for line in response.iter_lines():
                        chunk = parse_event(line)
                        if chunk is None:
                            continue
                        usage = chunk.get("usage") or usage
                        delta, finish = chunk_delta(chunk)
                        finish = finish or None
                        if delta:
                            now = time.perf_counter()
                            first_at, last_at = first_at or now, now
                            if not text:  # replies start with a space after "Assistant:", as in-process
                                delta = delta.lstrip()
                            count += 1
                            stop.produced = count
                            text += delta
                            yield StreamEvent(delta=delta, text=text, tokens=count, token_times=[now])
                        if stop.is_set():
                            finish = "stopped"
                            break
                break
            except httpx.TransportError as error:
                raise BackendError(transport_message(self.url, error, streaming=bool(text),
                                                     timeout_s=self.timeout_s)) from None
            except ServerSaid as said:
                raise BackendError(f"the model server at {self.url} {said}") from None
        if finish is None:
            raise BackendError(f"the model server at {self.url} ended the answer without finishing it; what was "
                               f"shown is kept, try again")
        reply_tokens = int(usage.get("completion_tokens") or count)
        decode_s = (last_at - first_at) if first_at and last_at else 0.0
        meta = ReplyMeta(
            model_id=self.model_id, adapter=version, params=params.as_dict(), seed=seed,
            prompt_tokens=int(usage.get("prompt_tokens") or 0), reply_tokens=reply_tokens,
            time_to_first_token_s=(first_at - started) if first_at else None,
            tokens_per_s=((reply_tokens - 1) / decode_s) if reply_tokens > 1 and decode_s > 0 else None,
            total_s=time.perf_counter() - started, trimmed_messages=0,
            finish_reason=finish if finish in ("stop", "length", "stopped") else "stop",
            stop_requested_at_token=stop.requested_at_token,
            images=sum(p["type"] == "image" for m in system + turns for p in m["content"]))
        yield StreamEvent(delta="", text=text.rstrip(), tokens=reply_tokens, done=True, meta=meta)

    def resolved(self, params: GenerationParams) -> GenerationParams:
        """`params` with "auto" image detail replaced by serve's --image-detail when that is set; otherwise it
        stays "auto", the server's choice (it alone knows its device)."""
        if params.image_detail != "auto" or self.image_detail == "auto":
            return params
        return dataclasses.replace(params, image_detail=self.image_detail)

    def _refuse(self, response, model: str) -> None:
        said = error_text(response.content)
        if response.status_code == 400 and "context" in said.lower():
            raise ParameterError(f"the conversation does not fit the model's context ({said}): shorten the "
                                 f"message, send fewer images, or lower max_new_tokens")
        raise BackendError(status_message(self.url, response.status_code, response.content, model))

    def generate(self, messages: list[dict], params: GenerationParams | None = None, **kwargs) -> Reply:
        """The whole reply at once (same path as `stream`)."""
        return Reply.collect(self.stream(messages, params, **kwargs), BackendError("the reply ended without a result"))
