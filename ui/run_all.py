"""Home's "Run the whole comparison": the plan of every standard chain (``engine.runtime.plan``)
with its estimated times, shown before a second button queues it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.core.dataset import DatasetError
from engine.runtime.plan import ISLE_AFTER, make_plan, submit_plan
from ui.common import cache_dir, refresh

SHOWN = "run_all_shown"  # session key: the plan is on screen, waiting for confirmation


def whole_comparison(root: Path, split: str) -> None:
    """The "Run the whole comparison" button; once pressed, the plan table (chain, images,
    estimate, plan), its total and "Confirm: queue N chains", which queues ``plan.todo``."""
    if st.button("Run the whole comparison", key="run_all"):
        st.session_state[SHOWN] = True
    if not st.session_state.get(SHOWN):
        return
    try:
        plan = make_plan(cache_dir(), Path(root), split)
    except (DatasetError, KeyError, ValueError) as exc:
        st.error(str(exc))
        return
    st.dataframe(plan.rows(), hide_index=True)
    st.write(f"**{len(plan.todo)} chain(s) to run: {plan.total_text()}** (estimates from this machine's "
             f"measured stage costs on {plan.device}; each is its chain's last step). Then make the ISLE "
             f"ensemble of them on the ISLE page or with `{ISLE_AFTER}`.")
    if not plan.todo:
        return
    confirm, back = st.columns(2)
    if confirm.button(f"Confirm: queue {len(plan.todo)} chains", type="primary", key="run_all_confirm"):
        try:
            ids = submit_plan(cache_dir(), Path(root), plan)
        except (DatasetError, KeyError, ValueError) as exc:
            st.error(str(exc))
            return
        st.session_state[SHOWN] = False
        refresh()
        st.toast(f"Queued jobs {ids}")
        st.success(f"Queued {len(plan.todo)} chain(s) as jobs {ids}.")
    if back.button("Cancel", key="run_all_cancel"):
        st.session_state[SHOWN] = False
        st.rerun()
