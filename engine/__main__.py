"""``python -m engine``: the command line (``engine/runtime/cli.py``)."""

import sys

from engine.runtime.cli import main

sys.exit(main())
