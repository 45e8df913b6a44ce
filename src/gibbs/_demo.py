"""The walkthrough's model and scenario, standard library only (``python -m gibbs demo``)."""

from __future__ import annotations

import asyncio
import math
import time


class MyAwesomeModel:
    def __init__(self, wait_time: float = 0.25) -> None:
        super().__init__()
        self.w = wait_time

    def __call__(self, x: int) -> int:
        time.sleep(self.w)
        return x**2


def run_demo(workers: int = 4, requests: int = 10, wait_time: float = 0.25) -> int:
    from . import Hub, Worker

    print(f"gibbs demo: {requests} concurrent requests, {workers} workers, a {wait_time} s model")
    hub = Hub(port=0)
    hub.start()
    procs = [Worker(MyAwesomeModel, wait_time, gibbs_port=hub.port) for _ in range(workers)]
    for w in procs:
        w.start()
    try:
        async def main() -> float:
            await hub.wait_for_workers(workers, timeout=60)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(hub.request(i) for i in range(requests)))
            elapsed = time.perf_counter() - t0
            assert results == [i**2 for i in range(requests)], results
            return elapsed

        with_gibbs = asyncio.run(main())
    finally:
        hub.close()
        for w in procs:
            w.terminate()
        for w in procs:
            w.join(10)

    model = MyAwesomeModel(wait_time)
    t0 = time.perf_counter()
    for i in range(requests):
        model(i)
    one_model = time.perf_counter() - t0
    ideal = math.ceil(requests / workers) * wait_time
    print(f"  one model in-process : {one_model:.3f} s")
    print(f"  with gibbs           : {with_gibbs:.3f} s   ({one_model / with_gibbs:.1f}x faster)")
    print(f"  ideal                : {ideal:.3f} s   (gibbs at {with_gibbs / ideal:.3f}x the ideal)")
    return 0
