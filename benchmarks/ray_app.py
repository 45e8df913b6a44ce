"""The stand-in GPU model (benchmarks.models.FakeGPU) under Ray Serve, for the
information rows of the adaptive-batching benchmark. Optional: needs
``pip install 'ray[serve]'``. Run by the benchmark in a fresh interpreter::

    python -m benchmarks.ray_app --seq N --tp-unbatched N --tp-batched N --repeat R

A local Ray instance, Serve without its HTTP proxy, two applications of two
replicas each: ``batched`` (``@serve.batch(max_batch_size=32,
batch_wait_timeout_s=0)``, ``max_ongoing_requests=64``) and ``unbatched``
(``model(x)`` per request). Each replica's method calls the model directly
(blocking, as a GPU call does: one model call at a time per replica), the
form of Serve's documentation; Serve runs in its throughput mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, see ``main``). Variants tried on this
machine did no better: the model in a thread (``asyncio.to_thread``, with a
lock for the unbatched one) 406 / 67 req/s, a sync method with a lock
(unbatched) 482 req/s, against 516 / 538 req/s as here; an identity
deployment itself answers 64 concurrent callers at ~500-700 req/s.
Callers are asyncio tasks in this process awaiting ``handle.remote(x)``,
driven as the gibbs rows are (benchmarks.baselines). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from .baselines import drive_concurrent, drive_sequential
from .common import median, percentile
from .models import FakeGPU
from .serving import ray_unavailable, start_ray_serve

BATCH_SIZE = 32
REPLICAS = 2
CONCURRENCY = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] ray: {msg}", file=sys.stderr, flush=True)


def deployments() -> tuple[Any, Any]:
    from ray import serve

    @serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=2 * BATCH_SIZE, ray_actor_options={"num_cpus": 0})
    class Batched:
        def __init__(self) -> None:
            self.model = FakeGPU(True)

        @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.0)
        async def __call__(self, xs: list[Any]) -> list[Any]:
            return self.model(xs)

    @serve.deployment(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0})
    class Unbatched:
        def __init__(self) -> None:
            self.model = FakeGPU(False)

        async def __call__(self, x: Any) -> Any:
            return self.model(x)

    return Batched, Unbatched


async def measure(args: argparse.Namespace, batched: Any, unbatched: Any) -> dict[str, Any]:
    def b(x: Any) -> Any:
        return batched.remote(x)

    def u(x: Any) -> Any:
        return unbatched.remote(x)

    assert await b(7) == 7 and await u(8) == 8
    log("warming up")
    await drive_sequential(u, 20)
    await drive_sequential(b, 20)
    await drive_concurrent(u, 200, CONCURRENCY)
    await drive_concurrent(b, 1000, CONCURRENCY)
    res: dict[str, list[float]] = {k: [] for k in ("rtt_u", "rtt_b", "tp_u", "tp_b", "p50_b", "p99_b")}
    for r in range(args.repeat):
        log(f"repetition {r + 1}/{args.repeat}")
        lat_u: list[float] = []
        lat_b: list[float] = []
        for i in range(args.seq):  # alternate, call by call
            lat_u.extend(await drive_sequential(u, 1, i))
            lat_b.extend(await drive_sequential(b, 1, i))
        res["rtt_u"].append(median(lat_u))
        res["rtt_b"].append(median(lat_b))
        tp, _ = await drive_concurrent(u, args.tp_unbatched, CONCURRENCY)
        res["tp_u"].append(tp)
        tp, lat = await drive_concurrent(b, args.tp_batched, CONCURRENCY)
        res["tp_b"].append(tp)
        res["p50_b"].append(percentile(lat, 50))
        res["p99_b"].append(percentile(lat, 99))
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_app")
    p.add_argument("--seq", type=int, default=300)
    p.add_argument("--tp-unbatched", type=int, default=1000)
    p.add_argument("--tp-batched", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    log("starting Ray and Serve")
    try:
        ray, serve = start_ray_serve()
    except ImportError as exc:
        return ray_unavailable(exc)
    try:
        Batched, Unbatched = deployments()
        batched = serve.run(Batched.bind(), name="batched", route_prefix=None)
        unbatched = serve.run(Unbatched.bind(), name="unbatched", route_prefix=None)
        started = time.perf_counter() - t0
        log(f"started in {started:.1f} s")

        # No serve.shutdown(): it waits up to 30 s for the controller here;
        # ray.shutdown() below stops every actor (and the benchmark reaps
        # this process group anyway).
        res: dict[str, Any] = asyncio.run(measure(args, batched, unbatched))
        res["startup"] = started
        res["version"] = ray.__version__
        res["throughput_optimized"] = os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"]
    finally:
        ray.shutdown()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
