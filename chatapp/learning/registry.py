"""The versioned adapter registry under `<data dir>/adapters/`.

Layout:
    adapters/
      v1/  adapter_config.json  adapter_model.safetensors  [README.md]  chatapp-adapter.json
      v2/  ...
      ACTIVE        JSON: {"version": "v2" | null, "previous": [...], "updated_at", "reason", "history": [...]}
      LAST_VERSION  the highest version number ever committed (numbers are never reused)
      .lock         held (core.files.file_lock) by every change (publish, activate, rollback, deactivate,
                    delete, cleanup)

Invariants:
- A folder `vN` exists only complete: publishing writes everything into `adapters/.tmp-...`, fsyncs
  the files, writes `chatapp-adapter.json` LAST, fsyncs, then renames the folder to `vN`; the rename
  is the commit. A crash (even SIGKILL) at any point leaves either no `vN` or a complete one.
- Weights are safetensors only: a source or a version folder with pickle files (.bin, .pt, .pth,
  .pkl, .pickle, .ckpt) is refused, and `chatapp-adapter.json` records the sha256 and size of every
  file, which `validate()` checks.
- Version numbers only grow: the next one is above every `vN` folder, every `.trash-vN-...` folder
  and LAST_VERSION (written after each commit, and before each delete).
- `ACTIVE` is replaced atomically (core.files.atomic_write); no file means the base model.
  Publishing never changes it unless asked (`activate=True`). The active version cannot be deleted.
- Deleting renames `vN` to `.trash-vN-...` (one atomic step: the version is gone) before removing it.
- Readers (list, show, active, validate) take no lock and ignore `.tmp-*` / `.trash-*` entries;
  `cleanup()` (tried on open, skipped while another process is changing the registry) removes them.
- Importing this module is cheap (no torch, peft or transformers); fingerprints and metadata checks
  live in `fingerprint`, the `adapters` command in `adapters_cli`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path

from chatapp.core import config
from chatapp.core.clock import now_iso
from chatapp.core.files import TMP_PREFIX, LockBusy, atomic_write, file_lock, fsync_dir, fsync_file
from chatapp.learning.fingerprint import (CONFIG_NAME, VERSION_RE, WEIGHTS_NAME, AdapterError, base_fingerprint,
                                          check_metadata, check_version_folder, normalize_version, pickle_files,
                                          sha256_file, stage_adapter_files, version_number)

ADAPTERS_DIR = "adapters"
METADATA_NAME = "chatapp-adapter.json"
ACTIVE_NAME = "ACTIVE"
LAST_VERSION_NAME = "LAST_VERSION"
LOCK_NAME = ".lock"
TRASH_PREFIX = ".trash-"
MAX_PREVIOUS = 20   # rollback depth kept in ACTIVE
MAX_HISTORY = 100   # activation events kept in ACTIVE

_TRASH_RE = re.compile(r"\.trash-v([1-9][0-9]*)-")


def _crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named point when $CHATAPP_CRASH_AT equals `name`.
    Points: after-weights, after-metadata, before-rename, after-rename, before-active-replace,
    after-active-replace, after-trash. Costs one dictionary lookup; never set the variable outside tests."""
    if os.environ.get("CHATAPP_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _crash_before_active_replace() -> None:
    _crash_point("before-active-replace")


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Registry:
    """The adapters folder. `Registry(root)`; `Registry.for_data_dir(data_dir)` uses `<data dir>/adapters`."""

    def __init__(self, root: str | os.PathLike | None = None, *, cleanup: bool = True):
        self.root = Path(root).resolve() if root is not None else config.data_dir() / ADAPTERS_DIR
        if cleanup and self.root.is_dir():
            self.cleanup(wait=False)

    @classmethod
    def for_data_dir(cls, data_dir: str | os.PathLike | None = None, **kwargs) -> "Registry":
        return cls(config.data_dir(data_dir) / ADAPTERS_DIR, **kwargs)

    @contextlib.contextmanager
    def _locked(self, wait: bool = True):
        """Exclusive lock over changes, across processes and across this process's threads (each
        file_lock has its own descriptor). Yields False when wait=False and the lock is taken."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self.root / LOCK_NAME, wait=wait))
            except LockBusy:
                yield False
                return
            yield True

    # ------------------------------------------------------------ reading

    def _folder(self, version: str) -> Path:
        return self.root / version

    def versions(self) -> list[str]:
        """Committed version folders (vN), oldest first; temp and trash entries are ignored."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if VERSION_RE.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=version_number)

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
                raise AdapterError(f"{self.root.name}/{ACTIVE_NAME} is unreadable ({error}); choose the adapter again with "
                                   "`python -m chatapp adapters activate V` or `... deactivate`") from None
            return empty
        if not isinstance(state, dict) or not (state.get("version") is None
                                               or VERSION_RE.fullmatch(str(state.get("version")))):
            if strict:
                raise AdapterError(f"{self.root.name}/{ACTIVE_NAME} does not name a version; choose the adapter again with "
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
            # the folder by its own name: messages reach users, who need no server paths
            raise AdapterError(f"no adapter {version} in {self.root.name}/ (published: {known})")
        return version

    def validate(self, version, base_fingerprint: str | None, *, check_files: bool = True) -> Path:
        """The folder of a version that is safe to load on this base, or AdapterError saying why not:
        unknown version, no or broken metadata, pickle files, a missing or altered file, or another
        base model (fingerprint mismatch; pass None to skip that check)."""
        version = self._known(version)
        folder = self._folder(version)
        check_version_folder(folder, version, self._read_metadata(version), base_fingerprint,
                             check_files=check_files)
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
            atomic_write(self.root / LAST_VERSION_NAME, f"{number}\n")

    def publish(self, source, metadata: dict, *, activate: bool = False, reason: str = "") -> str:
        """Add an adapter (a folder saved by peft, or a PeftModel: its active adapter) as the next
        version and return it ('v3'). `metadata`: base_model, base_fingerprint, method (required);
        parent, hyperparameters, feedback_ids, metrics, gate {'decision', 'reason'}, notes.
        With activate=True the new version becomes active (refused for a rejected one)."""
        meta = check_metadata(metadata)
        if activate and meta["gate"]["decision"] == "rejected":
            raise AdapterError("the gate rejected this adapter; publish it without activating it")
        with self._locked() as locked:
            assert locked
            version = f"v{self._next_number()}"
            tmp = self.root / f"{TMP_PREFIX}publish-{version}-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                stage_adapter_files(source, tmp, skip=METADATA_NAME)
                files = {}
                for path in sorted(tmp.iterdir()):
                    fsync_file(path)
                    files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                _crash_point("after-weights")
                try:
                    peft_config = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
                except ValueError as error:
                    raise AdapterError(f"{CONFIG_NAME} is not JSON ({error})") from None
                meta = {"version": version, **meta, "created_at": now_iso(), "files": files,
                        "peft": {k: peft_config.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules",
                                                                 "base_model_name_or_path", "peft_version")
                                 if k in peft_config}}
                (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                fsync_file(tmp / METADATA_NAME)  # written last: it marks the folder complete
                _crash_point("after-metadata")
                fsync_dir(tmp)
                _crash_point("before-rename")
                os.rename(tmp, self._folder(version))  # the commit
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(self.root)
            _crash_point("after-rename")
            self._record_last(version_number(version))
            if activate:
                self._set_active(version, "activate", reason or "published with activate=True")
        return version

    # ------------------------------------------------------------ the active pointer

    def _set_active(self, version: str | None, action: str, reason: str, *, previous: list | None = None) -> dict:
        """Write ACTIVE (caller holds the lock). `previous`: the rollback stack to record; by default
        the current one with the current version pushed on it."""
        state = self._read_active(strict=False)
        if previous is None:
            previous = [v for v in state["previous"] if v is None or VERSION_RE.fullmatch(str(v))]
            if state["version"] != version:
                previous.append(state["version"])
        stamp = now_iso()
        history = (state.get("history") or []) + [{"at": stamp, "action": action, "version": version,
                                                   "from": state["version"], "reason": reason}]
        new = {"version": version, "previous": previous[-MAX_PREVIOUS:], "updated_at": stamp, "reason": reason,
               "history": history[-MAX_HISTORY:]}
        atomic_write(self.root / ACTIVE_NAME, json.dumps(new, indent=2) + "\n",
                     before_replace=_crash_before_active_replace)
        _crash_point("after-active-replace")
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
                break
            else:
                raise AdapterError("nothing to roll back to: no earlier active version is recorded")
            # the popped stack: a rollback is not itself something to roll back to
            self._set_active(target, "rollback", reason or "rollback", previous=previous)
        return target

    def delete(self, version) -> None:
        """Remove a version for good (its number is never used again). The active one is refused."""
        with self._locked():
            version = self._known(version)
            state = self._read_active(strict=False)
            if state["version"] == version:
                raise AdapterError(f"{version} is the active adapter; activate another one, roll back or "
                                   "deactivate first")
            self._record_last(version_number(version))
            trash = self.root / f"{TRASH_PREFIX}{version}-{secrets.token_hex(4)}"
            os.rename(self._folder(version), trash)  # one atomic step: the version is gone
            fsync_dir(self.root)
            _crash_point("after-trash")
            if version in state["previous"]:
                state["previous"] = [v for v in state["previous"] if v != version]
                atomic_write(self.root / ACTIVE_NAME, json.dumps(state, indent=2) + "\n")
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


def activate_adapter(engine, data_dir, requested: str | None) -> str | None:
    """Load the adapter `serve`/`ask` should answer with: `requested` (a version or 'none'), else the
    data dir's active one. Returns the version used (None = base). An active version that peft cannot
    load does not stop the start: the base model answers, and the engine keeps the reason in
    `adapter_errors` (the hot-swap follower reports it); a version `requested` by name must load."""
    from chatapp.core.errors import EngineError

    registry = Registry.for_data_dir(data_dir)
    version = requested if requested is not None else registry.active()
    if version in (None, "", "none"):
        return None
    path = registry.validate(version, base_fingerprint(engine.base_model()))
    version = path.name
    try:
        engine.use_adapter(version, path)
    except EngineError:
        if requested is not None:
            raise
        return None
    return version
