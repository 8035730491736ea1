"""The store's labels: votes (with their history), preferred siblings and compare picks, and the
readings of them that export, statistics, the trainer's trigger and A/B tests need (a `Store` mixin).

Invariants:
- A user has at most one current vote per message and one preference per prompt; every vote
  change is also appended to `feedback_events`, so the history is never rewritten.
- A label's time is when it was last given or changed (`updated_at`, `picked_at`), so a changed
  vote counts as new feedback.
"""
from __future__ import annotations

import json

from chatapp.core.clock import now_iso
from chatapp.feedback.store_conversations import ConversationQueries

VOTES = ("up", "down")
PICKS = ("a", "b", "tie", "both_bad")


class LabelQueries(ConversationQueries):  # labels point at messages
    # ------------------------------------------------------------ votes

    def set_vote(self, user_id: int, message_id: int, vote: str | None, reasons: list[str] = (),
                 comment: str = "") -> None:
        """Record (or change, or with vote None remove) the user's current vote; the history keeps every change."""
        if vote is not None and vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES} or None")
        reasons_json = json.dumps(list(reasons))
        with self.write() as db:
            stamp = now_iso()
            db["feedback_events"].insert({"user_id": user_id, "message_id": message_id, "vote": vote or "none",
                                          "reasons": reasons_json, "comment": comment, "created_at": stamp})
            current = self.one("SELECT id FROM feedback WHERE user_id = ? AND message_id = ?", [user_id, message_id])
            if vote is None:
                if current:
                    db["feedback"].delete(current["id"])
            elif current:
                db["feedback"].update(current["id"], {"vote": vote, "reasons": reasons_json, "comment": comment,
                                                      "updated_at": stamp})
            else:
                db["feedback"].insert({"user_id": user_id, "message_id": message_id, "vote": vote,
                                       "reasons": reasons_json, "comment": comment,
                                       "created_at": stamp, "updated_at": stamp})

    def vote(self, user_id: int, message_id: int) -> dict | None:
        row = self.one("SELECT vote, reasons, comment FROM feedback WHERE user_id = ? AND message_id = ?",
                       [user_id, message_id])
        if row:
            row["reasons"] = json.loads(row["reasons"] or "[]")
        return row

    # ------------------------------------------------------------ preferences and comparisons

    def prefer(self, user_id: int, chosen_id: int, source: str = "siblings") -> None:
        """The user prefers `chosen_id` over its siblings (one preference per user and prompt)."""
        chosen = self.message(chosen_id)
        with self.write() as db:
            stamp = now_iso()
            current = self.one("SELECT id FROM preferences WHERE user_id = ? AND parent_id = ?",
                               [user_id, chosen["parent_id"]])
            if current:
                db["preferences"].update(current["id"], {"chosen_id": chosen_id, "source": source, "updated_at": stamp})
            else:
                db["preferences"].insert({"user_id": user_id, "parent_id": chosen["parent_id"], "chosen_id": chosen_id,
                                          "source": source, "created_at": stamp, "updated_at": stamp})

    def preferred(self, user_id: int, parent_id: int) -> int | None:
        row = self.one("SELECT chosen_id FROM preferences WHERE user_id = ? AND parent_id = ?", [user_id, parent_id])
        return row["chosen_id"] if row else None

    def create_comparison(self, user_id: int, parent_id: int, a_id: int, b_id: int) -> int:
        with self.write() as db:
            return db["comparisons"].insert({"user_id": user_id, "parent_id": parent_id, "a_id": a_id, "b_id": b_id,
                                             "pick": None, "created_at": now_iso(), "picked_at": None}).last_pk

    def comparison(self, comparison_id: int) -> dict | None:
        return self.one("SELECT * FROM comparisons WHERE id = ?", [comparison_id])

    def pick(self, comparison_id: int, pick: str) -> None:
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS}")
        with self.write() as db:
            db["comparisons"].update(comparison_id, {"pick": pick, "picked_at": now_iso()})

    # ------------------------------------------------------------ reading feedback for export and statistics

    def rated_messages(self) -> list[dict]:
        """Every current vote with its user and message."""
        return self.query("SELECT f.*, u.name AS user_name FROM feedback f JOIN users u ON u.id = f.user_id "
                          "ORDER BY f.id")

    def preference_pairs(self) -> list[dict]:
        """(chosen, rejected) answer pairs: each preferred sibling against each other assistant sibling,
        and each decided comparison (a or b)."""
        pairs = []
        for pref in self.query("SELECT p.*, u.name AS user_name FROM preferences p "
                               "JOIN users u ON u.id = p.user_id ORDER BY p.id"):
            for sibling in self.query("SELECT id FROM messages WHERE parent_id = ? AND role = 'assistant' "
                                      "AND id != ? ORDER BY id", [pref["parent_id"], pref["chosen_id"]]):
                pairs.append({"user_id": pref["user_id"], "user_name": pref["user_name"], "source": "siblings",
                              "chosen_id": pref["chosen_id"], "rejected_id": sibling["id"],
                              "created_at": pref["updated_at"]})
        for comp in self.query("SELECT c.*, u.name AS user_name FROM comparisons c JOIN users u ON u.id = c.user_id "
                               "WHERE c.pick IN ('a', 'b') ORDER BY c.id"):
            chosen, rejected = (comp["a_id"], comp["b_id"]) if comp["pick"] == "a" else (comp["b_id"], comp["a_id"])
            pairs.append({"user_id": comp["user_id"], "user_name": comp["user_name"], "source": "compare",
                          "chosen_id": chosen, "rejected_id": rejected, "created_at": comp["picked_at"]})
        return pairs

    def feedback_stats(self) -> dict:
        votes = {row["vote"]: row["n"] for row in self.query("SELECT vote, count(*) AS n FROM feedback GROUP BY vote")}
        return {"votes": votes,
                "preferences": self.count("SELECT count(*) AS n FROM preferences"),
                "comparisons": self.count("SELECT count(*) AS n FROM comparisons WHERE pick IS NOT NULL"),
                "messages": self.count("SELECT count(*) AS n FROM messages"),
                "conversations": self.count("SELECT count(*) AS n FROM conversations")}

    def votes_by_adapter(self) -> list[dict]:
        """Current votes counted by the adapter version that wrote the answer ('base' for none):
        {"adapter", "vote", "n"} rows."""
        return self.query(
            "SELECT coalesce(g.adapter_version, 'base') AS adapter, f.vote, count(*) AS n FROM feedback f "
            "JOIN generations g ON g.message_id = f.message_id WHERE f.vote IS NOT NULL "
            "GROUP BY adapter, f.vote ORDER BY adapter, f.vote")

    def votes_by_hour(self) -> list[dict]:
        """Current votes counted by the UTC hour they were last given: {"hour", "vote", "n"} rows."""
        return self.query(
            "SELECT substr(updated_at, 1, 13) || ':00' AS hour, vote, count(*) AS n FROM feedback "
            "WHERE vote IS NOT NULL GROUP BY hour, vote ORDER BY hour")

    # ------------------------------------------------------------ the live loop and A/B tests

    def labels_since(self, since: str | None) -> int:
        """Labels (current votes, preferred siblings, decided comparisons) given or changed after `since`."""
        since = since or ""
        return (self.count("SELECT count(*) AS n FROM feedback WHERE vote IS NOT NULL AND updated_at > ?", [since])
                + self.count("SELECT count(*) AS n FROM preferences WHERE updated_at > ?", [since])
                + self.count("SELECT count(*) AS n FROM comparisons WHERE pick IS NOT NULL AND picked_at > ?",
                             [since]))

    def comparison_versions(self, comparison: dict) -> tuple[str | None, str | None]:
        """The adapter version that answered side a and side b of a comparison (None: the base)."""
        return tuple((self.generation(comparison[side]) or {}).get("adapter_version") for side in ("a_id", "b_id"))

    def ab_picks(self, version_a: str | None, version_b: str | None, since: str | None = None) -> list[dict]:
        """Decided comparisons (picked after `since`) whose two answers came from `version_a` and
        `version_b` (either side; None = the base): each with `winner` = the version picked, or
        "tie" / "both_bad"."""
        rows = self.query(
            "SELECT c.id, c.pick, ga.adapter_version AS a_version, gb.adapter_version AS b_version, c.picked_at "
            "FROM comparisons c JOIN generations ga ON ga.message_id = c.a_id "
            "JOIN generations gb ON gb.message_id = c.b_id WHERE c.pick IS NOT NULL AND c.picked_at >= ? "
            "ORDER BY c.id", [since or ""])
        wanted = {version_a, version_b}
        picks = []
        for row in rows:
            if {row["a_version"], row["b_version"]} != wanted or row["a_version"] == row["b_version"]:
                continue
            winner = row["a_version"] if row["pick"] == "a" else row["b_version"] if row["pick"] == "b" else row["pick"]
            picks.append(dict(row, winner=winner))
        return picks
