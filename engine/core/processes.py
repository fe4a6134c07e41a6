"""Worker processes that end with their parent: the pools of the dataset scan and of the plugins.

Spawned, not forked: the worker process holds torch threads, which fork does not copy safely.
Each child watches its parent and exits when it is gone, so a SIGKILLed worker leaves no orphan
processes burning CPU on images nobody will record. The children share this process's cores:
each runs ``cores // processes`` intra-op threads (torch, and ONNX Runtime sessions sized from it).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def _start_child(parent_pid: int, threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for a torch imported later in the child
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def process_pool(processes: int) -> ProcessPoolExecutor:
    """A pool of ``processes`` spawned workers that end when this process dies, each on
    ``max(1, cores // processes)`` threads (cores: this process's CPU affinity)."""
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_child, initargs=(os.getpid(), threads))
