"""Bridge: scheduling. Idle workers pull work; pipelining for fast models
never reorders or mixes answers, and never parks a slow call behind a busy
worker."""

from __future__ import annotations

import asyncio
import threading

from conftest import run
from gibbs_test_models import Echo, Pid, Square

from gibbs import Hub


def test_pipelined_answers_never_mix_between_callers(make_hub, make_workers) -> None:
    hub = make_hub(pipeline_depth=8)
    make_workers(hub, Echo, 2)
    hub.wait_for_workers_sync(2, timeout=30)
    seen_depth = 0

    async def main() -> None:
        nonlocal seen_depth

        async def caller(c: int) -> None:
            for i in range(60):
                out = await hub.request(c, i, tag=f"{c}-{i}")
                assert out["args"] == (c, i) and out["kwargs"] == {"tag": f"{c}-{i}"}

        async def watch() -> None:
            nonlocal seen_depth
            while True:
                seen_depth = max([seen_depth] + [w["in_flight"] for w in hub.workers()])
                await asyncio.sleep(0)

        w = asyncio.ensure_future(watch())
        await asyncio.gather(*(caller(c) for c in range(64)))
        w.cancel()

    run(main())
    assert seen_depth > 1  # pipelining did happen (a 1-call worker would never show 2)


def test_answers_go_back_to_the_right_loop_and_thread(make_hub, make_workers) -> None:
    hub = make_hub()
    make_workers(hub, Square, 2)
    hub.wait_for_workers_sync(2, timeout=30)
    errors: list[BaseException] = []

    def in_thread(base: int) -> None:
        async def main() -> None:
            out = await asyncio.gather(*(hub.request(base + i) for i in range(200)))
            assert out == [(base + i) ** 2 for i in range(200)]

        try:
            run(main())
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(k * 1000,)) for k in range(4)]
    futures = [hub.submit(i) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [f.result(timeout=30) for f in futures] == [i * i for i in range(100)]


def test_slow_model_never_gets_a_second_call_while_busy(make_hub, make_workers) -> None:
    hub = make_hub(pipeline_depth=8)
    make_workers(hub, Pid, 3, 0.2)
    hub.wait_for_workers_sync(3, timeout=30)

    async def main() -> None:
        # warm up the service-time estimate, then a burst larger than the pool
        await asyncio.gather(*(hub.request() for _ in range(3)))
        tasks = [asyncio.ensure_future(hub.request()) for _ in range(7)]
        await asyncio.sleep(0.1)
        assert max(w["in_flight"] for w in hub.workers()) == 1
        assert hub.statistics()["queued"] == 4
        pids = await asyncio.gather(*tasks)
        assert len(set(pids)) == 3

    run(main())


def test_queued_requests_are_served_in_order(make_hub, make_workers, tmp_path) -> None:
    from gibbs_test_models import Recorder

    log = tmp_path / "log"
    hub = make_hub()

    async def main() -> None:
        tasks = [asyncio.ensure_future(hub.request(i)) for i in range(20)]
        await asyncio.sleep(0.1)
        make_workers(hub, Recorder, 1, str(log))
        assert await asyncio.gather(*tasks) == list(range(20))

    run(main())
    started = [int(w) for k, w in zip(log.read_text().split()[::2], log.read_text().split()[1::2]) if k == "start"]
    assert started == list(range(20))


def test_statistics_before_start_and_repr_after_close() -> None:
    hub = Hub(port=0)
    assert hub.statistics()["workers"] == 0
    hub.start()
    hub.close()
    assert "closed" in repr(hub)


def test_a_wake_up_during_a_drain_is_never_lost(monkeypatch) -> None:
    """The wake-up pipe's invariant: whenever the flag says a wake-up is
    pending, a byte waits in the pipe (else every later wake-up skips its
    write and the bridge sleeps until its next timer). A wake-up from
    another thread is injected at each point of a drain."""
    import os

    from gibbs import _wakeup

    real_read = os.read
    for inject_at in range(3):
        wakeup = _wakeup.Wakeup()
        wakeup.wake()  # a wake-up waiting to be drained
        calls = [0]

        def read(fd: int, n: int, _w=wakeup, _at=inject_at, calls=calls) -> bytes:
            if calls[0] == _at:
                _w.wake()  # another thread wakes the bridge now
            calls[0] += 1
            return real_read(fd, n)

        monkeypatch.setattr(_wakeup.os, "read", read)
        wakeup.drain()
        monkeypatch.setattr(_wakeup.os, "read", real_read)
        try:
            readable = bool(real_read(wakeup.fileno(), 4096))
        except BlockingIOError:
            readable = False
        assert readable or not wakeup._pending, f"wake-up lost (injected at read {inject_at})"
        wakeup.close()
        wakeup.wake()  # closed: a no-op, never a write to a reused number


def test_a_wake_up_wakes_a_wait_once() -> None:
    import selectors

    from gibbs._wakeup import Wakeup

    wakeup = Wakeup()
    sel = selectors.DefaultSelector()
    sel.register(wakeup, selectors.EVENT_READ)
    try:
        assert sel.select(0) == []
        for _ in range(3):
            wakeup.wake()
        assert len(sel.select(0)) == 1
        wakeup.drain()
        assert sel.select(0) == []
        wakeup.wake()
        assert len(sel.select(0)) == 1
    finally:
        sel.close()
        wakeup.close()


def test_close_while_a_hand_over_is_still_putting_outcomes_strands_none(make_hub, monkeypatch) -> None:
    """close() fails 300 queued submit() futures on the closing thread's
    hand-over, slowed here, while the bridge thread finishes: the delivery
    thread must neither stop before the last of them nor wait forever (the
    closing hub once either stranded the rest, or hung in join)."""
    import concurrent.futures
    import queue as queue_module
    import time

    import gibbs.bridge

    class SlowQueue(queue_module.SimpleQueue):  # type: ignore[type-arg]
        def put(self, item, block=True, timeout=None):  # type: ignore[no-untyped-def]
            if item is not None and threading.current_thread().name != "gibbs-bridge":
                time.sleep(0.002)  # the bridge thread ends meanwhile
            super().put(item)

    monkeypatch.setattr(gibbs.bridge.queue, "SimpleQueue", SlowQueue)
    hub = make_hub(no_worker_timeout=None)
    futs = [hub.submit(i) for i in range(300)]
    closer = threading.Thread(target=hub.close, kwargs={"grace": 0})
    closer.start()
    done, pending = concurrent.futures.wait(futs, timeout=30)
    closer.join(30)
    assert not pending, f"{len(pending)} futures never resolved"
    assert not closer.is_alive(), "close() hung waiting for the delivery thread"
    assert all(type(f.exception()).__name__ == "HubClosedError" for f in done)


def test_the_answers_of_one_read_free_their_queued_calls_in_one_write(monkeypatch) -> None:
    """A worker's answers that arrive together are applied together: the
    queued calls they free go out to it in one write, not one per answer."""
    import socket

    from gibbs import protocol as p
    from gibbs import transport as t
    from gibbs._reading import Reader
    from gibbs.bridge import Bridge
    from gibbs.core import Core

    key = b"one-write-per-read-test-key"
    mine = threading.local()  # the read in progress on this thread: [answers, writes]
    reads: list[tuple[int, int]] = []
    read_worker, flush, answered = Reader.read_worker, Bridge._flush_locked, Core.answered

    def counting_read(self, peer, buf, view):  # type: ignore[no-untyped-def]
        mine.counts = [0, 0]
        try:
            return read_worker(self, peer, buf, view)
        finally:
            if mine.counts[0]:
                reads.append((mine.counts[0], mine.counts[1]))
            mine.counts = None

    def counting_flush(self, peer):  # type: ignore[no-untyped-def]
        if getattr(mine, "counts", None) is not None:
            mine.counts[1] += 1
        return flush(self, peer)

    def counting_answered(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if getattr(mine, "counts", None) is not None:
            mine.counts[0] += 1
        return answered(self, *args, **kwargs)

    monkeypatch.setattr(Reader, "read_worker", counting_read)
    monkeypatch.setattr(Bridge, "_flush_locked", counting_flush)
    monkeypatch.setattr(Core, "answered", counting_answered)
    # pipeline_depth=1: a worker holds its 4 slots' calls and no more, so
    # that every answer frees exactly one queued call.
    hub = Hub(port=0, authkey=key, pipeline_depth=1)
    hub.start()
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
    try:
        sock.settimeout(10)
        t.client_handshake(sock, key)
        reader = p.FrameReader(1 << 16)
        pending: list[tuple[int, int, bytes]] = []
        while not any(f[0] == p.WELCOME for f in pending):
            pending += reader.feed(sock.recv(65536))
        hello = {"pid": 4000000, "host": "fake", "name": "fake", "heartbeat_interval": 5.0, "model": "m",
                 "concurrency": 4}
        sock.sendall(p.pack_json(p.HELLO, hello))
        hub.wait_for_workers_sync(1, model="m", timeout=10)
        futures = [hub.submit(i, gibbs_model="m") for i in range(8)]

        def requests(n: int) -> list[tuple[int, int, bytes]]:
            got: list[tuple[int, int, bytes]] = []
            while len(got) < n:
                got += [f for f in reader.feed(sock.recv(65536)) if f[0] == p.REQUEST]
            assert len(got) == n, got
            return got

        def answers(frames: list[tuple[int, int, bytes]]) -> bytes:  # echo each call's argument, in one write
            out = []
            for _, req_id, body in frames:
                (x,), _ = p.decode(body)
                out.append(b"".join(bytes(b) for b in p.pack_frame(p.RESULT, req_id, p.encode(x).body)))
            return b"".join(out)

        sock.sendall(answers(requests(4)))
        sock.sendall(answers(requests(4)))  # the four queued calls, freed by the first four answers
        assert sorted(f.result(timeout=10) for f in futures) == list(range(8))
    finally:
        sock.close()
        hub.close(grace=0)
    assert any(n >= 2 for n, _ in reads), f"no read carried several answers: {reads}"
    assert all(writes <= 1 for _, writes in reads), f"(answers, writes) per read: {reads}"
