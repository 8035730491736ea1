"""The versioned adapter registry under `<data dir>/adapters/`, and `python -m chatapp adapters ...`.

Layout:
    adapters/
      v1/  adapter_config.json  adapter_model.safetensors  [README.md]  chatapp-adapter.json
      v2/  ...
      ACTIVE        JSON: {"version": "v2" | null, "previous": [...], "updated_at", "reason", "history": [...]}
      LAST_VERSION  the highest version number ever committed (numbers are never reused)
      .lock         flock()ed by every change (publish, activate, rollback, deactivate, delete, cleanup)

Invariants:
- A folder `vN` exists only complete: publishing writes everything into `adapters/.tmp-...`, fsyncs
  the files, writes `chatapp-adapter.json` LAST, fsyncs, then renames the folder to `vN`; the rename
  is the commit. A crash (even SIGKILL) at any point leaves either no `vN` or a complete one.
- Weights are safetensors only: a source or a version folder with pickle files (.bin, .pt, .pth,
  .pkl, .pickle, .ckpt) is refused, and `chatapp-adapter.json` records the sha256 and size of every
  file, which `validate()` checks.
- Version numbers only grow: the next one is above every `vN` folder, every `.trash-vN-...` folder
  and LAST_VERSION (written after each commit, and before each delete).
- `ACTIVE` is replaced atomically (temp file + fsync + os.replace); no file means the base model.
  Publishing never changes it unless asked (`activate=True`). The active version cannot be deleted.
- Deleting renames `vN` to `.trash-vN-...` (one atomic step: the version is gone) before removing it.
- Readers (list, show, active, validate) take no lock and ignore `.tmp-*` / `.trash-*` entries;
  `cleanup()` (tried on open, skipped while another process is changing the registry) removes them.
- `base_fingerprint()` is the same for a model and for a PeftModel wrapping it, and for float32 and
  bfloat16 loads of the same weights, so the trainer and the server compute the same value.
- Importing this module is cheap (no torch, peft or transformers): the CLI builds its parser from it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path

from chatapp.core import config
from chatapp.core.errors import EngineError

ADAPTERS_DIR = "adapters"
METADATA_NAME = "chatapp-adapter.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ACTIVE_NAME = "ACTIVE"
LAST_VERSION_NAME = "LAST_VERSION"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
GATE_DECISIONS = ("promoted", "rejected", "manual")
METADATA_FORMAT = 1
MAX_PREVIOUS = 20   # rollback depth kept in ACTIVE
MAX_HISTORY = 100   # activation events kept in ACTIVE
FINGERPRINT_SAMPLES = 1024  # values sampled from every base tensor
FINGERPRINT_SHORT = 12

VERSION_RE = re.compile(r"v([1-9][0-9]*)")
_TRASH_RE = re.compile(r"\.trash-v([1-9][0-9]*)-")
METADATA_KEYS = {"base_model", "base_fingerprint", "method", "parent", "hyperparameters", "feedback_ids",
                 "metrics", "gate", "notes"}
REQUIRED_KEYS = ("base_model", "base_fingerprint", "method")


class AdapterError(EngineError):
    """The registry refuses this (unknown version, adapter for another base, pickle weights, ...);
    the message says why and what to do, in one line."""


def _crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named point when $CHATAPP_CRASH_AT equals `name`.
    Points: after-weights, after-metadata, before-rename, after-rename, before-active-replace,
    after-trash. Costs one dictionary lookup; never set the variable outside tests."""
    if os.environ.get("CHATAPP_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def short(fingerprint: str | None) -> str:
    return (fingerprint or "none")[:FINGERPRINT_SHORT]


def normalize_version(version) -> str:
    """'v3', 'V3', '3' or 3 -> 'v3'; anything else is an AdapterError."""
    text = str(version).strip().lower()
    if text.isdigit():
        text = f"v{text}"
    if not VERSION_RE.fullmatch(text):
        raise AdapterError(f"{version!r} is not an adapter version (versions look like v1, v2, ...)")
    return text


def _number(version: str) -> int:
    return int(VERSION_RE.fullmatch(version).group(1))


def feedback_digest(ids) -> str:
    """sha256 over the feedback ids used for training: their str() forms, sorted, one a line
    (so the order the trainer saw them in does not matter)."""
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()


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


# ---------------------------------------------------------------- files

def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(target: Path, text: str, crash_point: str | None = None) -> None:
    """Write `text` to a temp file beside `target`, fsync it, then os.replace it over `target`."""
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if crash_point:
            _crash_point(crash_point)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pickle_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.suffix.lower() in PICKLE_SUFFIXES)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_THREAD_LOCKS: dict[Path, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


# ---------------------------------------------------------------- registry

class Registry:
    """The adapters folder. `Registry(root)`; `Registry.for_data_dir(data_dir)` uses `<data dir>/adapters`."""

    def __init__(self, root: str | os.PathLike | None = None, *, cleanup: bool = True):
        self.root = Path(root).resolve() if root is not None else config.data_dir() / ADAPTERS_DIR
        with _THREAD_LOCKS_GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(self.root, threading.RLock())
        if cleanup and self.root.is_dir():
            self.cleanup(wait=False)

    @classmethod
    def for_data_dir(cls, data_dir: str | os.PathLike | None = None, **kwargs) -> "Registry":
        return cls(config.data_dir(data_dir) / ADAPTERS_DIR, **kwargs)

    # ------------------------------------------------------------ locking

    @contextlib.contextmanager
    def _locked(self, wait: bool = True):
        """Exclusive lock over changes: a thread lock (flock does not order threads sharing a
        descriptor) and flock on adapters/.lock (other processes). Yields False when wait=False and
        the lock is taken."""
        if not self._thread_lock.acquire(blocking=wait):
            yield False
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    import fcntl
                except ImportError:  # not POSIX: only this process's threads are ordered
                    fcntl = None
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                    except BlockingIOError:
                        yield False
                        return
                yield True
            finally:
                os.close(fd)  # releases the flock
        finally:
            self._thread_lock.release()

    # ------------------------------------------------------------ reading

    def _folder(self, version: str) -> Path:
        return self.root / version

    def versions(self) -> list[str]:
        """Committed version folders (vN), oldest first; temp and trash entries are ignored."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if VERSION_RE.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=_number)

    def _read_metadata(self, version: str) -> dict:
        path = self._folder(version) / METADATA_NAME
        if not path.is_file():
            raise AdapterError(f"adapter {version} has no {METADATA_NAME}: it was not published by this registry; "
                               f"delete it (python -m chatapp adapters delete {version})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise AdapterError(f"adapter {version}: {METADATA_NAME} is unreadable ({error})") from None
        if not isinstance(meta, dict) or meta.get("version") != version:
            raise AdapterError(f"adapter {version}: {METADATA_NAME} is for version "
                               f"{meta.get('version') if isinstance(meta, dict) else None!r}, not {version}")
        return meta

    def _read_active(self, strict: bool = True) -> dict:
        empty = {"version": None, "previous": [], "updated_at": None, "reason": None, "history": []}
        path = self.root / ACTIVE_NAME
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as error:
            if strict:
                raise AdapterError(f"{path} is unreadable ({error}); choose the adapter again with "
                                   "`python -m chatapp adapters activate V` or `... deactivate`") from None
            return empty
        if not isinstance(state, dict) or not (state.get("version") is None
                                               or VERSION_RE.fullmatch(str(state.get("version")))):
            if strict:
                raise AdapterError(f"{path} does not name a version; choose the adapter again with "
                                   "`python -m chatapp adapters activate V` or `... deactivate`")
            return empty
        return {**empty, **state}

    def active(self) -> str | None:
        """The active version, or None for the base model (no adapter)."""
        return self._read_active()["version"]

    def active_state(self) -> dict:
        """The whole ACTIVE record (version, previous, updated_at, reason, history): a server can
        poll `updated_at` to notice a change made from the command line."""
        return self._read_active()

    def list(self) -> list[dict]:
        """One summary per version, oldest first: version, created_at, method, gate decision, scalar
        metrics, parent, active flag; a version whose metadata cannot be read has an `error`."""
        active = self._read_active(strict=False)["version"]
        out = []
        for version in self.versions():
            row = {"version": version, "active": version == active}
            try:
                meta = self._read_metadata(version)
            except AdapterError as error:
                row["error"] = str(error)
                out.append(row)
                continue
            metrics = meta.get("metrics") or {}
            row.update(created_at=meta.get("created_at"), method=meta.get("method"),
                       gate=(meta.get("gate") or {}).get("decision"), parent=meta.get("parent"),
                       base_model=meta.get("base_model"),
                       metrics={k: v for k, v in metrics.items()
                                if isinstance(v, (int, float, str, bool)) or v is None})
            out.append(row)
        return out

    def show(self, version) -> dict:
        """The full metadata of a version, plus `active` and its activation events."""
        version = self._known(version)
        meta = self._read_metadata(version)
        state = self._read_active(strict=False)
        meta["active"] = state["version"] == version
        meta["activations"] = [e for e in state.get("history", []) if e.get("version") == version]
        meta["path"] = str(self._folder(version))
        return meta

    def _known(self, version) -> str:
        version = normalize_version(version)
        if not self._folder(version).is_dir():
            known = ", ".join(self.versions()) or "none"
            raise AdapterError(f"no adapter {version} in {self.root} (published: {known})")
        return version

    def validate(self, version, base_fingerprint: str | None, *, check_files: bool = True) -> Path:
        """The folder of a version that is safe to load on this base, or AdapterError saying why not:
        unknown version, no or broken metadata, pickle files, a missing or altered file, or another
        base model (fingerprint mismatch; pass None to skip that check)."""
        version = self._known(version)
        folder = self._folder(version)
        meta = self._read_metadata(version)
        pickles = _pickle_files(folder)
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
                if path.stat().st_size != recorded.get("bytes") or _sha256_file(path) != recorded.get("sha256"):
                    raise AdapterError(f"adapter {version}: {name} differs from the file that was published "
                                       "(altered or corrupted); publish the adapter again")
        if base_fingerprint is not None and meta.get("base_fingerprint") != base_fingerprint:
            raise AdapterError(
                f"adapter {version} was trained on another base model ({meta.get('base_model')}, fingerprint "
                f"{short(meta.get('base_fingerprint'))}) than the one loaded (fingerprint {short(base_fingerprint)}); "
                "load that base model, or choose an adapter trained on this one")
        return folder

    # ------------------------------------------------------------ publishing

    def _next_number(self) -> int:
        highest = 0
        for entry in self.root.iterdir():
            match = VERSION_RE.fullmatch(entry.name) or _TRASH_RE.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
        try:
            highest = max(highest, int((self.root / LAST_VERSION_NAME).read_text().strip() or 0))
        except (FileNotFoundError, ValueError):
            pass
        return highest + 1

    def _record_last(self, number: int) -> None:
        try:
            last = int((self.root / LAST_VERSION_NAME).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            last = 0
        if number > last:
            _atomic_write_text(self.root / LAST_VERSION_NAME, f"{number}\n")

    @staticmethod
    def _check_metadata(metadata: dict) -> dict:
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

    def _stage_source(self, source, tmp: Path) -> None:
        """Put the adapter files into `tmp`: save a PeftModel, or copy a folder's top-level files."""
        if isinstance(source, (str, os.PathLike)):
            src = Path(source)
            if not src.is_dir():
                raise AdapterError(f"{src} is not a folder")
            pickles = _pickle_files(src)
            if pickles:
                raise AdapterError(f"{src} holds pickle files ({', '.join(pickles)}); save the adapter with "
                                   "safe_serialization=True and without them (safetensors only)")
            folders = sorted(p.name for p in src.iterdir() if p.is_dir())
            if folders:
                raise AdapterError(f"{src} holds folders ({', '.join(folders)}); give the folder that holds "
                                   f"{CONFIG_NAME} and {WEIGHTS_NAME} itself")
            for path in src.iterdir():
                if path.name != METADATA_NAME:
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
        pickles = _pickle_files(tmp)
        if pickles:
            raise AdapterError(f"the adapter was saved with pickle files ({', '.join(pickles)}); safetensors only")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (tmp / name).is_file():
                raise AdapterError(f"the adapter has no {name} (a peft adapter saved with safe_serialization=True "
                                   "has adapter_config.json and adapter_model.safetensors)")

    def publish(self, source, metadata: dict, *, activate: bool = False, reason: str = "") -> str:
        """Add an adapter (a folder saved by peft, or a PeftModel: its active adapter) as the next
        version and return it ('v3'). `metadata`: base_model, base_fingerprint, method (required);
        parent, hyperparameters, feedback_ids, metrics, gate {'decision', 'reason'}, notes.
        With activate=True the new version becomes active (refused for a rejected one)."""
        meta = self._check_metadata(metadata)
        if activate and meta["gate"]["decision"] == "rejected":
            raise AdapterError("the gate rejected this adapter; publish it without activating it")
        with self._locked() as locked:
            assert locked
            version = f"v{self._next_number()}"
            tmp = self.root / f"{TMP_PREFIX}publish-{version}-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                self._stage_source(source, tmp)
                files = {}
                for path in sorted(tmp.iterdir()):
                    _fsync_file(path)
                    files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}
                _crash_point("after-weights")
                try:
                    peft_config = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
                except ValueError as error:
                    raise AdapterError(f"{CONFIG_NAME} is not JSON ({error})") from None
                meta = {"version": version, **meta, "created_at": now(), "files": files,
                        "peft": {k: peft_config.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules",
                                                                 "base_model_name_or_path", "peft_version")
                                 if k in peft_config}}
                with open(tmp / METADATA_NAME, "w", encoding="utf-8") as f:  # last: it marks the folder complete
                    f.write(json.dumps(meta, indent=2) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                _crash_point("after-metadata")
                _fsync_dir(tmp)
                _crash_point("before-rename")
                os.rename(tmp, self._folder(version))  # the commit
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_dir(self.root)
            _crash_point("after-rename")
            self._record_last(_number(version))
            if activate:
                self._set_active(version, "activate", reason or "published with activate=True")
        return version

    # ------------------------------------------------------------ the active pointer

    def _set_active(self, version: str | None, action: str, reason: str, *, push: bool = True) -> dict:
        """Write ACTIVE (caller holds the lock). push: remember the current version for rollback."""
        state = self._read_active(strict=False)
        previous = [v for v in state["previous"] if v is None or VERSION_RE.fullmatch(str(v))]
        if push and state["version"] != version:
            previous.append(state["version"])
        stamp = now()
        history = (state.get("history") or []) + [{"at": stamp, "action": action, "version": version,
                                                   "from": state["version"], "reason": reason}]
        new = {"version": version, "previous": previous[-MAX_PREVIOUS:], "updated_at": stamp, "reason": reason,
               "history": history[-MAX_HISTORY:]}
        _atomic_write_text(self.root / ACTIVE_NAME, json.dumps(new, indent=2) + "\n",
                           crash_point="before-active-replace")
        return new

    def activate(self, version, reason: str = "", *, base_fingerprint: str | None = None,
                 force: bool = False) -> str:
        """Make `version` the active adapter (after validating it; with base_fingerprint also against
        that base). A version the gate rejected needs force=True."""
        with self._locked():
            version = normalize_version(version)
            self.validate(version, base_fingerprint)
            decision = (self._read_metadata(version).get("gate") or {}).get("decision")
            if decision == "rejected" and not force:
                raise AdapterError(f"the gate rejected {version}; activate it anyway with --force")
            if self._read_active(strict=False)["version"] != version:
                self._set_active(version, "activate", reason or "activated")
        return version

    def deactivate(self, reason: str = "") -> str | None:
        """Serve the base model (no adapter); returns the version that was active."""
        with self._locked():
            was = self._read_active(strict=False)["version"]
            if was is not None:
                self._set_active(None, "deactivate", reason or "deactivated")
        return was

    def rollback(self, reason: str = "") -> str | None:
        """Go back to the version active before the current one (None = the base model); versions
        deleted since are skipped. AdapterError when there is nothing to go back to."""
        with self._locked():
            state = self._read_active(strict=False)
            previous = list(state["previous"])
            while previous:
                target = previous.pop()
                if target == state["version"]:
                    continue
                if target is not None and not self._folder(target).is_dir():
                    continue
                if target is not None:
                    self.validate(target, None)
                state_previous = previous
                break
            else:
                raise AdapterError("nothing to roll back to: no earlier active version is recorded")
            # write the popped stack: a rollback is not itself something to roll back to
            stamp = now()
            history = (state.get("history") or []) + [{"at": stamp, "action": "rollback", "version": target,
                                                       "from": state["version"], "reason": reason or "rollback"}]
            new = {"version": target, "previous": state_previous, "updated_at": stamp,
                   "reason": reason or "rollback", "history": history[-MAX_HISTORY:]}
            _atomic_write_text(self.root / ACTIVE_NAME, json.dumps(new, indent=2) + "\n",
                               crash_point="before-active-replace")
        return target

    def delete(self, version) -> None:
        """Remove a version for good (its number is never used again). The active one is refused."""
        with self._locked():
            version = self._known(version)
            state = self._read_active(strict=False)
            if state["version"] == version:
                raise AdapterError(f"{version} is the active adapter; activate another one, roll back or "
                                   "deactivate first")
            self._record_last(_number(version))
            trash = self.root / f"{TRASH_PREFIX}{version}-{secrets.token_hex(4)}"
            os.rename(self._folder(version), trash)  # one atomic step: the version is gone
            _fsync_dir(self.root)
            _crash_point("after-trash")
            if version in state["previous"]:
                state["previous"] = [v for v in state["previous"] if v != version]
                _atomic_write_text(self.root / ACTIVE_NAME, json.dumps(state, indent=2) + "\n")
            shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self, wait: bool = True) -> list[str]:
        """Remove leftover `.tmp-*` and `.trash-*` entries (from a crash). Returns their names; with
        wait=False does nothing while another process holds the lock (its temp folder may be live)."""
        if not self.root.is_dir():
            return []
        with self._locked(wait=wait) as locked:
            if not locked:
                return []
            removed = []
            for entry in self.root.iterdir():
                if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    _remove_tree(entry)
                    removed.append(entry.name)
            return sorted(removed)


