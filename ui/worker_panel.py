"""Home's worker panel: the live workers' state, Start and Stop (``engine.runtime.supervisor``).
The app keeps one alive through ``ui.common.keep_worker_alive`` (every page run and the jobs panel).

``ISLE_WORKER=off`` in the app's environment turns the automatic start off (a worker runs on
another machine, or under the user's own control); Start on Home still works. Stop holds the
automatic start off until Start is pressed (or ``python -m engine worker --detach`` is run).
"""

from __future__ import annotations

import time

import streamlit as st

from engine.runtime import supervisor
from ui.common import autostart_on, cache_dir


@st.fragment(run_every=2)
def worker_panel() -> None:
    """One line per live worker (name, job or idle, heartbeat age, since) with Stop; Start when
    none is alive."""
    directory = cache_dir()
    alive = [s for s in supervisor.worker_states(directory) if s.alive]
    for state in alive:
        row = state.row
        doing = f"running job {row.job_id}" if row.job_id is not None else "idle"
        since = time.strftime("%H:%M:%S", time.localtime(row.started_at))
        left, right = st.columns([5, 1])
        left.write(f"Worker `{row.name}` · {doing} · heartbeat {state.heartbeat_age:.0f} s ago · since {since}"
                   + (" · stopping" if row.stop_requested else ""))
        if right.button("Stop", key=f"stop_worker_{row.name}", disabled=row.stop_requested):
            supervisor.stop_workers(directory, [row.name])
            st.rerun(scope="fragment")
    if alive:
        return
    held = supervisor.held(directory)
    if held:
        st.caption("No worker is alive: it was stopped, so the app starts none by itself until you press Start.")
    elif autostart_on():
        st.caption("No worker is alive yet: the app starts one when the cache exists (a queued job creates it).")
    else:
        st.caption(f"No worker is alive, and {supervisor.AUTOSTART_ENV}=off: start one here, or run "
                   "`python -m engine worker`.")
    if st.button("Start a worker", key="start_worker"):
        _, pid = supervisor.ensure_worker(directory)
        st.toast(f"Worker starting (PID {pid}); its log: {supervisor.log_path(directory)}")
        st.rerun(scope="fragment")
