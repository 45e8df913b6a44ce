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


def fd_table() -> dict[int, str]:
    """This process's descriptors: number -> what it points to."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def open_fds() -> int:
    return len(fd_table())


@pytest.mark.timeout(180)
def test_chaos_kills_under_load_lose_nothing() -> None:
    base_threads = threading.active_count()
    base_table = fd_table()
    base_fds = len(base_table)
    hub = Hub(port=0, heartbeat_interval=0.2)
    hub.start()
    workers: list[Worker] = []
    kills = 0

    def add_worker() -> None:
        # fork (Linux's default before Python 3.14): the descriptor count
        # below is exact for it, with no fork server holding descriptors of its own
        w = Worker(
            Square,
            0.003,
            gibbs_port=hub.port,
            gibbs_host="127.0.0.1",
            gibbs_heartbeat_interval=0.2,
            gibbs_start_method="fork",
        )
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
    # Reaped through the public API: every process is gone and its exit status collected.
    assert not any(w.is_alive() for w in workers)
    assert all(w.exitcode is not None for w in workers), [w.exitcode for w in workers]
    assert wait_until(lambda: threading.active_count() <= base_threads, 10), threading.enumerate()
    # What may stay open is exactly what each Worker object (like any
    # multiprocessing.Process) holds until it is garbage-collected: its
    # process sentinel (Worker.sentinel, the read end of the pipe that tells
    # this process the child ended) and the write end of the pipe that tells
    # the child its parent is gone - two pipe descriptors per Worker, whether
    # it was killed or not (CPython's Popen, every start method). This test
    # keeps every Worker in ``workers`` (and gibbs keeps recently exited ones
    # for its error messages; Worker has no close()), so they are all still
    # open; anything beyond them (a socket, a shared-memory file, another
    # pipe) is a leak.
    per_worker = 2

    def extra() -> dict[int, str]:
        return {fd: what for fd, what in fd_table().items() if base_table.get(fd) != what}

    expected = base_fds + per_worker * len(workers)
    assert wait_until(lambda: open_fds() <= expected, 10), (
        f"{open_fds()} descriptors open, expected {base_fds} + {per_worker} x {len(workers)} workers: "
        + " ".join(sorted(extra().values(), key=lambda what: (what.startswith("pipe:"), what)))
    )
    left = extra()
    assert all(what.startswith("pipe:") for what in left.values()), sorted(left.values())
    assert {w.sentinel for w in workers} <= set(left), "a worker's sentinel was closed under it"
    assert len(left) == per_worker * len(workers), sorted(left.values())
    assert shm_files() == []
