"""Overload with deadlines, gibbs beside LitServe and Ray Serve in one run.

The workload of ``benchmarks.overload``: two workers of a 10 ms model,
requests arriving open-loop at 2x and 10x each system's own capacity
(measured closed-loop in the same run), each with a 200 ms deadline. Each
system with its own deadline and queue settings:

* gibbs: ``hub.request(x, gibbs_timeout=0.2)`` (through its Python API);
* LitServe: ``LitServer(timeout=0.2)`` (a request still queued after
  200 ms is answered 504), two inference workers, called over HTTP by a
  client that also gives up after 200 ms (and closes its connection);
* Ray Serve: not run yet. The row says why: where ``ray.serve`` does not
  import (its ``grpc`` dependency missing), that reason; where it does,
  that this benchmark does not drive it yet.

Goodput (answered within the deadline per second, over that system's
capacity) and the share of model calls wasted (run for a caller that did
not get the answer in time; each model counts its own calls); gibbs' ratio
to each. LitServe is measured over HTTP, gibbs through its API: each over
its own capacity, so the ratios compare what overload does to each.

    python -m benchmarks.overload_frameworks [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

from .common import arrivals, percentile
from .serving import Unavailable, child_env, litserve_server

SERVICE = 0.010
WORKERS = 2
DEADLINE = 0.2
FACTORS = (2, 10)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] overload vs frameworks: {msg}", file=sys.stderr, flush=True)


async def closed_loop(call: Callable[[int], Awaitable[Any]], seconds: float, callers: int = 4 * WORKERS) -> float:
    n = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal n
        while time.perf_counter() < end:
            await call(n)
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return n / (time.perf_counter() - t0)


async def open_loop(
    call: Callable[[int], Awaitable[Any]], served: Callable[[], int], rate: float, seconds: float
) -> dict[str, Any]:
    """Arrivals at ``rate`` for ``seconds``; each call is given up after
    DEADLINE by the caller too. Any exception is a refusal (shed, expired,
    504, 503)."""
    latencies: list[float] = []
    counts = {"ok": 0, "late": 0, "refused": 0, "timeout": 0}
    before = served()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(call(i), DEADLINE + 0.05)  # the system's own deadline first
        except asyncio.TimeoutError:
            counts["timeout"] += 1
            return
        except Exception:  # noqa: BLE001 - the system refused or expired it
            counts["refused"] += 1
            return
        dt = time.perf_counter() - t0
        if dt <= DEADLINE:
            counts["ok"] += 1
            latencies.append(dt)
        else:
            counts["late"] += 1

    sent, wall = await arrivals(one, rate, seconds=seconds)
    await asyncio.sleep(0.5)  # the calls of callers that left end
    ran = served() - before
    return {
        "sent": sent,
        "goodput": counts["ok"] / wall,
        "ran": ran,
        "wasted": max(0, ran - counts["ok"]) / ran if ran else 0.0,
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        **counts,
    }


async def measure(name: str, call: Callable[[int], Awaitable[Any]], served: Callable[[], int], seconds: float) -> list[dict[str, Any]]:
    for i in range(50):
        await call(i)
    capacity = await closed_loop(call, 1.0)
    log(f"{name}: capacity {capacity:.0f} calls/s")
    rows = []
    for factor in FACTORS:
        await asyncio.sleep(0.5)
        r = await open_loop(call, served, factor * capacity, seconds)
        r.update(system=name, factor=factor, capacity=capacity)
        rows.append(r)
    return rows


async def run_gibbs(seconds: float) -> list[dict[str, Any]]:
    from gibbs import Hub

    from .models import Sleeper

    async with Hub(port=0) as hub:
        hub.serve(Sleeper, SERVICE, gibbs_workers=WORKERS)
        await hub.wait_for_workers(WORKERS, timeout=60)

        def call(i: int) -> Awaitable[Any]:
            return hub.request(i, gibbs_timeout=DEADLINE)

        def served() -> int:
            return sum(w.get("served", 0) for w in hub.workers())

        return await measure("gibbs", call, served, seconds)


async def run_litserve(seconds: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="gibbs-bench-") as tmp:
        count = os.path.join(tmp, "calls")
        open(count, "w").close()
        extra = ["--sleep", str(SERVICE), "--count-file", count, "--timeout", str(DEADLINE)]
        async with litserve_server(2, 0.0, WORKERS, api_servers=1, extra=extra) as pool:

            def call(i: int) -> Awaitable[Any]:
                return pool.post("/sleep", {"x": i})

            def served() -> int:
                return os.path.getsize(count)

            return await measure("LitServe", call, served, seconds)


def ray_serve_missing() -> str | None:
    """Why Ray Serve cannot run here (None: it imports), from a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", "import ray.serve"], env=child_env(), capture_output=True, text=True, timeout=120
    )
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"python -c 'import ray.serve' exited {proc.returncode}"


