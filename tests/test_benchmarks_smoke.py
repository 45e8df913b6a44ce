"""The benchmark suite runs end to end and prints its table.

Timings are not checked (the machine running the tests may be busy): only
that ``python -m benchmarks --quick`` completes, reaps what it starts, and
produces every row of the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("1", "2", "2i", "3", "3i", "4a", "4i", "4b", "5a", "5b", "6a", "6i", "6j", "6b", "7a", "7b", "9a", "9b", "9c")


def _results_state() -> tuple[bool, float]:
    path = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    return (os.path.exists(path), os.path.getmtime(path) if os.path.exists(path) else 0.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_prints_the_table() -> None:
    before = _results_state()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeat", "1", "--no-write"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert "| # | Measure | gibbs | Baseline | Ratio | Target | Result |" in out
    for key in ROWS:
        assert f"\n| {key} | " in out, f"row {key} missing:\n{out}"
    assert "targets met" in out
    # every judged row says PASS or MISS, the others "reported"
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| # "):
            assert line.rstrip().endswith(("| PASS |", "| MISS |", "| reported |")), line
    assert _results_state() == before, "--no-write must leave RESULTS.md alone"


def test_table_rendering() -> None:
    sys.path.insert(0, ROOT)
    try:
        from benchmarks.report import Row, summary, table
    finally:
        sys.path.remove(ROOT)
    rows = [
        Row("1", "a | b", "1 ms", "2 ms", "0.5×", "≤ 1×", True),
        Row("2", "c", "3 ms", "1 ms", "3×", "≤ 1.5×", False),
        Row("2i", "info", "x", "y"),
    ]
    text = table(rows)
    assert "a \\| b" in text
    assert text.splitlines()[2].endswith("| PASS |")
    assert text.splitlines()[3].endswith("| MISS |")
    assert text.splitlines()[4].endswith("| reported |")
    assert summary(rows) == "1 of 2 targets met (missed: 2)"


@pytest.mark.slow
def test_streaming_benchmark_prints_its_rows() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.streaming", "--items", "200", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("chunks per second", "time to first chunk", "first chunk vs whole stream"):
        assert row in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cpu_benchmark_prints_the_request_path_targets() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu", "--seconds", "0.5", "--no-profile"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("asyncio floor, 64 caller(s)", "gibbs, 2 workers, 1 caller(s)", "gibbs, 2 workers, 64 caller(s)",
                "hub CPU per request at 64 callers:", "sequential latency:", "Interpreter work per request",
                "- gibbs, the hub's process: ", "- gibbs, a worker (the model's own work left out): "):
        assert row in proc.stdout, proc.stdout
    # the counts are counted: a figure for the hub and for a worker, not "not counted"
    assert re.search(r"hub's process: \d+ bytecodes", proc.stdout), proc.stdout
    assert re.search(r"hub's process, 64 callers .*\): \d+ bytecodes", proc.stdout), proc.stdout
    assert re.search(r"left out\): \d+ bytecodes", proc.stdout), proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_lifecycle_benchmark_rolls_without_errors() -> None:
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lifecycle", "--seconds", "0.5", "--callers", "8", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["steady"]["versions"] == ["v1"] and res["after"]["versions"] == ["v2"]
    assert sum(res[p]["errors"] for p in ("steady", "rolling update", "after")) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_realmodel_tensor_round_trips_run() -> None:
    """The real-model benchmark's 64 MiB round trips (its HTTP part needs
    wrk and minutes: it is run by hand, its table in RESULTS.md)."""
    pytest.importorskip("torch", reason="in the test extra")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.realmodel", "--no-http", "--trips", "2", "--no-write"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    for label in ("NumPy float32", "torch float32", "torch bfloat16", "torch float32, torch's own pickling"):
        assert f"| {label} | " in proc.stdout, proc.stdout
    assert "* torch at " in proc.stdout and "× NumPy" in proc.stdout


def test_realmodel_report_and_usage() -> None:
    sys.path.insert(0, ROOT)
    try:
        import argparse

        from benchmarks import realmodel
    finally:
        sys.path.remove(ROOT)
    u = realmodel.usage(os.getpgid(0))
    assert u["cpu"] > 0 and u["threads"] >= 1
    run = {"rps": 100.0, "p50": 0.1, "p99": 0.5, "errors": 0, "cores": 1.5, "switches": 2.0, "threads": 7}
    res = {realmodel.INPROCESS: [dict(run, rps=30.0)], realmodel.GIBBS: [run],
           realmodel.LITSERVE: [dict(run, rps=40.0, p99=0.4)]}
    args = argparse.Namespace(connections=32, duration=10.0, repeat=1)
    text = realmodel.report(res, {"NumPy float32": [0.02], "torch float32": [0.03]}, args, [])
    assert "at 3.33× FastAPI in process (target ≥ 3×: met)" in text
    assert "at 2.50× LitServe (target ≥ 2×: met)" in text
    assert "target: no worse: missed" in text
    assert "torch at 1.50× NumPy (target ≤ 1.3×: missed)" in text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_composition_benchmark_runs() -> None:
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.composition", "--calls", "100", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["A -> B"]["calls"] == res["direct B"]["calls"] == res["async A -> B"]["calls"] == 100
    assert res["ratio"] > 1 and res["async_ratio"] > 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_family_benchmark_runs() -> None:
    """A router in another process, a client hub here (one application), and
    the router SIGKILLed under load: the client answers everything."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.family", "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one request, median (us)" in proc.stdout and "64 callers (requests/s)" in proc.stdout
    assert "all answered" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hedging_benchmark_runs() -> None:
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.hedging", "--seconds", "0.5", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["without hedging"]["hedged"] == 0 and res["with hedging"]["calls"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_batched_overload_benchmark_runs() -> None:
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.overload_batched", "--requests", "100", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["how"]: r for r in json.loads(proc.stdout)}
    mine = rows["gibbs_timeout"]
    assert mine["requests"] == rows["wait_for"]["requests"] == 100
    # every call got an outcome, and no more answers in time than items computed
    assert mine["ok"] + mine["late"] + mine["shed"] + mine["expired_queued"] + mine["expired_running"] == 100
    assert 0 <= mine["ok"] <= mine["computed"] and 0.0 <= mine["wasted"] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_overload_beside_other_frameworks_runs() -> None:
    """gibbs' rows always; LitServe's and Ray Serve's, or the reason each was skipped."""
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.overload_frameworks", "--seconds", "0.3", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=190,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    systems = {r["system"] for r in res["rows"]}
    assert "gibbs" in systems
    for name in ("LitServe", "Ray Serve"):
        assert (name in systems) != (name in res["skipped"]), res["skipped"]
    for r in res["rows"]:
        assert r["ok"] + r["late"] + r["refused"] + r["timeout"] == r["sent"] > 0
    sys.path.insert(0, ROOT)
    try:
        from benchmarks.overload_frameworks import overload_frameworks_rows, report
    finally:
        sys.path.remove(ROOT)
    assert "gibbs" in report(res)
    rows = overload_frameworks_rows({"overload_frameworks": (res,)})
    assert [r.key for r in rows] == ["9d", "9e"] and all(r.status == "reported" for r in rows)