# ---------------------------------------------------------------- command line

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `adapters` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "adapters", help="list, inspect and choose the LoRA adapters trained from feedback",
        description="The versioned adapters under DATA_DIR/adapters: v1, v2, ... (numbers are never reused). "
                    "The active one is what the chat serves; none active means the base model.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per version (* marks the active one)")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    show = actions.add_parser("show", help="a version's full metadata as JSON")
    show.add_argument("version", help="v3 or 3")
    activate = actions.add_parser("activate", help="serve this version")
    activate.add_argument("version", help="v3 or 3")
    activate.add_argument("--reason", default="", help="why (kept in the activation history)")
    activate.add_argument("--force", action="store_true", help="activate even a version the gate rejected")
    rollback = actions.add_parser("rollback", help="go back to the version active before the current one")
    rollback.add_argument("--reason", default="")
    deactivate = actions.add_parser("deactivate", help="serve the base model without an adapter")
    deactivate.add_argument("--reason", default="")
    delete = actions.add_parser("delete", help="remove a version (not the active one)")
    delete.add_argument("version", help="v3 or 3")
    for action in (listing, show, activate, rollback, deactivate, delete):
        action.add_argument("--data-dir", help="the app's data folder (default: $CHATAPP_DATA_DIR, else ./data)")
    return parser


