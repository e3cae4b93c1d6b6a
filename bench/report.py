"""Output of a run: the markdown table, targets, JSON, CSV, the plot, and ``--compare``."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

from bench.core import SAME_BYTES, Target
from bench.harness import COPY, FAILED, OK, ROLE_COLUMNS, UNAVAILABLE
from bench.timing import paired_ratio

FORMAT = 1  # version of the JSON layout

LEGEND = (
    "p50/p20–p80: milliseconds per call over the timed samples (each after an untimed run-in of the same provider). "
    "vs eager: speed-up over the reference as people run it (eager PyTorch, allocating; DiffRec's style). "
    "vs compile: over `torch.compile` of that same code (allocating, as people run it). "
    "vs compile in-place: over its best form (compiled, writing a preallocated tensor with `copy_`), "
    "the like-for-like baseline of in-place rows. "
    "Every speed-up is the median over the timing rounds of the ratio within a round (the providers take "
    "their samples in the same rounds), so drift of the machine during the run cancels. "
    "GB/s: bytes the op must read and write (not page faults) per second; % copy: share of the GB/s of "
    "`dst.copy_(src)` moving the same bytes between preallocated tensors in the same run, interleaved (the copy "
    "also reads each destination line before writing it, which an op that updates its input in place does not, "
    "so in-place rows can pass 100%). "
    "compile s: first call less the steady-state median (cached: Inductor's on-disk cache hit). "
    "same bytes rows: one plain torch op with the op's reads and a write of the same kind; their speed-ups show "
    "what that memory traffic alone allows against the same baselines (quoted on a target's line), not a hard "
    "ceiling."
)

METRICS = {
    "vs_eager": ("speed-up vs the eager reference", "x"),
    "vs_compile": ("speed-up vs torch.compile(reference), allocating", "x"),
    "vs_compile_in_place": ("speed-up vs torch.compile(reference), in place", "x"),
    "copy_share": ("share of the copy roofline", "%"),
    "vs_provider": ("speed-up vs {baseline}", "x"),
}


# --- formatting ---------------------------------------------------------------------------------
def fmt_ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}" if v >= 0.01 else f"{v:.4f}"


def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "—"
    if v < 0.1:
        return f"{v:.2g}x"
    return f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def fmt_share(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def fmt_gbps(v: float | None) -> str:
    return "—" if v is None else (f"{v:.1f}" if v >= 1 else f"{v:.2f}")


def fmt_shape(shape: list[int]) -> str:
    return " x ".join(f"{s:,}" for s in shape)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


# --- the report ---------------------------------------------------------------------------------
def results_table(rows: list[dict]) -> str:
    header = ["op", "workload", "variant", "mode", "provider", "p50 ms", "p20–p80 ms", "vs eager", "vs compile",
              "vs compile in-place", "GB/s", "% copy", "compile s"]
    body = []
    for r in rows:
        if r["status"] == UNAVAILABLE:
            continue
        workload = f"{r['workload']} {fmt_shape(r['shape'])}"
        head = [r["op"], workload, r["variant"], r["mode"], r["provider"]]
        if r["status"] == FAILED:
            body.append(head + ["**FAILED**"] + ["—"] * 7)
            continue
        compile_s = "—" if r["compile_s"] is None else f"{r['compile_s']:.1f}" + (
            " (cached)" if r["compile_cache_hit"] else "")
        body.append(head + [
            fmt_ms(r["p50_ms"]), f"{fmt_ms(r['p20_ms'])}–{fmt_ms(r['p80_ms'])}",
            fmt_ratio(r["vs_eager"]), fmt_ratio(r["vs_compile"]), fmt_ratio(r["vs_compile_in_place"]),
            fmt_gbps(r["gbps"]), fmt_share(r["copy_share"]) if r["provider"] != COPY else "100%", compile_s,
        ])
    return markdown_table(header, body)


def evaluate_targets(targets: list[Target], rows: list[dict], threads: int, dtype: str) -> list[dict]:
    """Each target with the measured value, or why it was not measured in this run."""
    index = {(r["family"], r["op"], r["workload"], tuple(r["shape"]), r["variant"], r["mode"], r["provider"]): r
             for r in rows}
    out = []
    for t in targets:
        label, unit = METRICS[t.metric]
        label = label.format(baseline=f"{t.baseline} ({t.baseline_mode or t.mode})")
        goal = f"{100 * t.goal:.0f}%" if unit == "%" else f"{t.goal:g}x"
        text = (f"{t.op} {t.mode}, {t.workload} {fmt_shape(list(t.shape))} {str(t.dtype).removeprefix('torch.')}, "
                f"{t.variant}, {t.provider}"
                + (f", {t.threads} threads" if t.threads else "") + f": {label} >= {goal}")
        entry = {"target": text, "metric": t.metric, "goal": t.goal, "measured": None, "met": None, "why": None}
        case = (t.family, t.op, t.workload, tuple(t.shape), t.variant)
        r = index.get((*case, t.mode, t.provider))
        base = index.get((*case, t.baseline_mode or t.mode, t.baseline)) if t.metric == "vs_provider" else None
        if str(t.dtype).removeprefix("torch.") != dtype or (t.threads and t.threads != threads):
            entry["why"] = "not measured: this run uses another dtype or thread count"
        elif r is None:
            entry["why"] = "not measured: the workload is not in this run"
        elif r["status"] != OK:
            entry["why"] = f"not measured: the row {r['status']}"
        elif t.metric == "vs_provider":
            if base is None or base["status"] != OK:
                entry["why"] = f"not measured: {t.baseline} did not run"
            else:
                entry["measured"] = paired_ratio(base.get("sample_ms") or [base["p50_ms"]],
                                                 r.get("sample_ms") or [r["p50_ms"]])
        elif r.get(t.metric) is None:
            entry["why"] = "not measured: its baseline did not run"
        else:
            entry["measured"] = r[t.metric]
        if entry["measured"] is not None:
            entry["met"] = entry["measured"] >= t.goal
            plain = next((p for p in rows if p.get("role") == SAME_BYTES and p["status"] == OK and p["mode"] == t.mode
                          and (p["family"], p["op"], p["workload"], tuple(p["shape"]), p["variant"]) == case), None)
            if plain is not None and t.metric in ROLE_COLUMNS.values() and plain.get(t.metric) is not None:
                entry["same_bytes"], entry["same_bytes_op"] = plain[t.metric], plain["provider"]
        out.append(entry)
    return out


def targets_text(evaluated: list[dict]) -> str:
    lines = []
    for e in evaluated:
        if e["measured"] is None:
            lines.append(f"- {e['target']} — {e['why']}")
            continue
        value = f"{100 * e['measured']:.0f}%" if e["metric"] == "copy_share" else f"{e['measured']:.1f}x"
        verdict = "met" if e["met"] else f"**MISSED** ({e['measured'] / e['goal']:.0%} of the goal)"
        if e.get("same_bytes") is not None:
            op = e["same_bytes_op"].removeprefix("same bytes: ")
            verdict += f"; the same bytes through {op}: {e['same_bytes']:.1f}x"
        lines.append(f"- {e['target']} — measured {value}: {verdict}")
    return "\n".join(lines)


def not_run_text(rows: list[dict]) -> str:
    """Unavailable providers, one line per (provider, reason), with the rows they would have had."""
    seen: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if r["status"] == UNAVAILABLE:
            key = (r["family"], r["provider"], r["reason"])
            seen[key] = seen.get(key, 0) + 1
    return "\n".join(f"- {prov} ({fam}, {n} rows): {reason}" for (fam, prov, reason), n in seen.items())


ALLOCATION_FAULTS = 64  # minor page faults per call above which an in-place row is said to allocate


def allocating_in_place_text(rows: list[dict]) -> str:
    """In-place rows that page-faulted on every call: they allocate inside the timed region."""
    return "\n".join(
        f"- {r['op']} {r['workload']} {r['variant']}: {r['provider']} ({r['faults_per_call']:,.0f} minor page faults "
        f"per call, about {r['faults_per_call'] * 4096 / 1e6:,.0f} MB of fresh memory at 4 KiB pages)"
        for r in rows
        if r["status"] == OK and r["mode"] == "in-place" and (r["faults_per_call"] or 0) > ALLOCATION_FAULTS
    )


def failures_text(rows: list[dict]) -> str:
    return "\n".join(
        f"- {r['op']} {r['workload']} {r['variant']} {r['mode']} {r['provider']}: {r['reason']}"
        for r in rows if r["status"] == FAILED
    )


def render(result: dict) -> str:
    """The whole stdout report of a run."""
    cfg = result["config"]
    parts = [
        f"# diffcore bench — suite {cfg['suite']}, {cfg['dtype']}, {cfg['threads']} threads, "
        f"{cfg['repeat']} timed samples per row",
        "",
        f"machine: {result['machine_line']}",
        "",
        results_table(result["rows"]),
        "",
        LEGEND,
    ]
    if result["notes"]:
        parts += ["", "Notes:", "\n".join(f"- {n}" for n in result["notes"])]
    not_run = not_run_text(result["rows"])
    if not_run:
        parts += ["", "Not run here (provider: reason):", not_run]
    allocating = allocating_in_place_text(result["rows"])
    if allocating:
        parts += ["", "In-place rows that allocate inside the timed region (counted, not hidden):", allocating]
    failures = failures_text(result["rows"])
    if failures:
        parts += ["", "**FAILED rows** (output did not match the reference, or the provider raised):", failures]
    if result["targets"]:
        parts += ["", "Targets:", targets_text(result["targets"])]
    parts += ["", f"Ran {len([r for r in result['rows'] if r['status'] == OK])} rows in {result['elapsed_s']:.0f} s."]
    return "\n".join(parts)


# --- files --------------------------------------------------------------------------------------
def write_atomic(path: str, data: bytes) -> None:
    """Writes the whole file or nothing: a temporary file in the same directory, then a rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(result: dict) -> bytes:
    return (json.dumps({"format": FORMAT, **result}, indent=1) + "\n").encode()


