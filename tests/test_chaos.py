"""Chaos: workers SIGKILLed at random under load while new ones join.
Every request must come back with its own correct answer, nothing may hang,
and nothing may be left behind."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest
from conftest import run, shm_files, wait_until
from gibbs_test_models import Square

from gibbs import Hub, Worker


def fd_list() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def open_fds() -> int:
    return len(fd_list())


@pytest.mark.timeout(180)
def test_chaos_kills_under_load_lose_nothing() -> None:
    base_threads = threading.active_count()
    base_fds = open_fds()
    hub = Hub(port=0, heartbeat_interval=0.2)
    hub.start()
    workers: list[Worker] = []
    kills = 0

    def add_worker() -> None:
        w = Worker(Square, 0.003, gibbs_port=hub.port, gibbs_host="127.0.0.1", gibbs_heartbeat_interval=0.2)
        w.start()
        workers.append(w)

    try:
        for _ in range(3):
            add_worker()
        hub.wait_for_workers_sync(3, timeout=30)
        total, concurrency = 2000, 64
        rng = random.Random(1234)

        async def main() -> list[int]:
            nonlocal kills
            results: dict[int, int] = {}
            todo = iter(range(total))
            done = asyncio.Event()

            async def caller() -> None:
                for i in todo:
                    results[i] = await hub.request(i)

            async def killer() -> None:
                nonlocal kills
                while not done.is_set():
                    await asyncio.sleep(rng.uniform(0.05, 0.15))
                    alive = [w for w in workers if w.is_alive()]
                    if alive:
                        os.kill(rng.choice(alive).pid, signal.SIGKILL)  # type: ignore[arg-type]
                        kills += 1
                    add_worker()  # a new worker joins

            k = asyncio.ensure_future(killer())
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            done.set()
            await k
            return [results[i] for i in range(total)]

        t0 = time.monotonic()
        answers = run(main(), timeout=150)
        elapsed = time.monotonic() - t0
        assert answers == [i * i for i in range(total)]
        assert kills >= 5, kills
        stats = hub.statistics()
        assert stats["completed"] == total, stats
        assert stats["worker_deaths"] >= 1
        print(f"chaos: {total} requests in {elapsed:.1f} s, {kills} kills, stats={stats}")
    finally:
        hub.close(grace=0)
        for w in workers:
            w.kill()
        for w in workers:
            w.join(10)
    assert not any(w.is_alive() for w in workers)
    assert wait_until(lambda: threading.active_count() <= base_threads, 10), threading.enumerate()
    # each Worker keeps its process sentinel (a pipe) until it is garbage-collected
    workers.clear()
    del w
    import gc

    from gibbs import worker as worker_module

    worker_module._local_workers.clear()
    gc.collect()
    assert wait_until(lambda: open_fds() <= base_fds, 10), " ".join(fd_list())
    assert shm_files() == []
