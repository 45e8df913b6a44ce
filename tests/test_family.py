"""Many web processes, one pool: hubs of a family of processes share one
address. The first to start routes; the others are client hubs that forward
their calls to it, re-send them when it goes, and one of them takes the
address over. Several hubs in one process behave as hubs in several
processes do (each has its own connections), which keeps most tests here
fast; the router's death by SIGKILL runs in a real separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import run, wait_until

from gibbs import (
    Hub,
    HubClosedError,
    OverloadedError,
    QueueFullError,
    UserCodeException,
    Worker,
    WorkerDiedError,
)
from gibbs import transport as t

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def hubs() -> Iterator[Callable[..., Hub]]:
    made: list[Hub] = []

    def factory(port: int, **kwargs: Any) -> Hub:
        kwargs.setdefault("heartbeat_interval", 0.2)
        hub = Hub(port, **kwargs)
        hub.start()
        made.append(hub)
        return hub

    yield factory
    for hub in made:
        hub.close(grace=0)


@pytest.fixture
def workers() -> Iterator[Callable[..., list[Worker]]]:
    started: list[Worker] = []

    def factory(port: int, cls: Any, n: int = 1, *args: Any, **kwargs: Any) -> list[Worker]:
        kwargs.setdefault("gibbs_port", port)
        kwargs.setdefault("gibbs_heartbeat_interval", 0.2)
        ws = [Worker(cls, *args, **kwargs) for _ in range(n)]
        for w in ws:
            w.start()
            started.append(w)
        return ws

    yield factory
    for w in started:
        w.kill()
    for w in started:
        w.join(10)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture(autouse=True)
def one_application(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hubs of these tests come from several programs (this one, and
    scripts run with ``python -c``): one application by name."""
    monkeypatch.setenv("GIBBS_APP", "family-tests")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["GIBBS_APP"] = "family-tests"
    e["PYTHONPATH"] = os.pathsep.join([SRC, HERE, e.get("PYTHONPATH", "")])
    e.pop("GIBBS_HUB", None)
    e.pop("GIBBS_AUTHKEY", None)
    return e


# ---------------------------------------------------------------- joining


def test_second_hub_on_the_address_joins_the_first(port: int, hubs: Callable[..., Hub], workers: Any) -> None:
    from gibbs_test_models import Square

    router = hubs(port)
    client = hubs(port)
    assert (router.role, client.role) == ("router", "client")
    workers(port, Square, 2)
    client.wait_for_workers_sync(2, timeout=20)
    assert client.models()["default"]["workers"] == 2

    async def go() -> list[Any]:
        return await asyncio.gather(*(client.request(i) for i in range(50)))

    assert run(go()) == [i * i for i in range(50)]
    assert router.statistics()["clients"] == 1
    assert router.statistics()["completed"] == 50  # the router's workers ran them
    assert client.submit(9).result(10) == 81  # threads too


async def _reads_its_router(client: Hub) -> bool:
    """Whether the client's event loop reads its router's socket itself (an
    answer reaches its caller with no thread hop)."""
    bridge = client._bridge
    assert bridge is not None
    for _ in range(500):
        if bridge.loop_reads() == 1:
            return True
        await client.request(0)
        await asyncio.sleep(0.01)
    return False


def test_a_client_hubs_event_loop_reads_its_router_itself(port: int, hubs: Callable[..., Hub], workers: Any) -> None:
    from gibbs_test_models import Square

    router = hubs(port)
    client = hubs(port)
    workers(port, Square, 2)
    client.wait_for_workers_sync(2, timeout=20)

    async def go() -> list[Any]:
        assert await _reads_its_router(client)
        return await asyncio.gather(*(client.request(i) for i in range(200)))

    assert run(go()) == [i * i for i in range(200)]
    bridge = client._bridge
    assert bridge is not None
    # Its loop closed: the bridge thread reads the router again, and
    # callers without a loop are answered.
    assert wait_until(lambda: bridge.loop_reads() == 0, timeout=10)
    assert client.submit(7).result(10) == 49
    assert router.statistics()["completed"] >= 201


