"""Errors a user can act on. Every message can be shown to the user as is.

Invariant: importing this module imports nothing heavy (no torch, no gradio), so the web layer
can catch engine errors without importing the engine.
"""
from __future__ import annotations


class EngineError(RuntimeError):
    """A problem the user can act on; the message says what went wrong and what to do."""


class ModelLoadError(EngineError):
    pass


class RequestError(ValueError):
    """A request that cannot be served as asked (unknown id, wrong kind of message, bad field)."""


class AccessDenied(PermissionError):
    """The caller may not do this: someone else's conversation, or an admin action."""
