"""Stopping and streaming a generation: the stop signal, the token hand-off between the generation
thread and the consumer, incremental decoding, and what a finished reply reports.

Invariants:
- A set StopSignal ends generation within one token: generate() asks it after every token.
- The token queue never drops a token: the consumer gets every id in order, batched by wake-ups.
- The decoder never yields half a UTF-8 character; the concatenated deltas are the decoded text.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

from chatapp.core.config import ParameterError
from chatapp.core.errors import EngineError


def seed_sampling(device, seed: int) -> None:
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


class TokenQueue:
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
        self.push(value.reshape(-1).tolist())

    def push(self, ids: list[int]) -> None:
        """Hand over new token ids (what `put` does after the prompt; the batcher calls it directly)."""
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


class IncrementalDecoder:
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
    images: int = 0  # images in the prompt as sent (after trimming), each seen at params["image_detail"]

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

    @classmethod
    def collect(cls, stream, error: Exception) -> "Reply":
        """The whole reply of a backend's `stream` (its `done` event); `error` when it ends without one."""
        events = 0
        for event in stream:
            events += 1
            if event.done:
                return cls(text=event.text, meta=event.meta, events=events)
        raise error


def relay(streamer: "TokenQueue", stop: StopSignal, failure, tokenizer, eos_ids, started: float, prepared: dict,
          **reply_fields):
    """Yields a reply's events from its token queue; returns its last event, with the metadata
    (`reply_fields`: model_id, adapter, params, seed; `prepared`: the prompt's size, filled in by the
    generation thread). `failure()` waits for the generation to end and returns its exception (None: none).
    A consumer that leaves early stops the generation."""
    decoder = IncrementalDecoder(tokenizer)
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
        error = failure()  # waits for the generation to end
    if isinstance(error, ParameterError):  # the conversation does not fit: the user's to fix
        raise error
    if error is not None:
        raise EngineError(f"generation failed: {error}") from error
    finish = "stop" if last_id in eos_ids else "stopped" if stop.is_set() else "length"
    ended = time.perf_counter()
    decode_s = (last_at - first_at) if first_at and last_at else 0.0
    meta = ReplyMeta(
        **reply_fields, prompt_tokens=prepared.get("prompt_tokens", 0), reply_tokens=count,
        time_to_first_token_s=(first_at - started) if first_at else None,
        tokens_per_s=((count - 1) / decode_s) if count > 1 and decode_s > 0 else None,
        total_s=ended - started, trimmed_messages=prepared.get("dropped", 0), finish_reason=finish,
        stop_requested_at_token=stop.requested_at_token, images=prepared.get("images", 0),
    )
    return StreamEvent(delta="", text=text.rstrip(), tokens=count, done=True, meta=meta)
