"""Large arrays without copies on the receiving side.

A worker's model reads request arrays in place: read-only views on the hub's
shared memory, valid during its call (``gibbs_copy_args=True`` gives it
private, writable copies). A caller gets answer arrays on the worker's
shared memory; that segment goes back to the worker only when the caller
has freed every array on it, whatever the caller does with them: keeps them
past later calls, frees them on another thread or in a callback, or keeps
them after the hub closed and the worker died. What is lent is bounded
(``max_lent_bytes``; beyond it, answers are copied) and shown in
``statistics()["shared_memory"]``."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from conftest import run, shm_files, wait_until
from gibbs_test_models import ArrayInfo, ArrayThenUnpicklable, Doubled, DoubleInPlace, Identity

from gibbs import Hub, SerializationError, UserCodeException

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs under asyncio's event loop and under uvloop."""
    if request.param == "asyncio":
        yield "asyncio"
        return
    import uvloop  # in the test extra: missing, this fails rather than skips

    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield "uvloop"
    finally:
        asyncio.set_event_loop_policy(old)

MiB = 1 << 20

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
    "datetime64[ns]", "timedelta64[us]", "S7", "U5", np.dtype([("a", np.int32), ("b", np.float64, (3,))]),
]


def sample(dtype: Any, nbytes: int = MiB) -> np.ndarray:
    dt = np.dtype(dtype)
    n = max(1, nbytes // dt.itemsize)
    raw = np.random.default_rng(n).integers(0, 255, size=n * dt.itemsize, dtype=np.uint8)
    if dt.kind in "SU":
        return np.array([str(i % 1000) for i in range(n)], dtype=dt)
    if dt.kind == "b":
        return raw[:n] % 2 == 0
    a = raw.view(dt)
    if dt.kind in "fc":
        a = np.nan_to_num(a)  # NaN != NaN would spoil the comparisons
    return a


def lent(hub: Hub) -> dict[str, Any]:
    return hub.statistics()["shared_memory"]


def served(hub: Hub, make_workers: Callable[..., Any], cls: Any, n: int = 1, **kw: Any) -> None:
    # These tests are about memory, not liveness: a worker that took 0.4 s of
    # hub silence (a loaded machine) for a lost hub would drop its segments.
    kw.setdefault("gibbs_reset_after_n_miss", 25)
    make_workers(hub, cls, n, **kw)
    hub.wait_for_workers_sync(n, timeout=30)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_in_place(hub: Hub, make_workers: Any, dtype: Any) -> None:
    served(hub, make_workers, Identity)
    a = sample(dtype)
    try:
        memoryview(a)
        out_of_band = True
    except (ValueError, TypeError):  # NumPy pickles these in band (no buffer export): no shared memory
        out_of_band = False
    before = lent(hub)["answers_lent"]

    async def main() -> None:
        out = await hub.request(a)
        assert out.dtype == a.dtype and out.shape == a.shape
        assert out.tobytes() == a.tobytes()
        if out_of_band:
            assert not out.flags.owndata  # a view on the worker's memory, not a copy
            assert lent(hub)["lent"] == 1
        del out

    run(main())
    gc.collect()
    s = lent(hub)
    assert s["answers_lent"] == before + out_of_band and s["answers_copied"] == 0
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)


