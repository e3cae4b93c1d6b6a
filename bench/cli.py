"""The command line: ``python -m bench`` (run from the repository root)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from types import ModuleType

import torch

from bench import FAMILIES, harness, machine, report
from bench.core import SUITES, Config
from bench.progress import Progress
from diffcore import _checks

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# Per suite: timed samples, warm-up calls, minimum seconds per sample, torch.compile backend.
SUITE_SETTINGS = {
    "quick": dict(repeat=3, warmup=1, min_sample_s=0.02, compile_backend="inductor"),
    "full": dict(repeat=15, warmup=2, min_sample_s=0.05, compile_backend="inductor"),
    # tiny shapes for the test suite; Dynamo with the eager backend exercises the compile path in ~1 s
    "smoke": dict(repeat=1, warmup=0, min_sample_s=0.0, compile_backend="eager"),
}

USAGE_EXAMPLES = """\
examples:
  python -m bench                                  quick suite, every family, markdown table on stdout
  python -m bench --suite full --json out.json     every workload of DESIGN.md, results as JSON
  python -m bench --only diffusion --threads 1 --csv rows.csv --plot rows.png
  python -m bench --list                           what would run, and which providers cannot run here
  python -m bench --compare old.json new.json      the change of every row between two runs
  python -m bench --malloc steady                  allocating rows without glibc's first-touch page faults

exit status: 0 all rows checked and timed; 1 a provider's output did not match the reference
(or it raised); 2 bad arguments.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="diffcore's throughput comparisons: every family's ops against the eager reference, "
                    "torch.compile of it and a same-run copy roofline, checked for correctness first.",
        epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", default="quick", metavar="{quick,full}",
                   help="quick (default; about 6 min on 2 cores) or full (every workload, more samples)")
    p.add_argument("--only", metavar="FAMILY[,FAMILY]", help=f"families to run (of {', '.join(FAMILIES)})")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--repeat", type=int, help="timed samples per row (default: 3 quick, 15 full)")
    p.add_argument("--json", metavar="PATH", help="write the rows, machine and targets as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speed-ups and roofline shares (matplotlib)")
    p.add_argument("--list", action="store_true", help="list families, cases and providers; run nothing")
    p.add_argument("--providers", metavar="NAME[,NAME]",
                   help="time only providers whose name contains one of these (e.g. diffcore:cpu); the "
                        "baselines the speed-ups are computed against always run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (listed as skipped)")
    p.add_argument("--malloc", choices=("default", "steady"), default="default",
                   help="default: glibc's adaptive malloc (allocating rows pay page faults when it hands "
                        "memory back to the OS, which varies run to run); steady: freed blocks are kept and "
                        "reused, so allocating rows compare kernels, not first-touch faults")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                   help="print the change of every row between two --json results; run nothing")
    return p


class UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.compare:
            return _compare(*args.compare)
        config, families = _configure(args)
    except UsageError as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(config.threads)
    if args.malloc == "steady":  # before any case allocates its inputs
        config = dataclasses.replace(config, malloc=machine.steady_malloc())
    cases = [case for module in families for case in module.cases(config)]
    if args.providers:
        try:
            cases = _select_providers(cases, args.providers)
        except UsageError as exc:
            print(f"python -m bench: error: {exc}", file=sys.stderr)
            return 2
    if args.list:
        print(_listing(families, cases, config))
        return 0
    try:
        result = run(cases, families, config, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("python -m bench: interrupted; nothing written", file=sys.stderr)
        return 130
    print(report.render(result))
    for path, encode in ((args.json, report.to_json), (args.csv, report.to_csv), (args.plot, report.to_png)):
        if path:
            report.write_atomic(path, encode(result))
            print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in result["rows"] if r["status"] == harness.FAILED]
    if failed:
        print(f"python -m bench: {len(failed)} rows FAILED (see 'FAILED rows' above)", file=sys.stderr)
        return 1
    return 0