def test_errors_cross_the_router(port: int, hubs: Callable[..., Hub], workers: Any) -> None:
    from gibbs_test_models import BatchModel, Killer, Raises

    hubs(port, max_attempts=1)
    client = hubs(port)
    workers(port, Raises, 1)
    workers(port, Killer, 1, gibbs_model="killer")
    workers(port, BatchModel, 1, gibbs_model="batched", gibbs_batch_size=4)
    client.wait_for_workers_sync(3, timeout=20)

    async def go() -> None:
        with pytest.raises(UserCodeException) as info:
            await client.request("boom")
        assert "ValueError" in str(info.value)
        with pytest.raises(WorkerDiedError) as died:
            await client.request("sigkill", gibbs_model="killer")
        assert died.value.failures and "SIGKILL" in died.value.failures[0]
        with pytest.raises(TypeError, match="batched"):
            await client.request(1, 2, gibbs_model="batched")
        assert (await client.request(5, gibbs_model="batched"))[0] == 5

    run(go())


def test_a_shed_call_reaches_a_client_hub_as_overloaded(port: int, hubs: Callable[..., Hub]) -> None:
    """The router's admission control refuses a client hub's call: the
    client's caller gets the same QueueFullError (an OverloadedError, with
    retry_after and reason), not a bare GibbsError, so that a web app
    behind many processes answers 503 as one process would."""
    hubs(port, max_queued=1)
    client = hubs(port)
    wait_until(lambda: client.role == "client", 10)

    async def go() -> None:
        queued = asyncio.ensure_future(client.request(1))  # no worker: it waits at the router
        await asyncio.sleep(0.2)
        with pytest.raises(QueueFullError, match="max_queued=1") as info:
            await client.request(2)
        assert isinstance(info.value, OverloadedError)
        assert info.value.reason == "max_queued" and info.value.retry_after >= 0
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)

    run(go())


def test_cancel_at_a_client_removes_the_call_at_the_router(
    port: int, hubs: Callable[..., Hub], workers: Any, tmp_path: Any
) -> None:
    from gibbs_test_models import Recorder

    log = tmp_path / "ran"
    router = hubs(port)
    client = hubs(port)
    workers(port, Recorder, 1, str(log), 0.5)
    client.wait_for_workers_sync(1, timeout=20)

    async def go() -> None:
        first = asyncio.ensure_future(client.request("first"))
        assert await asyncio.to_thread(wait_until, lambda: log.exists(), 10)
        with pytest.raises(asyncio.TimeoutError):
            await client.request("queued", gibbs_timeout=0.1)
        assert await asyncio.to_thread(wait_until, lambda: router.statistics()["queued"] == 0, 5)
        assert await first == "first"

    run(go())
    time.sleep(0.3)
    assert "queued" not in log.read_text()  # it never ran
    assert router.statistics()["cancelled"] == 1


def test_retries_from_a_client_are_resent_by_the_router(port: int, hubs: Callable[..., Hub], workers: Any) -> None:
    from gibbs_test_models import Square

    router = hubs(port)
    client = hubs(port)
    workers(port, Square, 2, 0.3)
    client.wait_for_workers_sync(2, timeout=20)
    assert run(client.request(4, gibbs_timeout=0.2, gibbs_retries=3)) == 16
    assert router.statistics()["resent"] >= 1


def test_streams_through_a_client(port: int, hubs: Callable[..., Hub], workers: Any, tmp_path: Any) -> None:
    from gibbs_test_models import Streamer

    router = hubs(port)
    client = hubs(port)
    workers(port, Streamer, 1)
    client.wait_for_workers_sync(1, timeout=20)
    marker = tmp_path / "marker"

    async def go() -> None:
        assert [x async for x in client.stream(30)] == list(range(30))  # beyond the credit window
        got = []
        async for x in client.stream(1000, 0.01, marker=str(marker)):
            got.append(x)
            if len(got) == 3:
                break
        assert got == [0, 1, 2]

    run(go())
    assert wait_until(lambda: marker.exists() and "closed" in marker.read_text(), 10)  # stopped on the worker
    assert wait_until(lambda: router.statistics()["in_flight"] == 0, 5)


# ---------------------------------------------------------------- a router that goes


