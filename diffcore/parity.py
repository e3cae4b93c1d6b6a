"""``python -m diffcore.parity``: check diffcore's numbers on this machine before trusting them.

For every registered op and every implementation live here (C++ on CPU; Triton and CUDA on each
visible GPU; Triton on CPU through the interpreter with ``--interpret``), runs the op family's fixed
seeded cases (``diffcore._cases``: dtypes, odd shapes, strided rows, edge cases, seeded noise at
offsets) against the pure-PyTorch reference, computed in float32 on CPU, and prints one row per
(op, implementation, device, dtype, tolerance): cases, max absolute and relative error
(``max |got - ref| / max |ref|``), the tolerance rule and pass/fail. Seeded-noise cases also give
cross-backend rows: each backend's output against the ``cpu`` implementation's on CPU for the same
seed and offset. Implementations that cannot run are listed with the reason.

    python -m diffcore.parity                        # every family, every device
    python -m diffcore.parity --quick --interpret    # fewer cases; Triton under the interpreter
    python -m diffcore.parity --only diffusion --device cuda --json parity.json

Exit status: 0 when every row passes, 1 when any fails (or an op has no cases), 2 for bad usage
(an unknown family or device, a device that is not available).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

import diffcore
from diffcore import _cases, _checks, _library, _registry
from diffcore._registry import Implementation

__all__ = ["main", "check", "Row", "NotRun", "Report"]

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
REFERENCE = "reference"
BASELINE = "cpu"  # seeded noise on every backend is compared with this implementation on CPU
_IMPL_ORDER = ("cpu", "triton", "cuda", REFERENCE)


@dataclass
class Row:
    check: str  # "reference": against the float32 reference; "agreement": against `baseline`
    family: str
    op: str
    implementation: str
    device: str
    dtype: str
    tolerance: str
    baseline: str
    cases: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)  # {"case": ..., "message": ...}

    @property
    def passed(self) -> bool:
        return not self.failures

    def add(self, case: str, verdict: _cases.Verdict) -> None:
        self.cases += 1
        self.max_abs_err = _worst(self.max_abs_err, verdict.abs_err)
        self.max_rel_err = _worst(self.max_rel_err, verdict.rel_err)
        if not verdict.passed:
            self.failures.append({"case": case, "message": verdict.message or "failed"})


@dataclass(frozen=True)
class NotRun:
    op: str
    implementation: str
    device: str
    reason: str


@dataclass
class Report:
    environment: dict[str, object]
    families: list[str]
    quick: bool
    rows: list[Row]
    not_run: list[NotRun]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def to_json(self) -> dict[str, object]:
        rows = [{**asdict(row), "passed": row.passed} for row in self.rows]
        for row in rows:
            row["max_abs_err"], row["max_rel_err"] = _finite(row["max_abs_err"]), _finite(row["max_rel_err"])
        return {
            "passed": self.passed, "quick": self.quick, "families": self.families,
            "environment": self.environment, "seconds": round(self.seconds, 2),
            "rows": rows, "not_run": [asdict(n) for n in self.not_run],
        }


def _worst(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --- what runs where ----------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _skip_reason(impl: Implementation, device: torch.device) -> str | None:
    if impl.name == REFERENCE and device.type == "cpu":
        return "the reference on cpu is the truth every row is compared with"
    if impl.name == "triton" and device.type == "cuda" and interpreting():
        return "--interpret runs Triton through the interpreter; run without it to check compiled Triton on cuda"
    reason = impl.reason(device)
    if reason is not None and impl.name == "triton" and device.type == "cpu":
        reason += "; pass --interpret"
    return reason


def plan(op: str, devices: Sequence[torch.device]) -> tuple[list[tuple[Implementation, torch.device]], list[NotRun]]:
    """The (implementation, device) pairs of ``op`` to run on ``devices``, and the others with why."""
    impls = sorted(_registry.implementations(op).values(),
                   key=lambda i: _IMPL_ORDER.index(i.name) if i.name in _IMPL_ORDER else len(_IMPL_ORDER))
    runs, not_run = [], []
    for impl in impls:
        for device_type in impl.devices:
            selected = [d for d in devices if d.type == device_type]
            if not selected:
                reason = impl.reason(device_type)
                if reason is None:
                    present = _device_count(device_type) > 0
                    reason = "not selected (--device)" if present else f"no {device_type.upper()} device"
                not_run.append(NotRun(op, impl.name, device_type, reason))
            for device in selected:
                reason = _skip_reason(impl, device)
                if reason is None:
                    runs.append((impl, device))
                else:
                    not_run.append(NotRun(op, impl.name, str(device), reason))
    return runs, not_run


def _device_count(device_type: str) -> int:
    if device_type == "cpu":
        return 1
    return torch.cuda.device_count() if device_type == "cuda" and torch.cuda.is_available() else 0


# --- running the cases --------------------------------------------------------------------------
def _run(case: _cases.Case, impl: Implementation, device: torch.device) -> torch.Tensor | str:
    """The case's output on CPU, or the error it raised."""
    try:
        with diffcore.use(impl.name):
            return case.run(device).cpu()
    except Exception as exc:  # a row fails on any error; the command goes on
        return f"{type(exc).__name__}: {exc}"


