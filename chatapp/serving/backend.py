"""The backend seam: what the chat needs from a model, whoever runs it.

Two implementations:
- `engine.Engine` (kind "inprocess", the default): the model in this process, offline, one generation at a
  time; adapters are peft adapters loaded into it.
- `openai_backend.OpenAIBackend` (kind "openai"): any OpenAI-compatible server (vLLM, `transformers
  serve`, ...) reached over HTTP; adapters are loaded into that server at run time.

Invariants:
- The web layer and the hot-swap follower use only what `ChatBackend` lists: `stream()` a reply for
  messages, parameters and an adapter version (closing the iterator, or setting the stop signal, stops
  it; the last event carries a `ReplyMeta` naming the version that produced the reply), `resolved()`
  (the parameters as the reply will use them), `follow()` / `use_adapter()` to change the default
  version, `adapter_errors` (versions that cannot be loaded, with the reason), `adapter_source` (how a
  version named by a request is found) and `model_id`.
- A backend switches its default version only once that version is loaded where the answers are
  produced; a version it could not load leaves the default as it was (`adapter` tells which).
- Every failure reaching the chat is an `EngineError` whose message says what went wrong and what to do;
  a `ParameterError` means the request itself does not fit (nothing is stored for it).
- `base_model()` returns the base weights, for the registry's fingerprint check; a remote backend loads
  the local copy named by `--model` for that (the trainer trains that copy).
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, runtime_checkable

from chatapp.core.errors import EngineError

BACKEND_KINDS = ("inprocess", "openai")  # serve/train --backend


class BackendError(EngineError):
    """The model server failed (down, timed out, refused the request, unknown model); the message says
    which and what to do."""


class AdapterLoadError(EngineError):
    """An adapter version could not be loaded where answers are produced (peft or the model server
    refused it); the chat stays on the version it had."""


@runtime_checkable
class ChatBackend(Protocol):
    model_id: str
    adapter: str | None
    adapter_errors: dict
    adapter_source: Callable | None

    def stream(self, messages: list[dict], params=None, *, system_prompt: str | None = None, stop=None,
               adapter=...) -> Iterator: ...

    def resolved(self, params): ...

    def follow(self, version: str | None, path=None) -> None: ...

    def use_adapter(self, version: str | None, path=None) -> None: ...

    def loaded_adapters(self) -> list[str]: ...

    def base_model(self): ...

