"""Builds diffcore: the Python package, ``diffcore.kernels`` (from kernels/) and the C++ extension
``diffcore._C``, which CMakeLists.txt describes and this file drives with ninja.

    pip install --no-build-isolation -e .     # against the torch already installed
    DIFFCORE_NO_EXT=1 pip install ...          # pure Python: ops fall back to the reference

``--no-build-isolation`` matters: an isolated build would fetch a fresh (CUDA, several GB) torch.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "diffcore builds against the installed torch: install torch first and build with "
                "`pip install --no-build-isolation .` (or set DIFFCORE_NO_EXT=1)"
            ) from exc
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.check_call(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
             "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}"]
        )
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])
        built = target.parent / target.name
        if not built.exists():
            raise RuntimeError(f"the CMake build did not produce {built}")


# DIFFCORE_NO_EXT set and neither empty nor 0 (diffcore._library.no_ext_requested; setup cannot import it)
ext_modules = [] if os.environ.get("DIFFCORE_NO_EXT", "") not in ("", "0") else [CMakeExtension("diffcore._C")]

setup(
    packages=["diffcore", "diffcore.reference", "diffcore.kernels", "diffcore.nn", "diffcore.compat"],
    package_dir={"diffcore": "diffcore", "diffcore.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
