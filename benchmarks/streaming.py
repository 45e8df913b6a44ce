"""Streaming through gibbs, beside the same generator consumed in process.

``python -m benchmarks.streaming [--items N] [--repeat R]``

Rows, medians of R repetitions, measured side by side in one run:

* chunks per second of ``async for tok in hub.stream(N)`` (1 worker, a
  generator of N small tokens with no work), beside ``for tok in model(N)``
  in process;
* time to the first chunk, beside a plain ``await hub.request(x)`` round trip
  of a trivial model on the same hub (the issue's bound: the first chunk costs
  a request's latency);
* the same with a generator that sleeps 1 ms per token: the first chunk
  arrives long before the whole run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any, Iterator

from gibbs import Hub, Worker


class Tokens:
    def __call__(self, n: int, delay: float = 0.0) -> Iterator[str]:
        for _ in range(n):
            if delay:
                time.sleep(delay)
            yield "tok"


class Trivial:
    def __call__(self, x: Any) -> Any:
        return x


async def _stream(hub: Hub, n: int, delay: float) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = 0.0
    count = 0
    async for _ in hub.stream(n, delay, gibbs_model="tokens"):
        if count == 0:
            first = time.perf_counter() - t0
        count += 1
    assert count == n
    return first, time.perf_counter() - t0


async def _measure(items: int, repeat: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("gibbs_cps", "inproc_cps", "first", "rtt", "slow_first", "slow_total")}
    async with Hub(port=0) as hub:
        hub.start()
        workers = [
            Worker(Tokens, gibbs_port=hub.port, gibbs_host="127.0.0.1", gibbs_model="tokens"),
            Worker(Trivial, gibbs_port=hub.port, gibbs_host="127.0.0.1", gibbs_model="trivial"),
        ]
        for w in workers:
            w.start()
        try:
            await hub.wait_for_workers(2, timeout=60)
            await _stream(hub, 100, 0.0)  # warm up
            for _ in range(20):
                await hub.request(0, gibbs_model="trivial")
            model = Tokens()
            for _ in range(repeat):
                first, total = await _stream(hub, items, 0.0)
                out["gibbs_cps"].append(items / total)
                out["first"].append(first)
                t0 = time.perf_counter()
                assert sum(1 for _ in model(items)) == items
                out["inproc_cps"].append(items / (time.perf_counter() - t0))
                rtts = []
                for _ in range(50):
                    t1 = time.perf_counter()
                    await hub.request(0, gibbs_model="trivial")
                    rtts.append(time.perf_counter() - t1)
                out["rtt"].append(statistics.median(rtts))
                first, total = await _stream(hub, 100, 0.001)
                out["slow_first"].append(first)
                out["slow_total"].append(total)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.join(10)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    ns = parser.parse_args()
    m = {k: statistics.median(v) for k, v in asyncio.run(_measure(ns.items, ns.repeat)).items()}
    ratio = m["first"] / m["rtt"]
    print(f"streaming: {ns.items} tokens, medians of {ns.repeat}")
    print("| Measure | gibbs | Baseline | Ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| chunks per second, hub.stream({ns.items}) | {m['gibbs_cps']:,.0f}/s "
        f"| in process {m['inproc_cps']:,.0f}/s | {m['gibbs_cps'] / m['inproc_cps']:.4f}x |"
    )
    print(
        f"| time to first chunk | {m['first'] * 1e6:.0f} us | request round trip {m['rtt'] * 1e6:.0f} us "
        f"| {ratio:.2f}x (target <= 1.5x) {'PASS' if ratio <= 1.5 else 'MISS'} |"
    )
    print(
        f"| 100 tokens of 1 ms: first chunk vs whole stream | {m['slow_first'] * 1e3:.2f} ms "
        f"| whole {m['slow_total'] * 1e3:.1f} ms | {m['slow_first'] / m['slow_total']:.3f}x |"
    )


if __name__ == "__main__":
    main()
