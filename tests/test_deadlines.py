"""Deadlines end to end, through the public API: every caller path gets the
same deadline (request, submit, stream), the errors say what happened, and a
running async call is cancelled in the worker when its caller goes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest
from conftest import run, wait_until
from gibbs_test_models import AsyncCancellable, Sleep, Streamer

from gibbs import DeadlineExceededError


def test_request_expires_in_the_queue_and_while_running(hub, make_workers) -> None:
    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        running = asyncio.ensure_future(hub.request(0.6, gibbs_timeout=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceededError, match="expired in the queue") as queued:
            await hub.request(0.01, gibbs_timeout=0.1)
        assert queued.value.in_queue
        with pytest.raises(asyncio.TimeoutError, match="the model took too long") as slow:
            await running
        assert not slow.value.in_queue and isinstance(slow.value, TimeoutError)

    run(main())
    stats = hub.statistics()
    assert stats["expired"] == {"queued": 1, "running": 1}
    assert stats["models"]["default"]["expired"] == {"queued": 1, "running": 1}


def test_submit_has_the_same_deadline(hub, make_workers) -> None:
    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    fut = hub.submit(0.5, gibbs_timeout=0.1)
    with pytest.raises(DeadlineExceededError) as info:
        fut.result(10)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    assert hub.submit(0.01, "ok", gibbs_timeout=5).result(10) == "ok"


def test_a_model_default_deadline(hub, make_workers) -> None:
    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    hub.set_default_timeout(0.1)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        hub.submit(1.0).result(10)
    assert time.monotonic() - t0 < 0.9
    hub.set_default_timeout(None)
    assert hub.submit(0.2, "ok").result(10) == "ok"


def test_a_stream_deadline_closes_the_generator(hub, make_workers, tmp_path) -> None:
    marker = tmp_path / "stream"
    make_workers(hub, Streamer, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> list[int]:
        got = []
        with pytest.raises(DeadlineExceededError, match="took too long"):
            async for item in hub.stream(1000, 0.05, marker=str(marker), gibbs_timeout=0.4):
                got.append(item)
        return got

    got = run(main())
    assert 0 < len(got) < 1000
    assert wait_until(lambda: marker.exists() and "closed" in marker.read_text(), 10), "the generator was not closed"


def test_deadline_cancels_an_async_model_in_the_worker(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "calls"
    make_workers(hub, AsyncCancellable, 1, str(log))
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        with pytest.raises(DeadlineExceededError, match="took too long"):
            await hub.request(30.0, "slow", gibbs_timeout=0.3)
        # The worker answered the stopped call: its only slot is free again at once.
        t0 = time.monotonic()
        assert await hub.request(0.0, "next", gibbs_timeout=5) == "next"
        assert time.monotonic() - t0 < 3

    run(main())
    assert wait_until(lambda: "cancelled slow" in log.read_text(), 10), log.read_text()
    assert "end slow" not in log.read_text()


def test_caller_cancellation_cancels_an_async_model_in_the_worker(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "calls"
    make_workers(hub, AsyncCancellable, 1, str(log))
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        task = asyncio.ensure_future(hub.request(30.0, "gone"))
        assert await asyncio.to_thread(wait_until, lambda: log.exists() and "start gone" in log.read_text(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await hub.request(0.0, "next", gibbs_timeout=5) == "next"

    run(main())
    assert wait_until(lambda: "cancelled gone" in log.read_text(), 10), log.read_text()


@pytest.mark.parametrize("model", ["Remaining", "AsyncRemaining"])
def test_the_model_reads_its_time_left(hub, make_workers, model) -> None:
    import gibbs_test_models

    make_workers(hub, getattr(gibbs_test_models, model), 1)
    hub.wait_for_workers_sync(1, timeout=30)
    assert hub.submit().result(10) is None  # no deadline
    left = hub.submit(0.1, gibbs_timeout=2.0).result(10)
    assert left is not None and 1.0 < left < 1.95, left
    assert hub.submit(gibbs_timeout=5.0, gibbs_retries=-1).result(10) is None  # retries forever: no end
    assert hub.submit().result(10) is None  # the next call does not inherit it


def test_a_batch_waiting_on_the_worker_is_thinned_of_items_nobody_waits_for(
    hub, make_workers, tmp_path, monkeypatch
) -> None:
    """A busy batched worker may be sent its next batch ahead (pipelining,
    for a model measured under PIPELINE_WINDOW; widened here so that it
    happens whatever this machine's speed). An item of that batch whose
    deadline passes, or whose caller cancels, before it starts is taken out:
    the model sees the live items only."""
    from gibbs_test_models import BatchModel

    import gibbs.core

    monkeypatch.setattr(gibbs.core, "PIPELINE_WINDOW", 60.0)
    log = tmp_path / "batches"
    make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=30)
    assert hub.submit("warm").result(10)[0] == "warm"  # measured: pipelining may start
    running = hub.submit(("sleep", 0.8))
    assert wait_until(lambda: hub.statistics()["in_flight"] == 1, 10)
    expires = hub.submit("expires", gibbs_timeout=0.2)
    cancelled = hub.submit("cancelled")
    live = hub.submit("live")
    # All three were sent to the worker behind the running batch.
    assert wait_until(lambda: hub.statistics()["in_flight"] == 4, 10), hub.statistics()
    assert cancelled.cancel()
    with pytest.raises(DeadlineExceededError):
        expires.result(10)
    assert live.result(10)[0] == "live"
    assert running.result(10)[0] == ("sleep", 0.8)
    seen = log.read_text()
    assert "'live'" in seen
    assert "expires" not in seen and "cancelled" not in seen, seen
    stats = hub.statistics()
    assert stats["expired"]["running"] == 1 and stats["abandoned"] == 2, stats  # both were at the worker
    assert hub.submit("after").result(10)[0] == "after"  # the worker is in step
