"""``python -m bench``: see ``python -m bench --help``."""

import os
import sys

from bench.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:  # e.g. `python -m bench --compare a.json b.json | head`
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 0
sys.exit(code)
