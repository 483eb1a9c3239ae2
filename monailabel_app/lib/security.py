"""Start-up changes to the running MONAI Label server: CORS from an allow-list, our authentication, and a loud
warning when a server reachable from other machines has none.

MONAI Label's server module builds its FastAPI app at import, allowing every origin with credentials unless
``MONAI_LABEL_CORS_ORIGINS`` is set; :func:`install_security` runs in the server's start-up (``on_init_complete``)
and rebuilds the middleware, as :mod:`lib.errors` does for its handlers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware import Middleware

from .auth import AuthMiddleware, Guard, auth_router, load_secret
from .users import UserStore

if TYPE_CHECKING:
    from fastapi import FastAPI
    from monailabel.interfaces.datastore import Datastore

    from .settings import AppSettings

logger = logging.getLogger(__name__)

_ORIGIN = re.compile(r"^https?://[^/\s*,]+$")


def parse_origins(value: str) -> list[str]:
    """``--conf cors_origins``: the web origins (``scheme://host[:port]``) whose pages may call the API."""
    origins = [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
    bad = [origin for origin in origins if not _ORIGIN.match(origin)]
    if bad:
        raise ValueError(f"--conf cors_origins: {bad} are not web origins (scheme://host[:port], no path, no '*')")
    return origins


def check_options(settings: AppSettings) -> None:
    """Refuse bad security options when the app is built, so the server stops with the reason at start-up."""
    if settings.auth_users:
        UserStore(settings.auth_users)  # a missing, malformed or empty users file
    if settings.auth_token_minutes <= 0:
        raise ValueError(f"--conf auth_token_minutes must be > 0, got {settings.auth_token_minutes}")
    parse_origins(settings.cors_origins)


def secret_path(settings: AppSettings) -> Path:
    """``--conf auth_secret_file``, else ``<users file>.secret`` next to the users file."""
    users = Path(settings.auth_users)
    return Path(settings.auth_secret_file) if settings.auth_secret_file else users.with_name(users.name + ".secret")


def install_security(settings: AppSettings, datastore: Datastore, server: FastAPI | None = None) -> None:
    """Replace the CORS middleware of MONAI Label's app (or ``server``), add the log-in routes and token checks
    when ``auth_users`` is set, and warn when the server listens beyond this machine without authentication."""
    from monailabel.config import settings as server_settings

    if server is None:
        from monailabel.app import app as server

    origins = parse_origins(settings.cors_origins)
    origins += [str(origin).rstrip("/") for origin in server_settings.MONAI_LABEL_CORS_ORIGINS]
    middleware = [m for m in server.user_middleware if m.cls is not CORSMiddleware]
    if origins:  # bearer tokens, not cookies: no credentials mode, and never a wildcard
        methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
        cors = Middleware(CORSMiddleware, allow_origins=origins, allow_methods=methods, allow_headers=["*"])
        middleware.insert(0, cors)
    logger.info("Cross-origin requests allowed from: %s", origins or "no other origin")

    if settings.auth_users:
        if server_settings.MONAI_LABEL_AUTH_ENABLE:
            raise ValueError("--conf auth_users and MONAI_LABEL_AUTH_ENABLE (Keycloak) are both set; use one")
        guard = Guard(UserStore(settings.auth_users), load_secret(secret_path(settings)), settings.auth_token_minutes)
        prefix = server_settings.MONAI_LABEL_API_STR
        server.router.routes[0:0] = auth_router(guard, prefix).routes  # ahead of every MONAI Label route

        def labelled(image_id: str) -> bool:
            return bool(datastore.get_labels_by_image_id(image_id))

        auth = Middleware(AuthMiddleware, guard=guard, labelled=labelled, api_prefix=prefix)
        middleware.insert(1 if origins else 0, auth)  # inside CORS, so 401/403 answers carry CORS headers too
        logger.info(
            "Authentication on: users %s, tokens valid %d min", settings.auth_users, settings.auth_token_minutes
        )

    server.user_middleware = middleware
    server.middleware_stack = None  # Starlette built the stack at start-up; rebuild it on the next request
    authenticated = bool(settings.auth_users) or server_settings.MONAI_LABEL_AUTH_ENABLE
    warn_if_exposed(bound_host(sys.argv), authenticated, tls=any(a.startswith("--ssl_certfile") for a in sys.argv))


def bound_host(argv: Sequence[str]) -> str:
    """The ``--host`` (``-i``) of ``monailabel start_server``, whose default is every interface (0.0.0.0)."""
    for index, arg in enumerate(argv):
        if arg in ("--host", "-i") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--host="):
            return arg.partition("=")[2]
    return "0.0.0.0"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def warn_if_exposed(host: str, authenticated: bool, tls: bool) -> None:
    """Log and print (stderr) a warning when other machines can reach the server without log-in or without TLS."""
    if is_loopback(host):
        return
    if not authenticated:
        message = (
            f"SECURITY WARNING: the server listens on {host} (reachable from other machines) WITHOUT "
            "AUTHENTICATION: anyone who reaches it can read every image and label, run the models, start "
            "training, delete data and read the logs. Add --conf auth_users <file> (docs/security.md), or "
            "bind --host 127.0.0.1 behind a reverse proxy that authenticates."
        )
    elif not tls:
        message = (
            f"SECURITY WARNING: the server listens on {host} over plain HTTP: passwords and tokens cross the "
            "network unencrypted. Put a TLS reverse proxy in front (docs/security.md) or pass --ssl_certfile."
        )
    else:
        return
    logger.warning(message)
    banner = "!" * 100
    print(f"\n{banner}\n{message}\n{banner}\n", file=sys.stderr, flush=True)
