"""Priorities: interactive calls overtake a backlog of batch work.

    python examples/priorities.py

One worker, a backlog of 20 low-priority calls (class 0, a batch job), then
4 interactive calls (class 5): the interactive ones are served first, and the
batch job still gets one turn in at most nine (the starvation bound).
"""

from __future__ import annotations

import asyncio
import time

import gibbs


class Model:
    def __call__(self, tag: str) -> str:
        time.sleep(0.01)
        return tag


async def main() -> None:
    async with gibbs.Hub(port=0) as hub:
        hub.serve(Model, gibbs_workers=1)
        await hub.wait_for_workers(1, timeout=60)
        order: list[str] = []

        async def one(tag: str, priority: int) -> None:
            order.append(await hub.request(tag, gibbs_priority=priority))

        batch = [asyncio.ensure_future(one(f"batch{i}", 0)) for i in range(20)]
        await asyncio.sleep(0)  # the backlog is queued first
        interactive = [asyncio.ensure_future(one(f"web{i}", 5)) for i in range(4)]
        await asyncio.gather(*batch, *interactive)
        print(order)
        print({p: c["completed"] for p, c in hub.statistics()["models"]["default"]["priorities"].items()})


if __name__ == "__main__":
    asyncio.run(main())
