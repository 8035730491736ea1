"""What identifies an adapter, and the checks it passes before the registry stores or loads it: the
base model's fingerprint, the digest of the feedback it was trained on, version names, the metadata
a publisher gives, file checksums, and the refusal of pickle files.

Invariants:
- `base_fingerprint()` is the same for a model and for a PeftModel wrapping it, and for float32 and
  bfloat16 loads of the same weights, so the trainer and the server compute the same value.
- A version name is `v<N>` with N >= 1 and no leading zero; `normalize_version` is the only way a
  user's spelling ('3', 'V3') becomes one, so a name can never climb out of the adapters folder.
- `check_metadata` returns the registry's record format (METADATA_FORMAT) holding plain JSON values
  only, or refuses.
- Every refusal is an AdapterError (an EngineError) whose one-line message says why and what to do.
- Importing this module is cheap: torch is imported only by `base_fingerprint`, and peft is looked
  at only when something else already imported it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from chatapp.core.errors import EngineError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
GATE_DECISIONS = ("promoted", "rejected", "manual")
METADATA_FORMAT = 1
METADATA_KEYS = {"base_model", "base_fingerprint", "method", "parent", "hyperparameters", "feedback_ids",
                 "metrics", "gate", "notes"}
REQUIRED_KEYS = ("base_model", "base_fingerprint", "method")
FINGERPRINT_SAMPLES = 1024  # values sampled from every base tensor
FINGERPRINT_SHORT = 12

VERSION_RE = re.compile(r"v([1-9][0-9]*)")
MAX_VERSION_DIGITS = 9  # a longer number names no folder anyone published (and could exceed a file name)


class AdapterError(EngineError):
    """The registry refuses this (unknown version, adapter for another base, pickle weights, ...);
    the message says why and what to do, in one line."""


# ---------------------------------------------------------------- names and digests

def normalize_version(version) -> str:
    """'v3', 'V3', '3' or 3 -> 'v3'; anything else is an AdapterError."""
    text = str(version).strip().lower()
    if text.isdigit():
        text = f"v{text}"
    if len(text) > MAX_VERSION_DIGITS + 1 or not VERSION_RE.fullmatch(text):
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:37] + "..."
        raise AdapterError(f"{shown} is not an adapter version (versions look like v1, v2, ...)")
    return text


def version_number(version: str) -> int:
    return int(VERSION_RE.fullmatch(version).group(1))


def short(fingerprint: str | None) -> str:
    return (fingerprint or "none")[:FINGERPRINT_SHORT]


def feedback_digest(ids) -> str:
    """sha256 over the feedback ids used for training: their str() forms, sorted, one a line
    (so the order the trainer saw them in does not matter)."""
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pickle_files(folder: Path) -> list[str]:
    """Files under `folder` whose suffix marks a pickle (loading one can run code)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.suffix.lower() in PICKLE_SUFFIXES)


# ---------------------------------------------------------------- publisher metadata

