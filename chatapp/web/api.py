"""The public HTTP API (for `gradio_client`): one typed endpoint per chat and feedback action.

Invariants:
- Endpoint names and parameters are stable and documented in docs/api.md: /chat, /regenerate,
  /vote, /prefer, /compare, /compare_pick, /conversations, /conversation, /feedback_stats.
- Each endpoint resolves the caller from the login (`gr.Request.username`) and calls `ChatService`,
  which validates every input and checks the caller's rights; errors come back as one readable
  message (`gr.Error`), and the server keeps serving.
- Nothing internal reaches a user: an error that is not one of `USER_ERRORS` (a bug, a full disk)
  is logged with its traceback and an incident number, and the user gets a generic message with
  that number; a database that stays locked past the store's timeout reads "busy, try again", a
  full disk and a read-only data dir each read as what they are (`storage_message`; the details go
  to the log). None of these leaves half a write behind: each store write is one transaction.
- An uploaded file is accepted only from Gradio's upload folder: a path typed into a request (a
  server file, another user's image) is refused without saying whether it exists.
- The generation endpoints' sampling and system-prompt parameters (names, types, defaults, docs)
  come from config's `GenerationParam` specs; only their position and the defaults an endpoint
  overrides are stated here.
- Never imports torch.
"""
from __future__ import annotations

import errno
import functools
import html
import inspect
import logging
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Iterator

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder

from chatapp.core import config
from chatapp.web.chat import ChatService
from chatapp.core.config import ParameterError
from chatapp.core.errors import AccessDenied, EngineError, RequestError
from chatapp.feedback.images import ImageError
from chatapp.web.users import UserError, Users

USER_ERRORS = (RequestError, AccessDenied, ParameterError, ImageError, EngineError, UserError)
BUSY_MESSAGE = "the server is busy saving other work; nothing was changed, try again in a moment"
DISK_FULL_MESSAGE = "the server's disk is full, so this could not be saved; nothing was changed, try again later"
READ_ONLY_MESSAGE = ("the server cannot write to its data folder (it is read-only or unavailable), so this could "
                     "not be saved; nothing was changed, try again later")
log = logging.getLogger("chatapp.web")


def storage_message(error: Exception) -> str | None:
    """The message for a store that cannot take a write now (busy, full disk, read-only or unavailable
    data dir), or None when `error` is something else."""
    if isinstance(error, sqlite3.OperationalError):
        code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (code == 0 and "locked" in str(error)):
            return BUSY_MESSAGE
        if code == sqlite3.SQLITE_FULL:
            return DISK_FULL_MESSAGE
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR):
            return READ_ONLY_MESSAGE
    elif isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return DISK_FULL_MESSAGE
        if error.errno == errno.EROFS:
            return READ_ONLY_MESSAGE
    return None


def user_error(error: Exception) -> gr.Error:
    """The `gr.Error` a user sees for `error`: its own message when it is one they can act on, else a
    generic one with an incident number (the details go to the server's log under that number)."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, USER_ERRORS):
        message = str(error)
    elif (message := storage_message(error)) is not None:
        log.warning("storage refused a write (%s): %s", type(error).__name__, error)
    else:
        incident = secrets.token_hex(4)
        log.error("incident %s: %s", incident, type(error).__name__, exc_info=error)
        message = f"something went wrong on the server (incident {incident}); the request was not completed"
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def as_gradio_errors(fn):
    """Turn every error into `gr.Error` (shown in the page, returned by the API): see `user_error`."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as error:  # GeneratorExit (Stop, a client gone) is not an Exception
                raise user_error(error) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise user_error(error) from None
    return plain


def caller(users: Users, request: gr.Request | None):
    user = users.get(getattr(request, "username", None))
    if user is None:
        raise AccessDenied("unknown user: log in again")
    return user


