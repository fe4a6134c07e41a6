"""The one way to open the cache's DuckDB file.

DuckDB lets one process hold the file at a time when any connection writes ("Could not set lock
on file"), so every connection here is short-lived: open, do one unit of work, close. A process
that finds the file locked retries with backoff until ``timeout``. Within one process, a lock
serialises connections, because DuckDB also refuses a read-only and a read-write connection to
the same file side by side.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from cache.schema import ensure_schema

DB_NAME = "workbench.duckdb"
_process_lock = threading.RLock()
_schema_ready: set[tuple[Path, int]] = set()  # (file, inode) whose schema this process ensured


class CacheBusy(TimeoutError):
    """The cache file stayed locked by another process for longer than the timeout."""


class CacheCorrupt(RuntimeError):
    """The cache's DuckDB file is not a valid database, or is cut short; it was left as it is."""


# What DuckDB says of a file that is not a database, or of one cut short (a read past its end).
_DAMAGE_SIGNS = ("not a valid DuckDB database file", "Could not read enough bytes", "database file is corrupt",
                 "checksum")


def _is_damage(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.Error) and any(sign in str(exc) for sign in _DAMAGE_SIGNS)


def damaged(path: Path, exc: BaseException) -> CacheCorrupt:
    """The error for a damaged cache file: what DuckDB saw, that nothing was changed, how to recover."""
    seen = str(exc).strip().splitlines()[0]
    return CacheCorrupt(
        f"{path}: the cache database is damaged ({seen}). It was left as it is. To recover: stop the worker "
        f"(python -m engine worker --stop), move the file aside (mv {path} {path}.damaged) and queue the jobs "
        f"again: a new database is made, the trained models in {path.parent / 'models'} are reused and the "
        "label maps are made again. Keep the damaged file for a DuckDB expert (or the EXPORT of an older copy).")


def default_cache_dir() -> Path:
    """``$ISLE_CACHE_DIR`` if set, else ``workbench-cache/`` at the repository root."""
    env = os.environ.get("ISLE_CACHE_DIR")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1] / "workbench-cache"


def db_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / DB_NAME


def _is_lock_conflict(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() or "different configuration" in text


@contextmanager
def connect(cache_dir: Path, *, read_only: bool = False, timeout: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the cache in ``cache_dir``, closed on exit.

    A writer creates the directory and the schema and runs inside one transaction (committed on
    success, rolled back on error). The first reader in a process also opens a writer once, so a
    cache made by an older schema version gets its new tables. Raises ``FileNotFoundError`` for a read-only connection to a
    cache that does not exist yet, ``CacheBusy`` after ``timeout`` seconds of lock conflicts, and
    ``CacheCorrupt`` (naming the file and how to recover) when the file is not a valid database
    or a query reads past its end; the file is never rewritten then.
    """
    path = db_path(cache_dir)
    if read_only and not path.exists():
        raise FileNotFoundError(f"{path}: no cache yet (queue a job first)")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif (path, path.stat().st_ino) not in _schema_ready:
        # A reader of a cache written by older code first brings its schema up to date (new
        # tables only), once per process: read-only connections cannot create tables.
        with connect(cache_dir, timeout=timeout):
            pass
    deadline = time.monotonic() + timeout
    delay = 0.01
    with _process_lock:
        while True:
            try:
                con = duckdb.connect(str(path), read_only=read_only)
                break
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if _is_damage(exc):
                    raise damaged(path, exc) from exc
                if not _is_lock_conflict(exc) or time.monotonic() > deadline:
                    if _is_lock_conflict(exc):
                        raise CacheBusy(f"{path}: still locked by another process after {timeout:.0f} s") from exc
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            if read_only:
                yield con
            else:
                con.execute("BEGIN TRANSACTION")
                file_key = (path, path.stat().st_ino)
                if file_key not in _schema_ready:
                    ensure_schema(con)
                try:
                    yield con
                except BaseException:
                    with contextlib.suppress(duckdb.Error):  # on a damaged file the rollback fails too;
                        con.execute("ROLLBACK")              # closing discards the transaction anyway
                    raise
                con.execute("COMMIT")
                _schema_ready.add(file_key)
        except duckdb.Error as exc:  # a read past the end of a file cut short surfaces in a query
            if _is_damage(exc):
                raise damaged(path, exc) from exc
            raise
        finally:
            con.close()
