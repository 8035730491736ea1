"""What the server adds to Gradio's own app: sessions that end with their user, the client address
for login throttling, and the one route that serves stored images.

Invariants:
- Stored images are never reachable through Gradio's file route: the images folder is a blocked
  path of the app (so Gradio also refuses to copy stored images into its cache), and the page shows
  them through `image_url()`, served by `GET /chatapp/image/<message id>/<n>` to the owner of the
  message's conversation and to admins only: 401 without a session, 404 for anyone else, the same
  answer for "missing" and "someone else's" (ids of others are not confirmed).
- Before any HTTP request is handled, the sessions of users removed from the users file, or whose
  password or role changed, since the previous request are ended (their Gradio tokens dropped), so
  a removed user's next request is refused. An answer already streaming finishes.
- Gradio's upload folder (GRADIO_TEMP_DIR) is served by Gradio to any logged-in user who knows a
  file's path. That path is `sha256(this install's secret seed + the file's bytes)/<file name>`,
  handed only to the uploader (the upload's response, their own page), so it cannot be guessed
  from the image; uploads are swept from there after `config.UPLOAD_CACHE_MAX_AGE_S`, and what the
  store keeps is served only here. Gradio offers no per-user check on that folder.
- A client's address is the one uvicorn reports: the connection's peer, or behind a reverse proxy
  on this machine the X-Forwarded-For it sets (uvicorn trusts that header from 127.0.0.1 only).
"""
from __future__ import annotations

import re
from pathlib import Path

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse
from starlette.routing import Route

from chatapp.core import config
from chatapp.core.errors import AccessDenied, RequestError
from chatapp.web.chat import ChatService
from chatapp.web.inputs import parse_id
from chatapp.web.users import CLIENT_ADDRESS, User, Users

IMAGE_ROUTE = "/chatapp/image/{message_id}/{index}"
IMAGE_CACHE_CONTROL = "private, max-age=3600"  # a message's images never change; shared caches keep nothing


def image_url(message_id: int, index: int) -> str:
    """Relative to the page, so it also works behind a proxy that serves the app under a path."""
    return f"chatapp/image/{int(message_id)}/{int(index)}"


def image_html(message_id: int, index: int) -> str:
    """A chat entry that shows a stored image (the chatbot renders it; no file goes through Gradio)."""
    return (f'<img src="{image_url(message_id, index)}" alt="image {index + 1}" class="chatapp-image" '
            f'style="max-width: min(100%, 320px); max-height: 320px">')


def is_image_entry(content) -> bool:
    return isinstance(content, str) and content.startswith('<img src="chatapp/image/')


def editable_prefix(entries: list, index) -> list:
    """The chat entries before entry `index`, which the user edits; an image entry is no text to edit
    (the chatbot offers to edit it since it is shown as HTML)."""
    index = int(index)
    if 0 <= index < len(entries) and is_image_entry(entries[index]["content"]):
        raise RequestError("an image cannot be edited: edit the text of the message (its images stay)")
    return entries[:index]


def authorized_image(service: ChatService, user: User, message_id, index) -> Path:
    """The path of image `index` (0-based) of message `message_id`, if `user` owns its conversation
    or is an admin; AccessDenied (or RequestError for a malformed id) otherwise."""
    message_id = parse_id(message_id, "message id")
    if not re.fullmatch(r"[0-9]{1,3}", f"{index}"):
        raise RequestError(f"image index must be a small whole number, got {index!r:.20}")
    index = int(index)
    message = service.store.message(message_id)
    conversation = service.store.conversation(message["conversation_id"]) if message else None
    if conversation is None or not (user.is_admin or conversation["user_id"] == service.user_id(user)):
        raise AccessDenied(f"message {message_id} does not exist or is not yours")
    images = service.store.message_images(message_id)
    if index >= min(len(images), config.MAX_IMAGES_PER_MESSAGE):
        raise AccessDenied(f"message {message_id} has no image {index + 1}")
    return images[index]


def session_user(request: Request, users: Users) -> User | None:
    """The user whose Gradio session cookie came with `request` (the local user when logins are off)."""
    app = request.app
    if getattr(app, "auth", None) is None:
        return users.get(None)
    cookie_id = app.cookie_id
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(f"access-token-unsecure-{cookie_id}")
    name = app.tokens.get(token) if token else None
    return users.get(name) if name else None


def end_sessions(app, names: set[str]) -> None:
    tokens = getattr(app, "tokens", None)
    if not tokens or not names:
        return
    for token, name in list(tokens.items()):
        if name in names:
            tokens.pop(token, None)


class SessionGuard:
    """ASGI middleware: remembers the client address for the login callback, and ends the sessions of
    users whose entry in the users file changed before the request goes on."""

    def __init__(self, app, users: Users):
        self.app = app
        self.users = users

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        address = CLIENT_ADDRESS.set(client[0] if client else "")
        try:
            end_sessions(scope.get("app"), self.users.changed_users())
            await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(address)


def app_kwargs(service: ChatService, users: Users) -> dict:
    """What `launch(app_kwargs=...)` gives Gradio's FastAPI app: the image route (before Gradio's
    own routes) and the session guard."""

    def image(request: Request):  # plain function: Starlette runs it in a worker thread (SQLite, file)
        user = session_user(request, users)
        if user is None:
            return PlainTextResponse("log in first", status_code=401)
        try:
            path = authorized_image(service, user, request.path_params["message_id"], request.path_params["index"])
        except (AccessDenied, RequestError):
            return PlainTextResponse("no such image", status_code=404)
        return FileResponse(path, media_type="image/png",
                            headers={"Cache-Control": IMAGE_CACHE_CONTROL, "X-Content-Type-Options": "nosniff"})

    return {"routes": [Route(IMAGE_ROUTE, image, methods=["GET", "HEAD"])],
            "middleware": [Middleware(SessionGuard, users=users)]}
