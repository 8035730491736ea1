"""One answer: stream it from the engine and store it as it grows (used by `chat.ChatService`).

Invariants:
- The answer is committed at its first text, then at most every PARTIAL_ANSWER_SAVE_INTERVAL_S as it
  streams, marked "cut_off" until it ends (so a killed server keeps what the user was shown), and once
  more when it ends: as the engine finished it ("stop", "length"), "stopped" (the stop button, or the
  client went away) or "cut_off" (generation failed part way).
- An answer that ends without any text is stored too; in the history it reaches the model as an empty
  assistant turn, so the next message of the conversation still follows it.
- The generation record holds the parameters as the engine resolved them (`engine.resolved`: the
  image detail "auto" becomes low or high) from the first save on, since training rebuilds the prompt
  from them; the reply's footer (`reply_footer`) shows the detail when the prompt held images.
- A request the engine refuses before any answer (the prompt does not fit the context) stores no
  answer and calls `refused()`, which discards the user message the request stored.
- Talks to the store only through its named methods; never imports torch or gradio.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from chatapp.core import config
from chatapp.core.config import GenerationParams, ParameterError
from chatapp.core.errors import RequestError
from chatapp.feedback.images import load_image


@dataclass
class ChatEvent:
    """A step of a streamed answer. `message_id` is set on the last event (`done`), once stored."""
    conversation_id: int
    user_message_id: int
    text: str
    done: bool = False
    message_id: int | None = None
    model: str = ""
    adapter: str | None = None
    meta: dict = field(default_factory=dict)
    side: str | None = None  # "a" or "b" in a comparison

    def as_dict(self) -> dict:
        return {"conversation_id": self.conversation_id, "user_message_id": self.user_message_id,
                "message_id": self.message_id, "text": self.text, "done": self.done, "model": self.model,
                "adapter": self.adapter or "none", "side": self.side, "meta": self.meta}


def engine_messages(store, path: list[dict]) -> list[dict]:
    """Stored messages (a conversation path) in the engine's shape, with their images loaded."""
    messages = []
    for message in path:
        parts = [{"type": "image", "image": load_image(p)} for p in store.message_images(message["id"])]
        # an empty answer (the model ended at once) stays a turn, so the next message still follows it
        if message["text"] or message["role"] == "assistant":
            parts.append({"type": "text", "text": message["text"]})
        messages.append({"role": message["role"], "content": parts})
    return messages


def generation_record(model_id: str, meta, params: GenerationParams, system_prompt: str, adapter,
                      ending: str = "stopped") -> dict:
    """The record of a finished answer (`meta`), or of one that has not ended (yet): `ending` is
    "cut_off" while it streams or when it failed, "stopped" when stopped or abandoned."""
    if meta is None:
        return {"model_id": model_id, "adapter_version": adapter, "params": params.as_dict(),
                "seed": params.seed, "system_prompt": system_prompt, "finish_reason": ending}
    return {"model_id": meta.model_id, "adapter_version": meta.adapter, "params": meta.params,
            "seed": meta.seed, "system_prompt": system_prompt, "prompt_tokens": meta.prompt_tokens,
            "reply_tokens": meta.reply_tokens, "time_to_first_token_s": meta.time_to_first_token_s,
            "tokens_per_s": meta.tokens_per_s, "total_s": meta.total_s, "finish_reason": meta.finish_reason,
            "trimmed_messages": meta.trimmed_messages}


def stream_answer(engine, store, user_message: dict, messages: list[dict], params: GenerationParams,
                  system_prompt: str, kind: str, *, adapter, side: str | None = None,
                  refused=None) -> Iterator[ChatEvent]:
    """Stream the engine's answer to `messages` (ending with the stored `user_message`) from `adapter`,
    storing it as described above; the last event (`done`) carries the answer's id and metadata."""
    conversation_id, parent_id = user_message["conversation_id"], user_message["id"]
    answer_id, text, meta, ending, saved_at = None, "", None, "cut_off", 0.0
    params = engine.resolved(params)

    def record(meta=None):
        return generation_record(engine.model_id, meta, params, system_prompt, adapter, ending)

    stream = engine.stream(messages, params, system_prompt=system_prompt or None, adapter=adapter)
    try:
        for event in stream:
            text = event.text
            if event.done:
                meta = event.meta
                break
            if not event.delta:
                continue
            now = time.monotonic()
            if answer_id is None:
                answer_id = store.add_message(conversation_id, parent_id, "assistant", text, kind=kind,
                                              generation=record())
                saved_at = now
            elif now - saved_at >= config.PARTIAL_ANSWER_SAVE_INTERVAL_S:
                store.update_answer(answer_id, text, record())
                saved_at = now
            yield ChatEvent(conversation_id, parent_id, text, model=engine.model_id, adapter=adapter, side=side)
    except GeneratorExit:  # stopped, or the client went away
        ending = "stopped"
        raise
    except (ParameterError, RequestError):  # refused (e.g. it does not fit the context): store nothing
        if answer_id is None and refused is not None:
            refused()
        raise
    finally:
        stream.close()
        if meta is None and answer_id is not None:  # keep what was shown, marked as it ended
            store.update_answer(answer_id, text, record())
    if meta is None:
        return
    if answer_id is None:  # no text came (an empty answer): stored all the same
        answer_id = store.add_message(conversation_id, parent_id, "assistant", text, kind=kind,
                                      generation=record(meta))
    else:
        store.update_answer(answer_id, text, record(meta))
    yield ChatEvent(conversation_id, parent_id, text, done=True, message_id=answer_id, model=meta.model_id,
                    adapter=meta.adapter, side=side,
                    meta={"reply_tokens": meta.reply_tokens, "prompt_tokens": meta.prompt_tokens,
                          "tokens_per_s": meta.tokens_per_s, "finish_reason": meta.finish_reason,
                          "trimmed_messages": meta.trimmed_messages, "seed": meta.seed,
                          "image_detail": meta.params.get("image_detail"), "images": meta.images})


def reply_footer(event: ChatEvent) -> str:
    """The line under a finished reply: model, adapter, tokens, speed, turns left out, image detail."""
    meta = event.meta
    bits = [f"model `{event.model}`", f"adapter `{event.adapter or 'none'}`", f"{meta.get('reply_tokens')} tokens"]
    if meta.get("tokens_per_s"):
        bits.append(f"{meta['tokens_per_s']:.0f} tokens/s")
    if meta.get("trimmed_messages"):
        bits.append(f"{meta['trimmed_messages']} oldest messages left out to fit")
    if meta.get("images") and meta.get("image_detail"):
        bits.append(f"image detail {meta['image_detail']}")
    return " · ".join(bits)
