"""Stopping work nobody waits for: a per-context flag that inference checks at every stage.

A server runs each request in its own context (thread or task); when the client disconnects it sets the request's
flag, and the request's inference stops at its next stage (an encoding batch, a prompt batch, a clicked slice)
instead of keeping the model busy for a result nobody will read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Cancelled", "cancellable", "raise_if_cancelled"]

_FLAG: ContextVar[threading.Event | None] = ContextVar("medsam3_cancel", default=None)


class Cancelled(RuntimeError):
    """The work was cancelled by whoever asked for it."""


@contextlib.contextmanager
def cancellable(flag: threading.Event) -> Iterator[None]:
    """Work run inside stops at its next stage once ``flag`` is set."""
    token = _FLAG.set(flag)
    try:
        yield
    finally:
        _FLAG.reset(token)


def raise_if_cancelled() -> None:
    """Raise :class:`Cancelled` when the current context's flag is set."""
    flag = _FLAG.get()
    if flag is not None and flag.is_set():
        raise Cancelled("cancelled: the client that asked for this work has gone")