def _metrics_text(metrics: dict, limit: int = 4) -> str:
    items = []
    for key, value in list(metrics.items())[:limit]:
        items.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(items) + (" ..." if len(metrics) > limit else "")


def _name(version: str | None) -> str:
    return version or "base model (no adapter)"


def run(args) -> int:
    """The `adapters` command. A user mistake exits 2 with one `error:` line on stderr."""
    try:
        registry = Registry.for_data_dir(args.data_dir)
        if args.action == "list":
            rows = registry.list()
            if args.json:
                print(json.dumps({"active": registry.active(), "versions": rows}, indent=2))
                return 0
            if not rows:
                print(f"no adapters in {registry.root}; the base model is served", file=sys.stderr)
                return 0
            print(f"  {'version':<8} {'created (UTC)':<19} {'method':<14} {'gate':<9} {'parent':<7} metrics")
            for row in rows:
                mark = "*" if row["active"] else " "
                if "error" in row:
                    print(f"{mark} {row['version']:<8} {'(broken: ' + row['error'] + ')'}")
                    continue
                created = (row["created_at"] or "")[:19].replace("T", " ")
                print(f"{mark} {row['version']:<8} {created:<19} {str(row['method'])[:14]:<14} "
                      f"{str(row['gate']):<9} {str(row['parent'] or '-'):<7} {_metrics_text(row['metrics'])}")
            if registry.active() is None:
                print("(no active adapter: the base model is served)")
        elif args.action == "show":
            print(json.dumps(registry.show(args.version), indent=2))
        elif args.action == "activate":
            was = registry.active()
            version = registry.activate(args.version, args.reason, force=args.force)
            print(f"active: {version} (was {_name(was)})")
        elif args.action == "rollback":
            was = registry.active()
            print(f"active: {_name(registry.rollback(args.reason))} (rolled back from {_name(was)})")
        elif args.action == "deactivate":
            was = registry.deactivate(args.reason)
            print(f"active: {_name(None)} (was {_name(was)})")
        elif args.action == "delete":
            version = normalize_version(args.version)
            registry.delete(version)
            print(f"deleted {version}")
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def activate_adapter(engine, data_dir, requested: str | None) -> str | None:
    """Load the adapter `serve`/`ask` should answer with: `requested` (a version or 'none'), else the
    data dir's active one. Returns the version used (None = base)."""
    registry = Registry.for_data_dir(data_dir)
    version = requested if requested is not None else registry.active()
    if version in (None, "", "none"):
        return None
    path = registry.validate(version, base_fingerprint(engine.base_model()))
    version = path.name
    engine.use_adapter(version, path)
    return version