def check_metadata(metadata: dict) -> dict:
    """A publisher's metadata (see METADATA_KEYS) as the registry records it, or AdapterError."""
    if not isinstance(metadata, dict):
        raise AdapterError("metadata must be a dict")
    unknown = sorted(set(metadata) - METADATA_KEYS)
    if unknown:
        raise AdapterError(f"unknown metadata keys {unknown}; accepted: {sorted(METADATA_KEYS)}")
    for key in REQUIRED_KEYS:
        if not isinstance(metadata.get(key), str) or not metadata[key]:
            raise AdapterError(f"metadata needs {key!r} (a non-empty string)")
    parent = metadata.get("parent")
    if parent is not None:
        parent = normalize_version(parent)
    for key in ("hyperparameters", "metrics"):
        if not isinstance(metadata.get(key, {}), dict):
            raise AdapterError(f"metadata {key!r} must be a dict")
    ids = metadata.get("feedback_ids", [])
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, (int, str)) for i in ids):
        raise AdapterError("metadata 'feedback_ids' must be a list of ids (int or str)")
    gate = metadata.get("gate") or {"decision": "manual", "reason": ""}
    if not isinstance(gate, dict) or gate.get("decision") not in GATE_DECISIONS:
        raise AdapterError(f"metadata 'gate' must be {{'decision': one of {', '.join(GATE_DECISIONS)}, "
                           "'reason': text}")
    meta = {
        "format": METADATA_FORMAT,
        "parent": parent,
        "base_model": metadata["base_model"],
        "base_fingerprint": metadata["base_fingerprint"],
        "method": metadata["method"],
        "hyperparameters": dict(metadata.get("hyperparameters", {})),
        "feedback": {"ids": list(ids), "count": len(ids), "sha256": feedback_digest(ids)},
        "metrics": dict(metadata.get("metrics", {})),
        "gate": {"decision": gate["decision"], "reason": str(gate.get("reason") or "")},
        "notes": str(metadata.get("notes") or ""),
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as error:
        raise AdapterError(f"metadata must be plain JSON values: {error}") from None
    return meta


def check_version_folder(folder: Path, version: str, meta: dict, base_fingerprint: str | None, *,
                         check_files: bool = True) -> None:
    """AdapterError unless `folder` (version `version`, published with metadata `meta`) is safe to
    load on the base with that fingerprint (None skips that check): no pickle files, both peft files
    present, the config JSON, every recorded file unchanged (size and sha256, when check_files)."""
    pickles = pickle_files(folder)
    if pickles:
        raise AdapterError(f"adapter {version} holds pickle files ({', '.join(pickles)}), which can run code "
                           "when loaded; only safetensors weights are accepted")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise AdapterError(f"adapter {version} has no {name}")
    try:
        json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except ValueError as error:
        raise AdapterError(f"adapter {version}: {CONFIG_NAME} is not JSON ({error})") from None
    if check_files:
        for name, recorded in (meta.get("files") or {}).items():
            path = folder / name
            if not path.is_file():
                raise AdapterError(f"adapter {version}: {name} is missing")
            if path.stat().st_size != recorded.get("bytes") or sha256_file(path) != recorded.get("sha256"):
                raise AdapterError(f"adapter {version}: {name} differs from the file that was published "
                                   "(altered or corrupted); publish the adapter again")
    if base_fingerprint is not None and meta.get("base_fingerprint") != base_fingerprint:
        raise AdapterError(
            f"adapter {version} was trained on another base model ({meta.get('base_model')}, fingerprint "
            f"{short(meta.get('base_fingerprint'))}) than the one loaded (fingerprint {short(base_fingerprint)}); "
            "load that base model, or choose an adapter trained on this one")


# ---------------------------------------------------------------- base fingerprint

_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict", "quantization_config", "name_or_path",
                         "attn_implementation"}


def _stable_config(value):
    if isinstance(value, dict):
        return {str(k): _stable_config(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))
                if not str(k).startswith("_") and str(k) not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def _peft_classes():
    """(PeftModel-like wrappers, BaseTuner, BaseTunerLayer, AuxiliaryTrainingWrapper), or None when peft
    was never imported (then no model can hold peft layers, and peft need not be imported)."""
    if "peft" not in sys.modules:
        return None
    import peft
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = tuple(c for c in (getattr(peft, "PeftModel", None), getattr(peft, "PeftMixedModel", None)) if c)
    return wrappers, BaseTuner, BaseTunerLayer, AuxiliaryTrainingWrapper


def base_parameters(model) -> list[tuple[str, object]]:
    """The base model's parameters as (name, tensor), sorted by name, with the names the plain
    transformers model has: a PeftModel's wrapper prefix (`base_model.model.`), the `.base_layer`
    of tuner layers, adapter weights (lora_*) and modules_to_save copies are all left out."""
    classes = _peft_classes()
    if classes:
        wrappers, base_tuner, tuner_layer, aux_wrapper = classes
        if wrappers and isinstance(model, wrappers):
            model = model.get_base_model()
        if isinstance(model, base_tuner):
            model = model.model
    seen: set[int] = set()
    out: list[tuple[str, object]] = []

    def walk(module, prefix: str) -> None:
        if classes:
            if isinstance(module, aux_wrapper):
                return walk(module.original_module, prefix)
            if isinstance(module, tuner_layer):
                return walk(module.get_base_layer(), prefix)
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out.append((prefix + name, param))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return sorted(out, key=lambda item: item[0])


