"""The home loop: when one event loop makes the asyncio requests, it reads
the worker sockets itself (no thread hop for an answer). Whatever that loop
does next -- stops, closes, blocks in user code, or a second loop comes --
no caller may wait on it, no worker may be taken for dead, and no
descriptor may leak."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import wait_until
from gibbs_test_models import Sleep, Square

from gibbs import Hub, HubClosedError


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


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Hub]]:
    made: list[Hub] = []

    def factory(workers: int = 2, model: Any = Square, **kwargs: Any) -> Hub:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("heartbeat_interval", 0.5)
        kwargs.setdefault("close_grace", 2.0)
        hub = Hub(**kwargs)
        hub.start()
        made.append(hub)
        if workers:
            hub.serve(model, gibbs_workers=workers)
            hub.wait_for_workers_sync(workers, timeout=30)
        return hub

    yield factory
    for hub in made:
        hub.close(grace=0)


def loop_reads(hub: Hub) -> int:
    bridge = hub._bridge
    assert bridge is not None
    return bridge.loop_reads()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def squares(hub: Hub, n: int, start: int = 0) -> None:
    got = await asyncio.gather(*(hub.request(i) for i in range(start, start + n)))
    assert got == [i * i for i in range(start, start + n)]


def test_the_loop_that_makes_the_requests_reads_the_workers(served: Callable[..., Hub], event_loop_kind: str) -> None:
    hub = served()
    assert loop_reads(hub) == 0  # no loop yet: the bridge thread reads

    async def main() -> None:
        assert ("uvloop" in type(asyncio.get_running_loop()).__module__) == (event_loop_kind == "uvloop")
        await squares(hub, 50)
        assert wait_until(lambda: loop_reads(hub) == 2, 5)
        await squares(hub, 200, 50)  # answered through the loop's own reads
        assert loop_reads(hub) == 2

    asyncio.run(main())


def test_loop_reads_can_be_switched_off(served: Callable[..., Hub], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIBBS_LOOP_READS", "0")
    hub = served()

    async def main() -> None:
        await squares(hub, 100)
        await asyncio.sleep(0.3)
        assert loop_reads(hub) == 0

    asyncio.run(main())


def test_a_thread_caller_after_the_loop_closed_is_answered(served: Callable[..., Hub]) -> None:
    # A long heartbeat: the bridge's periodic check comes late, so only
    # noticing the stopped loop at the thread's call answers it at once.
    hub = served(heartbeat_interval=5.0)

    async def main() -> None:
        await squares(hub, 20)
        assert wait_until(lambda: loop_reads(hub) == 2, 5)

    asyncio.run(main())  # the home loop is closed now
    t = time.monotonic()
    assert hub.submit(7).result(timeout=10) == 49
    assert time.monotonic() - t < 1.5
    assert wait_until(lambda: loop_reads(hub) == 0, 5)


def test_a_stopped_loop_is_let_go_and_made_home_again(served: Callable[..., Hub]) -> None:
    hub = served()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(squares(hub, 20))
        assert loop.run_until_complete(hub.request(3)) == 9
        # Stopped, not closed: a thread's request must not wait for it to run again.
        assert hub.submit(8).result(timeout=10) == 64
        assert loop.run_until_complete(hub.request(4)) == 16
        loop.run_until_complete(squares(hub, 100))
    finally:
        loop.close()
    assert hub.submit(9).result(timeout=10) == 81


def test_a_blocked_loop_does_not_strand_other_callers(served: Callable[..., Hub]) -> None:
    hub = served()
    answered: list[float] = []

    def thread_caller() -> None:
        t = time.monotonic()
        assert hub.submit(6).result(timeout=20) == 36
        answered.append(time.monotonic() - t)

    async def main() -> None:
        await squares(hub, 20)
        assert wait_until(lambda: loop_reads(hub) == 2, 5)
        th = threading.Thread(target=thread_caller)
        th.start()
        time.sleep(4.0)  # user code blocks the loop, which reads the workers
        th.join(20)
        await squares(hub, 20, 100)  # and it is served again afterwards

    asyncio.run(main())
    assert answered and answered[0] < 3.0, answered  # not held for the 4 s the loop was blocked
    stats = hub.statistics()
    assert stats["worker_deaths"] == 0  # nobody was taken for dead
    assert stats["workers"] == 2


def test_two_loops_at_once_are_both_served(served: Callable[..., Hub]) -> None:
    hub = served()
    errors: list[BaseException] = []

    def run(start: int) -> None:
        try:
            asyncio.run(squares(hub, 300, start))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k * 1000,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)


def test_a_worker_killed_while_the_loop_reads_it(served: Callable[..., Hub]) -> None:
    hub = served(workers=2, model=Sleep)

    async def main() -> None:
        await asyncio.gather(*(hub.request(0.01, i) for i in range(10)))
        assert wait_until(lambda: loop_reads(hub) == 2, 5)
        calls = [asyncio.ensure_future(hub.request(0.3, i)) for i in range(8)]
        await asyncio.sleep(0.15)
        victim = hub.workers()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.gather(*calls) == list(range(8))  # re-sent, nobody sees an error
        # The pool's replacement joins and is read by the loop as well.
        for _ in range(100):
            if loop_reads(hub) == 2 and victim not in {w["pid"] for w in hub.workers()}:
                break
            await asyncio.sleep(0.1)
        assert loop_reads(hub) == 2
        assert await hub.request(0.0, "after") == "after"

    asyncio.run(main())


def test_no_descriptor_left_behind_by_loops_in_turn(served: Callable[..., Hub]) -> None:
    hub = served()
    asyncio.run(squares(hub, 10))
    before = open_fds()
    for k in range(15):
        asyncio.run(squares(hub, 10, k * 10))
        loop = asyncio.new_event_loop()
        loop.run_until_complete(squares(hub, 5))
        assert hub.submit(k).result(timeout=10) == k * k  # taken back while the loop is stopped
        loop.close()  # closed before it could let go: the bridge closes its duplicates
    assert hub.submit(2).result(timeout=10) == 4
    assert wait_until(lambda: open_fds() <= before + 2, 5), (open_fds(), before)


def test_closing_the_hub_from_its_home_loop(served: Callable[..., Hub]) -> None:
    hub = served(workers=2, model=Sleep)

    async def main() -> None:
        await asyncio.gather(*(hub.request(0.0, i) for i in range(10)))
        calls = [asyncio.ensure_future(hub.request(0.3, i)) for i in range(4)]
        await asyncio.sleep(0.1)
        hub.close(grace=5)  # a blocking close, in the loop that reads the workers
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)  # nobody hangs
        # Running requests finished within the grace period; queued ones failed at once.
        assert all(r == i or isinstance(r, HubClosedError) for i, r in enumerate(done)), done
        assert sum(1 for i, r in enumerate(done) if r == i) >= 2, done

    asyncio.run(main())


def test_a_submit_future_callback_may_use_the_hub_when_the_loop_reads(served: Callable[..., Hub]) -> None:
    hub = served()
    second: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def chain(fut: concurrent.futures.Future[Any]) -> None:
        hub.submit(fut.result()).add_done_callback(lambda f: second.set_result(f.result()))

    async def main() -> None:
        await squares(hub, 10)
        assert wait_until(lambda: loop_reads(hub) == 2, 5)
        first = hub.submit(3)
        first.add_done_callback(chain)
        assert await asyncio.wait_for(asyncio.wrap_future(second), 10) == 81

    asyncio.run(main())


def test_a_blocking_wait_inside_the_home_loop_is_answered_at_once(served: Callable[..., Hub]) -> None:
    # A coroutine that waits on hub.submit(...).result() blocks the very loop
    # that reads the workers: the bridge thread must read that answer, at
    # once, not when its periodic check (every 2.5 s here) notices.
    hub = served(heartbeat_interval=5.0)

    async def main() -> None:
        await squares(hub, 20)
        assert wait_until(lambda: loop_reads(hub) == 2, 5)
        for x in range(3):
            t = time.monotonic()
            assert hub.submit(x).result(timeout=20) == x * x
            assert time.monotonic() - t < 1.0
            await squares(hub, 10)  # and the loop reads them again afterwards

    asyncio.run(main())


def test_a_loop_that_closes_while_its_sockets_are_handed_over(
    served: Callable[..., Hub], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop closes between two of the bridge's hand-overs: the sockets it
    was already given are taken back (not left to a closed loop, where nobody
    reads them and their worker would be taken for dead)."""
    from gibbs._loops import LoopReads

    hub = served(workers=2, heartbeat_interval=2.0)
    attach = LoopReads.attach
    calls = [0]

    def slow_attach(self: Any, peer: Any, reader: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            time.sleep(1.0)  # the loop finishes and closes meanwhile
        attach(self, peer, reader)

    monkeypatch.setattr(LoopReads, "attach", slow_attach)

    async def main() -> None:
        try:  # answered, or not (if it went to the worker the bridge thread reads while it sleeps)
            await asyncio.wait_for(hub.request(5), 0.3)
        except asyncio.TimeoutError:
            pass

    asyncio.run(main())
    assert wait_until(lambda: calls[0] >= 2, timeout=10)
    time.sleep(1.0)
    t0 = time.monotonic()
    futures = [hub.submit(i) for i in range(6)]  # both workers get some
    assert [f.result(timeout=20) for f in futures] == [i * i for i in range(6)]
    assert time.monotonic() - t0 < 2.0  # not after a worker was taken for dead (2 s x misses)
    assert wait_until(lambda: loop_reads(hub) == 0, timeout=5)
    assert hub.statistics()["worker_deaths"] == 0


def socket_inodes() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            found.add(link)
    return found


def test_a_stopped_loop_keeps_no_descriptor_after_the_hub_closes(served: Callable[..., Hub]) -> None:
    """A loop stopped (not closed) when the hub closes: its duplicates of the
    worker sockets are closed with the hub."""
    hub = served(workers=2)
    bridge = hub._bridge
    assert bridge is not None
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(squares(hub, 20))
        assert loop_reads(hub) == 2
        workers = {os.readlink(f"/proc/self/fd/{p.fd}") for p in bridge._peers.values()}
        assert len(workers) == 2 and workers <= socket_inodes()
        hub.close(grace=1)
        assert wait_until(lambda: not (workers & socket_inodes()), timeout=10), "a worker socket is still open"
    finally:
        loop.close()


def test_loops_dropped_unclosed_leave_no_descriptor(served: Callable[..., Hub]) -> None:
    """Each request from a new loop that is then dropped without close(): the
    duplicates the dropped loops held are closed when the next takes over."""
    hub = served(workers=2)
    bridge = hub._bridge
    assert bridge is not None
    workers = {os.readlink(f"/proc/self/fd/{p.fd}") for p in bridge._peers.values()}

    def descriptors_of_workers() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") in workers
            except OSError:
                pass
        return n

    for k in range(15):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(hub.request(k))
        assert hub.submit(k).result(timeout=10) == k * k
        del loop  # never closed
    # The bridge's own two, and at most the duplicates of one loop.
    assert wait_until(lambda: descriptors_of_workers() <= 4, timeout=10), descriptors_of_workers()
