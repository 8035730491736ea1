"""The OpenAI chat-completions wire format, as the model servers we talk to speak it: request bodies,
the server-sent event stream, and what their errors mean to a user.

Invariants:
- Pure functions over dicts, bytes and exceptions: no sockets here (`openai_backend` owns those).
- Images go as PNG data URLs of the pixels the store kept (its files are PNG re-encodings; PNG is
  lossless, so the server decodes the same pixels), each with the request's `detail`.
- Sampling maps by engine (see ENGINE_CAPABILITIES, documented in docs/architecture.md "Backends"):
  vLLM takes top_k, seed and repetition_penalty as extra body fields; `transformers serve` takes a
  `generation_config` JSON (the same `generate()` arguments the in-process engine passes, so greedy
  replies match it) and `seed`; any other server gets the standard fields plus `seed` and `top_k`.
- Every failure becomes one sentence a user can act on, naming the server by its URL and never
  carrying a traceback; the server's own message is kept, shortened.
"""
from __future__ import annotations

import base64
import io
import json

from chatapp.core import config
from chatapp.core.config import GenerationParams

ENGINES = ("vllm", "transformers", "generic")
# What each engine honours of a request (docs/architecture.md "Backends" has the same table).
ENGINE_CAPABILITIES = {
    "vllm": {"top_k": True, "seed": True, "repetition_penalty": True, "detail": False, "runtime_lora": True},
    "transformers": {"top_k": True, "seed": True, "repetition_penalty": True, "detail": True, "runtime_lora": True},
    "generic": {"top_k": False, "seed": False, "repetition_penalty": False, "detail": False, "runtime_lora": False},
}
SERVER_MESSAGE_CHARS = 300  # of a server's error text shown to the user


def image_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def wire_messages(messages: list[dict], detail: str) -> list[dict]:
    """Normalized messages (`messages.normalize_messages` shape) as chat-completions messages."""
    out = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(part["image"]), "detail": detail}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


def request_body(engine: str, model: str, messages: list[dict], params: GenerationParams, seed: int,
                 detail: str = "auto") -> dict:
    """The streaming chat-completions request for `engine` (one of ENGINES); `detail` is OpenAI's
    low/high/auto for every image (auto: the server's choice)."""
    body = {"model": model, "messages": wire_messages(messages, detail), "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": params.max_new_tokens, "seed": seed}
    if engine == "transformers":
        # its request schema refuses unknown fields (422) and reads top_k only from a generation config;
        # the unset fields of that config come from the model's own (end-of-utterance ids and so on)
        body["generation_config"] = json.dumps(config.sampling_kwargs(params))
        if detail == "low":  # the processor's own switch for one frame per image (messages.image_detail_kwargs)
            body["chat_template_kwargs"] = {"processor_kwargs": {"do_image_splitting": False}}
        return body
    body["temperature"] = params.temperature
    if not params.greedy:
        body["top_p"] = params.top_p
    if engine == "vllm":
        body["top_k"] = params.top_k if params.top_k > 0 else -1  # vLLM: -1 = off
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
    return body


def parse_event(line: str) -> dict | None:
    """One line of the event stream: the chunk it carries, or None (blank lines, comments, [DONE]).
    A chunk that reports an error raises ServerSaid."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ServerSaid(f"sent something that is not JSON: {shorten(data)}") from None
    if isinstance(chunk, dict) and chunk.get("error"):
        raise ServerSaid(f"failed while answering: {error_text(chunk['error'])}")
    return chunk if isinstance(chunk, dict) else None


def chunk_delta(chunk: dict) -> tuple[str, str | None]:
    """(new text, finish reason or None) of a streamed chunk."""
    text, finish = "", None
    for choice in chunk.get("choices") or []:
        text += (choice.get("delta") or {}).get("content") or ""
        finish = choice.get("finish_reason") or finish
    return text, finish


class ServerSaid(Exception):
    """A message from the server's side of a stream (the caller adds which server)."""


def shorten(text: str, limit: int = SERVER_MESSAGE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_text(payload) -> str:
    """The readable part of an error body: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or text."""
    if isinstance(payload, (bytes, bytearray)):
        payload = payload.decode("utf-8", "replace")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return shorten(payload)
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            if key in payload:
                return error_text(payload[key]) if not isinstance(payload[key], str) else shorten(payload[key])
        return shorten(json.dumps(payload))
    if isinstance(payload, list):
        return "; ".join(error_text(item) for item in payload[:3])
    return shorten(str(payload))


def status_message(server: str, status: int, body, model: str) -> str:
    """What a refused request means to the user."""
    said = error_text(body) if body else f"HTTP {status}"
    if status == 404 and ("model" in said.lower() or "does not exist" in said.lower()):
        return (f"the model server at {server} does not serve model {model!r} ({said}); name one it serves "
                f"with --backend-model")
    if status in (401, 403):
        return (f"the model server at {server} refused the API key (HTTP {status}: {said}); set the variable "
                f"named by --backend-api-key-env")
    if 400 <= status < 500:
        return f"the model server at {server} refused the request (HTTP {status}: {said})"
    return f"the model server at {server} failed (HTTP {status}: {said}); try again, or check the server's log"


def transport_message(server: str, error: Exception, *, streaming: bool, timeout_s: float) -> str:
    """What a connection failure means to the user (`error` is an httpx transport error)."""
    name = type(error).__name__
    if name in ("ConnectError", "ConnectTimeout"):
        return (f"the model server at {server} is not reachable ({shorten(str(error)) or name}): start it, or "
                f"check --backend-url; nothing you sent was lost")
    if "Timeout" in name:
        return (f"the model server at {server} did not answer within {timeout_s:g} s; it may be overloaded. "
                f"Try again; nothing you sent was lost")
    if streaming:
        return (f"the model server at {server} stopped in the middle of the answer ({name}); what was shown "
                f"is kept, send your next message once the server is back")
    return f"the model server at {server} closed the connection ({name}: {shorten(str(error))})"
