"""Hedged requests: p99 with one worker 10x slower than the others, with
and without ``gibbs_hedge``, in one run.

``python -m benchmarks.hedging [--seconds 3] [--callers 6] [--json]``

Eight workers of one model: one sleeps 10x as long per call as the seven
others (a node with a noisy neighbour). A few callers in a closed loop; the
same load without and then with hedging (after a warm-up that lets the hub
learn the model's p95 service time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from gibbs import Hub, Worker

from .common import percentile

BASE = 0.004  # seconds per call on a fast worker


class Scaled:
    def __init__(self, multiplier: float) -> None:
        self.multiplier = multiplier

    def __call__(self, base: float) -> Any:
        time.sleep(base * self.multiplier)
        return None


async def _phase(hub: Hub, callers: int, seconds: float, hedge: bool) -> list[float]:
    lat: list[float] = []
    end = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            await hub.request(BASE, gibbs_hedge=hedge)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return lat


async def main_async(seconds: float, callers: int) -> dict[str, Any]:
    hub = Hub(port=0)
    hub.start()
    # The slow one first: it is picked whenever it is idle.
    workers = [Worker(Scaled, 10.0, gibbs_port=hub.port)] + [Worker(Scaled, 1.0, gibbs_port=hub.port) for _ in range(7)]
    for w in workers:
        w.start()
    try:
        await hub.wait_for_workers(8, timeout=60)
        await _phase(hub, callers, 1.0, False)  # warm-up: the p95 service time is learned
        out: dict[str, Any] = {}
        for label, hedge in (("without hedging", False), ("with hedging", True)):
            before = hub.statistics()["hedged"]
            lat = await _phase(hub, callers, seconds, hedge)
            out[label] = {
                "calls": len(lat), "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
                "hedged": hub.statistics()["hedged"] - before,
            }
        out["p99_ratio"] = out["with hedging"]["p99_ms"] / out["without hedging"]["p99_ms"]
        return out
    finally:
        hub.close(grace=0)
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--callers", type=int, default=6)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    res = asyncio.run(main_async(ns.seconds, ns.callers))
    if ns.json:
        print(json.dumps(res))
        return
    print(f"8 workers, one 10x slower ({BASE * 1e3:g} ms / {BASE * 1e4:g} ms per call), {ns.callers} callers")
    print(f"{'':16} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'hedged':>7}")
    for label in ("without hedging", "with hedging"):
        r = res[label]
        print(f"{label:16} {r['calls']:>6} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['hedged']:>7}")
    print(f"p99 with hedging / without: {res['p99_ratio']:.2f}x")


if __name__ == "__main__":
    main()
