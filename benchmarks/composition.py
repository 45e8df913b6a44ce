"""What a hop costs: one request through model A, which calls model B,
against a direct call of B, in one run.

``python -m benchmarks.composition [--calls 2000] [--json]``

B is the identity; A calls B through a plain ``Hub()`` made in its worker
(a client hub of the hub it serves) and returns B's answer; async A does
the same from an async model. Sequential calls from one caller, medians and
p99 of each, and the ratios. The aim: the hop costs about one more round
trip (ratio about 2). A direct call crosses two process boundaries, one
through A six (A's call goes through the hub, which schedules B): about 3
is this design's floor (docs/how-to/composition.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from gibbs import Hub, Worker

from .common import median, percentile


class B:
    def __call__(self, x: Any) -> Any:
        return x


class A:
    def __init__(self) -> None:
        self.hub = Hub()  # inside the worker: a client of the hub it serves

    def __call__(self, x: Any) -> Any:
        return self.hub.submit(x, gibbs_model="b").result()


class AsyncA:
    """A as an async model: its sub-call awaited on the worker's event loop."""

    def __init__(self) -> None:
        self.hub = Hub()

    async def __call__(self, x: Any) -> Any:
        return await self.hub.request(x, gibbs_model="b")


async def _measure(hub: Hub, model: str, n: int) -> list[float]:
    for _ in range(50):  # warm up (connections, the client hub inside A)
        await hub.request(0, gibbs_model=model)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await hub.request(i, gibbs_model=model)
        lat.append(time.perf_counter() - t0)
    return lat


async def main_async(n: int) -> dict[str, Any]:
    hub = Hub(port=0)
    hub.start()
    workers = [
        Worker(B, gibbs_port=hub.port, gibbs_model="b"),
        Worker(A, gibbs_port=hub.port, gibbs_model="a"),
        Worker(AsyncA, gibbs_port=hub.port, gibbs_model="async_a"),
    ]
    for w in workers:
        w.start()
    try:
        await hub.wait_for_workers(3, timeout=60)
        out: dict[str, Any] = {}
        for label, model in (("direct B", "b"), ("A -> B", "a"), ("async A -> B", "async_a")):
            lat = await _measure(hub, model, n)
            out[label] = {"median_us": median(lat) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "calls": n}
        out["ratio"] = out["A -> B"]["median_us"] / out["direct B"]["median_us"]
        out["hop_us"] = out["A -> B"]["median_us"] - out["direct B"]["median_us"]
        out["async_ratio"] = out["async A -> B"]["median_us"] / out["direct B"]["median_us"]
        return out
    finally:
        hub.close(grace=0)
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    res = asyncio.run(main_async(ns.calls))
    if ns.json:
        print(json.dumps(res))
        return
    print(f"one caller, {ns.calls} sequential calls each")
    print(f"{'path':14} {'median us':>10} {'p99 us':>10}")
    for label in ("direct B", "A -> B", "async A -> B"):
        r = res[label]
        print(f"{label:14} {r['median_us']:>10.0f} {r['p99_us']:>10.0f}")
    print(f"A -> B / direct B: {res['ratio']:.2f}x (the hop: {res['hop_us']:.0f} us)")
    print(f"async A -> B / direct B: {res['async_ratio']:.2f}x")


if __name__ == "__main__":
    main()
