"""The build: every CUDA source compiles with nvcc alone, the C++ extension loaded, and the CPU
backend is live.

Without these, a broken build passes silently: a .cu that stops compiling is only seen where CUDA
is built, and a missing ``diffcore._C`` turns the "cpu" implementation into the reference, so
parity tests compare the reference with itself (DESIGN.md, "Backends and what proves them here").
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import diffcore
from diffcore import _library

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
NO_EXT = bool(os.environ.get("DIFFCORE_NO_EXT"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source: Path, tmp_path: Path) -> None:
    # CMakeLists.txt's cuda_kernels flags, for one architecture (sm_90) to stay fast.
    cmd = [
        NVCC, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90,code=sm_90",
        "-I", str(ROOT / "csrc" / "include"), "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"nvcc could not compile {source.name}:\n$ {' '.join(cmd)}\n{result.stdout}{result.stderr}"
    )


@pytest.mark.skipif(NO_EXT, reason="DIFFCORE_NO_EXT is set")
def test_extension_loaded() -> None:
    assert _library._C is not None, (
        f"diffcore._C is expected (DIFFCORE_NO_EXT is not set) but did not load: {_library.EXTENSION_MISSING}"
    )


@pytest.mark.skipif(NO_EXT, reason="DIFFCORE_NO_EXT is set")
def test_cpu_backend_live() -> None:
    status = diffcore.backends("cpu")
    assert re.fullmatch(r"live \((AVX512|AVX2|DEFAULT)\)", status.get("cpu", "")), status


@pytest.mark.skipif(_library._C is None, reason="diffcore._C did not load")
def test_cuda_binding_flag() -> None:
    # has_cuda() says whether csrc/cuda/binding.cpp was built: never without a CUDA build of torch.
    assert hasattr(_library._C, "has_cuda"), f"{_library._C.__file__} has no has_cuda(): an old build, rebuild it"
    assert isinstance(_library._C.has_cuda(), bool)
    assert _library.HAS_CUDA_BINDING == _library._C.has_cuda()
    if torch.version.cuda is None:
        assert not _library.HAS_CUDA_BINDING


def test_float_arguments_of_float64_kernels_are_typed_float64() -> None:
    """Compiled Triton types a Python float argument as float32, so a kernel that also computes in
    float64 annotates its float arguments ``tl.float64`` (kernels/_launch.py, F64_SCALARS). The
    interpreter the suite runs keeps every float a double, so only the annotation can be checked."""
    tl = pytest.importorskip("triton.language")
    from diffcore.kernels import sparse, sphere, training

    expected = {
        sparse._csr_layer_kernel: ("w0", "wk"),
        sphere._sphere_map_kernel: ("eps",),
        sphere._sphere_p_step_kernel: ("guidance",),
        training._bpr_forward_kernel: ("weight_decay",),
        training._bpr_backward_kernel: ("weight_decay",),
        training._nce_forward_kernel: ("tau",),
        training._nce_backward_a_kernel: ("tau",),
        training._nce_backward_b_kernel: ("tau",),
    }
    for kernel, names in expected.items():
        params = inspect.signature(kernel.fn).parameters  # JITFunction or, interpreted, InterpretedFunction
        for name in names:
            assert params[name].annotation in (tl.float64, "tl.float64"), f"{kernel.fn.__name__}: {name}"