def run(cases: list, families: list[ModuleType], config: Config, progress: bool = True) -> dict:
    """Checks and times every case; returns the result the report, JSON and CSV are made of."""
    started = time.perf_counter()
    info = machine.describe(config.device)
    info["malloc"] = config.malloc
    bar = Progress(len(cases), enabled=progress)
    rows, notes = [], []
    try:
        for case in cases:
            bar.start(f"{case.family} {case.op} {case.workload.name} {case.variant}")
            rows += [r.to_dict() for r in harness.run_case(case, config, on_step=bar.status)]
            notes += [n for n in case.notes if n not in notes]
            bar.advance()
    finally:
        bar.close()
    targets = [t for module in families for t in module.TARGETS]
    dtype = str(config.dtype).removeprefix("torch.")
    return {
        "machine": info,
        "machine_line": machine.line(info),
        "config": {"suite": config.suite, "dtype": dtype, "threads": config.threads, "repeat": config.repeat,
                   "warmup": config.warmup, "min_sample_s": config.min_sample_s,
                   "compile_backend": config.compile_backend, "malloc": config.malloc,
                   "families": [m.FAMILY for m in families]},
        "rows": rows,
        "notes": notes,
        "targets": report.evaluate_targets(targets, rows, config.threads, dtype),
        "elapsed_s": time.perf_counter() - started,
    }


def _select_providers(cases: list, spec: str) -> list:
    """Keeps the providers whose name contains one of the comma-separated names, and every baseline."""
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    if not wanted:
        raise UsageError("--providers: expected provider names, e.g. diffcore:cpu")
    known = {p.name for case in cases for p in case.providers}
    unknown = [w for w in wanted if not any(w in name for name in known)]
    if unknown:
        raise UsageError(
            f"--providers: no provider matches {', '.join(unknown)}; providers: {', '.join(sorted(known))}")
    for case in cases:
        case.providers = [p for p in case.providers if p.role or any(w in p.name for w in wanted)]
    return cases


def _configure(args: argparse.Namespace) -> tuple[Config, list[ModuleType]]:
    if args.suite not in (*SUITES, "smoke"):
        raise UsageError(f"--suite: expected one of {', '.join(SUITES)}, got {args.suite!r}")
    if args.dtype.lower() not in DTYPES:
        raise UsageError(f"--dtype: expected float32, float16 or bfloat16, got {args.dtype!r}")
    if args.threads < 1:
        raise UsageError(f"--threads: expected a positive number of threads, got {args.threads}")
    if args.threads > (os.cpu_count() or 1):
        print(f"python -m bench: warning: --threads {args.threads} exceeds the {os.cpu_count()} logical CPUs",
              file=sys.stderr)
    if args.repeat is not None and args.repeat < 1:
        raise UsageError(f"--repeat: expected at least 1 timed sample, got {args.repeat}")
    names = list(FAMILIES) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UsageError(f"--only: unknown family {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known families: {', '.join(FAMILIES)}")
    if not args.list:
        for option, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
            problem = path and _checks.writable_path(path, option)
            if problem:
                raise UsageError(problem)
        if args.plot and report.plot_available():
            raise UsageError(report.plot_available())
    settings = dict(SUITE_SETTINGS[args.suite])
    if args.repeat is not None:
        settings["repeat"] = args.repeat
    if args.no_compile:
        settings["compile_backend"] = None
    config = Config(suite=args.suite, dtype=DTYPES[args.dtype.lower()], threads=args.threads, **settings)
    return config, [_family(n) for n in dict.fromkeys(names)]


def _family(name: str) -> ModuleType:
    module = importlib.import_module(f"bench.{name}")
    for attr in ("FAMILY", "DESCRIPTION", "TARGETS", "cases"):
        if not hasattr(module, attr):
            raise UsageError(f"bench/{name}.py does not define {attr} (see bench/core.py)")
    return module


def _compare(old_path: str, new_path: str) -> int:
    try:
        old, new = report.load_result(old_path), report.load_result(new_path)
    except ValueError as exc:
        raise UsageError(f"--compare: {exc}") from None
    print(report.compare(old, new, old_path, new_path))
    return 0


def _listing(families: list[ModuleType], cases: list, config: Config) -> str:
    lines = [f"suite {config.suite}, {str(config.dtype).removeprefix('torch.')}, {config.threads} threads", ""]
    for module in families:
        lines.append(f"{module.FAMILY}: {module.DESCRIPTION}")
        for case in (c for c in cases if c.family == module.FAMILY):
            lines.append(f"  {case.op} · {case.workload.label} ({case.workload.note}) · {case.variant} · "
                         f"{case.bytes_moved / 1e6:,.1f} MB moved per call")
            for p in case.providers:
                state = "runs" if p.unavailable is None else f"not run: {p.unavailable}"
                role = f", baseline {p.role}" if p.role else ""
                lines.append(f"    {p.name} [{p.mode}{role}]: {state}")
        for t in module.TARGETS:
            lines.append(f"  target: {t.op} {t.mode} {t.workload} {t.variant} {t.provider}: {t.metric} >= {t.goal:g}")
        lines.append("")
    return "\n".join(lines).rstrip()
