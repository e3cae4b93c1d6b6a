"""The machine a run measured: printed above every table and stored in the JSON."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path

import torch

import diffcore
from diffcore import _library


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_malloc() -> str:
    """Pins glibc's malloc for the rest of the process: blocks up to 1 GiB (32 MiB where glibc caps
    the threshold) come from the heap instead of fresh mmaps, and freed memory is never trimmed
    back to the OS, so a tensor allocated again reuses pages already faulted in (what jemalloc or
    tcmalloc give in a steady loop). By default glibc adapts both thresholds as the process runs,
    and whether a sample pays first-touch page faults then depends on the allocation history.
    Returns the setting as printed with the machine; off glibc it changes nothing."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (steady needs glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "default (mallopt not found)"
    for threshold in (1 << 30, 32 << 20):
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            break
    else:
        return "default (mallopt refused the thresholds)"
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return f"steady (glibc: blocks up to {threshold >> 20} MiB from the heap, never trimmed)"


def describe(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_isa": _library.cpu_isa(),
        "extension": getattr(_library._C, "__file__", None) if _library._C is not None else None,
        "extension_missing": _library.EXTENSION_MISSING,
        "torch": torch.__version__,
        "diffcore": diffcore.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "git": git_revision(),
        "device": str(device),
        "load_average": _load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load_average() -> float | None:
    """The 1-minute load average when the run started: other work on the machine skews timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def line(info: dict) -> str:
    isa = info["cpu_isa"] or f"none ({info['extension_missing']})"
    parts = [
        f"{info['cpu']} ({info['logical_cpus']} logical CPUs)",
        f"{info['threads']} threads",
        f"diffcore CPU kernels: {isa}",
        f"torch {info['torch']}",
        f"diffcore {info['diffcore']}" + (f" ({info['git']})" if info.get("git") else ""),
        f"Python {info['python']}",
    ]
    if info.get("load_average") is not None:
        parts.append(f"load average {info['load_average']:.1f} at start")
    if info.get("malloc", "default") != "default":
        parts.append(f"malloc {info['malloc']}")
    if info.get("gpu"):
        parts.insert(1, info["gpu"])
    return " · ".join(parts)
