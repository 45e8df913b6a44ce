"""Overload with deadlines: open-loop arrivals above capacity.

Two workers of a 10 ms model (capacity about 200 calls/s), requests arriving
open-loop (at a fixed rate, whatever the answers do) at 2x and 10x the
capacity measured in the same run, each with a 200 ms deadline. Two ways of
setting the deadline, side by side:

* ``gibbs_timeout=0.2``: the hub owns the deadline (expiry in the queue,
  never sending a call that cannot finish in time, shedding at admission);
* ``asyncio.wait_for(hub.request(x), 0.2)``: the caller's own timer, which
  removes a queued call when it fires and nothing more (gibbs before the
  deadline moved into the core).

Goodput: calls answered within their deadline per second, over the capacity.
Wasted: model calls whose answer nobody waited for, over the model calls run.

    python -m benchmarks.overload [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from gibbs import Hub

from .common import arrivals, deadline_counts, percentile, request_by_deadline
from .models import Sleeper
from .report import Row

SERVICE = 0.010
WORKERS = 2
DEADLINE = 0.2


async def _capacity(hub: Hub, seconds: float) -> float:
    """Closed loop, 4 callers per worker: calls per second the pool answers."""
    n = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal n
        while time.perf_counter() < end:
            await hub.request(0)
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(4 * WORKERS)))
    return n / (time.perf_counter() - t0)


def _served(hub: Hub) -> int:
    """Calls the workers answered (the model ran), whoever still waited."""
    return sum(w.get("served", 0) for w in hub.workers())


async def _open_loop(hub: Hub, rate: float, seconds: float, core_deadline: bool) -> dict[str, Any]:
    latencies: list[float] = []
    counts = deadline_counts()
    before = _served(hub)

    async def one(i: int) -> None:
        dt = await request_by_deadline(hub, i, DEADLINE, core_deadline, counts)
        if dt is not None:
            latencies.append(dt)

    sent, wall = await arrivals(one, rate, seconds=seconds)
    await asyncio.sleep(0.3)  # answers of abandoned calls come back
    # Every call a worker ran either answered its caller in time (counted
    # "ok") or was wasted: ran for a caller that had gone or would not wait.
    ran = _served(hub) - before
    return {
        "sent": sent,
        "goodput": counts["ok"] / wall,
        "wasted": (ran - counts["ok"]) / ran if ran else 0.0,
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        **counts,
    }


async def run(seconds: float) -> list[dict[str, Any]]:
    rows = []
    async with Hub(port=0) as hub:
        hub.serve(Sleeper, SERVICE, gibbs_workers=WORKERS)
        await hub.wait_for_workers(WORKERS, timeout=60)
        for _ in range(50):
            await hub.request(0)
        capacity = await _capacity(hub, min(1.0, seconds))
        for factor in (2, 10):
            for core_deadline in (True, False):
                await asyncio.sleep(min(0.5, seconds))  # the queue drains between runs
                r = await _open_loop(hub, factor * capacity, seconds, core_deadline)
                r.update(factor=factor, capacity=capacity, how="gibbs_timeout" if core_deadline else "wait_for")
                rows.append(r)
    return rows


async def section_overload(quick: bool, res: dict[str, Any]) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] overload: open loop at 2x and 10x capacity", file=sys.stderr, flush=True)
    res["overload"] = tuple(await run(0.5 if quick else 3.0))  # a tuple: not a list of repetitions


def overload_rows(res: dict[str, Any]) -> list[Row]:
    """Rows 9a (2x) and 9b (10x): goodput of gibbs_timeout over capacity,
    beside the caller's own timer, with the waste and p99 targets."""
    rows = []
    for key, factor in (("9a", 2), ("9b", 10)):
        mine = [r for r in res["overload"] if r["factor"] == factor and r["how"] == "gibbs_timeout"][0]
        theirs = [r for r in res["overload"] if r["factor"] == factor and r["how"] == "wait_for"][0]
        good = mine["goodput"] / mine["capacity"]
        base = theirs["goodput"] / theirs["capacity"]
        ok = good >= 0.9 and mine["wasted"] <= 0.10 and mine["p99"] < DEADLINE
        rows.append(Row(
            key,
            f"Goodput at {factor}x capacity, {WORKERS} workers of a {SERVICE * 1000:.0f} ms model, "
            f"{DEADLINE * 1000:.0f} ms deadlines (open loop)",
            f"{good:.2f} of capacity", f"asyncio.wait_for: {base:.2f}",
            f"{good / base:.1f}×" if base else "",
            "≥ 0.9 of capacity, ≤ 10 % wasted, p99 < deadline", ok,
            note=f"gibbs_timeout: {100 * mine['wasted']:.1f} % of model calls wasted, p99 of answered "
            f"{mine['p99'] * 1000:.0f} ms, {mine['shed']} shed at once; caller's timer: "
            f"{100 * theirs['wasted']:.1f} % wasted, p99 {theirs['p99'] * 1000:.0f} ms "
            f"(capacity {mine['capacity']:.0f} calls/s, measured closed-loop in the same run).",
        ))
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{WORKERS} workers of a {SERVICE * 1000:.0f} ms model, {DEADLINE * 1000:.0f} ms deadlines, "
        f"capacity {rows[0]['capacity']:.0f} calls/s (closed loop, same run)",
        "| load | deadline | goodput / capacity | wasted model calls | p50 | p99 answered | shed | expired q/r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['factor']}x | {r['how']} | {r['goodput'] / r['capacity']:.2f} | {100 * r['wasted']:.1f} % | "
            f"{r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | {r['shed']} | "
            f"{r['expired_queued']}/{r['expired_running']}{' +' + str(r['timeout']) + ' timeouts' if r['timeout'] else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of arrivals per load")
    args = parser.parse_args()
    print(report(asyncio.run(run(args.seconds))))


if __name__ == "__main__":
    main()
