"""Answer malformed requests with 400 and a message instead of a bare 500, keeping the server up and its disk clean.

MONAI Label's endpoints parse ``params`` with ``json.loads`` before any task runs; a ``ValueError`` (which
``JSONDecodeError`` is) escaping an endpoint would otherwise be an opaque "Internal Server Error".

Its upload endpoints copy each upload to a temporary file and schedule the file's removal as a background task,
which Starlette runs only after a successful response: every refused upload (an unreadable image, a label off its
image's grid, a bad session archive) left its copy in the temporary folder. Every error answer here first runs
the removals the failed endpoint scheduled.
"""

from __future__ import annotations

import json
import logging
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import requests
from fastapi import BackgroundTasks, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.utils.others.generic import remove_file
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[Response]]
UNSCHEDULED_UPLOADS = ("received_dir",)  # MONAI Label's session endpoint: its upload folder, before it schedules it


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


async def _internal_error(request: Request, error: Exception) -> PlainTextResponse:
    """Starlette's own answer to an unexpected error (it still logs the traceback); registered so that the failed
    request's uploads are removed as well."""
    return PlainTextResponse("Internal Server Error", status_code=500)


def _raised_by_endpoint(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and _is_endpoint(frames[-1].filename)


def _is_endpoint(filename: str) -> bool:
    return Path(filename).parent.name == "endpoints" and "monailabel" in filename


def remove_failed_uploads(error: BaseException) -> list[str]:
    """Run the temporary-file removals that the MONAI Label endpoints ``error`` went through had scheduled (their
    ``background_tasks``, which a failed response never runs), and remove the session endpoint's upload folder,
    which it schedules only once the session is made; returns the removed paths."""
    removed = []
    frame_tb = error.__traceback__
    while frame_tb is not None:
        frame = frame_tb.tb_frame
        if _is_endpoint(frame.f_code.co_filename):
            tasks = frame.f_locals.get("background_tasks")
            paths = [task.args[0] for task in getattr(tasks, "tasks", []) if task.func is remove_file and task.args]
            if isinstance(tasks, BackgroundTasks):
                tasks.tasks = [task for task in tasks.tasks if task.func is not remove_file]  # once only
            paths += [frame.f_locals[name] for name in UNSCHEDULED_UPLOADS if name in frame.f_locals]
            for path in paths:
                if isinstance(path, str) and Path(path).parent == Path(tempfile.gettempdir()):
                    remove_file(path)
                    removed.append(path)
        frame_tb = frame_tb.tb_next
    return removed


def _removing_uploads(handler: Handler) -> Handler:
    async def handle(request: Request, error: Exception) -> Response:
        try:
            removed = remove_failed_uploads(error)
        except OSError as problem:  # the answer matters more than the clean-up; say what is left behind
            logger.error("%s %s: could not remove its uploaded files: %s", request.method, request.url.path, problem)
        else:
            if removed:
                logger.info("%s %s failed: removed its uploaded files %s", request.method, request.url.path, removed)
        return await handler(request, error)

    return handle


def install_error_handlers() -> None:
    """Register the handlers on the running server (its middleware stack is rebuilt on the next request)."""
    from monailabel.app import app as server

    handlers: dict[type[Exception], Handler] = {
        ValueError: _bad_request,
        MONAILabelException: _monailabel_error,
        RecursionError: _too_deep,
        TypeError: _malformed,
        AttributeError: _malformed,
        requests.RequestException: _pacs_unreachable,
        HTTPException: http_exception_handler,
        Exception: _internal_error,
    }
    for kind, handler in handlers.items():
        server.add_exception_handler(kind, _removing_uploads(handler))
    server.middleware_stack = None  # Starlette builds the stack once; force a rebuild that includes our handlers
