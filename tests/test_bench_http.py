"""The HTTP benchmark's own parts that need neither wrk nor a server: reading
wrk's output, grouping a web process's profile, the report's garbage
collector column and lines, and the app's ``GET /gc`` and ``gc.freeze()``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRK_OUT = """Running 8s test @ http://127.0.0.1:40001/trivial
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.47ms    5.10ms  61.33ms   87.12%
    Req/Sec     3.41k   412.11     4.10k    70.00%
  Latency Distribution
     50%    8.80ms
     75%   10.10ms
     90%   13.60ms
     99%   46.61ms
  27310 requests in 8.01s, 3.83MB read
Requests/sec:   3409.49
Transfer/sec:    489.81KB
"""


def test_parse_wrk_reads_the_requests_made() -> None:
    r = http.parse_wrk(WRK_OUT)
    assert r == {"rps": 3409.49, "p50": 0.0088, "p99": 0.04661, "errors": 0, "requests": 27310.0}


def test_group_samples_by_whose_code_runs() -> None:
    samples = [
        ("thread (1): MainThread", ["run (asyncio/runners.py:118)", "app (fastapi/routing.py:301)",
                                    "Hub.request (gibbs/hub.py:589)", "encode (gibbs/protocol.py:499)"], 5),
        ("thread (1): MainThread", ["run (asyncio/runners.py:118)", "app (starlette/routing.py:70)"], 7),
        ("thread (1): MainThread", ["run (asyncio/runners.py:118)", "_run_once (asyncio/base_events.py:1922)",
                                    "LoopReads._loop_read (gibbs/_loops.py:206)", "_recv (gibbs/_reading.py:215)"], 3),
        ("thread (1): MainThread", ["<module> (x.py:1)", "trivial (benchmarks/http_app.py:65)"], 1),
        ("thread (1): MainThread", ["<module> (x.py:1)", "something (elsewhere/mod.py:3)"], 2),
    ]
    own, incl = http.group_samples(samples)
    assert own == {"gibbs": 8, "web framework": 7, "the app's endpoint": 1, "other": 2}
    assert incl == {"Hub.request": 5, "LoopReads._loop_read": 3, "Bridge._hand_over": 0}


def _run(rps: float, gc: float | None = None) -> dict[str, float]:
    r = {"rps": rps, "p50": 0.005, "p99": 0.01, "errors": 0.0, "requests": rps * 8}
    if gc is not None:
        r["gc"] = gc
    return r


def test_report_shows_the_collector_and_the_profile() -> None:
    res = {
        "FastAPI in process /trivial": [_run(5000, 0.0)],
        "FastAPI + gibbs /trivial": [_run(3000, 32e-6), _run(3200, 30e-6), _run(2800, 34e-6)],
        f"{http.FROZEN} /trivial": [_run(3100, 9e-6)],
        "LitServe /trivial": [_run(800)],
    }
    profiles = {
        "FastAPI + gibbs": {"rps": 2700.0, "own": {"web framework": 190.0, "gibbs": 90.0, "asyncio": 0.2},
                            "incl": {"Hub.request": 39.0, "LoopReads._loop_read": 44.0, "Bridge._hand_over": 0.0},
                            "gc": 21.0},
    }
    args = argparse.Namespace(connections=32, threads=1, duration=8.0, repeat=3, workers=2)
    text = http.report(res, args, [], profiles)
    assert "| server | model | req/s | p50 | p99 | errors | GC µs/req |" in text
    assert "| FastAPI + gibbs | trivial | 3,000 | 5.0 ms | 10.0 ms | 0 | 32.0 |" in text  # medians
    assert "| LitServe | trivial | 800 | 5.0 ms | 10.0 ms | 0 | - |" in text  # not one of ours: no /gc
    assert "FastAPI + gibbs at 0.60× FastAPI in process (target ≥ 0.9×: missed)" in text
    assert "gc.freeze() after startup at 1.03× FastAPI + gibbs without it (the collector: 9.0 against 32.0" in text
    assert "* FastAPI + gibbs (2,700 req/s): 280.2 µs: web framework 190.0, gibbs 90.0; of it in the garbage " \
           "collector 21.0." in text  # under 0.5 µs left out
    assert "gibbs, inclusive: Hub.request 39.0, LoopReads._loop_read 44.0." in text


APP_PROBE = """
import gc, json
from starlette.testclient import TestClient
from benchmarks.http_app import app
with TestClient(app) as client:
    before = client.get("/gc").json()
    gc.collect()
    after = client.get("/gc").json()
    print(json.dumps({"before": before, "after": after, "trivial": client.post("/trivial", json={"x": 7}).json()}))
"""


def _probe(freeze: bool) -> dict[str, dict[str, object]]:
    env = dict(os.environ, GIBBS_BENCH_MODE="inprocess", GIBBS_BENCH_GC_FREEZE="1" if freeze else "0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", APP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_app_counts_its_collections_and_freezes_when_told() -> None:
    plain = _probe(freeze=False)
    assert plain["trivial"] == {"y": 7}
    assert plain["before"]["frozen"] == 0
    b, a = plain["before"], plain["after"]
    assert a["collections"][2] == b["collections"][2] + 1  # gc.collect() is one full collection
    assert a["seconds"] > b["seconds"]
    frozen = _probe(freeze=True)
    assert frozen["before"]["frozen"] > 1000  # everything made at startup
