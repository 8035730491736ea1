"""Concurrent replies share the model: the decode steps of every running reply run as one batched
forward pass, and a new request joins the batch without waiting for the running ones to end
(continuous batching on the model's own forward and transformers' `DynamicCache`; transformers'
own continuous batching takes no pixel_values and no per-row LoRA, see ../shared/NOTES.md).

How: a request is prefilled on its own (its prompt from the longest cached prefix, as the engine
plans it: `Request.prepare`) into a one-row DynamicCache, and its first token is chosen. Where
`prefill_rows` > 1 (an accelerator: config.PREFILL_TOGETHER_ROWS), the requests waiting together
are prefilled together: those that start from an empty cache (`prepare(together=True)` keeps their
pixel_values) run as one left-padded forward pass, their images encoded in it, and each row's KV is
cut out of it without padding. At the next step the row joins the batch cache, both left-padded to a common length, with a 2-D
attention mask that hides the padding and per-row position ids (the layout generate() uses for a
left-padded batch). Each step feeds every row its last token; rows that end leave the batch, and
columns that no remaining row uses are cut off.

Invariants:
- At most `max_batch_size` rows decode at once; later requests wait in arrival order (the web
  server's queue limits and its busy message sit in front of this, unchanged).
- At most one prefill (one prompt, or on an accelerator up to `prefill_rows` prompts of at most
  `prefill_tokens` tokens together) runs between two decode steps: a running reply goes on producing
  a token per prefill; a new request waits for the prefills queued before it. A prompt prefilled
  with others gets the reply it gets alone up to float reassociation, as a batched decode row does;
  if their joint pass fails, each is prefilled on its own.
- Each row answers from its own adapter version, fixed when it was submitted: when every row
  has the same version the batch runs as that version (peft's active adapter, or the adapters
  disabled for the base); a mixed batch passes peft's per-row `adapter_names` ("__base__" for the
  base), which needs LoRA on the text model only (every LoRA layer must see one row per reply).
- Each row has its own sampling settings (temperature, top_k, top_p, repetition penalty,
  max_new_tokens, min_new_tokens), applied by transformers' own logits processors in generate()'s
  order, and its own torch.Generator seeded with the reply's seed.
- What holds for a reply batched with others. Greedy: each token is the argmax of the same model
  on the same tokens; it equals the reply generated alone (or by plain generate()) up to float
  reassociation: a batch of several rows multiplies with other kernels than a batch of one, and a
  padded row attends over masked positions; tests/test_batching.py finds it token-identical on the
  demo model. Seeded sampling: a row draws only from its own generator, the same draws as
  generate() makes from the global generator seeded alike, so other rows never change its draws;
  its reply is the one generated alone up to the same float differences (a token flips only
  where one lands on a draw's boundary).
- Stop: a row whose StopSignal is set ends before its next token (within one token of the
  request); the other rows go on untouched. A row that ends frees its slot at once; a request
  stopped while it waits ends at the next step, with no token.
- Every tensor op runs on one thread (the engine's generation thread, which this loop occupies
  while it has work and leaves when idle), each step under the engine's model lock: adapters load
  between steps, never during one.
- A row that ends hands a copy of its own KV (without padding) to `Prefill.on_finish` (the prefix
  cache), holding exactly its prompt and reply but the last token, as generate()'s cache does.
- Only models whose cache is plain full attention (`cache_batchable`) are batched, and only while
  their generation config adds no other logits processor (`settings_batchable`); the engine serves
  other replies through generate(), one at a time.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

from chatapp.core import config
from chatapp.serving.prefill import Prefill, adapters, joint_inputs, prefill_groups, row_cache
from chatapp.serving.row_sampling import Row

def cache_batchable(model) -> bool:
    """Whether `model`'s cache is one rows can be padded, merged and cut in (plain full attention)."""
    from transformers import DynamicCache

    from chatapp.serving.cache import reusable

    return reusable(DynamicCache(config=model.config))


@dataclass
class Request:
    """One reply to generate. `prepare(together)` runs on the generation thread, under the row's
    adapter; `together`: its prompt may be prefilled with others (see the module's docstring)."""
    prepare: Callable[..., Prefill]
    version: str | None  # the adapter version (None: the base)
    params: object  # config.GenerationParams
    seed: int
    stop: object  # streaming.StopSignal
    tokens: object  # streaming.TokenQueue: every chosen token is pushed to it, then end()
    min_new_tokens: int = 0
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


def _pad_left(tensor, width: int):
    """`tensor` (batch, heads, length, dim) with `width` zero positions before its first."""
    import torch

    if width == 0:
        return tensor
    return torch.cat([tensor.new_zeros(tensor.shape[:-2] + (width, tensor.shape[-1])), tensor], dim=-2)


