"""Who may use the app: the users file, password hashing, login throttling.

Invariants:
- Without a users file (or with an empty one) the app has one user, `local`, with admin rights,
  and it may only listen on a loopback address (`check_bind`).
- The users file (`<data dir>/users.json`) holds names, roles and scrypt hashes, never passwords.
  It is replaced atomically (core.files.atomic_write) and readable by its owner only, from its
  first byte on.
- Failed logins are counted per user name; after `MAX_FAILED_LOGINS` in `LOGIN_WINDOW_S` the name
  is refused, right password or not, until the oldest failure leaves the window.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from chatapp.core.files import atomic_write

USERS_FILE = "users.json"
LOCAL_USER = "local"
ROLES = ("user", "admin")
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_PASSWORD_CHARS = 8
MAX_FAILED_LOGINS = 10
LOGIN_WINDOW_S = 300
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class UserError(ValueError):
    pass


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


LOCAL = User(LOCAL_USER, "admin")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return "scrypt${}${}".format(base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except (AttributeError, ValueError):
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), **_SCRYPT)
    return hmac.compare_digest(candidate, base64.b64decode(digest))


class Users:
    """The users file of one data dir."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / USERS_FILE
        self._failures: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"the users file {self.path} cannot be read: {error}") from None
        return data.get("users", {})

    def _write(self, users: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"users": users}, indent=2, sort_keys=True), mode=0o600)

    @property
    def enabled(self) -> bool:
        """True when logins are required (the users file names at least one user)."""
        return bool(self._read())

    def list(self) -> list[User]:
        return [User(name, entry["role"]) for name, entry in sorted(self._read().items())]

    def get(self, name: str | None) -> User | None:
        """The user behind a request: `local` when logins are off, else the named user (None if unknown)."""
        users = self._read()
        if not users:
            return LOCAL
        entry = users.get(name or "")
        return User(name, entry["role"]) if entry else None

    def add(self, name: str, password: str, role: str = "user", *, replace: bool = False) -> User:
        if not USER_NAME.fullmatch(name or ""):
            raise UserError("a user name is 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit")
        if name == LOCAL_USER:
            raise UserError(f"'{LOCAL_USER}' is the name of the built-in user when logins are off; choose another")
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if len(password or "") < MIN_PASSWORD_CHARS:
            raise UserError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
        users = self._read()
        if name in users and not replace:
            raise UserError(f"user {name!r} exists; pass --replace to change the password or role")
        users[name] = {"role": role, "password": hash_password(password)}
        self._write(users)
        return User(name, role)

    def remove(self, name: str) -> None:
        users = self._read()
        if name not in users:
            raise UserError(f"no user {name!r}")
        del users[name]
        self._write(users)

    def login(self, name: str, password: str) -> bool:
        """Gradio's auth callback: True when the password is right and the name is not throttled."""
        name = name or ""
        with self._lock:
            failures = self._failures[name]
            cutoff = time.monotonic() - LOGIN_WINDOW_S
            while failures and failures[0] < cutoff:
                failures.popleft()
            if len(failures) >= MAX_FAILED_LOGINS:
                return False
        entry = self._read().get(name)
        ok = bool(entry) and check_password(password or "", entry["password"])
        if not ok:
            with self._lock:
                self._failures[name].append(time.monotonic())
        return ok

    def throttled(self, name: str) -> bool:
        with self._lock:
            cutoff = time.monotonic() - LOGIN_WINDOW_S
            return sum(1 for t in self._failures.get(name, ()) if t >= cutoff) >= MAX_FAILED_LOGINS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, users: Users) -> None:
    """Refuse to listen beyond this machine when anyone who can reach the port would be an admin."""
    if not is_loopback(host) and not users.enabled:
        raise UserError(
            f"refusing to listen on {host} without logins: anyone who can reach it would be an admin. "
            f"Add users first, e.g. `python -m chatapp users add alice --role admin` (it asks for a password), "
            f"then start the server again; or listen on 127.0.0.1 only.")
