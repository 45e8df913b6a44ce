"""Regression tests, through the public API, for the awkward paths of a
call's life: each of these stranded a caller or leaked before the core."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings

import pytest
from conftest import run, wait_until
from gibbs_test_models import BadInit, Sleep, Square

import gibbs
from gibbs import Hub, HubClosedError, NoWorkersError, Worker, WorkerDiedError

HERE = os.path.dirname(os.path.abspath(__file__))


class Slow:
    def __init__(self, wait: float = 0.3) -> None:
        self.w = wait

    def __call__(self, x: int) -> int:
        time.sleep(self.w)
        return x * 10


def test_retries_keep_the_answer_of_the_first_attempt(hub, make_workers) -> None:
    """gibbs_timeout=0.2, gibbs_retries=3 on a 0.3 s model: both workers
    answer; the first answer wins instead of a TimeoutError at 0.8 s."""
    make_workers(hub, Slow, 2, 0.3)
    hub.wait_for_workers_sync(2, timeout=30)

    async def main() -> None:
        t0 = time.monotonic()
        assert await hub.request(4, gibbs_timeout=0.2, gibbs_retries=3) == 40
        assert time.monotonic() - t0 < 0.8
        assert await hub.request(5, gibbs_timeout=0.2, gibbs_retries=-1) == 50
        assert hub.statistics()["resent"] >= 2

    run(main(), timeout=30)


def test_worker_lost_during_close_fails_its_caller(hub, make_workers) -> None:
    ws = make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        running = asyncio.ensure_future(hub.request(5.0, "never"))
        await asyncio.sleep(0.3)
        closing = asyncio.ensure_future(hub.aclose(grace=30))
        await asyncio.sleep(0.1)
        ws[0].kill()
        with pytest.raises((HubClosedError, WorkerDiedError)):
            await asyncio.wait_for(running, 5)
        await asyncio.wait_for(closing, 5)

    run(main(), timeout=30)


def test_timed_out_queued_requests_leave_nothing_behind(hub) -> None:
    """With no worker, 5000 timed-out 1 KB requests must not stay queued
    with their bodies."""

    async def burst(n: int) -> None:
        body = b"x" * 1024
        await asyncio.gather(*(_timeout(hub, body) for _ in range(n)))

    def gibbs_bytes(snapshot: tracemalloc.Snapshot) -> int:
        # Only what gibbs's own code allocated (asyncio keeps finished gather
        # children around on its own account).
        # The package's own directory, wherever the checkout lies (a clone is
        # often named gibbs too: a pattern on the name alone took in the tests).
        package = os.path.dirname(os.path.abspath(gibbs.__file__))
        mine = snapshot.filter_traces([tracemalloc.Filter(True, os.path.join(package, "*"))])
        return sum(stat.size for stat in mine.statistics("filename"))

    async def main() -> None:
        await burst(200)  # warm up
        gc.collect()
        tracemalloc.start()
        before = gibbs_bytes(tracemalloc.take_snapshot())
        await burst(5000)
        gc.collect()
        grown = gibbs_bytes(tracemalloc.take_snapshot()) - before
        tracemalloc.stop()
        assert hub.statistics()["queued"] == 0
        # 5000 bodies alone would be over 5 MB; the queue's table keeps its
        # peak size (an emptied dict does not shrink), a few hundred KB.
        assert grown < 1_000_000, f"{grown} bytes kept after 5000 timed-out requests"

    run(main(), timeout=60)


async def _timeout(hub: Hub, body: bytes) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await hub.request(body, gibbs_timeout=0.05)


def test_timed_out_worker_waiters_are_removed(hub) -> None:
    for _ in range(20):
        with pytest.raises(NoWorkersError):
            hub.wait_for_workers_sync(1, timeout=0.01)
    bridge = hub._bridge
    assert bridge is not None and not bridge._waiters


def test_fail_fast_when_every_local_worker_failed_to_build_its_model(hub, make_workers) -> None:
    make_workers(hub, BadInit, 2)

    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(NoWorkersError) as info:
            await hub.request(1)
        assert time.monotonic() - t0 < 8
        assert "cannot load weights from /nowhere" in str(info.value)
        with pytest.raises(NoWorkersError):
            await hub.request(2)  # new requests fail at once too
        t0 = time.monotonic()
        with pytest.raises(NoWorkersError) as info:
            await hub.wait_for_workers(2, timeout=60)
        assert time.monotonic() - t0 < 5
        assert "RuntimeError" in str(info.value)

    run(main(), timeout=60)


def test_a_worker_with_the_wrong_key_is_counted_and_named(make_hub, make_workers) -> None:
    hub = make_hub(authkey="right")
    make_workers(hub, Square, 1, gibbs_authkey="wrong")
    assert wait_until(lambda: hub.statistics()["handshake_failures"] >= 1, 10)
    with pytest.raises(NoWorkersError) as info:
        hub.wait_for_workers_sync(1, timeout=0.5)
    assert "handshake" in str(info.value)


def test_done_callbacks_run_off_the_bridge_and_may_use_the_hub(hub, make_workers) -> None:
    make_workers(hub, Square, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    seen: dict[str, object] = {}
    second_ready = threading.Event()

    def callback(fut: object) -> None:
        seen["thread"] = threading.current_thread().name
        seen["stats"] = hub.statistics()["workers"]
        seen["second"] = hub.submit(5)
        second_ready.set()

    first = hub.submit(3)
    first.add_done_callback(callback)
    assert first.result(10) == 9
    assert second_ready.wait(10)
    assert seen["second"].result(10) == 25  # type: ignore[attr-defined]
    assert seen["thread"] != "gibbs-bridge"
    assert seen["stats"] == 1


def test_handshake_deadline_is_for_the_whole_handshake(make_hub) -> None:
    hub = make_hub(handshake_timeout=1.0)
    sock = socket.create_connection(("127.0.0.1", hub.port))
    sock.settimeout(0.3)
    t0 = time.monotonic()
    closed = False
    try:
        while time.monotonic() - t0 < 8:
            try:
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except OSError:
                closed = True
                break
            try:
                sock.send(b"\0")  # a byte now and then: each read succeeds
            except OSError:
                closed = True
                break
    finally:
        sock.close()
    assert closed, "a trickling peer kept its handshake slot"
    assert time.monotonic() - t0 < 4


def test_unclosed_hub_releases_its_port_when_collected() -> None:
    hub = Hub(port=0)
    hub.start()
    port = hub.port
    thread = hub._bridge.thread  # type: ignore[union-attr]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del hub
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    thread.join(5)
    assert not thread.is_alive()
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    finally:
        s.close()


def _script(tmp_path, body: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)


def test_no_event_loop_closed_noise(tmp_path) -> None:
    proc = _script(
        tmp_path,
        """
        import asyncio, gc
        from gibbs import Hub
        hub = Hub(port=0)
        loop = asyncio.new_event_loop()
        coro = hub.request(1)
        task = loop.create_task(coro)
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()
        del task
        gc.collect()
        hub.close(grace=0)
        print("done")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