def _error(message: str) -> _cases.Verdict:
    return _cases.Verdict(False, math.nan, math.nan, message)


def check(families: Sequence[str], devices: Sequence[torch.device], *, quick: bool, strict: bool = True) -> Report:
    """Runs the cases of ``families`` on ``devices``. ``strict``: a registered op no family covers
    gives a failing row (it is never checked)."""
    start = time.perf_counter()
    rows: dict[tuple, Row] = {}
    not_run: list[NotRun] = []
    for op in _registry.ops():
        fam = _cases.family_of(op)
        if fam is None:
            if strict:
                row = Row(REFERENCE, op.split("_")[0], op, "-", "-", "-", "no cases", "-")
                row.failures.append({"case": "-", "message": f"{op} is registered but has no parity cases: add its "
                                     "family block to diffcore/_cases.py"})
                rows[(op,)] = row
            continue
        if fam.name not in families:
            continue
        cases = [c for c in fam.cases(quick) if c.op == op]
        runs, skipped = plan(op, devices)
        not_run += skipped
        _check_op(fam.name, op, cases, runs, rows)
    if _library._C is None and not _library.no_ext_requested():  # as DESIGN.md's test rule
        row = Row(REFERENCE, "-", "diffcore._C", "cpu", "cpu", "-", "-", "-")
        row.failures.append({"case": "-", "message": f"{_library.EXTENSION_MISSING}: the C++ CPU kernels are not "
                             "checked (DIFFCORE_NO_EXT=1 declares a pure-Python install)"})
        rows[("_C",)] = row
    for fam in families:  # a family whose ops are not registered (yet) cannot pass
        for op in _cases.FAMILIES[fam].ops:
            if op not in _registry.ops():
                row = Row(REFERENCE, fam, op, "-", "-", "-", "not registered", "-")
                message = f"family {fam} has cases for {op}, which is not registered"
                row.failures.append({"case": "-", "message": message})
                rows[(op,)] = row
    ordered = sorted(rows.values(), key=lambda r: r.check != REFERENCE)  # stable: reference rows first
    return Report(environment(devices), list(families), quick, ordered, not_run, time.perf_counter() - start)


def _check_op(fam: str, op: str, cases: list[_cases.Case], runs, rows: dict[tuple, Row]) -> None:
    cpu = torch.device("cpu")
    baseline_impl = _registry.get(op, BASELINE) if BASELINE in _registry.implementations(op) else None
    if baseline_impl is None or baseline_impl.reason(cpu) is not None:
        baseline_impl = _registry.get(op, REFERENCE)
    baseline_name = f"{baseline_impl.name} on cpu"
    truths: dict[int, tuple] = {}
    baselines: dict[int, torch.Tensor | str] = {}

    def truth(i: int, case: _cases.Case) -> tuple:
        if i not in truths:
            try:
                same = case.same_dtype_reference() if case.same_dtype_reference else None
                truths[i] = (case.reference(), same)
            except Exception as exc:
                truths[i] = f"the reference raised {type(exc).__name__}: {exc}"
        return truths[i]

    def row(check: str, impl: str, device: torch.device, case: _cases.Case, tol, baseline: str) -> Row:
        dtype = str(case.dtype).removeprefix("torch.")
        key = (check, op, impl, str(device), dtype, str(tol))
        if key not in rows:
            rows[key] = Row(check, fam, op, impl, str(device), dtype, str(tol), baseline)
        return rows[key]

    for impl, device in runs:
        for i, case in enumerate(cases):
            got = _run(case, impl, device)
            want = truth(i, case)
            if isinstance(got, str) or isinstance(want, str):
                verdict = _error(got if isinstance(got, str) else want)
            else:
                verdict = case.check(got, *want)
            row(REFERENCE, impl.name, device, case, case.tolerance, "reference on cpu").add(case.name, verdict)
            if case.agreement is None or (impl.name == baseline_impl.name and device == cpu):
                continue
            if i not in baselines:
                baselines[i] = _run(case, baseline_impl, cpu)
            base = baselines[i]
            if isinstance(got, str) or isinstance(base, str):
                verdict = _error(got if isinstance(got, str) else f"{baseline_name}: {base}")
            else:
                verdict = case.agreement.check(got, base)
            row("agreement", impl.name, device, case, case.agreement, baseline_name).add(case.name, verdict)


