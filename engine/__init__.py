"""ISLE Workbench engine: pseudo-label methods, refinements and the background worker.

Never imports streamlit; talks to the app only through the DuckDB cache (``cache/``).
"""

__version__ = "0.1.0"
