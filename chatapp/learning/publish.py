"""Publishing a judged candidate in the registry, with everything needed to reproduce and audit it.

Invariants:
- The published metadata holds the base model and its fingerprint, the method, the parent (the live
  adapter the run started beside), every hyperparameter, the ids of the rated messages the training
  rows came from, the run's metrics (every candidate's verdict when several were judged) and the
  gate's decision and reason.
- A version is published inactive and activated afterwards, so it is stored whole before it can
  become active. A candidate the gate rejected is activated only on an explicit `--publish always`
  (a forced activation).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from chatapp.learning.data import Data
from chatapp.learning.settings import TrainSettings


def publish_candidate(registry, model, candidate: str, base_model: str, fingerprint: str, method: str,
                      settings: TrainSettings, data: Data, metrics: dict, decision: str, reason: str,
                      parent: str | None, activate: bool, on_published=None) -> str:
    """Store adapter `candidate` of `model` as a new version; activate it when asked. Returns the version.
    `on_published(version)` runs between publishing and activating: the run records its version there,
    so a run that dies after this point is never taken for one that produced nothing."""
    with tempfile.TemporaryDirectory(prefix="chatapp-publish-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[candidate], safe_serialization=True)
        folder = Path(tmp) / candidate if (Path(tmp) / candidate).is_dir() else Path(tmp)
        metadata = {"base_model": base_model, "base_fingerprint": fingerprint, "method": method,
                    "parent": parent, "hyperparameters": settings.as_dict(), "feedback_ids": data.feedback_ids(),
                    "metrics": metrics, "gate": {"decision": decision, "reason": reason}}
        version = registry.publish(folder, metadata)
    if on_published is not None:
        on_published(version)
    if activate:  # an admin's `--publish always` may activate a candidate the gate rejected
        forced = decision != "promoted"
        registry.activate(version, reason="published with --publish always" if forced else f"gate: {reason}",
                          base_fingerprint=fingerprint, force=forced)
    return version