def environment(devices: Sequence[torch.device]) -> dict[str, object]:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    names = {}
    for d in devices:
        names[str(d)] = (platform.machine() or "cpu") if d.type == "cpu" else torch.cuda.get_device_name(d)
    return {
        "diffcore": diffcore.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton, "triton_interpret": interpreting(), "python": platform.python_version(),
        "cpu_kernels": _library.cpu_isa() or _library.EXTENSION_MISSING, "threads": torch.get_num_threads(),
        "devices": names,
    }


# --- output -------------------------------------------------------------------------------------
_COLUMNS = ("op", "implementation", "device", "dtype", "cases", "max abs err", "max rel err", "tolerance", "result")


def _fmt(x: float, cases: int) -> str:
    return "-" if cases == 0 else f"{x:.2e}" if math.isfinite(x) else str(x)


def _table(rows: Sequence[Row]) -> list[str]:
    cells = [_COLUMNS] + [
        (r.op, r.implementation, r.device, r.dtype, str(r.cases), _fmt(r.max_abs_err, r.cases),
         _fmt(r.max_rel_err, r.cases), r.tolerance, "PASS" if r.passed else "FAIL")
        for r in rows
    ]
    widths = [max(len(c[k]) for c in cells) for k in range(len(_COLUMNS))]
    right = {4, 5, 6}
    return ["  ".join(c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(cell, widths))).rstrip()
            for cell in cells]


def format_report(report: Report) -> str:
    env = report.environment
    triton = env["triton"] or "not installed"
    triton += " (interpreter)" if env["triton"] and env["triton_interpret"] else ""
    lines = [
        f"diffcore {env['diffcore']} parity: torch {env['torch']}, triton {triton}, C++ CPU kernels: "
        f"{env['cpu_kernels']}, python {env['python']}",
        "devices: " + ", ".join(f"{d} ({name})" for d, name in env["devices"].items())
        + f"; {'quick' if report.quick else 'full'} run of {', '.join(report.families)}",
    ]
    parity = [r for r in report.rows if r.check == REFERENCE]
    agreement = [r for r in report.rows if r.check != REFERENCE]
    lines += ["", "against the pure-PyTorch reference, computed on cpu; rel err = max abs err / max |ref|"]
    lines += _table(parity) if parity else ["(no rows)"]
    lines += [""]
    if agreement:
        baselines = sorted({r.baseline for r in agreement})
        baseline = baselines[0] if len(baselines) == 1 else "cpu on cpu (the reference where cpu is not live)"
        lines += [f"seeded noise across backends: same seed and offset as {baseline}"]
        lines += _table(agreement)
    else:
        lines += ["seeded noise across backends: no second backend live here (a GPU, or --interpret for Triton)"]
    if report.not_run:
        lines += ["", "not run:"]
        lines += _not_run_lines(report.not_run)
    idle = sorted({n.op for n in report.not_run} - {r.op for r in parity})
    if idle:
        lines += ["", f"nothing ran for {', '.join(idle)}: no implementation besides the reference is live here"]
    failed = [r for r in report.rows if not r.passed]
    if failed:
        lines += ["", "failures:"]
        for r in failed:
            where = " ".join(part for part in (r.op, r.implementation, r.device, r.dtype) if part != "-")
            lines += [f"  {where}" + ("" if f["case"] == "-" else f" [{f['case']}]") + f": {f['message']}"
                      for f in r.failures[:5]]
            if len(r.failures) > 5:
                lines += [f"  {where}: ... and {len(r.failures) - 5} more"]
    cases = sum(r.cases for r in report.rows)
    verdict = f"{len(failed)} FAILED" if failed else "all passed" if report.rows else "nothing was checked"
    lines += ["", f"{len(report.rows)} rows, {cases} case runs in {report.seconds:.1f} s: {verdict}"]
    return "\n".join(lines)


def _not_run_lines(not_run: Sequence[NotRun]) -> list[str]:
    widths = [max(len(getattr(n, k)) for n in not_run) for k in ("op", "implementation", "device")]
    return [f"  {n.op:<{widths[0]}}  {n.implementation:<{widths[1]}}  {n.device:<{widths[2]}}  {n.reason}"
            for n in not_run]


