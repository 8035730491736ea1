"""The conversation prefix cache: a follow-up turn reuses what earlier turns computed, the KV cache
of the conversation so far and the vision features of the images already seen.

How it is used (`Engine.stream`): `plan()` turns the full prompt's inputs into `generate()` inputs
that start from the longest cached prefix: `input_ids` stays the whole prompt and `past_key_values`
holds the prefix, so `generate` runs only the uncached suffix (transformers 5.23 slices input_ids by
the cache's length in `_prefill`); the suffix's images go in as `mm_encoder_outputs` (Idefics3's
pre-encoded features), each image's features cached on their own. `Plan.finish()` stores the
cache that generation grew, keyed by the tokens it holds.

Invariants:
- An entry belongs to the adapter version that built it and is never used for another: `version`
  is any key naming the weights (the engine passes the version and the folder it was loaded from).
- Stored entries are never changed: a generation starts from a copy of the shared prefix.
- A prefix is reused only where it is exactly the new prompt: the same token ids, the same images
  (sha256 of the decoded pixels plus the image processor's settings and the image detail: a low and a
  high encoding of one picture are different features) in the same places; it never
  ends inside an image's tokens, and at least one prompt token is always left to run.
- The tensors held stay within `budget_bytes` (the oldest out first: prefixes by when they were
  stored, image features by when they were last used; an entry larger than the budget is not
  kept). An evicted entry is simply recomputed.
- Prompts with images are planned only for models that take pre-encoded image features
  (Idefics3's `get_image_features` and `<global-img>` layout), and any prompt only for models whose
  cache is plain full attention; anything else, and every prompt while the budget is 0, takes the
  plain path (`plan()` returns None).
- Runs only on the engine's generation thread (under its lock): no locking of its own.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Prefix:
    version: object
    ids: list[int]
    image_digests: tuple[str, ...]  # the images whose tokens the prefix holds, in order (where ids
    # agree up to a point, so do the images' places: only their pixels can differ)
    cache: object  # a transformers DynamicCache holding exactly len(ids) positions
    nbytes: int


def tensor_bytes(tensors) -> int:
    """Bytes of the storage behind `tensors` (a view keeps its whole storage alive), each storage once."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def image_digest(image, settings: str) -> str:
    """sha256 of an image's decoded pixels, size and mode, plus the processor settings that turn it
    into frames: the same picture sent twice (another upload, another file) gets the same key."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:{settings}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def image_token_spans(ids: list[int], image_token: int, global_token: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Each image's [start, end) in the prompt and its frames' runs of image tokens. Idefics3 writes
    an image as its tiles' runs then a `<global-img>` run, so a run right after `<global-img>` ends one."""
    images, runs, i = [], [], 0
    while i < len(ids):
        if ids[i] != image_token:
            i += 1
            continue
        start = i
        while i < len(ids) and ids[i] == image_token:
            i += 1
        runs.append((start, i))
        if start > 0 and ids[start - 1] == global_token:
            images.append((runs[0][0], runs))
            runs = []
    return images if not runs else []  # runs left without a global frame: not a layout we know


class ServingCache:
    """An LRU of conversation prefixes and image features under one byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key -> (value, bytes)
        self.nbytes = 0
        self.stats = {"prefix_hits": 0, "prefix_misses": 0, "reused_tokens": 0, "image_hits": 0, "image_misses": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _get(self, key):
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def _put(self, key, value, nbytes: int) -> None:
        self._drop(key)
        if nbytes > self.budget_bytes:
            return
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.nbytes -= found[1]

    # ------------------------------------------------------------ images

    def holds_image(self, version, digest: str) -> bool:
        """Whether this image's features are stored (without making them recent)."""
        return ("image", version, digest) in self._entries

    def image_features(self, version, digest: str, compute):
        key = ("image", version, digest)
        features = self._get(key)
        if features is None:
            self.stats["image_misses"] += 1
            features = compute()
            self._put(key, features, tensor_bytes([features]))
        else:
            self.stats["image_hits"] += 1
        return features

    # ------------------------------------------------------------ prefixes

    def longest_prefix(self, version, ids: list[int], digests: list[str],
                       spans: list[tuple[int, int]]) -> tuple[_Prefix | None, int]:
        """The stored prefix sharing the most leading positions with this prompt (the newest of equals),
        and how many. A match does not make an entry recent: the reply stores a new entry holding the
        shared part, so a prefix that every conversation shares (the template's opening, a system
        prompt) never keeps an old conversation alive; entries age from when they were stored."""
        best, best_length = None, 0
        for key, (entry, _) in reversed(self._entries.items()):
            if key[0] != "prefix" or entry.version != version:
                continue
            length = _shared_length(entry, ids, digests, spans)
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def add_prefix(self, entry: _Prefix) -> None:
        """Keep `entry`; a stored prefix of the same version that it extends is dropped (it can
        match nothing this one does not match at least as far)."""
        for key, (other, _) in list(self._entries.items()):
            if key[0] == "prefix" and other.version == entry.version and len(other.ids) <= len(entry.ids) \
                    and other.ids == entry.ids[:len(other.ids)] \
                    and other.image_digests == entry.image_digests[:len(other.image_digests)]:
                self._drop(key)
        self._put(("prefix", id(entry)), entry, entry.nbytes)


