"""Hedged requests end to end: a call stuck on a slow worker gets a second
attempt on an idle one once it has run past the model's p95; the first
answer wins."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
from conftest import run

from gibbs import Hub


@pytest.mark.timeout(120)
def test_a_call_on_a_slow_worker_is_answered_by_a_hedge(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    from gibbs_test_models import Scaled

    hub = make_hub()
    (fast_b,) = make_workers(hub, Scaled, 1, 1.0)
    run(hub.wait_for_workers(1, timeout=60))

    async def warm() -> None:
        for _ in range(40):
            await hub.request(0.005)  # the model's p95 service time: about 5 ms

    run(warm(), timeout=60)
    (slow_a,) = make_workers(hub, Scaled, 1, 60.0)  # 60 times slower
    run(hub.wait_for_workers(2, timeout=60))
    (fast_c,) = make_workers(hub, Scaled, 1, 1.0)
    run(hub.wait_for_workers(3, timeout=60))

    async def one(hedge: bool) -> tuple[float, int]:
        busy = hub.submit(0.6)  # worker B busy for 0.6 s: the next call goes to slow A
        time.sleep(0.05)
        t0 = time.monotonic()
        pid = await hub.request(0.01, gibbs_hedge=hedge)  # 0.6 s on A, 10 ms on C
        took = time.monotonic() - t0
        busy.result(timeout=30)
        return took, pid

    took, pid = run(one(True), timeout=60)
    assert pid == fast_c.pid, "the hedge on the idle fast worker should have answered first"
    assert took < 0.4, f"hedged call took {took:.3f} s"
    assert hub.statistics()["hedged"] >= 1
    time.sleep(0.7)  # A finishes the losing attempt (its answer is dropped)
    took, pid = run(one(False), timeout=60)
    assert pid == slow_a.pid and took >= 0.5  # without hedging, it waits for the slow worker