def format_listing(families: Sequence[str], devices: Sequence[torch.device], quick: bool, show_cases: bool) -> str:
    lines = ["families (--only):"]
    width = max(len(f) for f in families)
    for name in families:
        fam = _cases.FAMILIES[name]
        n_quick, n_full = len(fam.cases(True)), len(fam.cases(False))
        lines.append(f"  {name:<{width}}  {', '.join(fam.ops)}: {n_quick} cases quick, {n_full} full; "
                     f"{fam.description}")
        if show_cases:
            lines += [f"    {str(c.dtype).removeprefix('torch.'):<9} {c.name}" for c in fam.cases(quick)]
    uncovered = [op for op in _registry.ops() if _cases.family_of(op) is None]
    if uncovered:
        lines.append(f"registered ops without parity cases (their rows fail): {', '.join(uncovered)}")
    entries = []
    for name in families:
        for op in _cases.FAMILIES[name].ops:
            if op not in _registry.ops():
                entries.append(NotRun(op, "-", "-", "not registered"))
                continue
            runs, not_run = plan(op, devices)
            entries += [NotRun(op, impl.name, str(device), "runs") for impl, device in runs] + not_run
    return "\n".join(lines + ["", "implementations:"] + _not_run_lines(entries))


# --- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffcore.parity",
        description="Check every live diffcore implementation against the pure-PyTorch reference on this "
        "machine, and seeded noise across backends. Exit status 0: every row passed; 1: a row failed; 2: bad usage.",
    )
    parser.add_argument("--only", action="append", metavar="FAMILY[,FAMILY]",
                        help=f"check only these families (of: {', '.join(sorted(_cases.FAMILIES))})")
    parser.add_argument("--device", action="append", metavar="DEVICE[,DEVICE]",
                        help="cpu, cuda (every visible GPU) or cuda:N; default: cpu and every visible GPU")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases (seconds, not minutes)")
    parser.add_argument("--interpret", action="store_true",
                        help="also run Triton kernels on CPU tensors through the interpreter (re-runs the command "
                        "with TRITON_INTERPRET=1)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the report (rows, not-run list, environment) as JSON")
    parser.add_argument("--list", action="store_true",
                        help="print the families (and, with --only, their cases) and what would run where, then exit")
    return parser


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def select_families(names: list[str]) -> list[str]:
    """``names`` checked against the table (all families when empty); raises ValueError."""
    for name in names:
        if name not in _cases.FAMILIES:
            fam = _cases.family_of(name)
            uncovered = [op for op in _registry.ops() if op.startswith(f"{name}_")]
            hint = f" ({name} is an op of the family {fam.name})" if fam else ""
            hint += f" ({', '.join(uncovered)} registered without parity cases)" if uncovered else ""
            raise ValueError(f"unknown family {name!r}{hint}; families: {', '.join(sorted(_cases.FAMILIES))}")
    return sorted(set(names)) if names else sorted(_cases.FAMILIES)


def select_devices(names: list[str]) -> list[torch.device]:
    """``names`` resolved to devices (default: cpu and every visible GPU); raises ValueError for an
    unknown device and RuntimeError for one that is not available here."""
    n_cuda = _device_count("cuda")
    if not names:
        return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(n_cuda)]
    devices: list[torch.device] = []
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {name!r}: diffcore runs on cpu, cuda and cuda:N")
        if device.type == "cpu":
            devices.append(torch.device("cpu"))
        elif n_cuda == 0:
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise RuntimeError(f"device {name!r} is not available: {why} (torch {torch.__version__})")
        elif device.index is None:
            devices += [torch.device("cuda", i) for i in range(n_cuda)]
        elif device.index >= n_cuda:
            raise RuntimeError(f"device {name!r} is not available: {n_cuda} CUDA device(s) visible")
        else:
            devices.append(device)
    return list(dict.fromkeys(devices))


def _reexec_interpreted(argv: list[str]) -> int:
    """Runs the command again with TRITON_INTERPRET=1 (it must be set before triton is imported):
    replaces this process when it is ``python -m diffcore.parity``, else runs it as a child."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "diffcore.parity", *argv]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == __name__:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, env)
    return subprocess.call(command, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns its exit status (argparse exits with 2 on bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.interpret and not interpreting():
        return _reexec_interpreted(list(sys.argv[1:] if argv is None else argv))
    for option, values in (("--only", args.only), ("--device", args.device)):
        if values and not _split(values):
            parser.error(f"{option}: expected comma-separated names, got {','.join(values)!r}")
    problem = args.json and _checks.writable_path(args.json, "--json")
    if problem:
        parser.error(problem)
    try:
        families = select_families(_split(args.only))
        devices = select_devices(_split(args.device))
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    if args.list:
        print(format_listing(families, devices, args.quick, show_cases=bool(args.only)))
        return EXIT_PASSED
    report = check(families, devices, quick=args.quick, strict=not args.only)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_json(), fh, indent=1)
    return EXIT_PASSED if report.passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