def test_forked_child_of_a_worker_starter_exits_quietly(tmp_path) -> None:
    proc = _script(
        tmp_path,
        """
        import os, sys
        from gibbs import Worker
        from gibbs_test_models import Square
        w = Worker(Square, gibbs_port=1, gibbs_host="127.0.0.1")
        w.start()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a pre-fork web server's child, exiting normally
        _, status = os.waitpid(pid, 0)
        print("child status", status)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "child status 0" in proc.stdout
    assert "can only join a child process" not in proc.stderr, proc.stderr


def test_local_worker_list_is_pruned(monkeypatch) -> None:
    import gibbs.worker as gw

    monkeypatch.setattr(gw, "_KEEP_EXITED", 2)
    ws = []
    for _ in range(6):
        w = Worker(_ExitAtOnce, gibbs_port=1, gibbs_host="127.0.0.1")
        w.start()
        w.join(10)
        ws.append(w)
    assert len([w for w in gw.local_workers() if w.exitcode is not None]) <= 3


class _ExitAtOnce:
    def __init__(self) -> None:
        os._exit(0)


def test_timeout_message_names_workers_that_never_connected(hub, make_workers) -> None:
    """A worker pointed at another port: the hub cannot hear from it, but
    the error says that a worker started here is running and not connected."""
    make_workers(hub, Square, 1, gibbs_port=1)
    with pytest.raises(NoWorkersError) as info:
        hub.wait_for_workers_sync(1, timeout=1.0)
    assert "point at 127.0.0.1:1, not at this hub" in str(info.value)
