"""Prefilling prompts for the batcher (batching.py): what a prompt brings (`Prefill`), which prompts
share one forward pass, the padded inputs of that pass, and each row's KV cut back out of it.

Invariants:
- Only prompts that start from an empty cache are prefilled together, and only with prompts that
  bring the same kinds of inputs (pixel_values or none); the rest are prefilled alone.
- A joint pass is left-padded: `pad_id` fills the left of shorter prompts and the attention mask
  hides it; positions count from each prompt's first real token; a prompt with fewer image frames
  is padded with all-zero frames, which Idefics3's vision step drops. So each row's KV, cut out
  without its padding, is the one its prompt gets alone, up to float reassociation.
- Adapters: a batch of one version runs as that version (peft's active adapter, or the adapters
  disabled for the base); a mixed batch passes peft's per-row `adapter_names` ("__base__").
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass
class Prefill:
    """A request's prompt, ready for the model (what `Request.prepare` returns)."""
    input_ids: object  # (1, n) tensor: the whole prompt
    past: object  # a DynamicCache holding the prompt's first k < n positions (k = 0: an empty one)
    inputs: dict  # other forward() inputs for the uncached part: pixel_values and its mask, or mm_encoder_outputs
    max_new_tokens: int
    on_finish: Callable | None = None  # (ids (1, m) tensor, DynamicCache of the first m - 1) when the row ends



@contextlib.contextmanager
def adapters(model, versions: list):
    """Run the model as `versions` (one per row; None = the base). Yields extra forward() arguments."""
    peft = sys.modules.get("peft")  # not imported: no adapter was ever loaded (importing it costs seconds)
    if peft is None or not isinstance(model, peft.PeftModel):  # no adapter loaded yet: every row is the base
        yield {}
        return
    distinct = set(versions)
    if len(distinct) > 1:
        yield {"adapter_names": [version if version is not None else "__base__" for version in versions]}
        return
    (version,) = distinct
    if version is None:
        with model.disable_adapter():
            yield {}
        return
    if model.active_adapter != version:
        model.set_adapter(version)
        model.eval()  # peft's set_adapter marks the adapter trainable
    yield {}



def prefill_groups(ready: list, rows: int, tokens: int) -> list[list]:
    """`ready` (request, prefill) pairs split into what is prefilled in one pass: prompts from an
    empty cache with the same kinds of inputs, at most `rows` of them and `tokens` prompt tokens;
    every other prompt alone. Order is kept within each group."""
    groups, open_groups = [], {}
    for request, prefill in ready:
        if prefill.past.get_seq_length() or rows < 2:
            groups.append([(request, prefill)])
            continue
        kind = tuple(sorted(prefill.inputs))
        group = open_groups.get(kind)
        length = prefill.input_ids.shape[1]
        if group is None or len(group) >= rows or sum(p.input_ids.shape[1] for _, p in group) + length > tokens:
            group = open_groups[kind] = []
            groups.append(group)
        group.append((request, prefill))
    return groups


def joint_inputs(group: list, pad_id: int):
    """The forward-pass inputs of `group`'s prompts, left-padded: (input_ids, attention_mask,
    position_ids, other inputs, prompt lengths)."""
    import torch

    lengths = [prefill.input_ids.shape[1] for _, prefill in group]
    width = max(lengths)
    ids = torch.cat([torch.nn.functional.pad(prefill.input_ids, (width - n, 0), value=pad_id)
                     for (_, prefill), n in zip(group, lengths)])
    mask = torch.cat([torch.nn.functional.pad(ids.new_ones((1, n)), (width - n, 0)) for n in lengths])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {}
    for key in group[0][1].inputs:
        tensors = [prefill.inputs[key] for _, prefill in group]
        if key in ("pixel_values", "pixel_attention_mask"):  # (1, frames, ...): all-zero frames pad a row
            frames = max(t.shape[1] for t in tensors)
            tensors = [torch.cat([t, t.new_zeros((1, frames - t.shape[1], *t.shape[2:]))], dim=1) for t in tensors]
        inputs[key] = torch.cat(tensors)
    return ids, mask, positions, inputs, lengths


def row_cache(model, cache, index: int, length: int):
    """Row `index` of a left-padded batch `cache`, its last `length` positions only (no padding), as a
    new one-row DynamicCache (copies: the batch's tensors are not kept alive)."""
    from transformers import DynamicCache

    row = DynamicCache(config=model.config)
    for layer, source in zip(row.layers, cache.layers):
        layer.update(source.keys[index:index + 1, :, -length:, :], source.values[index:index + 1, :, -length:, :])
    return row
