"""The feedback store: one SQLite file (sqlite-utils) under the data dir, plus the images folder.

`Store` is assembled from one module per job: `store_base` (the connection, write transactions,
WAL), `store_conversations` (users, images, conversations, messages), `store_labels` (votes,
preferences, comparisons and their statistics) and `store_runs` (training runs, requests, settings).

Invariants:
- These modules (with `migrations.py`, the schema) are the only place in chatapp that speaks SQL:
  everything else calls a named `Store` method.
- Every unit of work is one transaction (`Store.write()`); a crash at any point leaves every
  committed unit of work and none of the uncommitted ones (see `store_base`).
- Every timestamp comes from `chatapp.core.clock.now_iso`, so they sort as strings.
- The store knows nothing about users' rights: callers (the chat service) check them.
- The keys of the settings table are named here, once, for everyone who reads or writes them.
"""
from __future__ import annotations

from chatapp.feedback.store_base import BUSY_TIMEOUT_S, DB_NAME, IMAGES_DIR
from chatapp.feedback.store_conversations import StoredImage
from chatapp.feedback.store_labels import PICKS, VOTES, LabelQueries
from chatapp.feedback.store_runs import FINISHED_STATUSES, RunQueries

__all__ = ["Store", "StoredImage", "DB_NAME", "IMAGES_DIR", "BUSY_TIMEOUT_S", "VOTES", "PICKS",
           "FINISHED_STATUSES", "TRAINER_SETTING", "AB_SETTING", "AB_LAST_SETTING"]

# The background trainer's state, written every poll: {"state", "message", "pid", "at", "settings", ...}
TRAINER_SETTING = "trainer"
# The running A/B test, or None: {"candidate": version or None, "auto": bool, "min_votes": int,
# "started_by": name, "started_at": ISO time}
AB_SETTING = "ab_test"
# The A/B test that ended last: its final status with "ended" ("promoted" or "kept live")
AB_LAST_SETTING = "ab_test_last"


class Store(LabelQueries, RunQueries):
    """Open (creating and migrating as needed) the store under `data_dir`."""
