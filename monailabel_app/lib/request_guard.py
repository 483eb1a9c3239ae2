"""Keep the server answering while it works: every request that may run long gets a thread of its own.

MONAI Label's endpoints are ``async`` functions that run inference, training start-up and file writes inline, on the
server's one event loop, so a 20-second inference held up every other request, ``/info`` included. This middleware
runs each POST, PUT and DELETE request (the ones that work) on its own event loop in a worker thread, bridging the
request's messages to the server's loop; GETs stay on the loop and answer at once. The model itself is still used by
one request at a time (:class:`lib.model_service.ModelService` holds a lock), but waiting for it no longer blocks the
rest of the API.

When a client disconnects while its request runs, the request's cancellation flag is set, and inference stops at its
next stage (:mod:`scripts.cancellation`), instead of keeping the model busy for an answer nobody will read.

Request bodies are capped by ``--conf max_upload_mb`` (413 beyond it) through FastAPI's own body limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scripts.cancellation import cancellable

from .settings import AppSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

OFFLOADED_METHODS = {"POST", "PUT", "DELETE"}
DISCONNECT_POLL_S = 0.5
# Working requests run in a pool of their own: a request holds its thread while its client sends the body and while
# it waits for the model, and in anyio's shared pool (40 threads) enough of them would stall file downloads too.
REQUEST_THREADS = 64


class ThreadPerRequest:
    """ASGI middleware: POST/PUT/DELETE requests run in worker threads, cancelled when their client leaves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._threads: anyio.CapacityLimiter | None = None  # made on the server's loop, at the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in OFFLOADED_METHODS:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        gone = threading.Event()  # the client disconnected: the request's cancellation flag
        body_read = threading.Event()  # for the worker thread
        body_done = asyncio.Event()  # the same, for the server's loop
        watcher = asyncio.create_task(_watch_disconnect(receive, body_done, gone))

        def on_server_loop(awaitable: Awaitable[T]) -> T:
            return asyncio.run_coroutine_threadsafe(_awaited(awaitable), loop).result()

        async def thread_receive() -> Message:
            if body_read.is_set():  # the app listens for a disconnect: the watcher owns the channel now
                while not gone.is_set():
                    await asyncio.sleep(DISCONNECT_POLL_S)
                return {"type": "http.disconnect"}
            message = on_server_loop(receive())
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
                loop.call_soon_threadsafe(body_done.set)
            return message

        async def thread_send(message: Message) -> None:
            on_server_loop(send(message))

        def run() -> None:
            with cancellable(gone):
                asyncio.run(self.app(scope, thread_receive, thread_send))

        if self._threads is None:
            self._threads = anyio.CapacityLimiter(REQUEST_THREADS)
        try:
            await anyio.to_thread.run_sync(run, limiter=self._threads)
        finally:
            watcher.cancel()
        if gone.is_set() and not body_read.is_set():
            logger.info("%s %s: the client left before sending its request", scope["method"], scope["path"])


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _watch_disconnect(receive: Receive, body_done: asyncio.Event, gone: threading.Event) -> None:
    """Once the request body is in, the next message from the server is the client leaving (or the end)."""
    await body_done.wait()
    if (await receive())["type"] == "http.disconnect":
        gone.set()


def install_request_guards(settings: AppSettings) -> None:
    """Cap request bodies and give working requests their own threads, on the running server."""
    from monailabel.app import app as server

    server.max_body_size = settings.max_upload_mb * 2**20
    if not any(m.cls is ThreadPerRequest for m in server.user_middleware):
        server.user_middleware.append(Middleware(ThreadPerRequest))
    server.middleware_stack = None  # rebuilt on the next request, with the limit and the middleware
