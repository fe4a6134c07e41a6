"""Benchmark: the app under load while the worker records, on loopback only, bounded in count and time.

    python -m bench.app_load --cache DIR [--sessions 20] [--seconds 60]

A scratch copy of the cache ``DIR`` (a dataset with complete variants, e.g. ``make demo``'s, or
three imported candidates as ``bench.ensemble_merge`` uses) is served by ``streamlit run app.py``
on 127.0.0.1 (a free port, no worker of its own). A worker records a real labelling job there:
dCRF of the cache's first complete variant, 2 processes, its rows written every second.

- **with readers**: ``--sessions`` concurrent browser-like sessions, each a Streamlit websocket
  client (``/_stcore/stream``, the protocol the frontend speaks: ``BackMsg.rerun_script`` with the
  page's URL name, then the server's deltas until ``script_finished``) opening the heatmap, ISLE and
  QA pages in turn, again and again, for ``--seconds``. A page time is the request to its
  ``script_finished``; an error is a page that ends without it within 120 s, is not found, draws
  an exception element, or draws text naming ``CacheBusy`` or a lock.
- **without readers**: the same worker job for as long again, nobody reading.

Prints p50 / p95 page seconds per page, the count of page loads and of errors, and the worker's
images/s in both windows with their ratio (with / without).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from websockets.exceptions import ConnectionClosed

from cache import queries
from cache.db import connect
from engine.core.chains import Step
from engine.runtime.jobs import submit_chain

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
PAGES = ("per-class-iou", "ensemble", "pseudo-label-qa")
PAGE_TIMEOUT = 120.0
BAD_TEXT = ("CacheBusy", "Could not set lock", "lock on file")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts(msg) -> list[str]:
    """The strings a delta draws (markdown, text, alerts), for the error check."""
    element = msg.delta.new_element
    kind = element.WhichOneof("type")
    if kind in ("markdown", "text", "alert", "exception"):
        inner = getattr(element, kind)
        return [getattr(inner, field, "") for field in ("body", "message", "stack_trace") if hasattr(inner, field)]
    return []


async def _session(port: int, until: float, start: int, times: dict[str, list[float]], errors: list[str]) -> None:
    """One browser-like session: open the pages in turn until ``until``."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from websockets.asyncio.client import connect as websocket_connect

    ws = await websocket_connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"],
                                 max_size=None)
    pages = itertools.islice(itertools.cycle(PAGES), start, None)
    try:
        while time.monotonic() < until:
            page = next(pages)
            request = BackMsg()
            request.rerun_script.page_name = page
            request.rerun_script.query_string = ""
            began = time.monotonic()
            await ws.send(request.SerializeToString())
            finished = False
            while not finished:
                raw = await asyncio.wait_for(ws.recv(), PAGE_TIMEOUT)
                msg = ForwardMsg()
                msg.ParseFromString(raw)
                if msg.WhichOneof("type") == "delta":
                    if msg.delta.new_element.WhichOneof("type") == "exception":
                        errors.append(f"{page}: exception {msg.delta.new_element.exception.message[:200]}")
                    bad = [t for t in _texts(msg) if any(word in t for word in BAD_TEXT)]
                    errors.extend(f"{page}: {t[:200]}" for t in bad)
                elif msg.WhichOneof("type") == "page_not_found":
                    errors.append(f"{page}: page not found")
                elif msg.WhichOneof("type") == "script_finished":
                    finished = msg.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY
                    if msg.script_finished == ForwardMsg.FINISHED_WITH_COMPILE_ERROR:
                        errors.append(f"{page}: compile error")
                        finished = True
            times[page].append(time.monotonic() - began)
    except asyncio.TimeoutError:
        errors.append(f"no script_finished within {PAGE_TIMEOUT:.0f} s")
    except ConnectionClosed as exc:
        errors.append(f"the server closed the session ({exc})")
    finally:
        await ws.close()


async def _load(port: int, sessions: int, seconds: float) -> tuple[dict[str, list[float]], list[str]]:
    times: dict[str, list[float]] = {page: [] for page in PAGES}
    errors: list[str] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(_session(port, until, k, times, errors) for k in range(sessions)))
    return times, errors


def _done(cache_dir: Path, job_id: int) -> int:
    with connect(cache_dir, read_only=True) as con:
        return queries.get_job(con, job_id).done


def _rate(cache_dir: Path, job_id: int, during: Callable[[], T]) -> tuple[float, T]:
    """The images/s the worker recorded while ``during()`` ran, and what it returned."""
    first, began = _done(cache_dir, job_id), time.monotonic()
    result = during()
    return (_done(cache_dir, job_id) - first) / (time.monotonic() - began), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a cache with a dataset and complete variants")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="each window: with readers, then without")
    args = parser.parse_args()
    if not 1 <= args.sessions <= 50 or not 5 <= args.seconds <= 600:
        raise SystemExit("bounded: 1 to 50 sessions, 5 to 600 seconds")
    with tempfile.TemporaryDirectory(prefix="app-load-") as scratch:
        cache_dir = Path(scratch) / "cache"
        shutil.copytree(args.cache, cache_dir, symlinks=True)
        with connect(cache_dir, read_only=True) as con:
            dataset = queries.datasets(con)[0]
            source = next(v for v in queries.variants(con, dataset.id) if v.n_label_maps)
        (job_id,) = submit_chain(cache_dir, Path(dataset.root), "train", [Step("dcrf")], source.id)
        env = {**os.environ, "ISLE_CACHE_DIR": str(cache_dir), "ISLE_VOC_ROOT": dataset.root, "ISLE_WORKER": "off"}
        port = _free_port()
        app = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                                "--server.port", str(port), "--server.headless", "true"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = subprocess.Popen([sys.executable, "-m", "engine", "--cache", str(cache_dir), "worker",
                                   "--until-idle", "--processes", "2"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the app did not start") from None
                    time.sleep(0.3)
            while _done(cache_dir, job_id) == 0:  # the job's pool is up and recording
                time.sleep(0.5)
            loaded, (times, errors) = _rate(cache_dir, job_id,
                                            lambda: asyncio.run(_load(port, args.sessions, args.seconds)))
            alone, _ = _rate(cache_dir, job_id, lambda: time.sleep(args.seconds))
        finally:
            for process in (app, worker):
                process.terminate()
                process.wait(timeout=30)
    print(f"{args.sessions} sessions for {args.seconds:.0f} s on 127.0.0.1, the worker recording dCRF of "
          f"{source.name!r}; {os.cpu_count()} CPU cores")
    for page in PAGES:
        values = sorted(times[page])
        if values:
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            print(f"  {page:16} {len(values):5} loads  p50 {statistics.median(values):6.2f} s  p95 {p95:6.2f} s")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    print(f"worker: {loaded:.2f} images/s with readers, {alone:.2f} without; ratio {loaded / alone:.2f}")


if __name__ == "__main__":
    main()
