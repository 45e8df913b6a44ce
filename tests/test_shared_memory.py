"""Large buffers through /dev/shm: round trips, and no segment ever left
behind, even when a worker is SIGKILLed while it holds one.

Hub and workers keep a small pool of segments while they live (a reused
segment costs no page faults); what must hold is that a dead worker's files
go at once, and that nothing is left once the hub is closed and its workers
have exited."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from conftest import run, shm_files
from gibbs_test_models import DieOnce, Identity, LeakThenDie

from gibbs import WorkerDiedError

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")


def test_large_arrays_round_trip_through_shared_memory(hub, make_workers) -> None:
    make_workers(hub, Identity, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    assert hub.workers()[0]["shared_memory"]
    arrays = [
        np.arange(1 << 20, dtype=np.float64),
        np.arange(1 << 20, dtype=np.int32).reshape(1024, 1024)[::2, 1::3],  # non-contiguous
        np.asfortranarray(np.ones((512, 1024), dtype=np.complex64)),
        np.zeros(1 << 20, dtype=bool),
    ]

    async def main() -> None:
        for a in arrays:
            out = await hub.request(a)
            assert out.dtype == a.dtype and out.shape == a.shape
            np.testing.assert_array_equal(out, a)

    run(main())
    hub.close()
    assert shm_files(f"gibbs-h{os.getpid()}-") == []


def test_segments_are_reused_not_made_anew(hub, make_workers) -> None:
    make_workers(hub, Identity, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    a = np.ones(1 << 20)

    async def main() -> None:
        for _ in range(20):
            np.testing.assert_array_equal(await hub.request(a), a)

    run(main())
    # One request segment, used 20 times; answer segments go back to the
    # worker once the caller has freed the array, which reaches the worker a
    # moment later: it may have made a second one meanwhile, not more.
    assert len(shm_files()) <= 3, shm_files()


def test_request_segment_survives_a_worker_death_then_is_removed(hub, make_workers, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("")
    ws = make_workers(hub, DieOnce, 2, str(token))
    hub.wait_for_workers_sync(2, timeout=30)
    a = np.arange(1 << 19, dtype=np.float64)

    async def main() -> None:
        out = await hub.request(a, "sigkill")  # the second worker reads the same segment
        np.testing.assert_array_equal(out, a)

    run(main())
    assert hub.statistics()["retried"] == 1
    dead = [w for w in ws if not w.is_alive()]
    assert len(dead) == 1 and shm_files(f"gibbs-w{dead[0].pid}-") == []
    hub.close()
    for w in ws:
        w.terminate()
        w.join(10)
    assert shm_files() == []


def test_segments_of_a_killed_worker_are_removed(make_hub, make_workers) -> None:
    hub = make_hub(max_attempts=1)
    ws = make_workers(hub, LeakThenDie, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        with pytest.raises(WorkerDiedError):
            await hub.request(np.arange(1 << 18, dtype=np.float64))

    run(main())
    ws[0].join(10)
    assert shm_files(f"gibbs-w{ws[0].pid}-") == []
    hub.close()
    assert shm_files() == []


def test_cancelled_request_with_a_large_argument_leaves_nothing(hub) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(hub.request(np.ones(1 << 20)))
        await asyncio.sleep(0.05)
        assert shm_files() != []  # queued, holding its segment
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    hub.close()
    assert shm_files() == []


def test_mappings_read_in_place_stay_cached() -> None:
    """More segments read in place (answers lent to callers) than the cache
    holds: their mappings stay open and cached, so a reused segment is not
    mapped anew; once freed, the cache shrinks back to its size."""
    from gibbs import protocol

    pool = protocol.SegmentPool(f"gibbs-t{os.getpid()}-")
    cache = protocol.MappingCache(size=2)
    try:
        payloads = [protocol.encode(np.full(1 << 16, float(i)), pool, threshold=1024) for i in range(6)]
        held = []
        for p in payloads:
            _, views, _, _ = protocol.read_views(p.body, cache, readonly=True)
            held.append(views)
        assert cache.mapped == 6
        for i, p in enumerate(payloads * 3):  # the same segments again, views still held
            _, views, _, _ = protocol.read_views(p.body, cache, readonly=True)
            assert np.frombuffer(views[0], dtype=np.float64)[0] == float(i % 6)
            del views
        assert cache.mapped == 6, "a mapping still in use was dropped from the cache and mapped again"
        held.clear()
        payloads.append(protocol.encode(np.ones(1 << 16), pool, threshold=1024))
        protocol.read_views(payloads[-1].body, cache, readonly=True)  # a new segment: the free ones go
        assert len(cache) == 2
    finally:
        cache.clear()
        for p in payloads:
            p.release()
        pool.close()
