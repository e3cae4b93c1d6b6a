"""The C++ kernels' other instruction-set builds.

The extension holds each kernel three times, compiled for AVX512, AVX2 and no vector extension
(DEFAULT), and ATen picks one for the machine at import. The rest of the suite runs the build this
machine gets (AVX512 here); AVX2 is what most other x86 machines run, and each build has its own
vector paths (Philox lanes, lane masks, non-temporal stores, tails). So each other build reruns
the kernel families' tests in a fresh process with ATEN_CPU_CAPABILITY set, less the tests that do
not reach the C++ kernels (Triton, torch.compile, opcheck)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import run_with_isa

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = [
    "test_diffusion.py", "test_sphere.py", "test_sde.py", "test_sparse.py", "test_linalg.py", "test_training.py",
    "test_retrieval.py", "test_random.py", "test_compat.py",
]
NOT_KERNELS = "not triton and not compile and not opcheck"


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_kernel_tests_pass_on_the_build(isa):
    assert run_with_isa(isa, "import diffcore; print(diffcore._library.cpu_isa())") == [isa.upper()]
    cmd = [sys.executable, "-m", "pytest", *(f"tests/{m}" for m in KERNEL_TESTS), "-q", "-p", "no:cacheprovider",
           "-k", NOT_KERNELS]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ATEN_CPU_CAPABILITY": isa}, capture_output=True,
                         text=True, timeout=600)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and " passed" in summary, f"{isa} build:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