def base_fingerprint(model) -> str:
    """A cheap, deterministic sha256 (hex) of a base model: its config (minus volatile fields such as
    dtype, transformers_version, use_cache, name_or_path), every parameter's name and shape, and
    FINGERPRINT_SAMPLES values of every parameter at fixed, evenly spaced positions (first and last
    included), rounded to bfloat16. Same for a model and a PeftModel around it; same for float32 and
    bfloat16 loads of one checkpoint; differs for another checkpoint of the same architecture.
    (float16 or quantized loads give other values or shapes, hence another fingerprint.) A change
    smaller than bfloat16 precision, or only in unsampled positions, goes unnoticed: it identifies a
    checkpoint, it does not checksum it."""
    import torch

    params = base_parameters(model)
    unwrapped_config = getattr(model, "config", None)
    classes = _peft_classes()
    if classes and classes[0] and isinstance(model, classes[0]):
        unwrapped_config = model.get_base_model().config
    digest = hashlib.sha256(b"chatapp-base-fingerprint-1\n")
    cfg = unwrapped_config.to_dict() if unwrapped_config is not None else {}
    digest.update(json.dumps(_stable_config(cfg), sort_keys=True, default=str).encode())
    k = FINGERPRINT_SAMPLES
    index_cache: dict[int, object] = {}
    with torch.no_grad():
        for name, param in params:
            digest.update(f"\n{name} {tuple(param.shape)}\n".encode())
            if param.device.type == "meta":
                digest.update(b"meta")
                continue
            flat = param.detach().reshape(-1)
            n = flat.numel()
            if n > k:
                if n not in index_cache:
                    index_cache[n] = torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)
                flat = flat[index_cache[n].to(flat.device)]
            flat = flat.cpu()
            if flat.is_floating_point():
                values = flat.float().to(torch.bfloat16).view(torch.int16)
            else:
                values = flat.to(torch.int64)
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def stage_adapter_files(source, tmp: Path, *, skip: str) -> None:
    """Put the adapter files into `tmp`: save a PeftModel's active adapter, or copy a folder's top-level
    files (all but `skip`). Refuses pickle files, sub-folders, and adapters without config or weights."""
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if not src.is_dir():
            raise AdapterError(f"{src} is not a folder")
        pickles = pickle_files(src)
        if pickles:
            raise AdapterError(f"{src} holds pickle files ({', '.join(pickles)}); save the adapter with "
                               "safe_serialization=True and without them (safetensors only)")
        folders = sorted(p.name for p in src.iterdir() if p.is_dir())
        if folders:
            raise AdapterError(f"{src} holds folders ({', '.join(folders)}); give the folder that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME} itself")
        for path in src.iterdir():
            if path.name != skip:
                shutil.copyfile(path, tmp / path.name)
    elif hasattr(source, "save_pretrained") and hasattr(source, "peft_config"):
        name = source.active_adapter
        name = name[0] if isinstance(name, (list, tuple)) else name
        staging = tmp / ".save"
        source.save_pretrained(str(staging), selected_adapters=[name], safe_serialization=True)
        saved = staging / name if name != "default" else staging
        for path in saved.iterdir():
            if path.is_file():
                os.rename(path, tmp / path.name)
        readme = staging / "README.md"
        if readme.is_file() and not (tmp / "README.md").exists():
            os.rename(readme, tmp / "README.md")
        shutil.rmtree(staging)
    else:
        raise AdapterError(f"publish needs an adapter folder or a peft model, got {type(source).__name__}")
    pickles = pickle_files(tmp)
    if pickles:
        raise AdapterError(f"the adapter was saved with pickle files ({', '.join(pickles)}); safetensors only")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (tmp / name).is_file():
            raise AdapterError(f"the adapter has no {name} (a peft adapter saved with safe_serialization=True "
                               "has adapter_config.json and adapter_model.safetensors)")
