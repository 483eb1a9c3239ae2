"""Keeps a training run tied to the server that started it, and its folders tidy.

MONAI Label starts ``POST /train`` as a subprocess of the server (``utils/async_tasks``) and forgets it when the
server dies: killed with ``kill -9``, the subprocess would train on as an orphan and publish weights later, to
nobody's request. The server records its pid in the environment at start-up (:func:`mark_server_process`); a run
started by it follows that pid (:func:`follow_server`) and exits, publishing nothing, once the server is no longer
among its ancestors. Checking ancestry rather than liveness ignores a reused pid and works through a shell wrapper.

A run killed outright (``DELETE /train/`` kills it with SIGKILL) cannot say so itself: its statistics keep its pid
and start time, and :func:`run_alive` tells a reader that the process behind a "running" entry is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

SERVER_PID_ENV = "MEDSAM3_SERVER_PID"
POLL_S = 1.0
GONE_EXIT_CODE = 3  # the run stopped because its server is gone
TEMP_SUFFIXES = (".tmp", ".partial")  # what atomic writers leave when killed between writing and renaming
RUN_NAME = re.compile(r"\d{8}_\d{6}(_\d+)?")  # the trainer's run folders: time.strftime("%Y%m%d_%H%M%S")[_n]


def mark_server_process() -> None:
    """Called in the server at start-up: the training subprocesses it starts inherit the environment."""
    os.environ[SERVER_PID_ENV] = str(os.getpid())


def _starting_server() -> int | None:
    """The pid of the server that started this process, or None when no other process did (a synchronous run
    inside the server itself, or a test)."""
    raw = os.environ.get(SERVER_PID_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) != os.getpid() else None


def server_gone() -> str | None:
    """Why the server that started this run is gone, or None while it runs (or when there is none to follow)."""
    server = _starting_server()
    if server is None:
        return None
    ancestors = {process.pid for process in psutil.Process().parents()}  # psutil skips a reused pid
    return None if server in ancestors else f"the server that started this run (pid {server}) is gone"


def follow_server(on_gone: Callable[[str], None], poll_s: float = POLL_S) -> None:
    """Exit this process once the server that started it is gone, after ``on_gone(reason)`` records why.

    ``os._exit`` ends the run wherever the training loop is: nothing after it (in particular publishing) runs.
    """
    if _starting_server() is None:
        return
    check_server(on_gone)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            check_server(on_gone)

    threading.Thread(target=watch, name="follow-server", daemon=True).start()


def check_server(on_gone: Callable[[str], None]) -> None:
    """Exit now if the server that started this run is gone (also called right before publishing)."""
    reason = server_gone()
    if reason is None:
        return
    logger.error("Stopping the training run, publishing nothing: %s", reason)
    try:
        on_gone(reason)
    finally:
        os._exit(GONE_EXIT_CODE)


def process_identity() -> tuple[int, float]:
    """``(pid, start time)`` of this process: with the start time, a reused pid is not taken for this run."""
    return os.getpid(), psutil.Process().create_time()


def run_alive(pid: int, started: float) -> bool:
    """Whether the process ``pid`` started at ``started`` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remove_temp_files(folder: Path, owner: int | None = None) -> list[Path]:
    """Remove what killed atomic writes left directly in ``folder`` (``*.tmp``, ``*.partial``): all of them, or
    only those :func:`lib.published_weights.temp_name` named after the process ``owner``. Call it where no live
    process still writes them."""
    try:
        paths = list(folder.iterdir())
    except OSError:  # no folder (yet, or any more: a pruned run)
        return []
    removed = []
    for path in paths:
        if path.suffix in TEMP_SUFFIXES and (owner is None or f".{owner}." in path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("Removed temporary files of a stopped run: %s", [str(p) for p in removed])
    return removed


def prune_runs(train_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` run folders (0 keeps all); other folders there are left alone."""
    if keep <= 0 or not train_dir.is_dir():
        return []
    old = sorted(d for d in train_dir.iterdir() if d.is_dir() and RUN_NAME.fullmatch(d.name))[:-keep]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    if old:
        logger.info("Removed %d old run folders (keep_runs %d): %s", len(old), keep, [d.name for d in old])
    return old
