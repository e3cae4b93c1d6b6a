"""Runs a case: correctness first, then every provider and the copy roofline, interleaved.

For each case:
1. build the inputs (outside any timed region; large tensors are touched here, so their page faults
   never land in a timing);
2. run every available provider once on the pristine inputs and check its output (a torch.compile
   provider compiles in this call: its time, less the steady-state median, is the compile time);
   a mismatch or an exception fails that provider's row loudly and it is not timed;
3. time the providers that passed and a ``dst.copy_(src)`` moving the op's bytes between two
   preallocated tensors, interleaved (bench.timing), with recompiles forbidden;
4. turn medians into rows: GB/s from the bytes the op must move, share of the copy's GB/s, and
   speed-ups against the case's baseline providers.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from bench import timing
from bench.core import COMPILE, COMPILE_IN_PLACE, EAGER, IN_PLACE, ROOFLINE, Case, Config, Provider

OK, FAILED, UNAVAILABLE = "ok", "FAILED", "unavailable"
COPY = "copy (roofline)"
ROLE_COLUMNS = {EAGER: "vs_eager", COMPILE: "vs_compile", COMPILE_IN_PLACE: "vs_compile_in_place"}


@dataclass
class Row:
    family: str
    op: str
    workload: str
    shape: list[int]
    dtype: str
    variant: str
    mode: str
    provider: str
    role: str | None
    status: str  # ok, FAILED, unavailable
    threads: int
    bytes: int
    p20_ms: float | None = None
    p50_ms: float | None = None
    p80_ms: float | None = None
    samples: int = 0
    sample_ms: list[float] | None = None  # per timing round, in round order
    calls_per_sample: int = 0
    faults_per_call: float | None = None
    gbps: float | None = None
    copy_share: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    vs_compile_in_place: float | None = None
    compile_s: float | None = None
    compile_cache_hit: bool | None = None
    reason: str | None = None  # why unavailable, or what failed

    def to_dict(self) -> dict:
        return asdict(self)


def run_case(case: Case, config: Config, on_step: Callable[[str], None] = lambda s: None) -> list[Row]:
    def row(provider: str, mode: str, role: str | None, status: str, **kw) -> Row:
        return Row(case.family, case.op, case.workload.name, list(case.workload.shape), _dtype_name(config.dtype),
                   case.variant, mode, provider, role, status, config.threads, case.bytes_moved, **kw)

    names = [f"{p.name} [{p.mode}]" for p in case.providers]
    if len(set(names)) != len(names) or COPY in {p.name for p in case.providers}:
        raise ValueError(f"{case.family} {case.op} {case.workload.name}: provider names must be unique per mode "
                         f"and not {COPY!r}, got {names}")
    rows: dict[int, Row] = {}
    compiles = any(p.compiled and p.unavailable is None for p in case.providers)
    if compiles:
        torch._dynamo.reset()  # one compile per case, and no cache limit reached across cases
    on_step("inputs")
    try:
        inputs = case.make_inputs()
    except Exception as exc:  # every row of the case fails, loudly; the other cases go on
        return [row(p.name, p.mode, p.role, UNAVAILABLE if p.unavailable else FAILED,
                    reason=p.unavailable or f"building the inputs raised {type(exc).__name__}: {exc}")
                for p in case.providers]
    runners: dict[str, Callable[[], object]] = {}
    first_call: dict[str, float] = {}
    providers: dict[str, Provider] = {}
    for i, p in enumerate(case.providers):
        if p.unavailable is not None:
            rows[i] = row(p.name, p.mode, p.role, UNAVAILABLE, reason=p.unavailable)
            continue
        on_step(f"check {p.name} ({p.mode})")
        error, seconds, cache_hit, fn = _first_call(case, p, inputs, config)
        if error is not None:
            rows[i] = row(p.name, p.mode, p.role, FAILED, reason=error)
            continue
        name = f"{p.name} [{p.mode}]"
        runners[name], first_call[name], providers[name] = fn, seconds, p
        rows[i] = row(p.name, p.mode, p.role, OK, compile_cache_hit=cache_hit if p.compiled else None)
    case.reset(inputs)

    runners[COPY] = _copy_runner(case.bytes_moved, config.device)
    on_step("timing")
    with torch.compiler.set_stance("fail_on_recompile") if compiles else contextlib.nullcontext():
        timings = timing.interleaved(
            runners, repeat=config.repeat, warmup=config.warmup, min_sample_s=config.min_sample_s,
            device=config.device, on_round=lambda r: on_step(f"timing round {r + 1}/{config.repeat}"),
        )
    del inputs, runners

    copy = timings[COPY]
    copy_row = row(COPY, IN_PLACE, ROOFLINE, OK)
    _fill(copy_row, copy, case.bytes_moved, copy)
    by_name = {f"{p.name} [{p.mode}]": i for i, p in enumerate(case.providers)}
    for name, p in providers.items():
        r, t = rows[by_name[name]], timings[name]
        if t.error is not None:
            r.status, r.reason = FAILED, f"while timing: {t.error}"
            continue
        _fill(r, t, case.bytes_moved, copy)
        if p.compiled:
            r.compile_s = max(0.0, first_call[name] - t.p50)
    baselines = {p.role: rows[by_name[n]] for n, p in providers.items() if p.role in ROLE_COLUMNS}
    for r in rows.values():
        if r.status != OK:
            continue
        for role, column in ROLE_COLUMNS.items():
            base = baselines.get(role)
            if base is not None and base.status == OK and base.p50_ms and r.p50_ms:
                setattr(r, column, timing.paired_ratio(base.sample_ms, r.sample_ms))
    return [rows[i] for i in sorted(rows)] + [copy_row]


def _first_call(case: Case, p: Provider, inputs: dict, config: Config):
    """(error or None, seconds of the first call, compile-cache hit or None, runner)."""
    sync = timing.synchronizer(config.device)
    hits_before = _cache_hits() if p.compiled else 0
    try:
        case.reset(inputs)
        fn = p.setup(inputs)
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        seconds = time.perf_counter() - t0
        error = p.check(inputs, out) if p.check is not None else None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", 0.0, None, None
    hit = _cache_hits() > hits_before if p.compiled else None
    return (f"mismatch: {error}" if error else None), seconds, hit, fn


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def _copy_runner(bytes_moved: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """``dst.copy_(src)`` between preallocated, already-touched tensors: reads and writes
    ``bytes_moved`` bytes in total, as the op does."""
    numel = max(1, bytes_moved // 8)  # float32: 4 bytes read + 4 written per element
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


def _fill(r: Row, t: timing.Timing, bytes_moved: int, copy: timing.Timing) -> None:
    r.p20_ms, r.p50_ms, r.p80_ms = t.p20 * 1e3, t.p50 * 1e3, t.p80 * 1e3
    r.samples, r.calls_per_sample, r.faults_per_call = len(t.samples), t.calls_per_sample, t.faults_per_call
    r.sample_ms = [v * 1e3 for v in t.samples]
    r.gbps = bytes_moved / t.p50 / 1e9
    if copy.samples:
        r.copy_share = (bytes_moved / t.p50) / (8 * max(1, bytes_moved // 8) / copy.p50)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