def test_views_and_layouts(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Identity)
    base = np.arange(4 * MiB // 8, dtype=np.float64).reshape(512, -1)
    arrays = [
        base[::2, 1::3],  # not contiguous: pickled as a copy, still out of band
        np.asfortranarray(base),
        base.T,
        base[100:300],
        base.reshape(-1)[5:],  # an offset into a buffer
    ]

    async def main() -> None:
        for a in arrays:
            out = await hub.request(a)
            np.testing.assert_array_equal(out, a)
            assert out.shape == a.shape

    run(main())


def test_the_model_reads_its_arguments_in_place_and_cannot_write_them(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, ArrayInfo)
    a = np.arange(MiB, dtype=np.float64)
    got = run(hub.request(a))
    assert got == {"writeable": False, "owns": False, "sum": float(a.sum())}


def test_a_model_that_writes_into_its_argument_fails_clearly_or_gets_a_copy(
    make_hub: Callable[..., Hub], make_workers: Any
) -> None:
    a = np.ones(MiB)
    hub = make_hub()
    served(hub, make_workers, DoubleInPlace)
    with pytest.raises(UserCodeException, match="read-only"):
        run(hub.request(a))
    other = make_hub()
    served(other, make_workers, ArrayInfo, gibbs_copy_args=True)
    assert run(other.request(a))["writeable"] is True
    third = make_hub()
    served(third, make_workers, DoubleInPlace, gibbs_copy_args=True)
    out = run(third.request(a))
    np.testing.assert_array_equal(out, a * 2)
    np.testing.assert_array_equal(a, 1)  # the caller's array is never touched
    assert out.flags.writeable  # the model's own array comes back writable


def test_a_new_answer_array_is_writable(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Doubled)
    out = run(hub.request(np.ones(MiB)))
    out[...] = 3  # the caller's own (lent) memory
    assert out.sum() == 3 * MiB


def test_kept_answers_are_never_overwritten(hub: Hub, make_workers: Any) -> None:
    """Answers kept while more calls go to the same worker: the worker does
    not reuse their memory until they are freed."""
    served(hub, make_workers, Doubled)

    async def main() -> list[np.ndarray]:
        kept = [await hub.request(np.full(MiB // 8, float(i))) for i in range(6)]
        for _ in range(30):
            np.testing.assert_array_equal(await hub.request(np.full(MiB // 8, -1.0)), -2.0)
        return kept

    kept = run(main())
    for i, k in enumerate(kept):
        np.testing.assert_array_equal(k, 2.0 * i)
    assert lent(hub)["lent"] == 6
    del k
    mine = f"gibbs-w{hub.workers()[0]['pid']}-"
    files = len(shm_files(mine))
    kept.clear()
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)
    # The worker got its segments back: more calls make no new file.
    run(hub.request(np.ones(MiB // 8)))
    assert len(shm_files(mine)) <= files


def test_answers_freed_on_another_thread_and_in_callbacks(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Doubled, 2)

    async def main() -> list[np.ndarray]:
        return list(await asyncio.gather(*(hub.request(np.full(MiB // 8, float(i))) for i in range(8))))

    outs = run(main())
    assert lent(hub)["lent"] == 8
    done = threading.Event()

    def drop(arrays: list[np.ndarray]) -> None:
        for i, x in enumerate(arrays):
            assert x[0] == 2.0 * i
        arrays.clear()
        done.set()

    t = threading.Thread(target=drop, args=(outs,))
    del outs
    t.start()
    t.join(10)
    assert done.is_set()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)

    # submit() futures: the answer dropped in a done-callback, and a future
    # whose result is never asked for.
    seen: list[float] = []
    futures = [hub.submit(np.full(MiB // 8, 1.0)) for _ in range(4)]
    for f in futures:
        f.add_done_callback(lambda f: seen.append(float(f.result()[0])))
    for f in futures:
        f.result(timeout=20)
    # Done-callbacks run in the thread that set the result, maybe after
    # result() returned here.
    assert wait_until(lambda: len(seen) == 4, timeout=5)
    assert seen == [2.0] * 4
    del f, futures
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5), lent(hub)


def test_what_is_lent_is_bounded(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    hub = make_hub(max_lent_bytes=3 * MiB)  # two 1 MiB-class segments... and a bit
    served(hub, make_workers, Doubled)

    async def main() -> list[np.ndarray]:
        return [await hub.request(np.full(MiB // 8, float(i))) for i in range(6)]

    kept = run(main())
    s = lent(hub)
    assert s["lent"] == 3 and s["lent_bytes"] == 3 * MiB
    assert s["answers_copied"] == 3  # past the limit: copied, and the segment reused at once
    for i, k in enumerate(kept):
        np.testing.assert_array_equal(k, 2.0 * i)
    assert len(shm_files(f"gibbs-w{hub.workers()[0]['pid']}-")) <= 4
    kept.clear()
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)


def test_answers_outlive_the_hub_and_the_worker(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    hub = make_hub()
    ws = []
    ws += make_workers(hub, Doubled, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    pid = ws[0].pid
    out = run(hub.request(np.full(MiB, 3.0)))
    hub.close()
    # Its hub gone, the worker keeps no file while away (it would be left
    # behind if it were killed before it saw the end of the connection: so
    # the kill comes after); the caller's mapping stays valid throughout.
    assert wait_until(lambda: shm_files(f"gibbs-w{pid}-") == [], timeout=10)
    ws[0].kill()
    ws[0].join(10)
    np.testing.assert_array_equal(out, 6.0)
    out[0] = 1.0
    del out
    gc.collect()
    assert shm_files(f"gibbs-w{pid}-") == [] and shm_files(f"gibbs-h{os.getpid()}-") == []


def test_many_callers_with_large_arrays(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Doubled, 2)

    async def one(i: int) -> None:
        for j in range(5):
            out = await hub.request(np.full(MiB // 4, float(i * 10 + j)))
            assert out[0] == out[-1] == 2.0 * (i * 10 + j)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(16)))

    run(main())
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)
    assert lent(hub)["answers_lent"] == 80
    req = lent(hub)["requests"]
    assert req["leased"] == 0 and req["free_bytes"] <= 256 * MiB


def test_an_answer_that_fails_to_unpickle_gives_its_segment_back(hub: Hub, make_workers: Any) -> None:
    """The caller keeps the error (and so its traceback, whose frames held
    the answer's buffers): the segment goes back anyway."""
    served(hub, make_workers, ArrayThenUnpicklable)

    async def main() -> list[BaseException]:
        errors = []
        for _ in range(3):
            with pytest.raises(SerializationError) as info:
                await hub.request(MiB)
            errors.append(info.value)
        return errors

    errors = run(main())
    assert "could not be unpickled in the hub" in str(errors[0])
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5), lent(hub)
    assert lent(hub)["answers_lent"] == 3
    assert len(errors) == 3  # still held
