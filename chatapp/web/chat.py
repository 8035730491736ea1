"""Chat and feedback actions, shared by the page and the API: validate, authorize, store, generate.

Invariants:
- Every public method takes the calling `User` first and checks its rights itself: a user reaches
  only their own conversations and messages; admin actions check the role. Nothing relies on the
  page hiding a button.
- Every input is validated here (`inputs`: limits from `config`, images through `images.load_image`)
  before anything is stored; a refused request changes nothing.
- The user's message (and images) are committed before generation starts, and discarded again
  (with a conversation it started) when the request is refused before any answer: the prompt does
  not fit the context, the conversation is full.
- Answers are streamed and stored by `answering`: saved as they stream (marked cut off until they
  end), an answer without text stored too and never blocking the conversation.
- Talks to the store only through its named methods, and to A/B tests only through `ab.ABTest`
  (which version answers a compare side, picks, the policy that may activate a version).
- Never imports torch or gradio; the engine object is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from chatapp.core import config
from chatapp.core.config import GenerationParams
from chatapp.core.errors import AccessDenied, RequestError
from chatapp.feedback.store import PICKS, Store
from chatapp.learning.ab import ABTest
from chatapp.web.answering import ChatEvent, engine_messages, stream_answer
from chatapp.web.inputs import (check_images, parse_id, validate_choice, validate_system_prompt, validate_text,
                                validate_vote)
from chatapp.web.users import User

LIVE = object()  # the adapter version the engine answers with when the answer starts


class ChatService:
    def __init__(self, engine, store: Store, registry=None):
        self.engine = engine
        self.store = store
        self.registry = registry  # adapters.Registry; needed by A/B tests and their policy
        self.ab = ABTest(store, registry)
        self._user_ids: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ rights

    def user_id(self, user: User) -> int:
        key = (user.name, user.role)
        if key not in self._user_ids:
            self._user_ids[key] = self.store.ensure_user(user.name, user.role)
        return self._user_ids[key]

    def _own_conversation(self, user: User, conversation_id) -> dict:
        conversation_id = parse_id(conversation_id, "conversation id")
        conversation = self.store.conversation(conversation_id)
        if conversation is None or conversation["user_id"] != self.user_id(user):
            # the same answer for "missing" and "someone else's": ids of others are not confirmed
            raise AccessDenied(f"conversation {conversation_id} does not exist or is not yours")
        return conversation

    def _own_message(self, user: User, message_id, role: str | None = None) -> dict:
        message_id = parse_id(message_id, "message id")
        message = self.store.message(message_id)
        if message is None:
            raise AccessDenied(f"message {message_id} does not exist or is not yours")
        self._own_conversation(user, message["conversation_id"])
        if role and message["role"] != role:
            raise RequestError(f"message {message_id} is a {message['role']} message, not an {role} message"
                               if role == "assistant" else
                               f"message {message_id} is a {message['role']} message, not a {role} message")
        return message

    @staticmethod
    def require_admin(user: User) -> None:
        if not user.is_admin:
            raise AccessDenied("this action is for admins only")

    def serving(self) -> str | None:
        """The adapter version the engine answers with now (None: the base model)."""
        return getattr(self.engine, "adapter", None)

    @property
    def data_dir(self) -> Path:
        """The store's folder: the image paths this service returns lie under it."""
        return self.store.data_dir

    # ------------------------------------------------------------ generating

    def _answer(self, user_message: dict, params: GenerationParams, system_prompt: str, kind: str,
                side: str | None = None, adapter=LIVE, refused=None) -> Iterator[ChatEvent]:
        """Stream and store an answer to a stored user message (see `answering`); `refused()` undoes
        that message when the request is refused before any answer."""
        path = self.store.path_to(user_message["id"])
        if len(path) + 1 > config.MAX_CONVERSATION_MESSAGES:
            if refused is not None:
                refused()
            raise RequestError(f"this conversation has reached {config.MAX_CONVERSATION_MESSAGES} messages; "
                               f"start a new chat")
        messages = engine_messages(self.store, path)
        if adapter is LIVE:  # fixed now: the answer finishes on the version it started with
            adapter = self.serving()
        yield from stream_answer(self.engine, self.store, user_message, messages, params, system_prompt, kind,
                                 adapter=adapter, side=side, refused=refused)

    def _new_user_turn(self, user: User, conversation_id, text, image_paths, system_prompt: str):
        """Store the user's message (starting a conversation when none is given). Returns the stored
        message and a function that discards it again (for a request refused before any answer)."""
        text = validate_text(text, allow_empty=bool(image_paths))
        conversation = None
        if conversation_id not in (None, "", 0):
            conversation = self._own_conversation(user, conversation_id)
        images = check_images(image_paths)
        user_id = self.user_id(user)
        with self.store.write():  # a conversation this starts and its first message arrive together, or neither
            if conversation is None:
                conversation_id = self.store.create_conversation(user_id, (text or "Image"), system_prompt)
                parent_id = None
            else:
                conversation_id, parent_id = conversation["id"], conversation["leaf_id"]
                leaf = self.store.message(parent_id) if parent_id is not None else None
                if leaf is not None and leaf["role"] != "assistant":
                    # the last turn got no answer (it failed or was stopped at once): this one replaces it, as an edit
                    parent_id = leaf["parent_id"]
            message_id = self.store.add_user_message(conversation_id, parent_id, text, images)
        return self.store.message(message_id), lambda: self.store.discard_user_message(message_id, conversation)

    def chat(self, user: User, conversation_id, text, image_paths=(), params: GenerationParams | None = None,
             system_prompt: str = "") -> Iterator[ChatEvent]:
        """Start (conversation_id empty) or continue a conversation; streams the answer."""
        params = params or config.validate_generation()
        system_prompt = validate_system_prompt(system_prompt)
        user_message, discard = self._new_user_turn(user, conversation_id, text, image_paths, system_prompt)
        yield from self._answer(user_message, params, system_prompt, "chat", refused=discard)

    def regenerate(self, user: User, message_id, params: GenerationParams | None = None,
                   system_prompt: str | None = None) -> Iterator[ChatEvent]:
        """A new answer to the same prompt, kept beside the old one as a sibling."""
        message = self._own_message(user, message_id)
        if message["role"] == "assistant":
            user_message = self.store.message(message["parent_id"])
        else:
            user_message = message
        params = params or self._params_of(message)
        system_prompt = self._system_prompt_of(message) if system_prompt is None else validate_system_prompt(system_prompt)
        yield from self._answer(user_message, params, system_prompt, "regenerate")

    def edit(self, user: User, message_id, text, params: GenerationParams | None = None,
             system_prompt: str | None = None) -> Iterator[ChatEvent]:
        """Branch: a new version of a user message (same parent, same images) and an answer to it."""
        message = self._own_message(user, message_id, role="user")
        text = validate_text(text, allow_empty=bool(self.store.message_images(message["id"])))
        params = params or config.validate_generation()
        system_prompt = self._system_prompt_of(message) if system_prompt is None else validate_system_prompt(system_prompt)
        conversation = self.store.conversation(message["conversation_id"])
        new_id = self.store.add_user_message(message["conversation_id"], message["parent_id"], text, kind="edit",
                                             image_shas=self.store.message_image_shas(message["id"]))
        yield from self._answer(self.store.message(new_id), params, system_prompt, "chat",
                                refused=lambda: self.store.discard_user_message(new_id, conversation))

    def compare(self, user: User, conversation_id, text, image_paths=(), params: GenerationParams | None = None,
                system_prompt: str = "", params_b: GenerationParams | None = None,
                versions: tuple | None = None) -> Iterator[ChatEvent]:
        """Two answers to one prompt (A, then B). During an A/B test the two sides come from the
        candidate and the live adapter, in random order (the user does not see which is which until
        they pick); `versions` names two versions explicitly (admins only). Otherwise both are samples
        from the live adapter (different samples unless both are greedy). The last event carries
        `meta["comparison_id"]` and both message ids."""
        params = params or config.validate_generation()
        if params_b is None:
            seed_b = None if params.seed is None else (params.seed + 1) % (config.SEED_MAX + 1)
            params_b = GenerationParams(**{**params.as_dict(), "seed": seed_b})
        system_prompt = validate_system_prompt(system_prompt)
        sides = self._compare_versions(user, versions)
        user_message, discard = self._new_user_turn(user, conversation_id, text, image_paths, system_prompt)
        finals = {}
        for (side, side_params), version in zip((("a", params), ("b", params_b)), sides):
            for event in self._answer(user_message, side_params, system_prompt, "compare", side=side,
                                      adapter=version, refused=discard if side == "a" else None):
                if event.done:
                    finals[side] = event
                yield event
        if set(finals) != {"a", "b"}:
            return
        comparison_id = self.store.create_comparison(self.user_id(user), user_message["id"],
                                                     finals["a"].message_id, finals["b"].message_id)
        self.store.set_leaf(user_message["conversation_id"], finals["a"].message_id)
        last = finals["b"]
        last.meta = dict(last.meta, comparison_id=comparison_id, a_message_id=finals["a"].message_id,
                         b_message_id=finals["b"].message_id)
        yield last

    def _compare_versions(self, user: User, versions) -> tuple:
        """The adapter version of side A and side B (LIVE: whatever answers when the side starts)."""
        if versions:
            self.require_admin(user)
            if len(versions) != 2:
                raise RequestError("name two versions to compare, e.g. v3 and live")
            return tuple(self.resolve_version(v) for v in versions)
        return self.ab.sides(self.serving()) or (LIVE, LIVE)

    def resolve_version(self, version):
        """The adapter version 'live', 'base'/'none' or a published version names (None: the base)."""
        text = str(version or "").strip().lower()
        if text in ("", "live", "active"):
            return self.serving()
        if text in ("base", "none"):
            return None
        if self.registry is None:
            raise RequestError("this server has no adapter registry")
        from chatapp.learning.registry import AdapterError

        try:
            return self.registry.show(text)["version"]
        except (AdapterError, KeyError) as error:
            raise RequestError(str(error)) from None

    def _params_of(self, message: dict) -> GenerationParams:
        generation = self.store.generation(message["id"]) if message["role"] == "assistant" else None
        if generation and generation.get("params"):
            return config.validate_generation(**{k: v for k, v in generation["params"].items()
                                                 if k in GenerationParams.__dataclass_fields__})
        return config.validate_generation()

    def _system_prompt_of(self, message: dict) -> str:
        conversation = self.store.conversation(message["conversation_id"])
        return conversation.get("system_prompt") or ""

    # ------------------------------------------------------------ feedback

    def vote(self, user: User, message_id, vote: str, reasons=(), comment: str = "") -> dict:
        message = self._own_message(user, message_id, role="assistant")
        reasons, comment = validate_vote(vote, reasons, comment)
        self.store.set_vote(self.user_id(user), message["id"], None if vote == "none" else vote, reasons, comment)
        return {"message_id": message["id"], "vote": vote, "reasons": reasons, "comment": comment}

    def current_vote(self, user: User, message_id) -> dict | None:
        """The caller's vote on one of their answers ({"vote", "reasons", "comment"}), or None."""
        message = self._own_message(user, message_id)
        return self.store.vote(self.user_id(user), message["id"])

    def prefer(self, user: User, message_id) -> dict:
        message = self._own_message(user, message_id, role="assistant")
        siblings = [m for m in self.store.siblings(message["id"]) if m["role"] == "assistant"]
        if len(siblings) < 2:
            raise RequestError(f"message {message['id']} has no other answer to be preferred to; regenerate first")
        self.store.prefer(self.user_id(user), message["id"])
        self.store.set_leaf(message["conversation_id"], self._newest_leaf(message["id"]))
        return {"message_id": message["id"], "rejected": [m["id"] for m in siblings if m["id"] != message["id"]]}

    def compare_pick(self, user: User, comparison_id, pick: str) -> dict:
        comparison_id = parse_id(comparison_id, "comparison id")
        comparison = self.store.comparison(comparison_id)
        if comparison is None or comparison["user_id"] != self.user_id(user):
            raise AccessDenied(f"comparison {comparison_id} does not exist or is not yours")
        pick = validate_choice(pick, PICKS, "pick")
        recorded = self.ab.record_pick(comparison, pick, self.serving())
        chosen = comparison["b_id"] if pick == "b" else comparison["a_id"]
        conversation_id = self.store.message(chosen)["conversation_id"]
        self.store.set_leaf(conversation_id, self._newest_leaf(chosen))
        return {"comparison_id": comparison_id, "pick": pick, "message_id": chosen, **recorded}

    # ------------------------------------------------------------ reading

    def _newest_leaf(self, message_id: int) -> int:
        """Follow the newest child down from a message: what the user sees after choosing that branch."""
        message = self.store.message(message_id)
        while True:
            children = self.store.children(message["id"], message["conversation_id"])
            if not children:
                return message["id"]
            message = children[-1]

    def select(self, user: User, message_id) -> dict:
        """Show the branch through `message_id` (sibling navigation)."""
        message = self._own_message(user, message_id)
        self.store.set_leaf(message["conversation_id"], self._newest_leaf(message["id"]))
        return self.conversation(user, message["conversation_id"])

    def message(self, user: User, message_id) -> dict:
        """One of the caller's messages, as stored."""
        return self._own_message(user, message_id)

    def answer_siblings(self, user: User, message_id) -> list[int]:
        """The ids of the answers among the caller's message `message_id` and its siblings, oldest first."""
        message = self._own_message(user, message_id)
        return [m["id"] for m in self.store.siblings(message["id"]) if m["role"] == "assistant"]

    def system_prompt(self, user: User, conversation_id) -> str:
        """The system prompt the caller's conversation was started with."""
        return self._own_conversation(user, conversation_id).get("system_prompt") or ""

    def conversations(self, user: User) -> list[dict]:
        return self.store.conversations(self.user_id(user))

    def conversation(self, user: User, conversation_id) -> dict:
        """The conversation as shown: the messages on the current branch, each with its images, its
        siblings ("2 of 3"), its generation record (answers) and the caller's vote."""
        conversation = self._own_conversation(user, conversation_id)
        user_id = self.user_id(user)
        messages = []
        if conversation["leaf_id"] is not None:
            for message in self.store.path_to(conversation["leaf_id"]):
                siblings = [m["id"] for m in self.store.siblings(message["id"]) if m["role"] == message["role"]]
                entry = {"id": message["id"], "role": message["role"], "text": message["text"],
                         "kind": message["kind"], "images": [str(p) for p in self.store.message_images(message["id"])],
                         "siblings": siblings, "position": siblings.index(message["id"]) + 1}
                if message["role"] == "assistant":
                    generation = self.store.generation(message["id"]) or {}
                    entry["model"] = generation.get("model_id")
                    entry["adapter"] = generation.get("adapter_version") or "none"
                    entry["finish_reason"] = generation.get("finish_reason")
                    entry["vote"] = self.store.vote(user_id, message["id"])
                    entry["preferred"] = self.store.preferred(user_id, message["parent_id"]) == message["id"]
                messages.append(entry)
        return {"id": conversation["id"], "title": conversation["title"],
                "system_prompt": conversation.get("system_prompt") or "", "messages": messages}

    def feedback_stats(self, user: User) -> dict:
        self.require_admin(user)
        return self.store.feedback_stats()
