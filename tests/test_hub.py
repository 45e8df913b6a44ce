"""Hub: the walkthrough's promises end to end on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from typing import Any

import pytest
from conftest import run, wait_until
from gibbs_test_models import Echo, Pid, Raises, Square

from gibbs import Hub, HubClosedError, NoWorkersError, UserCodeException


def test_hub_created_outside_loop_binds_nothing_and_starts_no_thread() -> None:
    before = threading.active_count()
    hub = Hub()
    assert threading.active_count() == before
    assert "not started" in repr(hub)
    hub.close()  # closing a hub that never started is fine, and idempotent
    hub.close()


def test_parallel_requests_share_the_workers(hub, make_workers) -> None:
    make_workers(hub, Square, 4, 0.25)

    async def main() -> float:
        await hub.wait_for_workers(4, timeout=30)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(hub.request(i) for i in range(10)))
        assert results == [i**2 for i in range(10)]
        return time.perf_counter() - t0

    elapsed = run(main())
    # 10 requests of 0.25 s on 4 workers: 3 rounds (0.75 s); one model alone needs 2.5 s.
    assert elapsed < 1.6, elapsed


def test_request_goes_to_idle_worker_not_behind_busy_one(hub, make_workers) -> None:
    make_workers(hub, Pid, 2, 0.5)

    async def main() -> None:
        await hub.wait_for_workers(2, timeout=30)
        first = asyncio.ensure_future(hub.request())
        await asyncio.sleep(0.1)  # the first is running on one worker
        t0 = time.perf_counter()
        second = await hub.request()
        waited = time.perf_counter() - t0
        assert second != await first
        assert waited < 0.9, waited  # never queued behind the busy worker

    run(main())


def test_args_kwargs_and_tuples_round_trip(hub, make_workers) -> None:
    make_workers(hub, Echo, 1)

    async def main() -> None:
        out = await hub.request(1, (2, 3), [4], x={"a": (5,)}, y=None)
        assert out["args"] == (1, (2, 3), [4])
        assert isinstance(out["args"][1], tuple)
        assert out["kwargs"] == {"x": {"a": (5,)}, "y": None}

    run(main())


def test_user_exception_keeps_type_message_traceback_and_worker_serves_on(hub, make_workers) -> None:
    make_workers(hub, Raises, 1)

    async def main() -> None:
        with pytest.raises(UserCodeException) as info:
            await hub.request("boom")
        err = info.value
        assert isinstance(err.original, ValueError)
        assert isinstance(err.__cause__, ValueError)
        assert err.exc_type == "ValueError"
        assert "bad input: boom" in str(err)
        assert "raise ValueError" in err.remote_traceback
        # An exception that cannot be pickled still reaches the caller, by name.
        with pytest.raises(UserCodeException) as info2:
            await hub.request("custom")
        assert info2.value.original is None
        assert info2.value.exc_type == "UnpicklableError"
        assert "custom failure" in str(info2.value)
        assert await hub.request("fine") == "fine"

    run(main())


def test_several_loops_in_turn_and_plain_threads(hub, make_workers) -> None:
    make_workers(hub, Square, 2)
    hub.wait_for_workers_sync(2, timeout=30)
    for i in range(3):
        assert run(hub.request(i)) == i * i  # a new loop each time
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [hub.submit(i) for i in range(20)]
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(20)]
        # and several loops at once, each in its own thread
        outs = list(pool.map(lambda i: run(hub.request(i)), range(8)))
    assert outs == [i * i for i in range(8)]


def test_submit_futures_behave_as_concurrent_futures(hub, make_workers) -> None:
    """submit's future makes its Condition on first use (a queued request
    costs no Condition): it has every field of a Future, and waiting on it
    from many threads at once, wait(), as_completed() and timeouts work."""
    from gibbs.hub import _SubmitFuture

    plain = set(vars(concurrent.futures.Future())) - {"_condition"}
    assert plain <= set(vars(_SubmitFuture())), "concurrent.futures.Future has new fields"
    queued = hub.submit(1)  # no worker yet
    assert not {"_cond", "_condition"} & set(vars(queued))  # nobody waited on it: no Condition
    with pytest.raises(concurrent.futures.TimeoutError):
        queued.result(timeout=0.05)
    make_workers(hub, Square, 2)
    hub.wait_for_workers_sync(2, timeout=30)
    futures = [hub.submit(i) for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # eight threads wait on each future at once: one Condition per future
        got = list(pool.map(lambda f: [f.result(timeout=30) for _ in range(3)], futures * 8))
    assert got == [[i * i] * 3 for i in range(50)] * 8
    more = [hub.submit(i) for i in range(20)]
    done, _ = concurrent.futures.wait(more, timeout=30)
    assert len(done) == 20
    assert sorted(f.result() for f in concurrent.futures.as_completed([hub.submit(i) for i in range(10)], timeout=30)) == [
        i * i for i in range(10)
    ]
    assert queued.result(timeout=30) == 1


def test_a_thread_blocked_on_result_settles_its_own_future(hub, make_workers, monkeypatch) -> None:
    """The answer of a submit() that a thread waits on goes to that thread,
    which unpickles it and settles the future: the delivery thread is not
    woken in between. Done-callbacks added while it waits still run on the
    delivery thread; errors and cancellation arrive as usual; a timeout is
    waited once, not twice."""
    from gibbs_test_models import Raises, Sleep

    import gibbs._delivery as delivery

    unwrapped_in: list[str] = []
    ran_in: list[str] = []
    unwrap = delivery._unwrap
    late_callback: list[concurrent.futures.Future[Any]] = []

    def note(f: Any) -> None:
        ran_in.append(threading.current_thread().name)

    def spy(outcome: Any) -> Any:
        unwrapped_in.append(threading.current_thread().name)
        if late_callback:  # added after the bridge handed the outcome over, before it settles
            late_callback.pop().add_done_callback(note)
        return unwrap(outcome)

    monkeypatch.setattr(delivery, "_unwrap", spy)
    make_workers(hub, Sleep, 2)
    hub.wait_for_workers_sync(2, timeout=30)
    assert hub.submit(0, "warm").result(timeout=30) == "warm"
    waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="waiter")

    def blocked(fut: Any) -> Any:
        got = waiter.submit(fut.result, 30)
        assert wait_until(lambda: fut._gibbs_waiting == 1, timeout=10)
        return got.result(timeout=30)

    unwrapped_in.clear()
    assert blocked(hub.submit(0.3, "late")) == "late"
    assert unwrapped_in == ["waiter_0"]  # not the delivery thread

    fut = hub.submit(0.3, "raced")
    late_callback.append(fut)
    assert blocked(fut) == "raced"
    assert wait_until(lambda: ran_in == ["gibbs-deliver"], timeout=10), ran_in
    fut.add_done_callback(note)
    assert ran_in[-1] == threading.current_thread().name  # done: runs at once, here

    ran_in.clear()
    unwrapped_in.clear()
    fut = hub.submit(0.3, "called back")
    fut.add_done_callback(note)  # before it is waited on: the delivery thread settles it
    assert blocked(fut) == "called back"
    assert unwrapped_in == ["gibbs-deliver"] and ran_in == ["gibbs-deliver"]
    waiter.shutdown()

    t0 = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        hub.submit(3.0).result(timeout=0.5)
    assert time.monotonic() - t0 < 0.95  # once, not twice

    make_workers(hub, Raises, 1, gibbs_model="raises")
    hub.wait_for_workers_sync(1, timeout=30, model="raises")
    with pytest.raises(UserCodeException, match="bad input"):
        hub.submit("boom", gibbs_model="raises").result(timeout=30)
    slow = hub.submit(5.0)  # cancelled while a thread waits on it
    canceller = threading.Timer(0.3, slow.cancel)
    canceller.start()
    with pytest.raises(concurrent.futures.CancelledError):
        slow.result(timeout=30)
    canceller.join()


def test_a_handed_over_answer_is_never_lost_to_cancel_or_an_interrupt(hub, make_workers, monkeypatch) -> None:
    """Once the bridge hands a blocked thread its answer, cancel() is
    refused (the call is answered, as on the delivery thread); a waiter
    interrupted with the answer in hand (KeyboardInterrupt) leaves the
    settling to the delivery thread; and a future cancelled while queued
    is seen by concurrent.futures.wait() at once."""
    from gibbs_test_models import Sleep

    import gibbs._delivery as delivery

    queued = hub.submit(0, "never")  # no worker yet
    assert queued.cancel()
    done, _ = concurrent.futures.wait([queued], timeout=5)
    assert queued in done
    assert queued.cancel() and queued.cancelled()  # idempotent

    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    unwrap = delivery._unwrap
    refused: list[bool] = []
    target: list[Any] = []

    def cancel_meanwhile(outcome: Any) -> Any:
        if target:
            refused.append(not target.pop().cancel())
        return unwrap(outcome)

    monkeypatch.setattr(delivery, "_unwrap", cancel_meanwhile)
    fut = hub.submit(0.2, "kept")
    target.append(fut)
    assert fut.result(timeout=30) == "kept"
    assert refused == [True]

    settle = delivery._SubmitFuture._gibbs_settle
    interrupted: list[str] = []

    def interrupt_once(self: Any, raw: Any) -> None:
        if not interrupted:
            interrupted.append(threading.current_thread().name)
            raise KeyboardInterrupt
        settle(self, raw)

    monkeypatch.setattr(delivery._SubmitFuture, "_gibbs_settle", interrupt_once)
    fut = hub.submit(0.2, "late")
    with pytest.raises(KeyboardInterrupt):
        fut.result(timeout=30)
    assert interrupted == [threading.current_thread().name]
    assert wait_until(fut.done, timeout=10)  # the delivery thread settled it
    assert fut.result(timeout=0) == "late"


def test_workers_started_before_the_hub_exists(make_hub, make_workers) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    class Placeholder:
        pass

    placeholder = Placeholder()
    placeholder.port = port  # type: ignore[attr-defined]
    make_workers(placeholder, Square, 2)
    time.sleep(0.5)  # workers are retrying against nothing
    hub = make_hub(port=port)
    hub.wait_for_workers_sync(2, timeout=30)
    assert run(hub.request(7)) == 49


def test_wait_for_workers_says_why_none_came(hub, make_workers) -> None:
    from gibbs_test_models import BadInit

    ws = make_workers(hub, BadInit, 1)
    with pytest.raises(NoWorkersError) as info:
        hub.wait_for_workers_sync(1, timeout=5)
    msg = str(info.value)
    assert "cannot load weights from /nowhere" in msg
    assert "RuntimeError" in msg
    ws[0].join(10)
    from gibbs.worker import INIT_FAILED_EXIT

    assert ws[0].exitcode == INIT_FAILED_EXIT  # the constructor raised: no use restarting it as is


def test_close_is_idempotent_and_async_context_manager(make_workers) -> None:
    async def main() -> None:
        async with Hub(port=0, heartbeat_interval=0.2) as hub:
            hub.start()
            make_workers(hub, Square, 1)
            await hub.wait_for_workers(1, timeout=30)
            assert await hub.request(3) == 9
        assert hub.closed
        await hub.aclose()
        hub.close()
        with pytest.raises(HubClosedError):
            await hub.request(1)

    run(main())


def test_repr_shows_live_state(hub, make_workers) -> None:
    make_workers(hub, Square, 2, 0.3)
    hub.wait_for_workers_sync(2, timeout=30)

    async def main() -> None:
        tasks = [asyncio.ensure_future(hub.request(i)) for i in range(3)]
        await asyncio.sleep(0.1)
        text = repr(hub)
        assert "2 workers: 2 busy, 0 idle | 1 queued" in text, text
        await asyncio.gather(*tasks)
        stats = hub.statistics()
        assert stats["completed"] == 3 and stats["queued"] == 0

    run(main())


def test_fork_while_an_answer_is_given_back_does_not_hang_the_child() -> None:
    """A thread of the parent holds the lent answers' lock at the fork (a
    finalizer giving an answer back): the child's at-fork hook must not wait
    for it, since that thread does not exist in the child."""
    hub = Hub(port=0)
    hub.start()
    bridge = hub._bridge
    assert bridge is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with bridge._loans._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the at-fork hook has run (or hangs) before this line
            os._exit(0)
        deadline = time.monotonic() + 10
        done = 0
        while done == 0 and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done == pid, "the forked child hung in the hub's at-fork hook"
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        t.join(10)
        hub.close()


def test_fork_after_close_leaves_the_child_s_descriptors_alone() -> None:
    hub = Hub(port=0)
    hub.start()
    hub.close()
    # The closed hub's descriptor numbers are free again: new pipes get them.
    fds = [fd for _ in range(8) for fd in os.pipe()]
    pid = os.fork()
    if pid == 0:  # child: the at-fork hook ran; our pipes must still be open
        try:
            for fd in fds:
                os.fstat(fd)
        except OSError:
            os._exit(1)
        os._exit(0)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for fd in fds:
            os.close(fd)


def test_a_forked_child_never_uses_a_parents_bridge_even_if_one_hub_fails_its_clean_up() -> None:
    """Without a pid check on the request path, the at-fork hook alone keeps
    a child off the parent's sockets: one hub failing it must not leave the
    others (nor itself) holding the parent's bridge."""
    first, second = Hub(port=0), Hub(port=0)
    first.start()
    second.start()

    def broken() -> None:
        raise RuntimeError("a bug in one hub's at-fork clean-up")

    first._after_fork_in_child = broken  # type: ignore[method-assign]
    try:
        pid = os.fork()
        if pid == 0:  # child
            os._exit(0 if first._bridge is None and second._bridge is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a hub kept its parent's bridge in the child"
    finally:
        del first._after_fork_in_child
        first.close()
        second.close()
