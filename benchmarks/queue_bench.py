"""Target 6: the hub holding a long queue.

Each measurement runs in a fresh interpreter (``python -m
benchmarks.queue_bench MODE N``, one JSON line on stdout) so that neither
memory nor timing carries over from anything measured before.

Modes:

``mem-sync N submit``  hub started, no worker connected; N requests queued
                 with ``hub.submit(i)`` (small int argument). Growth of traced
                 memory (``--traced``: tracemalloc, which sees every Python and
                 raw allocation of the process, bridge thread included) or of
                 RSS (without tracemalloc), divided by N. The futures are kept
                 in a list allocated before the baseline, so the list is not
                 counted; the concurrent.futures.Future each request returns
                 is counted (the hub makes it).
``mem-sync N future``  the same for the future ``hub.submit`` returns, made
                 alone (its share, for the breakdown; its Condition is made
                 on first use, so a queued one has none);
                 ``mem-sync N bare``: a plain concurrent.futures.Future.
``mem-async N hub|bare``  N asyncio tasks awaiting ``hub.request(i)``, or
                 awaiting a bare loop future (what a task itself costs); the
                 difference is what the hub adds per awaiting caller.
``drain``        N requests queued with ``hub.submit`` while no worker is
                 connected; then two workers connect, each takes one request
                 and holds it at a gate (so connecting is not timed); the
                 clock starts when the gate opens and stops when the last
                 future is resolved. Throughput = N / that time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any, Callable

from gibbs import Hub, Worker

from .common import perf, reap, rss_bytes
from .models import Gated


def _measure(make: Callable[[int], Any], n: int, traced: bool) -> float:
    """Bytes per item of what ``make(i)`` keeps alive, n items."""
    keep: list[Any] = [None] * n
    gc.collect()
    if traced:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    else:
        base = rss_bytes()
    for i in range(n):
        keep[i] = make(i)
    gc.collect()
    time.sleep(0.05)  # let the bridge thread settle (it has nothing to do: no workers)
    after = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    if traced:
        tracemalloc.stop()
    per = (after - base) / n
    del keep
    return per


def _bare_future(i: int) -> concurrent.futures.Future:
    return concurrent.futures.Future()


def _submit_future(i: int) -> concurrent.futures.Future:
    from gibbs.hub import _SubmitFuture

    return _SubmitFuture()  # what hub.submit returns, alone


def mem_sync(n: int, traced: bool, variant: str) -> dict[str, Any]:
    """variant "submit": hub.submit(i) with no worker; "future": the future
    submit returns, alone (its share); "bare": a concurrent.futures.Future."""
    hub = Hub(port=0)
    hub.start()
    try:
        if variant == "submit":
            hub.submit(0).cancel()  # warm the code path: first-call allocations are not per request
            per = _measure(hub.submit, n, traced)
            queued = hub.statistics()["queued"]
        else:
            per = _measure(_submit_future if variant == "future" else _bare_future, n, traced)
            queued = 0
    finally:
        hub.close(grace=0)
    return {"per_request": per, "queued_seen": queued, "n": n}


def mem_async(n: int, traced: bool, variant: str) -> dict[str, Any]:
    """variant "hub": N tasks awaiting hub.request(i), no worker; "bare": N
    tasks awaiting a bare loop future (the task's own cost)."""

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        hub = Hub(port=0)
        hub.start()
        futs: list[Any] = []

        async def wait(f: Any) -> Any:
            return await f

        def with_hub(i: int) -> Any:
            return loop.create_task(hub.request(i))

        def bare(i: int) -> Any:
            f = loop.create_future()
            futs.append(f)
            return loop.create_task(wait(f))

        make = with_hub if variant == "hub" else bare
        keep: list[Any] = [None] * n
        try:
            await asyncio.sleep(0)
            gc.collect()
            if traced:
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
            else:
                base = rss_bytes()
            for i in range(n):
                keep[i] = make(i)
            await asyncio.sleep(0)  # every task runs up to its await
            await asyncio.sleep(0.05)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
            if traced:
                tracemalloc.stop()
            queued = hub.statistics()["queued"]
            for t in keep:
                t.cancel()
            await asyncio.gather(*keep, return_exceptions=True)
            return {"per_request": (after - base) / n, "queued_seen": queued, "n": n}
        finally:
            for f in futs:
                f.cancel()
            await hub.aclose(grace=0)

    return asyncio.run(main())


def drain(n: int, workers: int = 2) -> dict[str, Any]:
    gate = multiprocessing.Event()
    hub = Hub(port=0)
    hub.start()
    done = threading.Event()
    state = {"count": 0, "t_last": 0.0, "errors": 0}
    procs: list[Worker] = []

    def on_done(f: concurrent.futures.Future) -> None:  # bridge thread
        state["count"] += 1
        if f.cancelled() or f.exception() is not None:
            state["errors"] += 1
        if state["count"] == n:
            state["t_last"] = perf()
            done.set()

    try:
        futs = [hub.submit(i) for i in range(n)]
        for f in futs:
            f.add_done_callback(on_done)
        for _ in range(workers):
            w = Worker(Gated, gate, gibbs_port=hub.port, gibbs_host="127.0.0.1")
            w.start()
            procs.append(w)
        hub.wait_for_workers_sync(workers, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every worker holds one request at the gate
            s = hub.statistics()
            if s["busy"] == workers and s["queued"] == n - workers:
                break
            time.sleep(0.002)
        queued = hub.statistics()["queued"]
        t0 = perf()
        gate.set()
        if not done.wait(300):
            raise RuntimeError(f"drain of {n} did not finish: {state}")
        elapsed = state["t_last"] - t0
        ok = sum(1 for i, f in enumerate(futs) if f.result() == i)
        return {"n": n, "throughput": n / elapsed, "elapsed": elapsed, "queued_at_start": queued,
                "errors": state["errors"], "correct": ok}
    finally:
        reap(procs)
        hub.close(grace=0)


def run_child(mode: str, n: int, *extra: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its JSON result."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.queue_bench", mode, str(n), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    mode, n = argv[0], int(argv[1])
    traced = "--traced" in argv
    variant = argv[2] if len(argv) > 2 and not argv[2].startswith("--") else ""
    if mode == "mem-sync":
        out = mem_sync(n, traced, variant or "submit")
    elif mode == "mem-async":
        out = mem_async(n, traced, variant or "hub")
    elif mode == "drain":
        out = drain(n)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
