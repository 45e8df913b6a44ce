"""Latency while a pool rolls onto a new version, against steady state.

``python -m benchmarks.lifecycle [--callers 16] [--service-ms 2] [--seconds 3]``

Two workers of a model that takes ``--service-ms`` per call, ``--callers``
asyncio callers in a closed loop through one hub. Three phases, in one run:
steady (before), a rolling update of both workers to a new version (new
processes start, build, join, then the old ones drain), steady again
(after). Prints p50 and p99 of each phase, the ratio of the update's p99 to
the steady p99, and the errors seen (the target: none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from gibbs import Hub

from .common import percentile


class Versioned:
    def __init__(self, version: str, service: float) -> None:
        self.version = version
        self.service = service

    def __call__(self, x: Any) -> Any:
        end = time.perf_counter() + self.service
        while time.perf_counter() < end:
            pass
        return self.version


async def _phase(hub: Hub, callers: int, stop: asyncio.Event) -> tuple[list[float], list[BaseException], set[Any]]:
    lat: list[float] = []
    errors: list[BaseException] = []
    versions: set[Any] = set()

    async def caller() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                versions.add(await hub.request(0))
            except BaseException as exc:  # noqa: BLE001 - counted, the benchmark goes on
                errors.append(exc)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return lat, errors, versions


async def main_async(callers: int, service: float, seconds: float) -> dict[str, Any]:
    hub = Hub(port=0)
    hub.start()
    try:
        pool = hub.serve(Versioned, "v1", service, gibbs_workers=2)
        hub.wait_for_workers_sync(2, timeout=60)
        out: dict[str, Any] = {}

        async def timed(name: str, during: Any = None) -> None:
            stop = asyncio.Event()
            task = asyncio.ensure_future(_phase(hub, callers, stop))
            started = time.perf_counter()
            if during is not None:
                await during()
            else:
                await asyncio.sleep(seconds)
            stop.set()
            lat, errors, versions = await task
            out[name] = {
                "calls": len(lat), "seconds": time.perf_counter() - started,
                "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
                "errors": len(errors), "versions": sorted(map(str, versions)),
            }

        await timed("steady")
        await timed("rolling update", lambda: pool.aupdate(Versioned, "v2", service))
        await timed("after")
        out["p99_ratio"] = out["rolling update"]["p99_ms"] / out["steady"]["p99_ms"]
        return out
    finally:
        hub.close(grace=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--service-ms", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args()
    res = asyncio.run(main_async(ns.callers, ns.service_ms / 1e3, ns.seconds))
    if ns.json:
        print(json.dumps(res))
        return
    print(f"rolling update of 2 workers, {ns.callers} callers, {ns.service_ms:g} ms model")
    print(f"{'phase':16} {'calls':>7} {'seconds':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  versions")
    for name in ("steady", "rolling update", "after"):
        r = res[name]
        print(f"{name:16} {r['calls']:>7} {r['seconds']:>8.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['errors']:>6}  {','.join(r['versions'])}")
    print(f"p99 during the update / steady p99: {res['p99_ratio']:.2f}x")


if __name__ == "__main__":
    main()
