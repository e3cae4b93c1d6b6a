"""Smoke run of ``python -m bench`` (tiny shapes, one sample), so the bench can never rot.

One run goes through the real entry point (a subprocess from the repository root, with Dynamo's
eager backend standing in for Inductor so compiled baselines cost about a second); the rest call
``bench.cli.main(argv)`` in process.
"""

from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cli
from bench.core import IN_PLACE, Provider

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--suite", "smoke", "--repeat", "1", "--no-progress",
         "--json", str(out / "run.json"), "--csv", str(out / "run.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    failed = proc.stdout.find("**FAILED rows**")
    assert proc.returncode == 0, (proc.stdout[failed:] if failed >= 0 else proc.stdout) + proc.stderr
    return proc.stdout, out


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_table(smoke):
    stdout, _ = smoke
    assert stdout.startswith("# diffcore bench — suite smoke")
    assert "machine: " in stdout and "diffcore CPU kernels:" in stdout and f"torch {torch.__version__}" in stdout
    header = "| op | workload | variant | mode | provider | p50 ms | p20–p80 ms | vs eager | vs compile |"
    assert header in stdout
    for provider in ("diffcore:cpu", "eager reference", "copy (roofline)", "torch.compile[eager](reference)",
                     "eager reference + randn_like", "torch.randn"):
        assert f"| {provider} |" in stdout, provider
    assert "**FAILED**" not in stdout
    assert "Not run here" in stdout  # triton (without TRITON_INTERPRET) or cuda, with their reasons
    assert "Targets:" in stdout


def test_json_and_csv(smoke):
    _, out = smoke
    result = json.loads((out / "run.json").read_text())
    assert result["config"]["suite"] == "smoke" and result["machine"]["threads"] == 2
    assert result["config"]["malloc"] == "default"
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {"diffusion", "random"} <= {r["family"] for r in ok}
    assert {r["mode"] for r in ok} == {"allocating", "in-place"}
    for r in ok:
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["gbps"] > 0, r
    step = [r for r in ok if r["op"] == "p_step" and r["provider"] == "diffcore:cpu"]
    assert step and all(r["vs_eager"] is not None and r["copy_share"] is not None for r in step)
    assert all(r["reason"] for r in rows if r["status"] == "unavailable")
    with open(out / "run.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"p50_ms", "gbps", "copy_share", "vs_eager"} <= set(table[0])


def test_compare(smoke, capsys):
    _, out = smoke
    run = str(out / "run.json")
    assert cli.main(["--compare", run, run]) == 0
    text = capsys.readouterr().out
    assert "# bench compare" in text and "+0.0%" in text and "within noise" in text


def test_mismatch_fails_loudly(monkeypatch, capsys, keep_threads):
    import bench.random

    real_cases = bench.random.cases

    def with_wrong_provider(config):
        cases = real_cases(config)

        def setup(inputs):
            out = inputs["out"]
            return lambda: out.fill_(0.5)

        cases[0].providers.append(Provider("wrong", IN_PLACE, setup=setup, check=bench.random._check(config.dtype)))
        return cases

    monkeypatch.setattr(bench.random, "cases", with_wrong_provider)
    assert cli.main(["--suite", "smoke", "--only", "random", "--no-compile", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "| wrong | **FAILED**" in captured.out and "FAILED rows" in captured.out
    assert "mismatch" in captured.out and "FAILED" in captured.err


def test_paired_ratio():
    """Speed-ups pair the samples of one round: the median of per-round ratios, not the ratio of medians."""
    from bench.timing import paired_ratio

    assert paired_ratio([10.0, 30.0, 20.0], [1.0, 1.5, 4.0]) == 10.0  # rounds: 10x, 20x, 5x
    assert paired_ratio([10.0, 30.0, 20.0], [2.0, 4.0]) == 20.0 / 3.0  # unpaired: medians 20 / 3
    assert paired_ratio([6.0], [2.0]) == 3.0


def test_every_sample_follows_a_run_in():
    """Each timed sample is preceded by untimed calls of the same provider (at least one), and the
    samples are taken in rotating order; a provider that raises is dropped with its error."""
    from bench.timing import interleaved

    log: list[str] = []

    def runner(name: str):
        return lambda: log.append(name)

    def broken():
        raise RuntimeError("boom")

    timings = interleaved({"a": runner("a"), "b": runner("b"), "bad": broken}, repeat=2, warmup=1,
                          min_sample_s=0.0, device=torch.device("cpu"))
    # warm-up a, b; round 0: a (run-in + sample), b (run-in + sample); round 1 starts with b.
    assert log == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a"]
    assert [len(timings[n].samples) for n in ("a", "b")] == [2, 2]
    assert timings["bad"].samples == [] and "boom" in timings["bad"].error


def test_steady_malloc(tmp_path):
    """--malloc steady pins glibc's thresholds in its own process and says so with the machine."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--suite", "smoke", "--only", "random", "--no-compile", "--no-progress",
         "--malloc", "steady", "--json", str(tmp_path / "run.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["config"]["malloc"] == result["machine"]["malloc"]
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert result["config"]["malloc"].startswith("steady (glibc: blocks up to ")
        assert "· malloc steady (glibc" in proc.stdout
    assert any(r["status"] == "ok" for r in result["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope"], "unknown family 'nope'"),
    (["--threads", "0"], "--threads"),
    (["--dtype", "int8"], "--dtype"),
    (["--repeat", "0"], "--repeat"),
    (["--suite", "huge"], "--suite"),
    (["--json", "/no/such/dir/out.json"], "does not exist"),
    (["--compare", "/no/such/old.json", "/no/such/new.json"], "no such file"),
    (["--suite", "smoke", "--only", "random", "--providers", "nope"], "no provider matches nope"),
])
def test_bad_input(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_compare_rejects_other_json(tmp_path, capsys):
    other = tmp_path / "other.json"
    for text in ('{"not": "a bench result"}', '{"rows": [{}], "config": {}}'):  # rows without their fields too
        other.write_text(text)
        assert cli.main(["--compare", str(other), str(other)]) == 2
        assert "not a bench result" in capsys.readouterr().err


def test_list(capsys, keep_threads):
    assert cli.main(["--list", "--suite", "smoke"]) == 0
    text = capsys.readouterr().out
    assert "diffusion:" in text and "random:" in text and "diffcore:cpu [in-place]: runs" in text


def test_targets_evaluation():
    from bench.core import Target
    from bench.report import evaluate_targets, targets_text

    def row(provider, p50, **kw):
        return {"family": "f", "op": "op", "workload": "w", "shape": [4, 8], "variant": "v", "mode": "in-place",
                "provider": provider, "status": "ok", "p50_ms": p50, **kw}

    rows = [row("diffcore:cpu", 10.0, copy_share=0.5, vs_eager=20.0), row("other", 30.0),
            row("same bytes: torch.add(a, b)", 5.0, role="same-bytes", vs_eager=40.0)]
    targets = [
        Target("f", "op", "w", (4, 8), "v", "in-place", "diffcore:cpu", "vs_eager", 25.0),
        Target("f", "op", "w", (4, 8), "v", "in-place", "diffcore:cpu", "vs_provider", 2.0, baseline="other"),
        Target("f", "op", "w", (4, 8), "v", "in-place", "diffcore:cpu", "copy_share", 0.6),
        Target("f", "op", "w", (4, 8), "v", "in-place", "diffcore:cpu", "vs_eager", 15.0, threads=1),
        Target("f", "op", "big", (400, 8), "v", "in-place", "diffcore:cpu", "vs_eager", 15.0),
    ]
    result = evaluate_targets(targets, rows, threads=2, dtype="float32")
    assert result[0]["measured"] == 20.0 and result[0]["same_bytes"] == 40.0  # a ratio metric quotes the row
    assert result[1]["measured"] == 3.0 and result[1]["met"] and "same_bytes" not in result[1]
    assert result[2]["measured"] == 0.5 and result[2]["met"] is False and "same_bytes" not in result[2]
    assert result[3]["measured"] is None and "thread count" in result[3]["why"]
    assert result[4]["measured"] is None and "not in this run" in result[4]["why"]
    text = targets_text(result)
    assert "measured 20.0x: **MISSED** (80% of the goal); the same bytes through torch.add(a, b): 40.0x" in text
    assert "speed-up vs other (in-place) >= 2x — measured 3.0x: met\n" in text and "(83% of the goal)" in text


def test_providers_filter_keeps_the_baselines(capsys):
    argv = ["--suite", "smoke", "--only", "random", "--no-compile", "--no-progress", "--providers", "diffcore:cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "diffcore:cpu" in out and "torch.randn" in out and "diffcore:triton" not in out
