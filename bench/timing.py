"""Interleaved timing: warm-up, calibrated samples, quantiles, page faults.

Every provider of a case takes its samples in the same rounds, in a rotating order, so slow drift of
the machine (other processes, frequency, memory) lands on all of them alike and their ratios hold.
A sample repeats the call until it lasts ``min_sample_s`` (small ops would otherwise measure the
clock); its value is the time per call. Minor page faults per call are counted too: a provider that
claims to write in place but faults on every call is allocating.

Every sample is preceded by an untimed run of the same provider lasting ``min_sample_s`` (at least
one call), so a sample measures the provider at its own steady state, not the transition from the
provider before it in the round. The transition is large on this project's CPUs: a seeded sphere
step (65,536 x 64, compute-bound Philox) takes 4.6-5.3 ms on its first call after any other work (a
2-thread fill of 160 MB, a serial randn, a 30 ms idle spin) and needs about 5 calls (~20 ms) to
return to its 3.2-3.4 ms; without the run-in, 20 ms samples of 4 calls timed the ramp.
"""

from __future__ import annotations

import gc
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MAX_CALLS_PER_SAMPLE = 100_000


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)  # seconds per call, one per round
    calls_per_sample: int = 1
    faults_per_call: float = 0.0
    error: str | None = None  # the exception a provider raised while being timed

    def quantile(self, q: float) -> float:
        return quantile(self.samples, q)

    @property
    def p20(self) -> float:
        return self.quantile(0.2)

    @property
    def p50(self) -> float:
        return self.quantile(0.5)

    @property
    def p80(self) -> float:
        return self.quantile(0.8)


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(base: list[float], own: list[float]) -> float:
    """How many times faster ``own`` is than ``base``: the median over rounds of the ratio of the
    two samples taken in the same round (so drift of the machine during the run cancels), or
    the ratio of the medians when the sample lists do not pair up."""
    if base and len(base) == len(own) and all(v > 0 for v in own):
        return quantile([b / o for b, o in zip(base, own)], 0.5)
    return quantile(base, 0.5) / quantile(own, 0.5)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def interleaved(
    runners: dict[str, Callable[[], object]],
    *,
    repeat: int,
    warmup: int,
    min_sample_s: float,
    device: torch.device,
    on_round: Callable[[int], None] = lambda r: None,
) -> dict[str, Timing]:
    """Times every runner ``repeat`` times, round-robin, after ``warmup`` untimed calls (at least
    one, which also calibrates the calls per sample); each sample follows an untimed run-in of
    the same runner (``min_sample_s``, at least one call). A runner that raises is dropped from the
    rounds and keeps its error in ``Timing.error``."""
    sync = synchronizer(device)
    timings = {name: Timing() for name in runners}
    live = dict(runners)

    def call(name: str, n: int) -> tuple[float, int] | None:
        fn = live[name]
        try:
            sync()
            f0, t0 = minor_faults(), time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            return time.perf_counter() - t0, minor_faults() - f0
        except Exception as exc:  # reported with the row; the other providers go on
            timings[name].error = f"{type(exc).__name__}: {exc}"
            del live[name]
            return None

    def run_in(name: str, seconds: float) -> bool:
        """Untimed calls of ``name`` for ``seconds`` (at least one); False if it raised."""
        t0 = time.perf_counter()
        while call(name, 1) is not None:
            if time.perf_counter() - t0 >= seconds:
                return True
        return False

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        last: dict[str, float] = {}
        for _ in range(max(1, warmup)):  # warm-up; the last call's time calibrates the calls per sample
            for name in list(live):
                measured = call(name, 1)
                if measured is not None:
                    last[name] = measured[0]
        for name in live:
            once = max(last[name], 1e-7)
            timings[name].calls_per_sample = min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(min_sample_s / once)))
        faults = {name: 0 for name in runners}
        names = list(runners)
        for r in range(repeat):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                if name not in live:
                    continue
                n = timings[name].calls_per_sample
                if not run_in(name, min_sample_s):
                    continue
                measured = call(name, n)
                if measured is not None:
                    timings[name].samples.append(measured[0] / n)
                    faults[name] += measured[1]
            on_round(r)
        for name, t in timings.items():
            if t.samples:
                t.faults_per_call = faults[name] / (len(t.samples) * t.calls_per_sample)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings
