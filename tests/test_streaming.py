"""Streams (generator models: hub.stream, hub.submit_stream, hub.request on a
generator) and async models (async def __call__, gibbs_concurrency).

How far a worker's generator has run is read from a file the model rewrites
before each item (``progress``); that its ``finally`` ran, from a file it
appends to (``marker``): both are written in the worker process, so the
tests see what really happened there, not what the hub believes.

Timing bounds are generous (2 noisy cores): each says "well before the
generator's whole run", never "within a few milliseconds".
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional

import pytest
from conftest import run, wait_until
from gibbs_test_models import AsyncSleep, AsyncStreamer, Square, Streamer

from gibbs import UserCodeException, WorkerDiedError, protocol

WINDOW = protocol.STREAM_WINDOW


# ------------------------------------------------------------------ helpers


def produced(path: Any) -> int:
    """How many items the worker's generator has produced (0 before the first)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text else 0  # "" only while the model rewrites it


def marks(path: Any) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def closed_marks(path: Any) -> list[str]:
    return [line for line in marks(path) if line.startswith("closed ")]


async def collect(hub: Any, *args: Any, **kwargs: Any) -> tuple[list[Any], Optional[BaseException]]:
    """Every item of ``hub.stream(...)``, and the exception that ended it (or None)."""
    items: list[Any] = []
    try:
        async for item in hub.stream(*args, **kwargs):
            items.append(item)
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        return items, exc
    return items, None


def collect_sync(hub: Any, *args: Any, **kwargs: Any) -> tuple[list[Any], Optional[BaseException]]:
    items: list[Any] = []
    it = hub.submit_stream(*args, **kwargs)
    try:
        for item in it:
            items.append(item)
    except Exception as exc:  # noqa: BLE001
        return items, exc
    finally:
        it.close()
    return items, None


def start_words(hub: Any, make_workers: Any, n: int = 1, **kwargs: Any) -> list[Any]:
    ws = make_workers(hub, Streamer, n, gibbs_model="words", **kwargs)
    run(hub.wait_for_workers(n, timeout=30, model="words"))
    return ws


# ------------------------------------------------------------------ basics


def test_stream_request_and_submit_stream_give_the_generator_s_items(hub, make_workers) -> None:
    start_words(hub, make_workers)

    async def main() -> tuple[list[Any], Any]:
        streamed = [x async for x in hub.stream(6, gibbs_model="words")]
        as_list = await hub.request(4, gibbs_model="words")
        return streamed, as_list

    streamed, as_list = run(main())
    assert streamed == list(range(6))
    assert as_list == [0, 1, 2, 3]  # a plain request to a generator model: the items as a list
    assert list(hub.submit_stream(5, gibbs_model="words")) == list(range(5))
    with hub.submit_stream(3, gibbs_model="words") as it:
        assert list(it) == [0, 1, 2]
    assert hub.submit(2, gibbs_model="words").result(10) == [0, 1]
    # An empty generator: a stream of nothing, a request of [].
    assert run(collect(hub, 0, gibbs_model="words")) == ([], None)
    assert list(hub.submit_stream(0, gibbs_model="words")) == []


def test_a_plain_model_streams_its_value_as_one_item(hub, make_workers) -> None:
    make_workers(hub, Square)

    async def main() -> list[Any]:
        await hub.wait_for_workers(1, timeout=30)
        return [x async for x in hub.stream(7)]

    assert run(main()) == [49]
    assert list(hub.submit_stream(3)) == [9]


def test_many_streams_at_once_keep_their_items_apart(hub, make_workers) -> None:
    start_words(hub, make_workers, n=2)

    async def main() -> list[tuple[list[Any], Optional[BaseException]]]:
        return await asyncio.gather(*(collect(hub, 10 + i, 0.001, gibbs_model="words") for i in range(12)))

    results = run(main())
    for i, (items, err) in enumerate(results):
        assert err is None, err
        assert items == list(range(10 + i))


def test_first_item_arrives_long_before_the_generator_ends(hub, make_workers) -> None:
    # 20 items x 0.1 s: the whole run takes 2 s; the first item must not wait for it.
    start_words(hub, make_workers)
    run(hub.request(1, gibbs_model="words"))  # warm: connected and served once

    async def main() -> tuple[list[Any], list[float]]:
        items, times = [], []
        t0 = time.monotonic()
        async for x in hub.stream(20, 0.1, gibbs_model="words"):
            items.append(x)
            times.append(time.monotonic() - t0)
        return items, times

    items, times = run(main())
    assert items == list(range(20))
    assert times[0] < 1.0, f"first item after {times[0]:.2f} s: the stream waited for the generator"
    assert times[-1] >= 1.8, times  # the generator really took its time
    assert times[-1] - times[0] >= 1.0, f"items arrived together, not one by one: {times}"
    assert times[10] - times[0] >= 0.5, times


def test_first_item_of_submit_stream_arrives_early(hub, make_workers) -> None:
    start_words(hub, make_workers)
    hub.submit(1, gibbs_model="words").result(10)
    t0 = time.monotonic()
    it = hub.submit_stream(20, 0.1, gibbs_model="words")
    first = next(it)
    t_first = time.monotonic() - t0
    rest = list(it)
    t_last = time.monotonic() - t0
    assert [first] + rest == list(range(20))
    assert t_first < 1.0, f"first item after {t_first:.2f} s"
    assert t_last >= 1.8


# ------------------------------------------------------------------ flow control


def test_a_slow_consumer_holds_the_generator_back(hub, make_workers, tmp_path) -> None:
    start_words(hub, make_workers)
    progress = tmp_path / "progress"

    async def main() -> list[Any]:
        agen = hub.stream(60, progress=str(progress), gibbs_model="words")
        got: list[Any] = []
        for target in (1, 5, 13):
            while len(got) < target:
                got.append(await agen.__anext__())
            await asyncio.sleep(1.0)  # the consumer is busy; the generator could run to the end
            ahead = produced(progress)
            assert ahead <= len(got) + WINDOW + 1, (
                f"after the consumer took {len(got)} items, the generator had produced {ahead} "
                f"(window {WINDOW}): the worker did not wait for the consumer"
            )
        got.extend([x async for x in agen])
        return got

    assert run(main()) == list(range(60))
    assert produced(progress) == 60


def test_a_slow_thread_consumer_holds_the_generator_back(hub, make_workers, tmp_path) -> None:
    start_words(hub, make_workers)
    progress = tmp_path / "progress"
    it = hub.submit_stream(60, progress=str(progress), gibbs_model="words")
    got = [next(it)]
    time.sleep(1.0)
    ahead = produced(progress)
    assert ahead <= 1 + WINDOW + 1, f"the generator produced {ahead} items while the consumer held 1"
    for _ in range(9):
        got.append(next(it))
    time.sleep(1.0)
    ahead = produced(progress)
    assert ahead <= 10 + WINDOW + 1, f"the generator produced {ahead} items while the consumer held 10"
    got.extend(it)
    assert got == list(range(60))


def test_a_paused_stream_blocks_neither_other_workers_nor_other_models(hub, make_workers, tmp_path) -> None:
    start_words(hub, make_workers, n=2)
    make_workers(hub, Square, 1, gibbs_model="sq")
    progress = tmp_path / "progress"

    async def main() -> None:
        await hub.wait_for_workers(3, timeout=30)
        paused = hub.stream(1000, progress=str(progress), gibbs_model="words")
        assert await paused.__anext__() == 0
        # While its consumer sits on it (the worker waits for credit) ...
        t0 = time.monotonic()
        other = await asyncio.wait_for(collect(hub, 50, gibbs_model="words"), 10)
        squares = await asyncio.wait_for(asyncio.gather(*(hub.request(i, gibbs_model="sq") for i in range(20))), 10)
        elapsed = time.monotonic() - t0
        assert other == (list(range(50)), None)  # a second stream, on the other worker
        assert squares == [i * i for i in range(20)]  # another model
        assert elapsed < 5.0, elapsed
        assert produced(progress) <= 1 + WINDOW + 1  # ... and the paused one stayed paused
        await paused.aclose()

    run(main())


def test_plain_requests_do_not_queue_behind_a_paused_stream(hub, make_workers, tmp_path) -> None:
    """Two workers of one model, one of them holding a stream whose consumer
    sits on it: many quick requests to the model must all be answered by the
    other worker meanwhile, not be pipelined to the worker that waits for the
    consumer (it cannot start them before the stream ends)."""
    start_words(hub, make_workers, n=2)
    marker = tmp_path / "marker"

    async def main() -> None:
        # Warm up: the hub has measured both workers as fast (sub-millisecond calls).
        for _ in range(3):
            assert await asyncio.gather(*(hub.request(1, gibbs_model="words") for _ in range(100))) == [[0]] * 100
        paused = hub.stream(1000, marker=str(marker), gibbs_model="words")
        assert await paused.__anext__() == 0
        await asyncio.sleep(0.3)  # the worker has sent its window and now waits
        t0 = time.monotonic()
        try:
            done = await asyncio.wait_for(
                asyncio.gather(*(hub.request(2, gibbs_model="words") for _ in range(60))), 8.0
            )
        except asyncio.TimeoutError:
            stats = hub.workers()
            pytest.fail(
                "quick requests were still unanswered 8 s later, while one worker waited for a paused "
                f"stream's consumer and the other was free: {stats}"
            )
        assert done == [[0, 1]] * 60
        assert time.monotonic() - t0 < 8.0
        await paused.aclose()

    run(main())
    assert wait_until(lambda: closed_marks(marker), 10)


# ------------------------------------------------------------------ stopping early


def test_break_and_aclose_close_the_generator_on_the_worker(hub, make_workers, tmp_path) -> None:
    start_words(hub, make_workers)  # one worker: the next request needs it free
    marker = tmp_path / "marker"

    async def main() -> float:
        agen = hub.stream(100000, 0.01, marker=str(marker), gibbs_model="words")
        got = []
        async for x in agen:
            got.append(x)
            if len(got) == 3:
                break
        await agen.aclose()
        assert got == [0, 1, 2]
        t0 = time.monotonic()
        assert await asyncio.wait_for(hub.request(3, gibbs_model="words"), 10) == [0, 1, 2]
        return time.monotonic() - t0

    freed_after = run(main())
    assert wait_until(lambda: closed_marks(marker), 10), marks(marker)
    closed = closed_marks(marker)
    assert len(closed) == 1, marks(marker)
    assert int(closed[0].split()[2]) < 100, closed  # stopped near where the consumer left
    assert freed_after < 3.0, f"the worker took {freed_after:.2f} s to serve the next request"


def test_cancelling_the_consumer_task_closes_the_generator(hub, make_workers, tmp_path) -> None:
    start_words(hub, make_workers)
    marker = tmp_path / "marker"

    async def main() -> None:
        got: list[Any] = []

        async def consume() -> None:
            async for x in hub.stream(100000, 0.01, marker=str(marker), gibbs_model="words"):
                got.append(x)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(hub.request(2, gibbs_model="words"), 10) == [0, 1]

    run(main())
    assert wait_until(lambda: closed_marks(marker), 10), marks(marker)


def test_stream_iterator_close_closes_the_generator(hub, make_workers, tmp_path) -> None:
    start_words(hub, make_workers)
    marker = tmp_path / "marker"
    it = hub.submit_stream(100000, 0.01, marker=str(marker), gibbs_model="words")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    it.close()  # idempotent
    assert list(it) == []  # closed: no more items
    assert wait_until(lambda: closed_marks(marker), 10), marks(marker)
    t0 = time.monotonic()
    assert hub.submit(2, gibbs_model="words").result(10) == [0, 1]
    assert time.monotonic() - t0 < 3.0

    # Leaving a with block early closes it too.
    with hub.submit_stream(100000, 0.01, marker=str(marker), gibbs_model="words") as it2:
        assert next(it2) == 0
    assert wait_until(lambda: len(closed_marks(marker)) == 2, 10), marks(marker)


def test_closing_a_paused_stream_closes_the_generator(hub, make_workers, tmp_path) -> None:
    # The worker is waiting for credit (not between two yields) when the consumer leaves.
    start_words(hub, make_workers)
    marker = tmp_path / "marker"
    progress = tmp_path / "progress"

    async def main() -> None:
        agen = hub.stream(1000, progress=str(progress), marker=str(marker), gibbs_model="words")
        assert await agen.__anext__() == 0
        assert await asyncio.to_thread(wait_until, lambda: produced(progress) >= WINDOW, 10)
        await asyncio.sleep(0.3)
        await agen.aclose()
        assert await asyncio.wait_for(hub.request(1, gibbs_model="words"), 10) == [0]

    run(main())
    assert wait_until(lambda: closed_marks(marker), 10), marks(marker)
    assert int(closed_marks(marker)[0].split()[2]) <= 1 + WINDOW + 1


# ------------------------------------------------------------------ failures mid-stream


@pytest.mark.parametrize("consumer", ["async", "thread"])
def test_a_model_exception_mid_stream_follows_the_items_before_it(hub, make_workers, consumer) -> None:
    start_words(hub, make_workers)
    if consumer == "async":
        items, err = run(collect(hub, 10, fail_at=3, gibbs_model="words"))
    else:
        items, err = collect_sync(hub, 10, fail_at=3, gibbs_model="words")
    assert items == [0, 1, 2]
    assert isinstance(err, UserCodeException), repr(err)
    assert err.exc_type.endswith("ValueError")
    assert "item 3 is cursed" in str(err)
    assert "cursed" in err.remote_traceback
    assert isinstance(err.original, ValueError)
    # The worker is fine afterwards.
    assert run(hub.request(3, gibbs_model="words")) == [0, 1, 2]
    with pytest.raises(UserCodeException, match="item 1 is cursed"):
        run(hub.request(5, fail_at=1, gibbs_model="words"))


def test_a_worker_dying_before_the_first_item_gets_the_stream_re_sent(hub, make_workers, tmp_path) -> None:
    ws = start_words(hub, make_workers, n=2)
    token = tmp_path / "token"
    token.write_text("x")
    items, err = run(collect(hub, 12, 0.01, die_at=0, token=str(token), gibbs_model="words"))
    assert err is None, repr(err)
    assert items == list(range(12))
    assert not token.exists()  # one worker took it and died
    assert wait_until(lambda: sum(1 for w in ws if w.exitcode is not None) == 1, 10)
    assert [w.exitcode for w in ws if w.exitcode is not None] == [-9]


@pytest.mark.parametrize("consumer", ["async", "thread"])
def test_a_worker_dying_mid_stream_gives_the_items_then_worker_died(hub, make_workers, tmp_path, consumer) -> None:
    # Two workers: the stream must not be re-sent (its consumer would see 0, 1, 2 again).
    ws = start_words(hub, make_workers, n=2)
    token = tmp_path / "token"
    token.write_text("x")
    args = (10, 0.01)
    kwargs = dict(die_at=3, token=str(token), gibbs_model="words")
    if consumer == "async":
        items, err = run(collect(hub, *args, **kwargs))
    else:
        items, err = collect_sync(hub, *args, **kwargs)
    assert items == [0, 1, 2]
    assert isinstance(err, WorkerDiedError), repr(err)
    assert not token.exists()
    assert wait_until(lambda: sum(1 for w in ws if w.exitcode is not None) == 1, 10)
    # The survivor serves on.
    assert run(collect(hub, 4, gibbs_model="words")) == ([0, 1, 2, 3], None)


# ------------------------------------------------------------------ async models


def test_async_model_answers_and_raises(hub, make_workers) -> None:
    (w,) = make_workers(hub, AsyncSleep)

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=30)
        assert await hub.request(0.01, "a") == ("a", w.pid)
        with pytest.raises(UserCodeException, match="async boom") as info:
            await hub.request(0.01, "boom")
        assert info.value.exc_type.endswith("ValueError")
        assert isinstance(info.value.original, ValueError)
        assert await hub.request(0.0, "after") == ("after", w.pid)

    run(main())
    assert hub.submit(0.01, "sync").result(10) == ("sync", w.pid)


def test_async_model_with_concurrency_runs_calls_at_once(hub, make_workers, tmp_path) -> None:
    (w,) = make_workers(hub, AsyncSleep, 1, gibbs_concurrency=8)

    async def main() -> tuple[list[Any], float]:
        await hub.wait_for_workers(1, timeout=30)
        await hub.request(0.0)  # warm
        t0 = time.monotonic()
        results = await asyncio.gather(*(hub.request(0.5, i) for i in range(8)))
        return results, time.monotonic() - t0

    results, elapsed = run(main())
    assert results == [(i, w.pid) for i in range(8)]  # one worker ran them all
    assert elapsed < 2.5, f"8 calls of 0.5 s with gibbs_concurrency=8 took {elapsed:.2f} s (one at a time: 4 s)"


def test_async_model_default_concurrency_runs_one_call_at_a_time(hub, make_workers, tmp_path) -> None:
    path = tmp_path / "calls"
    (w,) = make_workers(hub, AsyncSleep, 1, str(path))

    async def main() -> tuple[list[Any], float]:
        await hub.wait_for_workers(1, timeout=30)
        t0 = time.monotonic()
        results = await asyncio.gather(*(hub.request(0.3, i) for i in range(3)))
        return results, time.monotonic() - t0

    results, elapsed = run(main())
    assert results == [(i, w.pid) for i in range(3)]
    assert elapsed >= 0.85, f"3 calls of 0.3 s took {elapsed:.2f} s on a worker of concurrency 1"
    lines = marks(path)
    assert len(lines) == 6, lines
    # Never two at once: each call ends before the next starts.
    assert [line.split()[0] for line in lines] == ["start", "end"] * 3, lines


def test_async_generator_model_streams(hub, make_workers, tmp_path) -> None:
    make_workers(hub, AsyncStreamer, 1, gibbs_model="astream")
    marker = tmp_path / "marker"

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=30, model="astream")
        assert await hub.request(4, gibbs_model="astream") == [0, 1, 2, 3]
        times, items = [], []
        t0 = time.monotonic()
        async for x in hub.stream(20, 0.1, gibbs_model="astream"):
            items.append(x)
            times.append(time.monotonic() - t0)
        assert items == list(range(20))
        assert times[0] < 1.0, f"first item after {times[0]:.2f} s"
        assert times[-1] - times[0] >= 1.0, times
        # Leaving early closes the async generator on the worker.
        agen = hub.stream(100000, 0.01, marker=str(marker), gibbs_model="astream")
        assert [await agen.__anext__() for _ in range(3)] == [0, 1, 2]
        await agen.aclose()
        assert await asyncio.wait_for(hub.request(2, gibbs_model="astream"), 10) == [0, 1]
        # An exception mid-stream.
        items, err = await collect(hub, 10, fail_at=2, gibbs_model="astream")
        assert items == [0, 1]
        assert isinstance(err, UserCodeException) and "async item 2 is cursed" in str(err), repr(err)

    run(main())
    assert wait_until(lambda: closed_marks(marker), 10), marks(marker)
    assert list(hub.submit_stream(3, gibbs_model="astream")) == [0, 1, 2]


def test_async_generator_slow_consumer_holds_the_generator_back(hub, make_workers, tmp_path) -> None:
    make_workers(hub, AsyncStreamer, 1, gibbs_model="astream")
    progress = tmp_path / "progress"

    async def main() -> list[Any]:
        await hub.wait_for_workers(1, timeout=30, model="astream")
        agen = hub.stream(40, progress=str(progress), gibbs_model="astream")
        got = [await agen.__anext__()]
        await asyncio.sleep(1.0)
        assert produced(progress) <= 1 + WINDOW + 1, produced(progress)
        got.extend([x async for x in agen])
        return got

    assert run(main()) == list(range(40))


def test_a_paused_stream_does_not_stall_other_calls_on_a_concurrent_async_worker(
    hub, make_workers, tmp_path
) -> None:
    """gibbs_concurrency=4: the worker has 4 slots and the hub fills them. A
    stream whose consumer sits on it holds one; calls in the others must run
    meanwhile."""
    make_workers(hub, AsyncStreamer, 1, gibbs_model="astream", gibbs_concurrency=4)
    progress = tmp_path / "progress"

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=30, model="astream")
        paused = hub.stream(1000, progress=str(progress), gibbs_model="astream")
        assert await paused.__anext__() == 0
        await asyncio.sleep(0.3)
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(
                    hub.request(3, gibbs_model="astream"),
                    collect(hub, 5, gibbs_model="astream"),
                ),
                8.0,
            )
        except asyncio.TimeoutError:
            pytest.fail(
                "a worker of gibbs_concurrency=4 holding one paused stream answered nothing else "
                f"for 8 s: {hub.workers()}"
            )
        finally:
            await paused.aclose()
        assert answers == [[0, 1, 2], (list(range(5)), None)]

    run(main())


def test_sigterm_lets_async_calls_in_flight_answer(hub, make_workers, tmp_path) -> None:
    path = tmp_path / "calls"
    (w,) = make_workers(hub, AsyncSleep, 1, str(path), gibbs_concurrency=4)
    hub.wait_for_workers_sync(1, timeout=30)
    futures = [hub.submit(1.0, i) for i in range(4)]
    assert wait_until(lambda: sum(1 for line in marks(path) if line.startswith("start")) == 4, 10), marks(path)
    w.terminate()
    results = [f.result(timeout=20) for f in futures]
    assert results == [(i, w.pid) for i in range(4)]
    w.join(15)
    assert w.exitcode == 0, w.exitcode
    assert sorted(line for line in marks(path) if line.startswith("end")) == [f"end {i}" for i in range(4)]


def test_sync_callers_from_threads_stream_at_once(hub, make_workers) -> None:
    # submit_stream from several threads, each iterating its own stream.
    start_words(hub, make_workers, n=2)
    out: dict[int, Any] = {}

    def consume(i: int) -> None:
        out[i] = collect_sync(hub, 20 + i, 0.005, gibbs_model="words")

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert out == {i: (list(range(20 + i)), None) for i in range(6)}


def test_hub_close_ends_a_stream_in_progress(make_hub, make_workers, tmp_path) -> None:
    hub = make_hub()
    start_words(hub, make_workers)
    marker = tmp_path / "marker"
    it = hub.submit_stream(100000, 0.01, marker=str(marker), gibbs_model="words")
    assert next(it) == 0
    hub.close(grace=0)
    # The consumer is not left waiting forever: the stream ends with an error.
    box: list[Any] = []

    def drain() -> None:
        try:
            for _ in it:
                pass
            box.append(None)
        except Exception as exc:  # noqa: BLE001
            box.append(exc)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    t.join(15)
    assert not t.is_alive(), "a stream's consumer still waits after hub.close()"
    assert wait_until(lambda: closed_marks(marker), 10), marks(marker)

