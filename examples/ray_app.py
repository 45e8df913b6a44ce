"""Workers placed by Ray: the hub in this process, each worker a Ray actor.

    pip install -e '.[ray]'
    python examples/ray_app.py                    # a local Ray instance (or the running cluster)
    RAY_ADDRESS=10.0.0.1:6379 GIBBS_AUTHKEY=... python examples/ray_app.py --host 0.0.0.0

With a cluster of several machines, the hub must listen on an address the
nodes reach (``--host 0.0.0.0``, which needs a key: ``GIBBS_AUTHKEY``); the
workers dial this machine's address as Ray sees it (or ``--hub-host``).
The model class travels to the actors with Ray's pickling (defined here, in
``__main__``, it goes by value; a class from your package must be importable
on the nodes, e.g. through ``runtime_env``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import gibbs
import gibbs.ray


class SlowSquare:
    """A 50 ms model that says where it ran."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay

    def __call__(self, x: int) -> tuple[int, str]:
        time.sleep(self.delay)
        return x * x, f"{socket.gethostname()} pid {os.getpid()}"


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--host", default="127.0.0.1", help="the hub's listening address (0.0.0.0 for a real cluster)")
    p.add_argument("--hub-host", default=None, help="the address workers dial (default: chosen by gibbs.ray)")
    p.add_argument("--requests", type=int, default=40)
    args = p.parse_args()

    hub = gibbs.Hub(host=args.host, port=0)
    pool = hub.serve(
        SlowSquare, 0.05, gibbs_workers=args.workers,
        gibbs_launcher=gibbs.ray.Launcher(num_cpus=1, hub_host=args.hub_host),
    )
    print(f"hub on port {hub.port}; workers dial {pool.launcher.hub_address}; waiting for {args.workers} workers")
    while sum(1 for w in hub.workers() if w["state"] in ("ready", "busy")) < args.workers:
        if pool.failed:
            raise SystemExit(pool.failed)
        await asyncio.sleep(0.1)

    t = time.perf_counter()
    answers = await asyncio.gather(*(hub.request(i) for i in range(args.requests)))
    took = time.perf_counter() - t
    assert [a for a, _ in answers] == [i * i for i in range(args.requests)]
    print(f"{args.requests} requests in {took:.2f} s by {len({w for _, w in answers})} workers:")
    for where in sorted({w for _, w in answers}):
        print(f"  {where}: {sum(1 for _, w in answers if w == where)} requests")
    pool.scale(1)  # one actor drains (finishes what it holds) and is killed
    print("scaled to", pool.size, "worker;", await hub.request(12))
    hub.close()


if __name__ == "__main__":
    asyncio.run(main())
