"""Log-in, bearer tokens and roles for the server (``--conf auth_users``), in front of MONAI Label's routes.

MONAI Label's own authentication (Keycloak, ``MONAI_LABEL_AUTH_ENABLE``) is fixed when its server module is
imported, before the app's options exist, so this layer is added at start-up instead (:mod:`lib.security`): the
``/auth`` endpoints that MONAI Label's Slicer plugin and Python client call, and an ASGI middleware that holds
every other request to :data:`RULES`.
"""

from __future__ import annotations

import hmac
import html
import logging
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import jwt
from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import OAuth2PasswordRequestForm
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from .safe_paths import UnsafePath, check_name
from .users import ADMIN, ANNOTATOR, User, UserStore

logger = logging.getLogger(__name__)

PUBLIC = None  # a rule's role when no token is needed
ANY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Rule:
    path: str  # without a trailing slash; matches itself and, unless ``exact``, everything below it
    role: str | None
    methods: frozenset[str] = ANY  # empty: every method
    exact: bool = False
    upload: bool = False  # annotators may only add new images or replace unlabelled ones (see AuthMiddleware)

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        return path == self.path or (not self.exact and path.startswith(self.path.rstrip("/") + "/"))


_WRITE = frozenset({"POST", "DELETE"})
# Who may do what: the first rule that matches decides; a request no rule matches needs the annotator role.
RULES: tuple[Rule, ...] = (
    # No token: logging in, the API docs and the static files (of OHIF too: its API calls do need a token).
    Rule("/auth", PUBLIC),
    Rule("/", PUBLIC, exact=True),
    Rule("/docs", PUBLIC, exact=True),
    Rule("/openapi.json", PUBLIC, exact=True),
    Rule("/favicon.ico", PUBLIC, exact=True),
    Rule("/static", PUBLIC),
    Rule("/ohif", PUBLIC),
    # Admins only.
    Rule("/train", ADMIN, _WRITE),  # fine-tuning takes the GPU and publishes the weights everyone is served
    Rule("/datastore", ADMIN, frozenset({"DELETE"})),  # removes images and labels: annotation work is lost
    Rule("/logs", ADMIN),  # the server log shows every user's requests and their parameters
    Rule("/model", ADMIN),  # downloads, replaces or deletes model weights
    Rule("/batch", ADMIN, _WRITE),  # inference over the whole datastore
    Rule("/reload", ADMIN),  # reloads the app
    # Slicer uploads a local volume before segmenting it (again on every run), so annotators may upload; an
    # upload that reuses the id of a labelled image replaces the image and drops its labels: admins only.
    Rule("/datastore", ANNOTATOR, frozenset({"PUT"}), exact=True, upload=True),
    Rule("/datastore/image", ANNOTATOR, frozenset({"PUT"}), exact=True, upload=True),
)
DEFAULT = Rule("/", ANNOTATOR)  # infer, read the datastore, save labels, sessions, active learning, scoring, info


