"""The store's users, images, conversations and messages (a `Store` mixin over `StoreBase`).

Invariants:
- Images are re-encoded PNG files named by their sha256, written atomically (`atomic_write`)
  before the row that points at them is committed; an image file is never rewritten.
- A message and its images (or the generation record of an answer) are stored in one transaction
  that also makes it the conversation's current leaf. An answer being streamed is stored early and
  updated as it grows (`update_answer`); its generation record says how it ended.
- A user message refused before any answer is discarded whole (`discard_user_message`): the
  message, its images if no other message uses them, and a conversation it started.
- From any rated assistant message, `context()` rebuilds the exact prompt (every message on its
  path with its images, the system prompt) and the answer.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from chatapp.core import config
from chatapp.core.clock import now_iso
from chatapp.core.errors import RequestError
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
        with self.write() as db:  # under the write lock: discard_user_message cannot remove the file meanwhile
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, data)
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
        """A new conversation of the user's, or RequestError when they have their quota of them
        (`config.MAX_CONVERSATIONS_PER_USER`; counted in the same transaction as the insert)."""
        with self.write() as db:
            if self.count("SELECT count(*) AS n FROM conversations WHERE user_id = ?",
                          [user_id]) >= config.MAX_CONVERSATIONS_PER_USER:
                raise RequestError(f"you have {config.MAX_CONVERSATIONS_PER_USER} conversations, the most one "
                                   f"user may keep; continue one of them")
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

    def add_user_message(self, conversation_id: int, parent_id: int | None, text: str, images=(), *,
                         kind: str = "chat", image_shas: list[str] = ()) -> int:
        """A user's message with its images (checked RGB PIL images, saved as by `save_image`, after
        the already stored `image_shas`) in one transaction: the message and its images arrive together."""
        with self.write():
            shas = list(image_shas) + [self.save_image(image).sha256 for image in images]
            return self.add_message(conversation_id, parent_id, "user", text, kind=kind, image_shas=shas)

    def update_answer(self, message_id: int, text: str, generation: dict) -> None:
        """Replace the text and the generation record of an answer being streamed (saved so far, or
        finished), in one transaction; the conversation's leaf is left alone."""
        with self.write() as db:
            db["messages"].update(message_id, {"text": text})
            record = dict(generation, message_id=message_id)
            record["params"] = json.dumps(record.get("params") or {}, sort_keys=True)
            db["generations"].upsert(record, pk="message_id", alter=False)

    def discard_user_message(self, message_id: int, conversation_before: dict | None) -> None:
        """Undo a user message that was refused before any answer (e.g. it does not fit the context),
        in one transaction: the message, its image links, the images no other message uses, and the
        conversation as it was (`conversation_before`, its row before the message; None: the message
        started it, so it goes too). A message with answers or other replies is never discarded."""
        with self._write_lock:  # held until the files are gone: save_image looks for its file under it
            with self.write() as db:
                message = self.message(message_id)
                if message is None:
                    return
                if self.one("SELECT id FROM messages WHERE parent_id = ? LIMIT 1", [message_id]) is not None:
                    raise ValueError(f"message {message_id} has replies; it cannot be discarded")
                shas = list(dict.fromkeys(self.message_image_shas(message_id)))
                db.execute("DELETE FROM message_images WHERE message_id = ?", [message_id])
                db.execute("DELETE FROM messages WHERE id = ?", [message_id])
                conversation_id = message["conversation_id"]
                if conversation_before is not None:
                    db["conversations"].update(conversation_id, {"leaf_id": conversation_before["leaf_id"],
                                                                 "updated_at": conversation_before["updated_at"]})
                elif self.one("SELECT id FROM messages WHERE conversation_id = ? LIMIT 1", [conversation_id]) is None:
                    db.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])
                unused = [sha for sha in shas
                          if self.one("SELECT 1 AS n FROM message_images WHERE sha256 = ? LIMIT 1", [sha]) is None]
                paths = [self.image_path(sha) for sha in unused]
                for sha in unused:
                    db.execute("DELETE FROM images WHERE sha256 = ?", [sha])
            for path in paths:  # after the commit: a failed transaction keeps its files
                path.unlink(missing_ok=True)

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
            if message["text"] or message["role"] == "assistant":  # an empty answer is a turn all the same
                parts.append({"type": "text", "text": message["text"]})
            prompt.append({"role": message["role"], "content": parts})
        generation = self.generation(message_id) or {}
        return {"message_id": message_id, "conversation_id": answer["conversation_id"], "prompt": prompt,
                "answer": answer["text"], "role": answer["role"],
                "system_prompt": generation.get("system_prompt") or "", "generation": generation}