class Batcher:
    """Runs the requests submitted to it, their decode steps in one batch (see the module's invariants).

    `model` returns the engine's current model (it becomes a PeftModel when the first adapter
    loads); `lock` is the engine's model lock; `executor` its single generation thread."""

    def __init__(self, model: Callable[[], object], lock: threading.Lock, executor, eos_ids: list[int],
                 max_batch_size: int = config.MAX_BATCH_SIZE, pad_id: int = 0, prefill_rows: int = 1,
                 prefill_tokens: int = config.PREFILL_TOGETHER_TOKENS):
        self._model = model
        self._lock = lock
        self._executor = executor
        self._eos_ids = eos_ids
        self._pad_id = pad_id  # fills the left of shorter prompts in a joint prefill (masked out)
        self.max_batch_size = max_batch_size
        self.prefill_rows = prefill_rows  # prompts prefilled in one forward pass at most (1: each alone)
        self.prefill_tokens = prefill_tokens  # and their prompt tokens at most
        self._condition = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Row] = []
        self._running = False
        self._cache = None  # the batch's DynamicCache: row i is batch index i, left-padded
        self._mask = None  # (rows, cache length) attention mask: 0 on padding
        self.largest_batch = 0  # the most rows one decode step has run (benchmarks and tests read it)
        self.largest_prefill = 0  # the most prompts one forward pass has prefilled

    @property
    def rows(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def versions_in_use(self) -> set:
        """Adapter versions of the rows running or waiting (the engine never unloads them)."""
        with self._condition:
            return {request.version for request in self._waiting} | {row.request.version for row in self._rows}

    def submit_unbatched(self, job: Callable, side_executor):
        """Run `job` (a reply through generate(), its caller holding the model lock) on the generation
        thread, or on `side_executor` while this loop holds that thread: queued behind the loop, which
        waits for the lock its caller holds, it would never run. Decided under the loop's own lock, so a
        loop that starts later queues behind the job instead. Returns the job's Future."""
        with self._condition:
            return (side_executor if self._running else self._executor).submit(job)

    def submit(self, request: Request) -> None:
        with self._condition:
            self._waiting.append(request)
            if not self._running:
                self._running = True
                self._executor.submit(self._run)

    # ------------------------------------------------------------ the loop (generation thread)

    def _run(self) -> None:
        import torch

        try:
            while True:
                with self._condition:
                    # a request stopped while it waits ends now, not when a row frees up for it
                    given_up = [request for request in self._waiting if request.stop.is_set()]
                    for request in given_up:
                        self._waiting.remove(request)
                    room = min(self.prefill_rows, self.max_batch_size - len(self._rows), len(self._waiting))
                    requests = [self._waiting.popleft() for _ in range(max(0, room))]
                    if not requests and not self._rows and not given_up:
                        self._running = False
                        return
                for stopped in given_up:
                    self._signal_end(stopped)
                with torch.inference_mode():
                    if requests:
                        self._admit(requests)
                    if self._rows:
                        self._step()
        except BaseException as error:  # a fault of the loop itself: no request may be left waiting
            with self._condition:
                waiting, self._waiting = list(self._waiting), collections.deque()
                self._running = False
            self._fail([row.request for row in self._rows] + waiting, error)
            raise

    def _admit(self, requests: list[Request]) -> None:
        """Prefill `requests` (alone, or those that can together) and choose each one's first token;
        they join the batch at the next step."""
        ended = []
        try:
            with self._lock:
                model, ready = self._model(), []
                together = len(requests) > 1
                for request in requests:
                    if request.stop.is_set():  # stopped while waiting: no token at all
                        ended.append(request)
                        continue
                    try:
                        with adapters(model, [request.version]):
                            ready.append((request, request.prepare(together)))
                    except BaseException as error:  # this request's own failure (its prompt): only it ends
                        request.error = error
                        ended.append(request)
                for group in prefill_groups(ready, self.prefill_rows, self.prefill_tokens):
                    joint = None
                    if len(group) > 1:
                        try:
                            joint = self._joint_pass(model, group)
                        except Exception:  # the joint pass failed (memory, say): each prompt on its own
                            pass
                    if joint is not None:
                        ended += self._rows_from_joint(model, group, *joint)
                        continue
                    for request, prefill in group:
                        try:
                            ended += self._prefill_alone(model, request, prefill)
                        except BaseException as error:  # this request's own failure (an adapter): only it ends
                            request.error = error
                            ended.append(request)
        finally:
            for request in ended:
                self._signal_end(request)

    def _prefill_alone(self, model, request: Request, prefill: Prefill) -> list[Request]:
        """One prompt's forward pass; its row joins the batch unless its first token ends it. Returns
        the requests that ended."""
        import torch

        ids, past = prefill.input_ids, prefill.past
        cached = past.get_seq_length()
        positions = torch.arange(cached, ids.shape[1], device=ids.device).unsqueeze(0)
        with adapters(model, [request.version]) as extra:
            output = model(input_ids=ids[:, cached:], attention_mask=torch.ones_like(ids),
                           position_ids=positions, past_key_values=past, use_cache=True, logits_to_keep=1,
                           **prefill.inputs, **extra)
        self.largest_prefill = max(self.largest_prefill, 1)
        return self._first_token(Row(request, prefill, self._eos_ids, ids.device), output.logits[:, -1, :], past)

    def _joint_pass(self, model, group: list):
        """The group's prompts in one forward pass: (last-position logits, joint cache, prompt lengths)."""
        from transformers import DynamicCache

        ids, mask, positions, inputs, lengths = joint_inputs(group, self._pad_id)
        past = DynamicCache(config=model.config)
        with adapters(model, [request.version for request, _ in group]) as extra:
            output = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=True, logits_to_keep=1, **inputs, **extra)
        self.largest_prefill = max(self.largest_prefill, len(group))
        return output.logits[:, -1, :], past, lengths

    def _rows_from_joint(self, model, group: list, logits, past, lengths: list[int]) -> list[Request]:
        """Each prompt of a joint pass as a row with its own KV (`row_cache`) and first token. Returns
        the requests that ended."""
        ended = []
        for index, (request, prefill) in enumerate(group):
            try:
                row = Row(request, prefill, self._eos_ids, logits.device)
                ended += self._first_token(row, logits[index:index + 1], row_cache(model, past, index, lengths[index]))
            except BaseException as error:  # this row's own failure: only it ends
                request.error = error
                ended.append(request)
        return ended

    def _first_token(self, row: Row, logits, past) -> list[Request]:
        """Choose `row`'s first token; it joins the batch with `past` unless that token ends it."""
        import torch

        if row.take(int(row.choose(logits))):
            if row.on_finish is not None:
                row.on_finish(torch.tensor([row.ids], device=logits.device), past)
            return [row.request]
        self._join(row, past)
        return []

    def _join(self, row: Row, past) -> None:
        import torch

        length = past.get_seq_length()
        if not self._rows:
            self._cache = past
            self._mask = torch.ones((1, length), dtype=torch.long, device=past.layers[0].keys.device)
        else:
            width = self._mask.shape[1]
            grow, pad = max(0, length - width), max(0, width - length)
            for batch_layer, row_layer in zip(self._cache.layers, past.layers):
                batch_layer.keys = torch.cat([_pad_left(batch_layer.keys, grow), _pad_left(row_layer.keys, pad)])
                batch_layer.values = torch.cat([_pad_left(batch_layer.values, grow),
                                                _pad_left(row_layer.values, pad)])
            mask = torch.nn.functional.pad(self._mask, (grow, 0))
            row_mask = torch.nn.functional.pad(mask.new_ones((1, length)), (pad, 0))
            self._mask = torch.cat([mask, row_mask])
        self._rows.append(row)

    def _step(self) -> None:
        """One decode step of every row."""
        import torch

        ended = []
        try:
            with self._lock:
                stopped = [row for row in self._rows if row.request.stop.is_set()]
                if stopped:  # before their next token
                    self._leave(stopped)
                    ended += stopped
                if not self._rows:
                    return
                model, rows = self._model(), self._rows
                self.largest_batch = max(self.largest_batch, len(rows))
                device = self._mask.device
                input_ids = torch.tensor([[row.ids[-1]] for row in rows], device=device)
                positions = torch.tensor([[row.cached] for row in rows], device=device)
                mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
                with adapters(model, [row.request.version for row in rows]) as extra:
                    output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                   past_key_values=self._cache, use_cache=True, logits_to_keep=1, **extra)
                self._mask = mask
                logits = output.logits[:, -1, :]
                chosen = torch.stack([row.choose(logits[i:i + 1]) for i, row in enumerate(rows)]).tolist()
                finished = []
                for row, token in zip(rows, chosen):
                    row.cached += 1
                    if row.take(token):
                        finished.append(row)
                if finished:
                    self._leave(finished)
                    ended += finished
        except Exception as error:  # the model failed on this batch: its rows end with the error
            failed = [row for row in self._rows if row not in ended]
            self._rows, self._cache, self._mask = [], None, None
            for row in failed:
                row.request.error = error
            ended += failed
        finally:
            for row in ended:
                self._signal_end(row.request)

    def _leave(self, leaving: list[Row]) -> None:
        """Take `leaving` out of the batch (their prefix handed to on_finish first) and free their slots."""
        import torch

        for row in leaving:
            if row.on_finish is not None:
                row.on_finish(torch.tensor([row.ids], device=self._mask.device), self._row_cache(row))
        keep = [index for index, row in enumerate(self._rows) if row not in leaving]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        for layer in self._cache.layers:
            layer.batch_select_indices(index)
        mask = self._mask[index]
        first = int(mask.any(dim=0).int().argmax())  # columns before it are padding in every row left
        self._mask = mask[:, first:]
        if first:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self._rows = [self._rows[i] for i in keep]

    def _row_cache(self, row: Row):
        """A new DynamicCache holding `row`'s positions only."""
        return row_cache(self._model(), self._cache, self._rows.index(row), row.cached)

    @staticmethod
    def _signal_end(request: Request) -> None:
        request.tokens.end()
        request.finished.set()

    def _fail(self, requests: list[Request], error: BaseException) -> None:
        self._rows, self._cache, self._mask = [], None, None
        for request in requests:
            if not request.finished.is_set():
                request.error = error
                self._signal_end(request)
