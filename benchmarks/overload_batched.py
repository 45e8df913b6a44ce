"""A batched model under deadlines: how many computed items were wasted.

One worker of a batched model (batches of up to 8, 50 ms per batch:
capacity 160 items/s), 400 requests arriving open-loop at twice that rate,
each with an 80 ms deadline. Two ways of setting the deadline, side by side:

* ``gibbs_timeout=0.08``: the hub owns the deadline (batches formed of live
  items that can finish in time, a batch waiting on the worker thinned of
  items nobody waits for, shedding at admission);
* ``asyncio.wait_for(hub.request(x), 0.08)``: the caller's own timer.

Wasted: items the model computed whose answer did not reach its caller
within the deadline, over the items it computed (the model counts them).

    python -m benchmarks.overload_batched [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from typing import Any

from gibbs import Hub

from .common import arrivals, deadline_counts, request_by_deadline
from .models import BatchedSleeper
from .report import Row

SERVICE = 0.050
BATCH_SIZE = 8
DEADLINE = 0.080
REQUESTS = 400
LOAD = 2.0


async def _open_loop(hub: Hub, counters: Any, requests: int, core_deadline: bool) -> dict[str, Any]:
    counts = deadline_counts()
    items_before = counters[1]
    rate = LOAD * BATCH_SIZE / SERVICE

    async def one(i: int) -> None:
        await request_by_deadline(hub, i, DEADLINE, core_deadline, counts)

    await arrivals(one, rate, count=requests)
    await asyncio.sleep(2 * SERVICE + 0.2)  # the batches of abandoned calls end
    computed = counters[1] - items_before
    return {
        "requests": requests,
        "computed": computed,
        "wasted": (computed - counts["ok"]) / computed if computed else 0.0,
        **counts,
    }


async def run(requests: int) -> list[dict[str, Any]]:
    counters = multiprocessing.RawArray("q", 2)
    rows = []
    async with Hub(port=0) as hub:
        hub.serve(BatchedSleeper, SERVICE, counters, gibbs_workers=1, gibbs_batch_size=BATCH_SIZE)
        await hub.wait_for_workers(1, timeout=60)
        for _ in range(10):  # the model's service time is measured
            await asyncio.gather(*(hub.request(0) for _ in range(BATCH_SIZE)))
        for core_deadline in (True, False):
            await asyncio.sleep(0.3)
            r = await _open_loop(hub, counters, requests, core_deadline)
            r["how"] = "gibbs_timeout" if core_deadline else "wait_for"
            rows.append(r)
    return rows


async def section_overload_batched(quick: bool, res: dict[str, Any]) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] overload: a batched model under deadlines", file=sys.stderr, flush=True)
    res["overload_batched"] = tuple(await run(200 if quick else REQUESTS))


def overload_batched_rows(res: dict[str, Any]) -> list[Row]:
    """Row 9c: computed items wasted with gibbs_timeout, beside the caller's timer."""
    mine = [r for r in res["overload_batched"] if r["how"] == "gibbs_timeout"][0]
    theirs = [r for r in res["overload_batched"] if r["how"] == "wait_for"][0]
    return [Row(
        "9c",
        f"Computed items wasted, a batched {SERVICE * 1000:.0f} ms model (batches of {BATCH_SIZE}), "
        f"{mine['requests']} requests at {LOAD:.0f}x capacity, {DEADLINE * 1000:.0f} ms deadlines",
        f"{100 * mine['wasted']:.1f} %", f"asyncio.wait_for: {100 * theirs['wasted']:.1f} %",
        f"{mine['wasted'] / theirs['wasted']:.2f}×" if theirs["wasted"] else "",
        "≤ 10 % wasted", mine["wasted"] <= 0.10 and mine["ok"] > 0,
        note=f"gibbs_timeout: {mine['ok']} answered in time of {mine['computed']} items computed, "
        f"{mine['shed']} shed at once, {mine['expired_queued']} expired before they started; caller's timer: "
        f"{theirs['ok']} in time of {theirs['computed']} computed.",
    )]


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"1 worker of a batched {SERVICE * 1000:.0f} ms model (batches of {BATCH_SIZE}), {LOAD:.0f}x capacity, "
        f"{DEADLINE * 1000:.0f} ms deadlines",
        "| deadline | requests | answered in time | items computed | wasted | shed | expired q/r |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['how']} | {r['requests']} | {r['ok']} | {r['computed']} | {100 * r['wasted']:.1f} % | "
            f"{r['shed']} | {r['expired_queued']}/{r['expired_running']}"
            f"{' +' + str(r['timeout']) + ' timeouts' if r['timeout'] else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests per run")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = asyncio.run(run(args.requests))
    if args.json:
        import json

        print(json.dumps(rows))
    else:
        print(report(rows))


if __name__ == "__main__":
    main()