def test_a_closing_router_hands_its_clients_calls_over(
    port: int, hubs: Callable[..., Hub], workers: Any, tmp_path: Any
) -> None:
    from gibbs_test_models import Square

    router = hubs(port)
    client = hubs(port)
    workers(port, Square, 2, 0.3)
    client.wait_for_workers_sync(2, timeout=20)

    async def go() -> list[Any]:
        calls = [asyncio.ensure_future(client.request(i)) for i in range(6)]
        await asyncio.sleep(0.1)  # two running at the router, four queued there
        await asyncio.to_thread(router.close, 5.0)
        return await asyncio.gather(*calls)

    t0 = time.monotonic()
    assert run(go()) == [i * i for i in range(6)]  # none lost, none failed
    assert client.role == "router"  # it took the address over
    assert client.statistics()["workers"] == 2  # and the workers came to it
    assert time.monotonic() - t0 < 10


def test_a_client_hub_closing_fails_only_its_own_calls(port: int, hubs: Callable[..., Hub], workers: Any) -> None:
    from gibbs_test_models import Square

    router = hubs(port)
    client = hubs(port)
    workers(port, Square, 1, 0.3)
    router.wait_for_workers_sync(1, timeout=20)

    async def go() -> None:
        mine = asyncio.ensure_future(router.request(3))
        queued = asyncio.ensure_future(client.request(2))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(client.close, 0)
        with pytest.raises(HubClosedError):
            await queued
        assert await mine == 9
        assert await router.request(5) == 25

    run(go())
    assert wait_until(lambda: router.statistics()["clients"] == 0, 5)


ROUTER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from gibbs import Hub
    hub = Hub(int(sys.argv[1]), heartbeat_interval=0.2)
    hub.start()
    print(hub.role, flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.mark.timeout(90)
def test_router_killed_a_client_takes_over_and_nothing_is_lost(
    port: int, hubs: Callable[..., Hub], workers: Any, procs: list[subprocess.Popen[bytes]]
) -> None:
    from gibbs_test_models import Square

    router = subprocess.Popen([sys.executable, "-c", ROUTER_SCRIPT, str(port)], env=env(), stdout=subprocess.PIPE)
    procs.append(router)
    assert router.stdout is not None and router.stdout.readline().strip() == b"router"
    # max_attempts=1: losing the router is not an attempt lost (its workers live on).
    client = hubs(port, max_attempts=1)
    assert client.role == "client"
    workers(port, Square, 4, 0.25)
    client.wait_for_workers_sync(4, timeout=20)

    async def go() -> tuple[list[Any], float]:
        assert await _reads_its_router(client)  # the router is lost while the loop reads it
        calls = [asyncio.ensure_future(client.request(i)) for i in range(12)]
        await asyncio.sleep(0.1)
        killed = time.monotonic()
        os.kill(router.pid, signal.SIGKILL)
        results = await asyncio.gather(*calls)
        return results, time.monotonic() - killed

    results, took = run(go(), timeout=60)
    assert results == [i * i for i in range(12)]
    assert client.role == "router"
    # 12 calls of 0.25 s on 4 workers is 0.75 s; a second or so to take over
    # and for the workers to reconnect; generous for a loaded machine.
    assert took < 8, took


# ---------------------------------------------------------------- a standalone hub


@pytest.mark.timeout(90)
def test_standalone_hub_command_with_clients_by_address(
    port: int, hubs: Callable[..., Hub], workers: Any, procs: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gibbs_test_models import Square

    def start_hub() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-m", "gibbs", "hub", "--bind", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2"],
            env=env(), stderr=subprocess.PIPE,
        )
        procs.append(p)
        assert p.stderr is not None
        assert b"listening" in p.stderr.readline()
        return p

    standalone = start_hub()
    monkeypatch.setenv("GIBBS_HUB", f"127.0.0.1:{port}")
    a = hubs(9)  # the port argument is ignored: GIBBS_HUB names the hub
    b = hubs(9)
    assert (a.role, b.role) == ("client", "client")
    workers(port, Square, 2)
    a.wait_for_workers_sync(2, timeout=20)
    b.wait_for_workers_sync(2, timeout=20)

    async def go(n: int) -> None:
        results = await asyncio.gather(*(h.request(i) for i in range(n) for h in (a, b)))
        assert results == [i * i for i in range(n) for _ in (a, b)]

    run(go(20))
    # The hub restarts: clients wait for it (they never take over an address
    # they were given), then carry on.
    standalone.kill()
    standalone.wait(10)
    pending = b.submit(7)
    start_hub()
    assert pending.result(30) == 49
    run(go(5))
    assert (a.role, b.role) == ("client", "client")