def route_path(scope: Scope) -> str:
    """The path the router matches: the request path without the ASGI ``root_path`` (behind a proxy's prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def rule_for(method: str, path: str) -> Rule:
    """The rule for a request; ``path`` is the route path (without the ASGI root path)."""
    path = path.rstrip("/") or "/"
    return next((rule for rule in RULES if rule.matches(method, path)), DEFAULT)


class Guard:
    """Checks passwords against the user store and signs and checks the tokens (HS256 JWT) with the site's key."""

    def __init__(self, store: UserStore, secret: bytes, minutes: int) -> None:
        self.store, self._secret, self.seconds = store, secret, minutes * 60

    def login(self, name: str, password: str) -> str | None:
        """A new token, or ``None`` for a wrong password or an unknown user alike."""
        user = self.store.authenticate(name, password)
        if user is None:
            return None
        now = int(time.time())
        claims = {"sub": user.name, "ver": user.fingerprint, "iat": now, "exp": now + self.seconds}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def bearer(self, authorization: str | None) -> User | None:
        """The user of an ``Authorization: Bearer <token>`` header, if the token is valid and the user still is.

        Roles come from the store, not the token, so removing a user or a role takes effect at once; a token
        issued before a password change no longer matches the user's fingerprint."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            claims = jwt.decode(token.strip(), self._secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.InvalidTokenError:
            return None
        user = self.store.get(str(claims["sub"]))
        return user if user and hmac.compare_digest(user.fingerprint, str(claims.get("ver", ""))) else None


def load_secret(path: Path) -> bytes:
    """The token-signing key at ``path``; created once (random, mode 0600) so tokens stay valid over restarts."""
    try:
        if not path.exists():
            _create_secret(path)
        key = path.read_text().strip()
    except OSError as error:
        raise ValueError(f"--conf auth_secret_file {path}: cannot create or read the key ({error})") from error
    if len(key) < 32:
        raise ValueError(f"--conf auth_secret_file {path}: the key is shorter than 32 characters")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("Token signing key %s is readable by other accounts; run: chmod 600 %s", path, path)
    return key.encode()


def _create_secret(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    with os.fdopen(handle, "w") as out:
        out.write(secrets.token_hex(32))
    try:
        os.link(temp, path)  # atomic, and keeps a key another worker wrote first
        logger.info("Created the token signing key %s", path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)


COOKIE = "medsam3_token"  # set by /auth/login: browsers (OHIF served by this server) send it on same-origin calls
LOGIN_PAGE = """<!doctype html><title>Medical SAM3: log in</title>
<form method="post" action="login"><input type="hidden" name="next" value="{next}">
<p><label>User <input name="username" autocomplete="username" required></label></p>
<p><label>Password <input name="password" type="password" autocomplete="current-password" required></label></p>
<p><button>Log in</button></p></form>"""


def _local(target: str) -> str:
    """Only a path on this server is a redirect target (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/ohif/"


def auth_router(guard: Guard, prefix: str = "") -> APIRouter:
    """``/auth/``, ``/auth/token`` and ``/auth/token/valid`` as MONAI Label's Slicer plugin and client call them."""
    router = APIRouter(prefix=f"{prefix}/auth", tags=["Auth"])

    @router.get("/", summary="Whether authentication is on")
    def enabled() -> dict:
        return {"enabled": True, "client_id": None, "realm": None}

    @router.post("/token", summary="Log in with an OAuth2 password form; answers a bearer token")
    def token(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> dict:
        issued = guard.login(form.username, form.password)  # a sync route: scrypt runs in the thread pool
        client = request.client.host if request.client else "?"
        if issued is None:
            logger.warning("Failed log-in as %r from %s", form.username, client)
            raise HTTPException(401, "Incorrect user name or password", headers={"WWW-Authenticate": "Bearer"})
        logger.info("%s logged in from %s", form.username, client)
        return {"access_token": issued, "token_type": "bearer", "expires_in": guard.seconds}

    @router.get("/login", summary="Log-in page for browsers (OHIF): sets the token as a same-site cookie")
    def login_page(next: str = "/ohif/") -> HTMLResponse:
        return HTMLResponse(LOGIN_PAGE.format(next=html.escape(_local(next), quote=True)))

    @router.post("/login", summary="Log in from the page; the cookie then authenticates same-origin calls")
    def login_form(
        request: Request,
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        next: Annotated[str, Form()] = "/ohif/",
    ) -> Response:
        issued = guard.login(username, password)
        if issued is None:
            logger.warning("Failed log-in as %r from %s", username, request.client.host if request.client else "?")
            return HTMLResponse(LOGIN_PAGE.format(next=html.escape(_local(next), quote=True)), status_code=401)
        response = RedirectResponse(_local(next), status_code=303)
        response.set_cookie(
            COOKIE,
            issued,
            max_age=guard.seconds,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.get("/token/valid", summary="Whether the bearer token is valid")
    def valid(request: Request) -> dict:
        user = guard.bearer(request.headers.get("authorization"))
        if user is None:
            raise HTTPException(401, "Invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
        return {"username": user.name, "email": None, "name": None, "roles": list(user.roles)}

    return router


def plain_image_id(image_id: str | None) -> bool:
    """An id annotators may upload under: one file name inside the studies folder (:func:`lib.safe_paths.check_name`),
    not hidden."""
    if not image_id or image_id.startswith("."):
        return False
    try:
        check_name(image_id, "image id")
    except UnsafePath:
        return False
    return True


class AuthMiddleware:
    """401 without a valid bearer token, 403 without the role :func:`rule_for` names; public paths pass."""

    def __init__(self, app: ASGIApp, guard: Guard, labelled: Callable[[str], bool], api_prefix: str = "") -> None:
        self.app, self.guard, self.labelled, self.api_prefix = app, guard, labelled, api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if self.api_prefix and path.startswith(self.api_prefix + "/"):
            path = path[len(self.api_prefix) :]
        method = scope["method"]
        rule = rule_for(method, path)
        if rule.role is PUBLIC:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # Starlette's lenient parser, as browsers send cookies: the standard library's stops at the first cookie it
        # finds malformed (another app's on the same host, "ui=dark mode"), dropping ours after it.
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE)
        user = self.guard.bearer(headers.get("authorization") or (f"Bearer {cookie}" if cookie else None))
        if user is None:
            status, detail = 401, "Not authenticated: get a token from POST /auth/token, send 'Authorization: Bearer'"
        elif not user.may(rule.role):
            status, detail = 403, f'Role "{rule.role}" is required'
        elif rule.upload and not user.may(ADMIN) and not await self._new_or_unlabelled(scope):
            status, detail = 403, 'Role "admin" is required to replace a labelled image or to upload without ?image='
        else:
            await self.app(scope, receive, send)
            return
        logger.warning("%d %s %s (%s)", status, method, path, user.name if user else "no valid token")
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)

    async def _new_or_unlabelled(self, scope: Scope) -> bool:
        image_id = QueryParams(scope["query_string"]).get("image")  # the value MONAI Label's endpoint reads
        return plain_image_id(image_id) and not await run_in_threadpool(self.labelled, image_id)
