"""Deadlines and overload: a burst of requests, each with a deadline, at a
pool that cannot serve them all in time.

    python examples/deadlines.py

Each request either gets its answer within its deadline, or is refused at
once (OverloadedError, with a Retry-After hint), or expired
(DeadlineExceededError): nothing waits longer than its deadline, and the
model computes no answer nobody waits for.
"""

from __future__ import annotations

import asyncio
import collections
import time

import gibbs


class SlowModel:
    def __call__(self, x: int) -> int:
        time.sleep(0.02)  # 20 ms a call: 2 workers serve about 100 calls/s
        return x * 2


async def main() -> None:
    async with gibbs.Hub(port=0) as hub:
        hub.serve(SlowModel, gibbs_workers=2, gibbs_timeout=1.0)  # the model's default deadline
        await hub.wait_for_workers(2, timeout=60)
        for i in range(10):  # the hub measures the model's service time
            await hub.request(i)

        outcomes: collections.Counter[str] = collections.Counter()
        retry_after: list[float] = []

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                assert await hub.request(i, gibbs_timeout=0.25) == 2 * i
                outcomes["answered"] += 1
                assert time.perf_counter() - t0 < 0.5
            except gibbs.OverloadedError as exc:  # at once: HTTP 503 with Retry-After
                outcomes["shed"] += 1
                retry_after.append(exc.retry_after)
            except gibbs.DeadlineExceededError as exc:  # HTTP 504
                outcomes["expired in the queue" if exc.in_queue else "model too slow"] += 1

        await asyncio.gather(*(one(i) for i in range(300)))  # a burst: 3 s of work at once
        print(dict(outcomes))
        if retry_after:
            print(f"retry after {1000 * min(retry_after):.0f}-{1000 * max(retry_after):.0f} ms")
        stats = hub.statistics()
        print("shed:", stats["shed"], "expired:", stats["expired"])


if __name__ == "__main__":
    asyncio.run(main())
