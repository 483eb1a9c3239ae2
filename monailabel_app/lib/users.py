"""The local user store behind ``--conf auth_users <file>``: who may log in, with which password and roles.

The file is JSON, ``{"users": {"alice": {"password": "<hash>", "roles": ["annotator"]}}}``, written only by
:func:`main` (``python -m monailabel_app.users``): atomically and with mode 0600, so a half-written file is never
read and other accounts on the machine cannot read the hashes. Passwords are hashed with the standard library's
scrypt (passlib's bcrypt backend does not load with bcrypt 5), stored as ``scrypt$<n>$<r>$<p>$<salt>$<key>``
(salt and key base64), so the cost can be raised later without breaking the stored hashes.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import logging
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .safe_paths import atomic_write

logger = logging.getLogger(__name__)

ADMIN, ANNOTATOR = "admin", "annotator"
ROLES = (ADMIN, ANNOTATOR)
MIN_PASSWORD = 8
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_MAXMEM = 128 * 1024 * 1024  # above OpenSSL's 32 MiB default, which n=2**15, r=8 needs


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password`` in the file's format."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, maxmem=_MAXMEM, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``; the final compare takes the same time wherever the bytes differ."""
    try:
        scheme, n, r, p, salt, key = hashed.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM, dklen=32
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    roles: tuple[str, ...]

    def may(self, role: str) -> bool:
        """Admins may do whatever annotators may."""
        return role in self.roles or ADMIN in self.roles

    @property
    def fingerprint(self) -> str:
        """Changes with the password, so tokens issued before a password change stop working."""
        return hashlib.sha256(self.password_hash.encode()).hexdigest()[:16]


class UserStore:
    """The users file, re-read when it changes on disk (so ``users add``/``remove`` apply without a restart)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}
        self._dummy_hash = hash_password(secrets.token_hex(16))  # checked for unknown names: they cost the same
        self._reload()
        if not self._users:
            raise ValueError(f"--conf auth_users {self.path}: no users; add one with {_CLI} add <name> --role admin")
        if self.path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("Users file %s is readable by other accounts; run: chmod 600 %s", self.path, self.path)

    def get(self, name: str) -> User | None:
        try:
            self._reload()
        except ValueError as error:  # keep serving the last good copy; an admin is editing the file by hand
            logger.error("%s", error)
        return self._users.get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if the password is right; ``None`` for a wrong password or an unknown name alike."""
        user = self.get(name)
        ok = verify_password(password, user.password_hash if user else self._dummy_hash)
        return user if ok and user else None

    def _reload(self) -> None:
        try:
            info = self.path.stat()
        except OSError as error:
            raise ValueError(f"--conf auth_users {self.path}: cannot read the users file ({error})") from error
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            self._users = read_users(self.path)
            self._stamp = stamp


def read_users(path: Path) -> dict[str, User]:
    """The users of ``path``; a missing or malformed file raises ``ValueError`` naming the file and the problem."""
    try:
        entries = json.loads(path.read_text())["users"]
        users = {
            str(name): User(str(name), str(entry["password"]), tuple(entry["roles"])) for name, entry in entries.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"--conf auth_users {path}: not a users file ({type(error).__name__}: {error})") from error
    for user in users.values():
        unknown = set(user.roles) - set(ROLES)
        if unknown or not user.roles:
            raise ValueError(f"--conf auth_users {path}: user {user.name!r} has roles {user.roles}; use {ROLES}")
    return users


def write_users(path: Path, users: dict[str, User]) -> None:
    """Replace ``path`` atomically with ``users``; the file is created with mode 0600 (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"users": {u.name: {"password": u.password_hash, "roles": list(u.roles)} for u in users.values()}}
    atomic_write(path, lambda out: out.write(json.dumps(payload, indent=2).encode("utf-8")), mode=0o600)


_CLI = "python -m monailabel_app.users --file <users.json>"


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise SystemExit("The passwords differ; nothing changed.")
    if len(password) < MIN_PASSWORD:
        raise SystemExit(f"Passwords need at least {MIN_PASSWORD} characters; nothing changed.")
    return password


def main(argv: list[str] | None = None) -> int:
    """The command line of ``python -m monailabel_app.users``; the exit status is for scripts."""
    parser = argparse.ArgumentParser(
        prog="python -m monailabel_app.users", description="Add (or change) a user, remove one, or list them."
    )
    parser.add_argument("--file", required=True, type=Path, help="the users file (--conf auth_users)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user, or set an existing user's password and roles")
    add.add_argument("name")
    add.add_argument("--role", action="append", choices=ROLES, help=f"repeatable; default {ANNOTATOR}")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    commands.add_parser("remove", help="remove a user (their tokens stop working)").add_argument("name")
    commands.add_parser("list", help="user names and roles")
    args = parser.parse_args(argv)

    users = read_users(args.file) if args.file.exists() else {}
    if args.command == "list":
        for user in users.values():
            print(f"{user.name}\t{','.join(user.roles)}")
        return 0
    if args.command == "remove":
        if users.pop(args.name, None) is None:
            raise SystemExit(f"No user {args.name!r} in {args.file}")
    else:
        if not args.name.strip() or args.name != args.name.strip():
            raise SystemExit("User names must be non-empty without surrounding spaces.")
        roles = tuple(dict.fromkeys(args.role or [ANNOTATOR]))
        users[args.name] = User(args.name, hash_password(_read_password(args.password_stdin)), roles)
    write_users(args.file, users)
    print(f"{args.file}: {args.command} {args.name} done")
    return 0
