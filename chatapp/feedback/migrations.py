"""The database schema, as an append-only list of migrations (sqlite-utils `Migrations`).

Invariants:
- Never edit or reorder a migration that has shipped: add a new one at the end. A database made by
  any older version of the app is upgraded by applying the ones it lacks, each in a transaction
  together with its record in `_sqlite_migrations`.
- Timestamps are ISO-8601 UTC text; JSON columns hold text produced by `json.dumps`.
"""
from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("chatapp")


@migrations()
def m001_initial(db: Database) -> None:
    db["users"].create({"id": int, "name": str, "role": str, "created_at": str}, pk="id", not_null={"name", "role"})
    db["users"].create_index(["name"], unique=True)

    db["conversations"].create(
        {"id": int, "user_id": int, "title": str, "leaf_id": int, "created_at": str, "updated_at": str},
        pk="id", foreign_keys=[("user_id", "users", "id")], not_null={"user_id"})
    db["conversations"].create_index(["user_id", "updated_at"])

    # A tree: regenerate and compare add assistant siblings under one user message, an edit adds a
    # user sibling under the same parent. `kind` says how a message came to be.
    db["messages"].create(
        {"id": int, "conversation_id": int, "parent_id": int, "role": str, "text": str, "kind": str,
         "created_at": str},
        pk="id", foreign_keys=[("conversation_id", "conversations", "id"), ("parent_id", "messages", "id")],
        not_null={"conversation_id", "role", "text", "kind"})
    db["messages"].create_index(["conversation_id"])
    db["messages"].create_index(["parent_id"])

    # Images are stored once, by the sha256 of their re-encoded PNG bytes; `path` is relative to the data dir.
    db["images"].create({"sha256": str, "path": str, "width": int, "height": int, "bytes": int, "created_at": str},
                        pk="sha256")
    db["message_images"].create(
        {"message_id": int, "position": int, "sha256": str}, pk=("message_id", "position"),
        foreign_keys=[("message_id", "messages", "id"), ("sha256", "images", "sha256")])

    db["generations"].create(
        {"message_id": int, "model_id": str, "adapter_version": str, "params": str, "seed": int,
         "system_prompt": str, "prompt_tokens": int, "reply_tokens": int, "time_to_first_token_s": float,
         "tokens_per_s": float, "total_s": float, "finish_reason": str, "trimmed_messages": int},
        pk="message_id", foreign_keys=[("message_id", "messages", "id")])

    # The current vote of each user on each message; every change is also kept in feedback_events.
    db["feedback"].create(
        {"id": int, "user_id": int, "message_id": int, "vote": str, "reasons": str, "comment": str,
         "created_at": str, "updated_at": str},
        pk="id", foreign_keys=[("user_id", "users", "id"), ("message_id", "messages", "id")],
        not_null={"user_id", "message_id", "vote"})
    db["feedback"].create_index(["user_id", "message_id"], unique=True)
    db["feedback_events"].create(
        {"id": int, "user_id": int, "message_id": int, "vote": str, "reasons": str, "comment": str,
         "created_at": str},
        pk="id", foreign_keys=[("user_id", "users", "id"), ("message_id", "messages", "id")])

    # One preferred answer per user among the siblings under one prompt (`parent_id`).
    db["preferences"].create(
        {"id": int, "user_id": int, "parent_id": int, "chosen_id": int, "source": str,
         "created_at": str, "updated_at": str},
        pk="id", foreign_keys=[("user_id", "users", "id"), ("parent_id", "messages", "id"),
                               ("chosen_id", "messages", "id")],
        not_null={"user_id", "parent_id", "chosen_id"})
    db["preferences"].create_index(["user_id", "parent_id"], unique=True)

    # Two answers to one prompt shown side by side; `pick` is a, b, tie or both_bad once the user chose.
    db["comparisons"].create(
        {"id": int, "user_id": int, "parent_id": int, "a_id": int, "b_id": int, "pick": str,
         "created_at": str, "picked_at": str},
        pk="id", foreign_keys=[("user_id", "users", "id"), ("parent_id", "messages", "id"),
                               ("a_id", "messages", "id"), ("b_id", "messages", "id")],
        not_null={"user_id", "parent_id", "a_id", "b_id"})


@migrations()
def m002_feedback_index_and_conversation_system_prompt(db: Database) -> None:
    # Export and statistics read votes by message; a reopened conversation gets its system prompt back.
    db["feedback"].create_index(["message_id"])
    db["conversations"].add_column("system_prompt", str, not_null_default="")


@migrations()
def m003_training_runs(db: Database) -> None:
    # One row per training run; the trainer updates it as it goes so a page can follow it.
    # status: running, promoted, rejected, failed, skipped
    db["training_runs"].create(
        {"id": int, "status": str, "method": str, "phase": str, "step": int, "total_steps": int,
         "loss": float, "eta_s": float, "rows": int, "settings": str, "metrics": str, "decision": str,
         "reason": str, "candidate_version": str, "parent_version": str, "error": str, "pid": int,
         "started_at": str, "updated_at": str, "finished_at": str},
        pk="id", not_null={"status"})
    # The curves: one point per logged step (loss, rewards) for plots.
    db["training_points"].create(
        {"run_id": int, "phase": str, "step": int, "name": str, "value": float, "created_at": str},
        foreign_keys=[("run_id", "training_runs", "id")])
    db["training_points"].create_index(["run_id", "step"])


@migrations()
def m004_live_loop(db: Database) -> None:
    # "Train now" from the admin tab: the background trainer takes the oldest open request.
    db["train_requests"].create(
        {"id": int, "requested_by": str, "created_at": str, "run_id": int, "taken_at": str}, pk="id")
    # Settings admins change while the app runs (the A/B test), as JSON values by key.
    db["settings"].create({"key": str, "value": str, "updated_by": str, "updated_at": str}, pk="key")


@migrations()
def m005_run_estimates(db: Database) -> None:
    # What a run was expected to cost before it started (learning/cost.py): JSON with the minutes,
    # the parts, the measured unit costs and the budget it was fitted to.
    db["training_runs"].add_column("estimate", str)