def _shared_length(entry: _Prefix, ids: list[int], digests: list[str], spans: list[tuple[int, int]]) -> int:
    limit = min(len(entry.ids), len(ids) - 1)  # at least one prompt token must run to give the next token
    length = 0
    while length < limit and entry.ids[length] == ids[length]:
        length += 1
    for index, (start, end) in enumerate(spans):
        if start >= length:
            break
        same_image = index < len(entry.image_digests) and entry.image_digests[index] == digests[index]
        if not same_image or end > length:  # another picture, or the prefix ends inside this one
            return start
    return length


def copy_prefix(cache, length: int, config):
    """A new DynamicCache holding the first `length` positions of `cache` (the stored one is kept as is)."""
    from transformers import DynamicCache

    copy = DynamicCache(config=config)
    for layer, source in zip(copy.layers, cache.layers):
        layer.update(source.keys[..., :length, :], source.values[..., :length, :])  # torch.cat: a copy
    return copy


def reusable(cache) -> bool:
    """Only plain full-attention layers can be cut back to any prefix exactly."""
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class Plan:
    """`generate()` inputs that start from a cached prefix; `finish()` keeps what generation grew."""
    kwargs: dict
    reused_tokens: int
    owner: ServingCache
    version: object
    digests: list[str]
    spans: list[tuple[int, int]]

    def finish(self, sequences, cache=None) -> None:
        """Store the cache generate() grew, keyed by the tokens it holds (`sequences`: generate's output).
        `cache`: the reply's own cache where it is not the one planned (the batcher's copy of its row)."""
        cache = cache if cache is not None else self.kwargs["past_key_values"]
        length = cache.get_seq_length()
        if not reusable(cache) or length > sequences.shape[1]:
            return
        kept = [i for i, (_, end) in enumerate(self.spans) if end <= length]
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        digests = tuple(self.digests[i] for i in kept)
        ids = sequences[0, :length].tolist()
        self.owner.add_prefix(_Prefix(self.version, ids, digests, cache, tensor_bytes(tensors)))


def plan(owner: ServingCache, model, processor, inputs, images: list, version, *,
         image_detail: str = "high", encode_images: bool = True) -> Plan | None:
    """Inputs for `model.generate` that reuse `owner`'s longest matching prefix and cached image
    features (run it under the adapter context the reply uses: features depend on the weights;
    `image_detail` is the detail `inputs` were made at).
    `encode_images=False` (a prompt prefilled together with others: batching.py): a prompt none of
    whose images is cached or in a reused prefix keeps its pixel_values and starts from an empty
    cache (the few template tokens it shares with other conversations are computed again), so the
    caller's one forward pass encodes every prompt's images together; its features are not stored
    (its follow-ups reuse the conversation's KV, image included).
    None: take the plain path (no budget, or a model or layout the cache does not know)."""
    import torch
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if owner.budget_bytes <= 0 or inputs["input_ids"].shape[0] != 1:
        return None
    past = DynamicCache(config=model.config)
    if not reusable(past):
        return None
    ids = inputs["input_ids"][0].tolist()
    layout = []
    if images:
        image_token = getattr(model.config, "image_token_id", None)
        global_token = processor.tokenizer.convert_tokens_to_ids("<global-img>")
        layout = image_token_spans(ids, image_token, global_token)
        frames = sum(len(runs) for _, runs in layout)
        if len(layout) != len(images) or inputs["pixel_values"].shape[1] != frames \
                or not hasattr(model, "get_image_features"):
            return None
    settings = f"{processor.image_processor.to_json_string()}detail={image_detail}" if images else ""
    digests = [image_digest(image, settings) for image in images]
    spans = [(start, runs[-1][1]) for start, runs in layout]
    entry, length = owner.longest_prefix(version, ids, digests, spans)
    if not encode_images and layout and length <= spans[0][0] \
            and not any(owner.holds_image(version, digest) for digest in digests):
        owner.stats["prefix_misses"] += 1
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                  "past_key_values": past, "pixel_values": inputs["pixel_values"]}
        if inputs.get("pixel_attention_mask") is not None:
            kwargs["pixel_attention_mask"] = inputs["pixel_attention_mask"]
        return Plan(kwargs, 0, owner, version, digests, spans)
    if entry is None:
        owner.stats["prefix_misses"] += 1
    else:
        owner.stats["prefix_hits"] += 1
        owner.stats["reused_tokens"] += length
        past = copy_prefix(entry.cache, length, model.config)
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "past_key_values": past}
    features, first_frame = [], 0
    for index, (start, runs) in enumerate(layout):
        frames = slice(first_frame, first_frame + len(runs))
        first_frame += len(runs)
        if start < length:
            continue  # already in the reused prefix

        def encode(frames=frames):
            mask = inputs.get("pixel_attention_mask")
            return model.get_image_features(inputs["pixel_values"][:, frames],
                                            mask[:, frames] if mask is not None else None).pooler_output[0]

        features.append(owner.image_features(version, digests[index], encode))
    if features:
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[torch.cat(features)])}
    return Plan(kwargs, length, owner, version, digests, spans)