def file_path(file) -> str | None:
    """The path of an uploaded file, however gradio handed it over (FileData, dict, str), or None.
    Only a file inside Gradio's upload folder is accepted (RequestError otherwise): the path comes
    from the request, and a request can name any file on the server."""
    if file is None or file == "":
        return None
    if isinstance(file, dict):
        path = file.get("path")
    elif isinstance(file, str):
        path = file
    else:
        path = getattr(file, "path", file)  # FileData; anything else (a number, a list) is refused below
    if not isinstance(path, str) or not path or "\0" in path:
        raise RequestError("an image must be a file uploaded with the request")
    upload_folder = os.path.realpath(get_upload_folder())
    if os.path.commonpath([upload_folder, os.path.realpath(path)]) != upload_folder:
        raise RequestError("an image must be a file uploaded with the request; this one was not uploaded")
    return path


def _generation_endpoint(users: Users, *, system_prompt: bool, **defaults):
    """Decorator for a streaming endpoint. The signature gradio reads is the function's own parameters,
    then config.WEB_SAMPLING_PARAMS (their defaults, or `defaults`), then config.SYSTEM_PROMPT if asked,
    then the request; their bounds are appended to the docstring as Args. The function gets the caller
    as `user`, the sampling values validated as `params`, and `system_prompt` when asked, as keywords."""
    spliced = config.WEB_SAMPLING_PARAMS + ((config.SYSTEM_PROMPT,) if system_prompt else ())
    unknown = defaults.keys() - {param.name for param in spliced}
    if unknown:
        raise TypeError(f"no such endpoint parameter: {', '.join(sorted(unknown))}")
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def decorate(fn):
        signature = inspect.signature(fn)
        public = signature.replace(parameters=[
            *(p for p in signature.parameters.values() if p.kind is positional),
            *(inspect.Parameter(param.name, positional, default=defaults.get(param.name, param.default),
                                annotation=param.annotation) for param in spliced),
            inspect.Parameter("request", positional, default=None, annotation=gr.Request)])

        @functools.wraps(fn)
        def endpoint(*args, **kwargs):
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            user = caller(users, values.pop("request"))
            params = config.validate_generation(**{param.name: values.pop(param.name)
                                                   for param in config.WEB_SAMPLING_PARAMS})
            yield from fn(**values, user=user, params=params)

        endpoint.__signature__ = public
        endpoint.__annotations__ = {**{p.name: p.annotation for p in public.parameters.values()},
                                    "return": signature.return_annotation}
        endpoint.__doc__ = inspect.cleandoc(fn.__doc__) + "\n\nArgs:\n" + "\n".join(
            f"    {param.name}: {param.describe(defaults.get(param.name, param.default))}" for param in spliced)
        return endpoint
    return decorate


def register(service: ChatService, users: Users) -> None:
    """Add the API endpoints to the Blocks being built."""
    generate = dict(concurrency_limit=config.CHAT_CONCURRENCY, concurrency_id="generate")
    quick = dict(concurrency_limit=config.FEEDBACK_CONCURRENCY, concurrency_id="feedback")

    @as_gradio_errors
    @_generation_endpoint(users, system_prompt=True)
    def chat(conversation_id: str = "", text: str = "", image: FileData | None = None, *, user, params,
             system_prompt) -> Iterator[dict]:
        """Start (empty conversation_id) or continue a conversation. Streams dicts; the last has done=true,
        the conversation id, the answer's message_id, its text, model and adapter version."""
        image_path = file_path(image)
        for event in service.chat(user, conversation_id, text, [image_path] if image_path else [], params,
                                  system_prompt):
            yield event.as_dict()

    @as_gradio_errors
    @_generation_endpoint(users, system_prompt=False)
    def regenerate(message_id: int, *, user, params) -> Iterator[dict]:
        """A new answer to the prompt of answer `message_id`, kept as its sibling. Same outputs as /chat."""
        for event in service.regenerate(user, message_id, params):
            yield event.as_dict()

    @as_gradio_errors
    @_generation_endpoint(users, system_prompt=True, temperature=1.0)  # two answers to choose from: let them differ
    def compare(conversation_id: str = "", text: str = "", image: FileData | None = None, *, user, params,
                system_prompt) -> Iterator[dict]:
        """Two answers (side "a" then "b") to one prompt. The last dict has meta.comparison_id,
        meta.a_message_id and meta.b_message_id; record the pick with /compare_pick."""
        image_path = file_path(image)
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
        root = service.data_dir
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
