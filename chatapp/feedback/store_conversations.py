"""The store's users, images, conversations and messages (a `Store` mixin over `StoreBase`).

Invariants:
- Images are re-encoded PNG files named by their sha256, written atomically (`atomic_write`)
  before the row that points at them is committed; an image file is never rewritten.
- A message and its images (or the generation record of an answer) are stored in one transaction
  that also makes it the conversation's current leaf.
- From any rated assistant message, `context()` rebuilds the exact prompt (every message on its
  path with its images, the system prompt) and the answer.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from chatapp.core.clock import now_iso
from chatapp.core.files import atomic_write
from chatapp.feedback.store_base import IMAGES_DIR, StoreBase


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path  # absolute


class ConversationQueries(StoreBase):
    # ------------------------------------------------------------ users

    def ensure_user(self, name: str, role: str = "user") -> int:
        """The user's id, creating the row on first sight; the role follows the users file."""
        with self.write() as db:
            row = self.one("SELECT id, role FROM users WHERE name = ?", [name])
            if row is None:
                return db["users"].insert({"name": name, "role": role, "created_at": now_iso()}).last_pk
            if row["role"] != role:
                db["users"].update(row["id"], {"role": role})
            return row["id"]

    def user(self, user_id: int) -> dict | None:
        return self.one("SELECT * FROM users WHERE id = ?", [user_id])

    # ------------------------------------------------------------ images

    def save_image(self, image) -> StoredImage:
        """Store a checked RGB PIL image (see images.load_image) once, as PNG without metadata."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        relative = Path(IMAGES_DIR) / sha[:2] / f"{sha}.png"
        target = self.data_dir / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        with self.write() as db:
            db["images"].insert({"sha256": sha, "path": str(relative), "width": image.width,
                                 "height": image.height, "bytes": len(data), "created_at": now_iso()}, ignore=True)
        return StoredImage(sha, target)

    def image_path(self, sha: str) -> Path:
        row = self.one("SELECT path FROM images WHERE sha256 = ?", [sha])
        if row is None:
            raise KeyError(sha)
        return self.data_dir / row["path"]

    # ------------------------------------------------------------ conversations and messages

    def create_conversation(self, user_id: int, title: str, system_prompt: str = "") -> int:
        with self.write() as db:
            stamp = now_iso()
            return db["conversations"].insert({"user_id": user_id, "title": title[:80], "leaf_id": None,
                                               "system_prompt": system_prompt or "",
                                               "created_at": stamp, "updated_at": stamp}).last_pk

    def conversation(self, conversation_id: int) -> dict | None:
        return self.one("SELECT * FROM conversations WHERE id = ?", [conversation_id])

    def conversations(self, user_id: int, limit: int = 200) -> list[dict]:
        return self.query("SELECT id, title, created_at, updated_at FROM conversations WHERE user_id = ? "
                          "ORDER BY updated_at DESC, id DESC LIMIT ?", [user_id, limit])

    def add_message(self, conversation_id: int, parent_id: int | None, role: str, text: str, *,
                    kind: str = "chat", image_shas: list[str] = (), generation: dict | None = None) -> int:
        """Append one message (with its images, or with the generation record of an answer) and make it
        the conversation's current leaf, in one transaction."""
        with self.write() as db:
            stamp = now_iso()
            message_id = db["messages"].insert({"conversation_id": conversation_id, "parent_id": parent_id,
                                                "role": role, "text": text, "kind": kind,
                                                "created_at": stamp}).last_pk
            for position, sha in enumerate(image_shas):
                db["message_images"].insert({"message_id": message_id, "position": position, "sha256": sha})
            if generation is not None:
                record = dict(generation, message_id=message_id)
                record["params"] = json.dumps(record.get("params") or {}, sort_keys=True)
                db["generations"].insert(record)
            db["conversations"].update(conversation_id, {"leaf_id": message_id, "updated_at": stamp})
            return message_id

    def set_leaf(self, conversation_id: int, message_id: int) -> None:
        with self.write() as db:
            db["conversations"].update(conversation_id, {"leaf_id": message_id, "updated_at": now_iso()})

    def message(self, message_id: int) -> dict | None:
        return self.one("SELECT * FROM messages WHERE id = ?", [message_id])

    def message_images(self, message_id: int) -> list[Path]:
        rows = self.query("SELECT i.path FROM message_images m JOIN images i ON i.sha256 = m.sha256 "
                          "WHERE m.message_id = ? ORDER BY m.position", [message_id])
        return [self.data_dir / row["path"] for row in rows]

    def message_image_shas(self, message_id: int) -> list[str]:
        """The sha256 of each image of a message, in the order the user sent them."""
        rows = self.query("SELECT sha256 FROM message_images WHERE message_id = ? ORDER BY position", [message_id])
        return [row["sha256"] for row in rows]

    def generation(self, message_id: int) -> dict | None:
        row = self.one("SELECT * FROM generations WHERE message_id = ?", [message_id])
        if row is not None:
            row["params"] = json.loads(row["params"] or "{}")
        return row

    def children(self, parent_id: int | None, conversation_id: int) -> list[dict]:
        if parent_id is None:
            return self.query("SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS NULL ORDER BY id",
                              [conversation_id])
        return self.query("SELECT * FROM messages WHERE parent_id = ? ORDER BY id", [parent_id])

    def siblings(self, message_id: int) -> list[dict]:
        """The message and every other answer (or edit) to the same parent, oldest first."""
        message = self.message(message_id)
        if message is None:
            return []
        return self.children(message["parent_id"], message["conversation_id"])

    def path_to(self, message_id: int) -> list[dict]:
        """The messages from the conversation's first one down to `message_id`, in order."""
        rows = self.query("""
            WITH RECURSIVE up(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM messages WHERE id = ?
                UNION ALL
                SELECT m.id, m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.parent_id)
            SELECT messages.* FROM up JOIN messages ON messages.id = up.id ORDER BY up.depth DESC""", [message_id])
        return rows

    def newest_answers(self) -> list[dict]:
        """For each user message that got an answer, its newest answer: {"parent_id", "answer_id"},
        newest prompt first."""
        return self.query("SELECT parent_id, max(id) AS answer_id FROM messages WHERE role = 'assistant' "
                          "AND parent_id IS NOT NULL GROUP BY parent_id ORDER BY parent_id DESC")

    def context(self, message_id: int) -> dict:
        """Everything a trainer needs about one answer: the prompt messages up to it (content as parts,
        images as absolute paths, in the order the user sent them), the system prompt and the answer."""
        path = self.path_to(message_id)
        if not path:
            raise KeyError(message_id)
        answer = path[-1]
        prompt = []
        for message in path[:-1]:
            parts = [{"type": "image", "path": str(p)} for p in self.message_images(message["id"])]
            if message["text"]:
                parts.append({"type": "text", "text": message["text"]})
            prompt.append({"role": message["role"], "content": parts})
        generation = self.generation(message_id) or {}
        return {"message_id": message_id, "conversation_id": answer["conversation_id"], "prompt": prompt,
                "answer": answer["text"], "role": answer["role"],
                "system_prompt": generation.get("system_prompt") or "", "generation": generation}
