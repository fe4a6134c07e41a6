"""ISLE Workbench: ``streamlit run app.py``. Routes only; each page is one user task."""

import streamlit as st

st.set_page_config(page_title="ISLE Workbench", layout="wide")
# url_path differs from the file names on purpose: a deep link equal to a file name in pages/ is
# served by Streamlit's legacy multipage mode, which bypasses this router.
navigation = st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", url_path="home", default=True),
    st.Page("pages/per_class_iou.py", title="Per-class IoU", icon=":material/grid_on:", url_path="per-class-iou"),
    st.Page("pages/ensemble.py", title="ISLE ensemble", icon=":material/join:", url_path="ensemble"),
    st.Page("pages/qa.py", title="Pseudo-label QA", icon=":material/image_search:", url_path="pseudo-label-qa"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:", url_path="train"),
])
navigation.run()
