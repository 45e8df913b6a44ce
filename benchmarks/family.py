"""Several web processes, one pool: what the extra hop of a client hub costs.

``python -m benchmarks.family [--repeat R]``

Measured side by side in one run, 2 workers of a trivial model:

* one request's round trip (median of 2,000) from the hub that routes
  (the router), beside the same from a hub in another process that sends its
  calls through the router (a client hub: one more local hop);
* requests per second with 64 concurrent callers, router beside client;
* recovery: the router's process is SIGKILLed while the client has 64 calls
  in flight; the time until every one of them is answered (the client takes
  the address over, the workers reconnect to it, the calls are re-sent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

from gibbs import Hub, Worker


class Trivial:
    def __call__(self, x: Any) -> Any:
        return x


ROUTER = textwrap.dedent(
    """
    import sys, time
    from gibbs import Hub
    hub = Hub(int(sys.argv[1]), heartbeat_interval=0.2)
    hub.start()
    print(hub.role, flush=True)
    while True:
        time.sleep(1)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _latency(hub: Hub, n: int) -> float:
    for i in range(200):
        await hub.request(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await hub.request(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _throughput(hub: Hub, callers: int, per_caller: int) -> float:
    async def caller() -> None:
        for i in range(per_caller):
            await hub.request(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return callers * per_caller / (time.perf_counter() - t0)


def _workers(port: int, n: int) -> list[Worker]:
    ws = [Worker(Trivial, gibbs_port=port, gibbs_host="127.0.0.1", gibbs_heartbeat_interval=0.2) for _ in range(n)]
    for w in ws:
        w.start()
    return ws


async def _run(repeat: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("lat_router", "lat_client", "tp_router", "tp_client", "recovery")}
    for _ in range(repeat):
        port = _free_port()
        env = dict(os.environ)
        env.pop("GIBBS_HUB", None)
        env["GIBBS_APP"] = "benchmarks-family"  # the router's process and this one: one application
        router = subprocess.Popen([sys.executable, "-c", ROUTER, str(port)], env=env, stdout=subprocess.PIPE)
        workers: list[Worker] = []
        try:
            assert router.stdout is not None and router.stdout.readline().strip() == b"router"
            workers = _workers(port, 2)
            # The same measurement from the router's own process, then from a client hub.
            async with Hub(_free_port(), heartbeat_interval=0.2) as direct:
                direct.start()
                dw = _workers(direct.port, 2)
                try:
                    await direct.wait_for_workers(2, timeout=30)
                    out["lat_router"].append(await _latency(direct, 2000))
                    out["tp_router"].append(await _throughput(direct, 64, 100))
                finally:
                    for w in dw:
                        w.terminate()
                    for w in dw:
                        w.join(10)
            async with Hub(port, heartbeat_interval=0.2, app="benchmarks-family") as client:
                client.start()
                assert client.role == "client"
                await client.wait_for_workers(2, timeout=30)
                out["lat_client"].append(await _latency(client, 2000))
                out["tp_client"].append(await _throughput(client, 64, 100))
                calls = [asyncio.ensure_future(client.request(i)) for i in range(64)]
                await asyncio.sleep(0)
                t0 = time.perf_counter()
                os.kill(router.pid, signal.SIGKILL)
                assert await asyncio.gather(*calls) == list(range(64))
                after = await client.request("after")
                assert after == "after"
                out["recovery"].append(time.perf_counter() - t0)
                assert client.role == "router"
        finally:
            if router.poll() is None:
                router.kill()
            router.wait(10)
            for w in workers:
                w.terminate()
            for w in workers:
                w.join(10)
    return out


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.family")
    parser.add_argument("--repeat", type=int, default=3)
    ns = parser.parse_args(argv)
    r = asyncio.run(_run(ns.repeat))
    med = {k: statistics.median(v) for k, v in r.items()}
    print(f"{'':34s}{'router':>12s}{'client hub':>12s}{'ratio':>8s}")
    print(
        f"{'one request, median (us)':34s}{med['lat_router'] * 1e6:12.0f}{med['lat_client'] * 1e6:12.0f}"
        f"{med['lat_client'] / med['lat_router']:8.2f}"
    )
    print(
        f"{'64 callers (requests/s)':34s}{med['tp_router']:12.0f}{med['tp_client']:12.0f}"
        f"{med['tp_client'] / med['tp_router']:8.2f}"
    )
    print(f"router SIGKILLed with 64 calls in flight: all answered {med['recovery'] * 1000:.0f} ms after the kill "
          f"(median of {ns.repeat}: {', '.join(f'{x * 1000:.0f}' for x in r['recovery'])} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
