"""ISLE Workbench: ``streamlit run app.py``. Routes only (and keeps a worker alive); each page is one user task.

The pages live in ``app_pages/``, not ``pages/``: Streamlit serves a ``pages/`` folder next to the
entrypoint in its legacy multipage mode, and a deep link as a fresh server's first request would
then run that page file directly, bypassing this router (for every later session too).
"""

import streamlit as st

from cache.db import CacheCorrupt
from ui.auth import require_sign_in
from ui.common import keep_worker_alive

st.set_page_config(page_title="ISLE Workbench", layout="wide")
require_sign_in()  # team mode: nothing but the sign-in form until this session signs in
HOME = "app_pages/home.py"
navigation = st.navigation([
    st.Page(HOME, title="Home", icon=":material/home:", url_path="index", default=True),
    st.Page("app_pages/per_class_iou.py", title="Per-class IoU", icon=":material/grid_on:", url_path="per-class-iou"),
    st.Page("app_pages/ensemble.py", title="ISLE ensemble", icon=":material/join:", url_path="ensemble"),
    st.Page("app_pages/qa.py", title="Pseudo-label QA", icon=":material/image_search:", url_path="pseudo-label-qa"),
    st.Page("app_pages/train.py", title="Train", icon=":material/model_training:", url_path="train"),
    # The default page is served at "/" (its url_path only reserves a name); /home, the path a user
    # expects, is the same page kept out of the menu.
    st.Page(HOME, title="Home", url_path="home", visibility="hidden"),
])
try:
    keep_worker_alive()  # a job queued from any page is run without a terminal (ISLE_WORKER=off: not)
    navigation.run()
except CacheCorrupt as exc:  # every page reads the cache: say what is wrong and how to recover
    st.error(str(exc))
