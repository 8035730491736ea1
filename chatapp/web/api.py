"""The public HTTP API (for `gradio_client`): one typed endpoint per chat and feedback action.

Invariants:
- Endpoint names and parameters are stable and documented in the README: /chat, /regenerate,
  /vote, /prefer, /compare, /compare_pick, /conversations, /conversation, /feedback_stats.
- Each endpoint resolves the caller from the login (`gr.Request.username`) and calls `ChatService`,
  which validates every input and checks the caller's rights; errors come back as one readable
  message (`gr.Error`), and the server keeps serving.
- Never imports torch.
"""
from __future__ import annotations

import functools
import html
import inspect
from pathlib import Path
from typing import Iterator

import gradio as gr
from gradio.data_classes import FileData

from chatapp.core import config
from chatapp.web.chat import ChatService
from chatapp.core.config import ParameterError
from chatapp.core.errors import AccessDenied, EngineError, RequestError
from chatapp.feedback.images import ImageError
from chatapp.web.users import UserError, Users

USER_ERRORS = (RequestError, AccessDenied, ParameterError, ImageError, EngineError, UserError)


def as_gradio_errors(fn):
    """Turn the errors a user can act on into `gr.Error` (shown in the page, returned by the API)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as error:
                raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
    return plain


def caller(users: Users, request: gr.Request | None):
    user = users.get(getattr(request, "username", None))
    if user is None:
        raise AccessDenied("unknown user: log in again")
    return user


def _file_path(file) -> str | None:
    if file is None:
        return None
    if isinstance(file, dict):
        return file.get("path")
    return getattr(file, "path", None) or (file if isinstance(file, str) else None)


def register(service: ChatService, users: Users) -> None:
    """Add the API endpoints to the Blocks being built."""
    generate = dict(concurrency_limit=config.CHAT_CONCURRENCY, concurrency_id="generate")
    quick = dict(concurrency_limit=config.FEEDBACK_CONCURRENCY, concurrency_id="feedback")

    @as_gradio_errors
    def chat(conversation_id: str = "", text: str = "", image: FileData | None = None,
             temperature: float = config.DEFAULT_TEMPERATURE, top_k: int = config.DEFAULT_TOP_K,
             top_p: float = config.DEFAULT_TOP_P, max_new_tokens: int = config.DEFAULT_MAX_NEW_TOKENS,
             seed: int | None = None, system_prompt: str = "", request: gr.Request = None) -> Iterator[dict]:
        """Start (empty conversation_id) or continue a conversation. Streams dicts; the last has done=true,
        the conversation id, the answer's message_id, its text, model and adapter version."""
        user = caller(users, request)
        params = config.validate_generation(temperature=temperature, top_k=top_k, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed)
        image_path = _file_path(image)
        for event in service.chat(user, conversation_id, text, [image_path] if image_path else [], params,
                                  system_prompt):
            yield event.as_dict()

    @as_gradio_errors
    def regenerate(message_id: int, temperature: float = config.DEFAULT_TEMPERATURE,
                   top_k: int = config.DEFAULT_TOP_K, top_p: float = config.DEFAULT_TOP_P,
                   max_new_tokens: int = config.DEFAULT_MAX_NEW_TOKENS, seed: int | None = None,
                   request: gr.Request = None) -> Iterator[dict]:
        """A new answer to the prompt of answer `message_id`, kept as its sibling. Same outputs as /chat."""
        user = caller(users, request)
        params = config.validate_generation(temperature=temperature, top_k=top_k, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed)
        for event in service.regenerate(user, message_id, params):
            yield event.as_dict()

    @as_gradio_errors
    def compare(conversation_id: str = "", text: str = "", image: FileData | None = None,
                temperature: float = 1.0, top_k: int = config.DEFAULT_TOP_K, top_p: float = config.DEFAULT_TOP_P,
                max_new_tokens: int = config.DEFAULT_MAX_NEW_TOKENS, seed: int | None = None,
                system_prompt: str = "", request: gr.Request = None) -> Iterator[dict]:
        """Two answers (side "a" then "b") to one prompt. The last dict has meta.comparison_id,
        meta.a_message_id and meta.b_message_id; record the pick with /compare_pick."""
        user = caller(users, request)
        params = config.validate_generation(temperature=temperature, top_k=top_k, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed)
        image_path = _file_path(image)
        for event in service.compare(user, conversation_id, text, [image_path] if image_path else [], params,
                                     system_prompt):
            yield event.as_dict()

    @as_gradio_errors
    def vote(message_id: int, vote: str, reasons: list[str] | None = None, comment: str = "",
             request: gr.Request = None) -> dict:
        """Thumbs on one of your answers: vote is "up", "down" or "none" (removes it); reasons from
        wrong, unhelpful, too long, unsafe, other; an optional comment."""
        return service.vote(caller(users, request), message_id, vote, reasons or [], comment)

    @as_gradio_errors
    def prefer(message_id: int, request: gr.Request = None) -> dict:
        """Mark answer `message_id` as better than its siblings (other answers to the same prompt)."""
        return service.prefer(caller(users, request), message_id)

    @as_gradio_errors
    def compare_pick(comparison_id: int, pick: str, request: gr.Request = None) -> dict:
        """Record the pick of a comparison: "a", "b", "tie" or "both_bad"."""
        return service.compare_pick(caller(users, request), comparison_id, pick)

    @as_gradio_errors
    def conversations(request: gr.Request = None) -> list[dict]:
        """Your conversations, newest first."""
        return service.conversations(caller(users, request))

    @as_gradio_errors
    def conversation(conversation_id: int, request: gr.Request = None) -> dict:
        """One of your conversations: the messages on its current branch with images (their names in the
        store, images/<sha256>.png), siblings, votes."""
        conversation = service.conversation(caller(users, request), conversation_id)
        root = service.store.data_dir
        for message in conversation["messages"]:
            message["images"] = [str(Path(p).relative_to(root)) for p in message["images"]]
        return conversation

    @as_gradio_errors
    def feedback_stats(request: gr.Request = None) -> dict:
        """Admins only: counts of votes, preferences, comparisons, messages and conversations."""
        return service.feedback_stats(caller(users, request))

    for fn in (chat, regenerate, compare):
        gr.api(fn, api_name=fn.__name__, **generate)
    for fn in (vote, prefer, compare_pick, conversations, conversation, feedback_stats):
        gr.api(fn, api_name=fn.__name__, **quick)