CSV_COLUMNS = ["family", "op", "workload", "shape", "dtype", "variant", "mode", "provider", "status", "threads",
               "p20_ms", "p50_ms", "p80_ms", "samples", "calls_per_sample", "gbps", "copy_share", "vs_eager",
               "vs_compile", "vs_compile_in_place", "compile_s", "compile_cache_hit", "faults_per_call", "bytes",
               "role", "reason"]


def to_csv(result: dict) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result["rows"]:
        writer.writerow({**r, "shape": "x".join(map(str, r["shape"]))})
    return buf.getvalue().encode()


def plot_available() -> str | None:
    """None if --plot can work here, else the reason."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed (pip install matplotlib, or diffcore[bench])"
    return None


def to_png(result: dict) -> bytes:
    """Speed-up vs the eager reference and share of the copy roofline, one bar per timed row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == OK and r["provider"] != COPY]
    labels = [f"{r['op']} {r['workload']} {fmt_shape(r['shape'])}, {r['variant']}, {r['mode']}: {r['provider']}"
              for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 1.8), sharey=True)
    ys = range(len(rows))
    colors = ["tab:blue" if r["provider"].startswith("diffcore") else
              "tab:orange" if r["provider"].startswith("torch.compile") else "tab:gray" for r in rows]
    ax1.barh(ys, [r["vs_eager"] or 0 for r in rows], color=colors)
    ax1.set_xscale("log")
    ax1.axvline(1, color="black", linewidth=0.8)
    ax1.set_xlabel("speed-up vs eager reference (log)")
    ax1.set_yticks(list(ys), labels, fontsize=7)
    ax1.invert_yaxis()
    ax2.barh(ys, [100 * (r["copy_share"] or 0) for r in rows], color=colors)
    ax2.axvline(100, color="black", linewidth=0.8)
    ax2.set_xlabel("% of copy roofline")
    cfg = result["config"]
    fig.suptitle(f"diffcore bench ({cfg['suite']}, {cfg['dtype']}, {cfg['threads']} threads; blue: diffcore, "
                 f"orange: torch.compile, gray: eager)\n"
                 f"{result['machine_line']}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- compare ------------------------------------------------------------------------------------
def load_result(path: str) -> dict:
    """A JSON written by ``--json``; raises ValueError with a clear message otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    fields = ("family", "op", "workload", "shape", "dtype", "variant", "mode", "provider", "status", "p20_ms", "p50_ms",
              "p80_ms")
    if (not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "config" not in data
            or not all(isinstance(r, dict) and all(f in r for f in fields) for r in data["rows"])):
        raise ValueError(f"{path}: not a bench result (written by `python -m bench --json PATH`)")
    return data


def _key(r: dict) -> tuple:
    return (r["family"], r["op"], r["workload"], tuple(r["shape"]), r["dtype"], r["variant"], r["mode"],
            r["provider"])


MIN_CHANGE = 0.05


def compare(old: dict, new: dict, old_name: str, new_name: str) -> str:
    """The change of every row's median from ``old`` to ``new``. A change counts (faster/slower)
    when the p20–p80 ranges do not overlap and the medians differ by at least :data:`MIN_CHANGE`;
    otherwise it is within noise."""
    old_rows = {_key(r): r for r in old["rows"] if r["status"] != UNAVAILABLE}
    new_rows = {_key(r): r for r in new["rows"] if r["status"] != UNAVAILABLE}
    body, counts = [], {"slower": 0, "faster": 0}
    for key in [k for k in old_rows if k in new_rows] + [k for k in new_rows if k not in old_rows]:
        o, n = old_rows.get(key), new_rows[key]
        head = [n["op"], f"{n['workload']} {fmt_shape(n['shape'])}", n["variant"], n["mode"], n["provider"]]
        if o is None:
            body.append(head + ["—", fmt_ms(n["p50_ms"]), "—", "new row"])
            continue
        if o["status"] != OK or n["status"] != OK:
            body.append(head + [fmt_ms(o["p50_ms"]), fmt_ms(n["p50_ms"]), "—", f"{o['status']} → {n['status']}"])
            continue
        change = n["p50_ms"] / o["p50_ms"] - 1
        if abs(change) < MIN_CHANGE:
            verdict = "within noise"
        elif n["p20_ms"] > o["p80_ms"]:
            verdict = "**slower**"
            counts["slower"] += 1
        elif n["p80_ms"] < o["p20_ms"]:
            verdict = "faster"
            counts["faster"] += 1
        else:
            verdict = "within noise"
        body.append(head + [fmt_ms(o["p50_ms"]), fmt_ms(n["p50_ms"]), f"{change:+.1%}", verdict])
    for key, o in old_rows.items():
        if key not in new_rows:
            head = [o["op"], f"{o['workload']} {fmt_shape(o['shape'])}", o["variant"], o["mode"], o["provider"]]
            body.append(head + [fmt_ms(o["p50_ms"]), "—", "—", "gone"])
    header = ["op", "workload", "variant", "mode", "provider", "old p50 ms", "new p50 ms", "change", "verdict"]
    lines = [
        f"# bench compare: {old_name} → {new_name}",
        "",
        f"old: {old.get('machine_line', '?')} ({old['config'].get('suite')}, {old['config'].get('dtype')})",
        f"new: {new.get('machine_line', '?')} ({new['config'].get('suite')}, {new['config'].get('dtype')})",
        "",
        markdown_table(header, body),
        "",
        f"{counts['slower']} rows slower, {counts['faster']} faster (p20–p80 ranges apart and medians at least "
        f"{MIN_CHANGE:.0%} apart); the rest within noise.",
    ]
    same = ("cpu", "logical_cpus", "threads", "cpu_isa", "torch", "device")
    if any(old.get("machine", {}).get(k) != new.get("machine", {}).get(k) for k in same):
        lines.append("Note: the two runs describe different machines or software; compare with care.")
    return "\n".join(lines)
