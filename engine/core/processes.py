"""Worker processes that end with their parent: the pools of the dataset scan and of the plugins.

Spawned, not forked: the worker process holds torch threads, which fork does not copy safely.
Each child watches its parent and exits when it is gone, so a SIGKILLed worker leaves no orphan
processes burning CPU on images nobody will record.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def process_pool(processes: int) -> ProcessPoolExecutor:
    """A pool of ``processes`` spawned workers that end when this process dies."""
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
