"""Keeping a worker alive for a cache: which workers are alive, start one, ask them to stop.

The app calls ``ensure_worker`` (``ui.worker_panel``), so a job queued from a page is run without a
terminal; ``python -m engine worker --detach`` does the same from the command line (``make demo``
leaves one running with the app). A worker is alive when it has not said it stopped and either
runs on this host under its recorded PID (a dead PID is dead whatever its heartbeat) or, on
another host, wrote a heartbeat within ``stale_seconds``.

Two app sessions, or the app and a terminal, may ask at the same moment: the check and the start
hold an exclusive ``flock`` on ``<cache>/supervisor.lock``, and a worker started but not yet
registered (its imports take seconds) is remembered in ``<cache>/worker.starting``, so one
worker is started per cache. A second worker started on purpose (``python -m engine worker``)
is fine: jobs are claimed by a guarded UPDATE (``engine.runtime.worker``).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cache import queries
from cache.db import connect, db_path
from cache.rows import WorkerRow

REPO = Path(__file__).resolve().parents[2]
AUTOSTART_ENV = "ISLE_WORKER"  # "off": the app never starts a worker (one runs elsewhere)
STALE_SECONDS = 120.0  # as WorkerConfig.stale_seconds: a remote worker silent this long is dead
START_GRACE_SECONDS = 120.0  # a started worker that has not registered within this is given up on

_children: list[subprocess.Popen] = []  # workers this process started, reaped so none stays a zombie


@dataclass(frozen=True)
class WorkerState:
    """A worker row and what the supervisor makes of it. heartbeat_age: seconds since its last
    heartbeat; alive: see the module docstring."""

    row: WorkerRow
    alive: bool
    heartbeat_age: float


def _pid_runs(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process of this host."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def worker_alive(row: WorkerRow, now: float, stale_seconds: float = STALE_SECONDS) -> bool:
    """The rule of the module docstring for one ``workers`` row at time ``now`` (epoch seconds)."""
    if row.stopped_at is not None:
        return False
    if row.host == socket.gethostname():
        return _pid_runs(row.pid)
    return now - row.heartbeat_at <= stale_seconds


def worker_states(cache_dir: Path, stale_seconds: float = STALE_SECONDS) -> list[WorkerState]:
    """Every worker of the cache that has not said it stopped, newest first ([] without a cache)."""
    _reap()
    if not db_path(cache_dir).exists():
        return []
    with connect(cache_dir, read_only=True) as con:
        rows = queries.workers(con)
    now = time.time()
    return [WorkerState(r, worker_alive(r, now, stale_seconds), now - r.heartbeat_at) for r in rows]


def live_workers(cache_dir: Path, stale_seconds: float = STALE_SECONDS) -> list[WorkerRow]:
    """The alive workers of ``cache_dir``, newest first."""
    return [s.row for s in worker_states(cache_dir, stale_seconds) if s.alive]


def _reap() -> None:
    _children[:] = [child for child in _children if child.poll() is None]


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "supervisor.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _starting(cache_dir: Path) -> int | None:
    """The PID of a worker started here that has not registered yet and still runs, else None
    (a registered one, even one exiting, is the workers table's to judge)."""
    path = cache_dir / "worker.starting"
    try:
        pid_text, started = path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if pid in _registered_pids(cache_dir) or not _pid_runs(pid) or time.time() - float(started) > START_GRACE_SECONDS:
        return None
    return pid


def _registered_pids(cache_dir: Path) -> set[int]:
    if not db_path(cache_dir).exists():
        return set()
    with connect(cache_dir, read_only=True) as con:
        return {w.pid for w in queries.workers(con, include_stopped=True) if w.host == socket.gethostname()}


def log_path(cache_dir: Path) -> Path:
    """Where a started worker writes its output: ``<cache>/logs/worker.log`` (appended)."""
    return cache_dir / "logs" / "worker.log"


def start_worker(cache_dir: Path, args: Sequence[str] = (), options: Sequence[str] = ()) -> int:
    """Start ``python -m engine --cache DIR *options worker *args`` in its own session (it outlives the
    caller, e.g. the app's server), output appended to ``log_path``; returns its PID. Raises
    ``OSError`` when the process cannot be started."""
    log = log_path(cache_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "engine", "--cache", str(cache_dir), *options, "worker", *args],
                                 cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    _children.append(child)
    return child.pid


def _held(cache_dir: Path) -> Path:
    return cache_dir / "worker.held"


def held(cache_dir: Path) -> bool:
    """Whether a user stopped the workers on purpose: the app then starts none by itself."""
    return _held(cache_dir).exists()


def ensure_worker(cache_dir: Path, args: Sequence[str] = (), options: Sequence[str] = (), automatic: bool = False
                  ) -> tuple[list[WorkerRow], int | None]:
    """Start a worker for ``cache_dir`` (``start_worker``) unless one is alive or starting.

    ``automatic`` (the app keeping one alive): start none while the user's stop holds
    (``stop_workers(hold=True)``); otherwise the hold ends here. Returns ``(alive workers, PID
    started or starting)``: a PID when no registered worker is alive (None too when held).
    Safe to call from many processes at once (``flock``)."""
    cache_dir = Path(cache_dir)
    with _locked(cache_dir):
        alive = live_workers(cache_dir)
        if alive or (automatic and held(cache_dir)):
            return alive, None
        _held(cache_dir).unlink(missing_ok=True)
        pid = _starting(cache_dir)
        if pid is None:
            pid = start_worker(cache_dir, args, options)
            (cache_dir / "worker.starting").write_text(f"{pid} {time.time()}")
        return [], pid


def stop_workers(cache_dir: Path, names: Sequence[str] | None = None, hold: bool = True) -> list[str]:
    """Ask workers to stop (``names``, default every alive one); returns the names asked. Each
    records its finished images, requeues its job and exits at its next flush or poll. With
    ``hold`` the app starts no other until a worker is started by hand (``ensure_worker``)."""
    names = [w.name for w in live_workers(cache_dir)] if names is None else list(names)
    if hold:
        with _locked(cache_dir):
            _held(cache_dir).write_text(f"{time.time()}")
    if names:
        with connect(cache_dir) as con:
            queries.request_worker_stop(con, names)
    return names


def wait_stopped(cache_dir: Path, names: Sequence[str], timeout: float = 60.0) -> bool:
    """Wait until none of ``names`` is alive; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not {w.name for w in live_workers(cache_dir)} & set(names):
            return True
        time.sleep(0.2)
    return False
