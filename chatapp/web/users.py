"""Who may use the app: the users file, password hashing, login throttling, sessions that end.

Invariants:
- Without a users file (or with an empty one) the app has one user, `local`, with admin rights,
  and it may only listen on a loopback address (`check_bind`). A server started with logins keeps
  them (`keep_logins_on`): emptying the users file while it runs locks everyone out, it never
  makes an open session the built-in admin.
- The users file (`<data dir>/users.json`) holds names, roles and scrypt hashes, never passwords.
  It is replaced atomically (core.files.atomic_write) and readable by its owner only, from its
  first byte on.
- Failed logins are counted per (name, client address) and per address (OWASP's authentication
  cheat sheet): after `MAX_FAILED_LOGINS` for one pair, or `MAX_FAILED_LOGINS_PER_ADDRESS` from one
  address (an IPv6 address counts by its /64), in `LOGIN_WINDOW_S`, that pair or address is
  refused, right password or not, until the oldest failure leaves the window. Nobody can lock a
  name out for others. At most `MAX_THROTTLE_KEYS` counters are kept, the least recently failed
  dropped first; a name that is no valid user name counts as one shared name.
- Every login runs one scrypt hash, also for unknown names (against a dummy hash), so the time a
  login takes does not tell which names exist; the hash runs off the event loop, at most
  `LOGIN_HASH_CONCURRENCY` at once, so logins never stall streaming answers.
- Sessions end when their user's entry changes: `changed_users()` names the users removed, or
  whose password or role changed, since the previous call (the server ends their sessions).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from chatapp.core.files import atomic_write

USERS_FILE = "users.json"
LOCAL_USER = "local"
ROLES = ("user", "admin")
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_PASSWORD_CHARS = 8
MAX_FAILED_LOGINS = 10  # per (name, address) in LOGIN_WINDOW_S
MAX_FAILED_LOGINS_PER_ADDRESS = 50  # per address, whatever the names, in LOGIN_WINDOW_S
LOGIN_WINDOW_S = 300
MAX_THROTTLE_KEYS = 10_000  # failure counters kept in memory
LOGIN_HASH_CONCURRENCY = 2  # password hashes (~50 ms of CPU and 16 MB each) run at once
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

# The address of the client whose request is being handled, set by the server's middleware:
# Gradio's auth callback gets only a name and a password.
CLIENT_ADDRESS: ContextVar[str] = ContextVar("chatapp_client_address", default="")


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
    digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, **_SCRYPT)
    return "scrypt${}${}".format(base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except (AttributeError, ValueError):
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=base64.b64decode(salt), **_SCRYPT)
    return hmac.compare_digest(candidate, base64.b64decode(digest))


@functools.cache
def _dummy_hash() -> str:
    """What an unknown name's password is checked against (made on first use: it takes a hash)."""
    return hash_password(secrets.token_urlsafe(16))


def address_key(host: str | None) -> str:
    """The throttling key of a client address: IPv4 as is, IPv6 by its /64 (one host gets a whole /64)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return (host or "unknown")[:64]
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


class LoginThrottle:
    """Failed logins in a sliding window, per (name, address) and per address, in bounded memory."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._failures: OrderedDict[tuple, deque] = OrderedDict()  # least recently failed first
        self._lock = threading.Lock()

    @staticmethod
    def _limits(name: str, address: str):
        return ((("pair", name, address), MAX_FAILED_LOGINS), (("address", address), MAX_FAILED_LOGINS_PER_ADDRESS))

    def blocked(self, name: str, address: str) -> bool:
        cutoff = self._clock() - LOGIN_WINDOW_S
        with self._lock:
            for key, limit in self._limits(name, address):
                times = self._failures.get(key)  # the newest `limit` failures
                if times is not None and len(times) >= limit and times[0] >= cutoff:
                    return True
        return False

    def failed(self, name: str, address: str) -> None:
        now = self._clock()
        with self._lock:
            for key, limit in self._limits(name, address):
                times = self._failures.pop(key, None) or deque(maxlen=limit)
                times.append(now)
                self._failures[key] = times
            # counters whose newest failure left the window count for nothing; beyond the bound the
            # least recently failed go
            while self._failures and (len(self._failures) > MAX_THROTTLE_KEYS
                                      or next(iter(self._failures.values()))[-1] < now - LOGIN_WINDOW_S):
                self._failures.popitem(last=False)

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._failures.pop(("pair", name, address), None)

    def __len__(self) -> int:
        return len(self._failures)


class Users:
    """The users file of one data dir."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / USERS_FILE
        self.throttle = LoginThrottle()
        self._logins_kept = False
        self._lock = threading.Lock()
        self._hashers: ThreadPoolExecutor | None = None
        self._signature = None  # the users file's (mtime, size, inode) when `_entries` was taken
        self._entries: dict[str, tuple] = {}

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
        """True when logins are required (the users file names at least one user, or did when the
        server started)."""
        return self._logins_kept or bool(self._read())

    def keep_logins_on(self) -> None:
        """For a server started with logins: they stay on whatever happens to the users file, and
        `changed_users` compares with the file as it is now."""
        self._logins_kept = True
        self.changed_users()

    def _signature_now(self):
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def changed_users(self) -> set[str]:
        """The users removed, or whose password or role changed, since the previous call (whose
        sessions must end). One stat when the file did not change; an unreadable file names everyone."""
        signature = self._signature_now()
        with self._lock:
            if signature == self._signature:
                return set()
            self._signature = signature
            try:
                entries = {name: (entry.get("role"), entry.get("password")) for name, entry in self._read().items()}
            except (UserError, AttributeError):
                entries = {}
            before, self._entries = self._entries, entries
        return {name for name, entry in before.items() if entries.get(name) != entry}

    def list(self) -> list[User]:
        return [User(name, entry["role"]) for name, entry in sorted(self._read().items())]

    def get(self, name: str | None) -> User | None:
        """The user behind a request: `local` when logins are off, else the named user (None if unknown)."""
        users = self._read()
        if not users and not self._logins_kept:
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

    async def login(self, name: str, password: str) -> bool:
        """Gradio's auth callback (awaited on the event loop): `authenticate` for the client whose
        request this is, in a worker thread."""
        if self._hashers is None:
            self._hashers = ThreadPoolExecutor(LOGIN_HASH_CONCURRENCY, thread_name_prefix="chatapp-login")
        return await asyncio.get_running_loop().run_in_executor(
            self._hashers, self.authenticate, name, password, CLIENT_ADDRESS.get())

    def authenticate(self, name, password, address: str = "") -> bool:
        """True when the password is right and neither the (name, address) pair nor the address is
        throttled. Takes one scrypt hash whether the name exists or not (none when throttled)."""
        name = name if isinstance(name, str) and USER_NAME.fullmatch(name) else ""  # one key for non-names
        address = address_key(address)
        if self.throttle.blocked(name, address):
            return False
        try:
            entry = self._read().get(name) if name else None
        except UserError:
            entry = None  # an unreadable users file lets nobody in
        password = password if isinstance(password, str) else ""
        ok = check_password(password, entry["password"] if entry else _dummy_hash()) and entry is not None
        if ok:
            self.throttle.succeeded(name, address)
        else:
            self.throttle.failed(name, address)
        return ok

    def throttled(self, name: str, address: str = "") -> bool:
        return self.throttle.blocked(name, address_key(address))


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
