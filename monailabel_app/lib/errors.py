"""Answer malformed requests with 400 and a message instead of a bare 500, keeping the server up.

MONAI Label's endpoints parse ``params`` with ``json.loads`` before any task runs; a ``ValueError`` (which
``JSONDecodeError`` is) escaping an endpoint would otherwise be an opaque "Internal Server Error".
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import requests
from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)

logger = logging.getLogger(__name__)


async def _bad_request(request: Request, error: Exception) -> JSONResponse:
    detail = f"params is not valid JSON: {error}" if isinstance(error, json.JSONDecodeError) else str(error)
    logger.warning("Bad request %s %s: %s", request.method, request.url.path, detail)
    return JSONResponse(status_code=400, content={"detail": detail})


async def _monailabel_error(request: Request, error: MONAILabelException) -> JSONResponse:
    """MONAI Label's own errors about the request are the client's to fix: 404 for an unknown image or label, 400
    for bad input (an unknown model among them), 500 for the rest."""
    if isinstance(error, (ImageNotFoundException, LabelNotFoundException)):
        status = 404
    else:
        status = 400 if error.error == MONAILabelError.INVALID_INPUT else 500
    logger.warning("%s %s failed: %s", request.method, request.url.path, error.msg)
    return JSONResponse(status_code=status, content={"detail": error.msg})


async def _too_deep(request: Request, error: RecursionError) -> JSONResponse:
    """JSON nested thousands deep exhausts the parser's recursion: the client's input, not a server fault."""
    logger.warning("Bad request %s %s: input nested too deeply", request.method, request.url.path)
    return JSONResponse(status_code=400, content={"detail": "Request input is nested too deeply"})


async def _malformed(request: Request, error: Exception) -> JSONResponse:
    """A TypeError or AttributeError raised by MONAI Label's endpoint code itself, where it reads the request
    (``params`` that is JSON but not an object, say), is a malformed request; raised anywhere else it is a bug."""
    if not _raised_by_endpoint(error):
        raise error
    logger.warning("Malformed request %s %s: %s", request.method, request.url.path, error)
    return JSONResponse(status_code=400, content={"detail": f"Malformed request: {error}"})


async def _pacs_unreachable(request: Request, error: requests.RequestException) -> JSONResponse:
    """The server's only outgoing HTTP is to the PACS (``--studies http...``): when it fails, say so (502)."""
    logger.error("%s %s: the PACS did not answer: %s", request.method, request.url.path, error)
    detail = f"The PACS did not answer ({type(error).__name__}): check that it runs and that --studies points at it"
    return JSONResponse(status_code=502, content={"detail": detail})


def _raised_by_endpoint(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).parent.name == "endpoints" and "monailabel" in frames[-1].filename


def install_error_handlers() -> None:
    """Register the handlers on the running server (its middleware stack is rebuilt on the next request)."""
    from monailabel.app import app as server

    server.add_exception_handler(ValueError, _bad_request)
    server.add_exception_handler(MONAILabelException, _monailabel_error)
    server.add_exception_handler(RecursionError, _too_deep)
    server.add_exception_handler(TypeError, _malformed)
    server.add_exception_handler(AttributeError, _malformed)
    server.add_exception_handler(requests.RequestException, _pacs_unreachable)
    server.middleware_stack = None  # Starlette builds the stack once; force a rebuild that includes our handlers
