"""ISLE Workbench: ``streamlit run app.py``. Routes only; each page is one user task."""

import streamlit as st

st.set_page_config(page_title="ISLE Workbench", layout="wide")
navigation = st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/per_class_iou.py", title="Per-class IoU", icon=":material/grid_on:"),
])
navigation.run()