async def run(seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": [], "skipped": {}}
    out["rows"] += await run_gibbs(seconds)
    try:
        out["rows"] += await run_litserve(seconds)
    except Unavailable as exc:
        out["skipped"]["LitServe"] = str(exc)
    why = ray_serve_missing()
    if why is not None:
        out["skipped"]["Ray Serve"] = why
    else:
        out["skipped"]["Ray Serve"] = "ray.serve imports, but this benchmark does not drive it yet"
    for name, why in out["skipped"].items():
        log(f"{name} skipped: {why}")
    return out


def report(res: dict[str, Any]) -> str:
    rows = res["rows"]
    lines = [
        f"{WORKERS} workers of a {SERVICE * 1000:.0f} ms model, {DEADLINE * 1000:.0f} ms deadlines, open loop "
        "at a multiple of each system's own capacity (closed loop, same run)",
        "| load | system | capacity | goodput / capacity | wasted model calls | p99 answered | refused | late | "
        "gibbs goodput ratio | gibbs waste ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = next(x for x in rows if x["system"] == "gibbs" and x["factor"] == r["factor"])
        good, gg = r["goodput"] / r["capacity"], g["goodput"] / g["capacity"]
        ratio = f"{gg / good:.1f}×" if r is not g and good else ""
        waste = f"{g['wasted'] / r['wasted']:.2f}×" if r is not g and r["wasted"] else ""
        lines.append(
            f"| {r['factor']}x | {r['system']} | {r['capacity']:.0f}/s | {good:.2f} | {100 * r['wasted']:.1f} % | "
            f"{r['p99'] * 1000:.0f} ms | {r['refused']} | {r['late'] + r['timeout']} | {ratio} | {waste} |"
        )
    for name, why in res["skipped"].items():
        lines.append(f"\n{name}: skipped ({why})")
    return "\n".join(lines)


def section_overload_frameworks(cfg: Any, res: dict[str, Any]) -> None:
    """For ``python -m benchmarks`` (full mode: LitServe's start-up and the
    runs take ~30 s): the other systems' rows of this benchmark."""
    if cfg.quick:
        log("skipped in --quick mode")
        return
    out = asyncio.run(run(2.0))
    res["overload_frameworks"] = (out,)  # a tuple: not a list of repetitions


def overload_frameworks_rows(res: dict[str, Any]) -> list[Any]:
    """Rows 9d (LitServe), 9e (Ray Serve): gibbs' goodput over capacity at
    2x and 10x over theirs, reported (another system's own settings)."""
    from .report import Row

    if "overload_frameworks" not in res:
        return []
    out = res["overload_frameworks"][0]
    rows = []
    for key, name in (("9d", "LitServe"), ("9e", "Ray Serve")):
        theirs = [r for r in out["rows"] if r["system"] == name]
        if not theirs:
            rows.append(Row(key, f"Overload with deadlines beside {name}", "", f"skipped: {out['skipped'].get(name, '?')}"))
            continue
        cells = []
        for r in theirs:
            g = next(x for x in out["rows"] if x["system"] == "gibbs" and x["factor"] == r["factor"])
            cells.append((r["factor"], g["goodput"] / g["capacity"], r["goodput"] / r["capacity"], g, r))
        rows.append(Row(
            key,
            f"Goodput over capacity at {' and '.join(f'{c[0]}x' for c in cells)} capacity, "
            f"{DEADLINE * 1000:.0f} ms deadlines, beside {name} with its own timeout",
            " / ".join(f"{c[1]:.2f}" for c in cells), f"{name}: " + " / ".join(f"{c[2]:.2f}" for c in cells),
            " / ".join(f"{c[1] / c[2]:.0f}×" if c[2] else "" for c in cells),
            note="wasted model calls: gibbs " + " / ".join(f"{100 * c[3]['wasted']:.1f} %" for c in cells)
            + f", {name} " + " / ".join(f"{100 * c[4]['wasted']:.1f} %" for c in cells),
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of arrivals per load")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    res = asyncio.run(run(args.seconds))
    if args.json:
        import json

        print(json.dumps(res))
    else:
        print(report(res))


if __name__ == "__main__":
    main()
