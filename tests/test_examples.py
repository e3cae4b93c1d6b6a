"""The example scripts run (small sizes) and their checks pass: each compares diffcore's output
with the original code's and raises on a mismatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script, expected", [
    ("compat_e2e.py", ["DiffRec-style", "LightGCN"]),
    ("dreamrec.py", ["DreamRec-style"]),
])
def test_example_runs(script, expected):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--repeat", "1"], cwd=EXAMPLES.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in expected:
        assert text in proc.stdout and "x)" in proc.stdout, proc.stdout
