"""Answer malformed requests with 400 and a message instead of a bare 500, keeping the server up.

MONAI Label's endpoints parse ``params`` with ``json.loads`` before any task runs; a ``ValueError`` (which
``JSONDecodeError`` is) escaping an endpoint would otherwise be an opaque "Internal Server Error".
"""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)


async def _bad_request(request: Request, error: Exception) -> JSONResponse:
    detail = f"params is not valid JSON: {error}" if isinstance(error, json.JSONDecodeError) else str(error)
    logger.warning("Bad request %s %s: %s", request.method, request.url.path, detail)
    return JSONResponse(status_code=400, content={"detail": detail})


async def _monailabel_error(request: Request, error: MONAILabelException) -> JSONResponse:
    """MONAI Label's own errors (unknown model, bad input) are the client's to fix: 400, not 500."""
    status = 400 if error.error == MONAILabelError.INVALID_INPUT else 500
    logger.warning("%s %s failed: %s", request.method, request.url.path, error.msg)
    return JSONResponse(status_code=status, content={"detail": error.msg})


def install_error_handlers() -> None:
    """Register the handlers on the running server (its middleware stack is rebuilt on the next request)."""
    from monailabel.app import app as server

    server.add_exception_handler(ValueError, _bad_request)
    server.add_exception_handler(MONAILabelException, _monailabel_error)
    server.middleware_stack = None  # Starlette builds the stack once; force a rebuild that includes our handlers
