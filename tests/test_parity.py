"""``python -m diffcore.parity``: the quick run passes and its rows, JSON and exit codes say what
ran where; bad input gives a clear message and exit status 2; a wrong implementation fails."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import utils

from diffcore import _cases, _library, _registry, parity
from diffcore.reference.random import normal

CPU = torch.device("cpu")
BASELINE = "cpu on cpu" if _library._C is not None else "reference on cpu"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The command as users run it, without TRITON_INTERPRET in the environment: ``--interpret``
    must re-execute the process with it set."""
    path = tmp_path_factory.mktemp("parity") / "parity.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    families = ",".join(_cases.FAMILIES)
    argv = ["--quick", "--interpret", "--only", families, "--json", str(path)]
    res = subprocess.run([sys.executable, "-m", "diffcore.parity", *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    return res, json.loads(path.read_text()) if path.exists() else None


def test_quick_run_passes(quick_run):
    res, report = quick_run
    assert res.returncode == 0, res.stdout + res.stderr
    assert report["passed"] and report["quick"] and report["environment"]["triton_interpret"]
    assert all(row["passed"] and row["cases"] > 0 for row in report["rows"])
    assert sorted(report["families"]) == sorted(_cases.FAMILIES)


def test_rows_cover_every_live_implementation_and_dtype(quick_run):
    _, report = quick_run
    rows = [r for r in report["rows"] if r["check"] == "reference"]
    ran = {(r["op"], r["implementation"], r["device"]) for r in rows}
    for fam in _cases.FAMILIES.values():
        for op in fam.ops:
            runs, not_run = parity.plan(op, [CPU])
            assert ran >= {(op, impl.name, str(d)) for impl, d in runs}
            live = {"triton"} | ({"cpu"} if _library._C is not None else set())  # TRITON_INTERPRET=1 (conftest)
            assert live <= {impl.name for impl, _ in runs}
            dtypes = {str(c.dtype).removeprefix("torch.") for c in fam.cases(True) if c.op == op}
            for impl, d in runs:
                assert {r["dtype"] for r in rows if (r["op"], r["implementation"]) == (op, impl.name)} == dtypes
            # nothing is dropped silently: every registered implementation ran or is listed with a reason
            listed = {(n["op"], n["implementation"]) for n in report["not_run"]}
            for name in _registry.implementations(op):
                assert (op, name) in {(op, i.name) for i, _ in runs} | listed
    reasons = {(n["op"], n["implementation"], n["device"]): n["reason"] for n in report["not_run"]}
    assert "truth" in reasons[("diffusion_step", "reference", "cpu")]
    if not torch.cuda.is_available():
        assert reasons[("random_normal", "cuda", "cuda")]


def test_seeded_noise_agrees_across_backends(quick_run):
    _, report = quick_run
    agreement = {(r["op"], r["implementation"]): r for r in report["rows"] if r["check"] == "agreement"}
    for op in ("random_normal", "diffusion_step"):
        row = agreement[(op, "triton")]
        assert row["baseline"] == BASELINE and row["passed"] and row["cases"] >= 3
        assert row["max_abs_err"] <= _cases.NOISE_ATOL * 4  # scaled by max |ref| for a step


def test_table_shows_every_row(quick_run):
    res, report = quick_run
    lines = res.stdout.splitlines()
    assert sum(line.rstrip().endswith("PASS") for line in lines) == len(report["rows"])
    for row in report["rows"]:
        cells = [row["op"], row["implementation"], row["device"], row["dtype"], str(row["cases"])]
        assert any(line.split()[:5] == cells for line in lines), row
    assert "not run:" in res.stdout and res.stdout.rstrip().endswith("all passed")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "nope"], "unknown family 'nope'"),
        (["--only", "diffusion_step"], "op of the family diffusion"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda:99"], "'cuda:99' is not available"),
        (["--only", ","], "--only: expected comma-separated names, got ','"),
        (["--device", " ,"], "--device: expected comma-separated names"),
        (["--only", "random", "--json", "/nonexistent-dir/out.json"], "the directory /nonexistent-dir does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parity.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: python -m diffcore.parity" in err


def test_cuda_without_a_gpu_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exit_:
        parity.main(["--device", "cpu,cuda"])
    assert exit_.value.code == 2 and "device 'cuda' is not available" in capsys.readouterr().err


def test_bad_family_from_the_command_line():
    res = subprocess.run([sys.executable, "-m", "diffcore.parity", "--only", "nope"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown family 'nope'" in res.stderr and res.stdout == ""


@pytest.fixture
def extra_implementations():
    """Registers a wrong, a crashing and an unavailable random_normal implementation for one test."""
    def off_by_one_ulp_too_many(out, seed, offset):  # 4e-6: outside the documented 2e-6
        out.copy_((normal(out.numel(), seed, offset) + 4e-6).reshape(out.shape))

    def crashes(out, seed, offset):
        raise RuntimeError("kernel launch failed")

    _registry.register("random_normal", "wrong", off_by_one_ulp_too_many, devices=("cpu",))
    _registry.register("random_normal", "crash", crashes, devices=("cpu",))
    _registry.register("random_normal", "absent", crashes, devices=("cpu",),
                       unavailable=lambda device: "needs a flux capacitor")
    try:
        yield
    finally:
        for name in ("wrong", "crash", "absent"):
            del _registry._REGISTRY["random_normal"][name]


def test_a_failing_row_exits_1(extra_implementations, tmp_path, capsys):
    path = tmp_path / "parity.json"
    assert parity.main(["--only", "random", "--quick", "--device", "cpu", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    by_impl = {}
    for row in report["rows"]:
        by_impl.setdefault((row["check"], row["implementation"]), []).append(row)
    wrong = by_impl[("reference", "wrong")][0]
    assert not wrong["passed"] and math.isclose(wrong["max_abs_err"], 4e-6, rel_tol=0.1)
    assert "elements outside atol 2e-06" in wrong["failures"][0]["message"]
    assert not by_impl[("agreement", "wrong")][0]["passed"]  # against cpu on cpu as well
    crash = by_impl[("reference", "crash")][0]
    assert crash["max_abs_err"] is None and "kernel launch failed" in crash["failures"][0]["message"]
    assert all(r["passed"] for r in by_impl[("reference", "cpu")])
    assert {"op": "random_normal", "implementation": "absent", "device": "cpu",
            "reason": "needs a flux capacitor"} in report["not_run"]
    assert "FAIL" in out and "failures:" in out and "needs a flux capacitor" in out and "FAILED" in out


def test_an_op_without_cases_fails_the_full_run():
    _registry.register("fake_op", "cpu", lambda out: None, devices=("cpu",))
    try:
        report = parity.check([], [CPU], quick=True)
    finally:
        del _registry._REGISTRY["fake_op"]
    row = next(r for r in report.rows if r.op == "fake_op")
    assert not row.passed and not report.passed and "diffcore/_cases.py" in row.failures[0]["message"]


def test_every_registered_op_has_parity_cases():
    missing = [op for op in _registry.ops() if _cases.family_of(op) is None]
    assert not missing, f"registered ops without parity cases: {missing}; add the family's block to diffcore/_cases.py"


def test_list(capsys):
    assert parity.main(["--list", "--only", "diffusion", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "diffusion_step  cpu" in out and "runs" in out and "p_step t=0" in out


def test_cases_are_fixed():
    first, second = _cases.FAMILIES["diffusion"].cases(True), _cases.FAMILIES["diffusion"].cases(True)
    assert [c.name for c in first] == [c.name for c in second]
    assert len({(c.name, c.dtype) for c in first}) == len(first)
    assert torch.equal(first[0].reference(), second[0].reference())


def test_tolerance_rules():
    ref = torch.tensor([1.0, -2.0, 3.0])
    close = _cases.Close(*_cases.FP32_TOL)
    assert close.check(ref + 1e-6, ref).passed
    assert not close.check(ref + 1e-3, ref).passed
    assert not close.check(torch.tensor([1.0, math.nan, 3.0]), ref).passed
    assert not close.check(ref[:2], ref).passed
    twice = _cases.TwiceReference()
    same = (ref + 0.01).half()
    assert twice.check((ref + 0.015).half(), ref, same).passed
    assert not twice.check((ref + 0.03).half(), ref, same).passed
    # tests/utils.py uses the same table
    assert utils.FP32_TOL is _cases.FP32_TOL and utils.DTYPES is _cases.DTYPES