def test_hub_command_refuses_a_held_address(port: int, hubs: Callable[..., Hub]) -> None:
    hubs(port)
    proc = subprocess.run(
        [sys.executable, "-m", "gibbs", "hub", "--bind", f"127.0.0.1:{port}"], env=env(), capture_output=True, timeout=30
    )
    assert proc.returncode == 2
    assert b"already held" in proc.stderr


def test_address_needs_a_key_off_loopback() -> None:
    with pytest.raises(ValueError, match="explicit key"):
        Hub(address="192.0.2.1:5019")
    with pytest.raises(ValueError, match="bad hub address"):
        Hub(address="host:port")


# ---------------------------------------------------------------- zero configuration


def test_worker_command_needs_no_key_for_a_loopback_hub(
    port: int, hubs: Callable[..., Hub], procs: list[subprocess.Popen[bytes]]
) -> None:
    hub = hubs(port)
    # Its own process authkey differs from ours: only the user id lets it in.
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:Square", "--hub", f"127.0.0.1:{port}"],
            env=env(), start_new_session=True,
        )
    )
    hub.wait_for_workers_sync(1, timeout=30)
    assert run(hub.request(6)) == 36


def _handshake_pair(server_explicit: bool, client_explicit: bool, server_key: bytes, client_key: bytes) -> tuple[Any, Any]:
    import threading

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out: dict[str, Any] = {}

    def side(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001
            out[name] = exc

    th = threading.Thread(target=side, args=("server", lambda: t.server_handshake(a, server_key, server_explicit)))
    th.start()
    side("client", lambda: t.client_handshake(b, client_key, client_explicit))
    th.join(10)
    a.close()
    b.close()
    return out["server"], out["client"]


def test_same_user_needs_no_shared_key() -> None:
    assert _handshake_pair(False, False, b"one", b"two") == (True, True)


def test_an_explicit_key_is_still_checked_for_the_same_user() -> None:
    server, client = _handshake_pair(False, True, b"one", b"two")
    assert isinstance(server, t.AuthenticationError) or isinstance(client, t.AuthenticationError)
    assert _handshake_pair(True, True, b"k", b"k") == (False, False)


def test_another_user_is_challenged(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel reports our uid for the peer; pretend this process is another user.
    real = os.geteuid()
    monkeypatch.setattr(t.os, "geteuid", lambda: real + 1)
    server, client = _handshake_pair(False, False, b"one", b"two")
    assert isinstance(server, t.AuthenticationError) or isinstance(client, t.AuthenticationError)
    assert _handshake_pair(False, False, b"same", b"same") == (False, False)  # a shared key still works


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_another_user_is_refused(port: int, hubs: Callable[..., Hub]) -> None:
    hub = hubs(port)
    pid = os.fork()
    if pid == 0:  # the child: another user, with its own (default) key
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = t.connect("127.0.0.1", port, timeout=5)
            try:
                t.client_handshake(sock, os.urandom(32), False)
                code = 3  # let in: wrong
            except t.AuthenticationError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert wait_until(lambda: hub.statistics()["handshake_failures"] >= 1, 5)


def test_large_arrays_through_a_client_hub(port: int, hubs: Callable[..., Hub], workers: Any) -> None:
    """A client hub's arrays: the router sends them to its workers through
    shared memory and passes the answers on inline; nothing it lent stays
    lent, and the client's answers are whole copies of their own."""
    import gc

    import numpy as np
    from gibbs_test_models import Doubled

    router = hubs(port)
    client = hubs(port)
    workers(port, Doubled, 2)
    client.wait_for_workers_sync(2, timeout=20)

    async def go() -> list[Any]:
        return await asyncio.gather(*(client.request(np.full(1 << 17, float(i))) for i in range(8)))

    outs = run(go())
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, 2.0 * i)
    out[...] = 1.0  # the client's own memory
    gc.collect()
    assert wait_until(lambda: router.statistics()["shared_memory"]["lent"] == 0, timeout=5)
    assert router.statistics()["shared_memory"]["answers_lent"] == 8
