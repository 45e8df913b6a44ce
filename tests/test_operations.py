"""Operations: a pool the hub supervises (hub.serve), devices, loading
workers, health, metrics (parsed by prometheus_client), and the status
command against a live hub."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import run, wait_until
from prometheus_client.parser import text_string_to_metric_families

from gibbs import Hub, NoWorkersError, UserCodeException
from gibbs import protocol as p
from gibbs import transport as t
from gibbs.pool import LocalLauncher, resolve_devices

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


@pytest.fixture
def served() -> Iterator[Callable[..., Hub]]:
    """A hub on a free port; it closes its pools when the test ends."""
    made: list[Hub] = []

    def factory(**kwargs: Any) -> Hub:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("heartbeat_interval", 0.2)
        kwargs.setdefault("close_grace", 2.0)
        hub = Hub(**kwargs)
        hub.start()
        made.append(hub)
        return hub

    yield factory
    for hub in made:
        hub.close(grace=0)
        assert not hub.pools()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([SRC, HERE, e.get("PYTHONPATH", "")])
    e.pop("GIBBS_AUTHKEY", None)
    e.pop("GIBBS_HUB", None)
    return e


def live_pids(hub: Hub) -> set[int]:
    return {w["pid"] for w in hub.workers() if w["state"] in ("ready", "busy")}


# ---------------------------------------------------------------- the pool


@pytest.mark.timeout(60)
def test_a_killed_pool_worker_is_replaced_and_no_caller_sees_it(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    pool = hub.serve(Square, 0.02, gibbs_workers=3)
    hub.wait_for_workers_sync(3, timeout=30)
    before = live_pids(hub)

    async def go() -> float:
        calls = [asyncio.ensure_future(hub.request(i)) for i in range(150)]
        await asyncio.sleep(0.1)
        pool.workers()[0].kill()
        killed = time.monotonic()
        assert await asyncio.gather(*calls) == [i * i for i in range(150)]
        while len(live_pids(hub)) < 3:
            await asyncio.sleep(0.01)
        return time.monotonic() - killed

    back = run(go())
    assert len(live_pids(hub) - before) == 1  # one new worker
    assert pool.restarts == 1 and pool.size == 3
    assert hub.statistics()["models"]["default"]["restarts"] == 1
    assert back < 5, f"the pool took {back:.2f} s to be back to size"


class _SamePid:
    """A worker handle that reports the pid every other one reports, as Ray
    actors on different nodes may: the pool must tell them apart by token."""

    def __init__(self, worker: Any) -> None:
        self._w = worker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._w, name)

    @property
    def pid(self) -> int:
        return 4242


class _SamePidLauncher(LocalLauncher):
    def launch(self, make: Any, device: Any) -> Any:
        return _SamePid(make(device))


@pytest.mark.timeout(60)
def test_workers_with_the_same_pid_are_told_apart_by_token(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    pool = hub.serve(Square, gibbs_workers=2, gibbs_launcher=_SamePidLauncher())
    hub.wait_for_workers_sync(2, timeout=30)
    before = live_pids(hub)
    pool.workers()[0]._w.kill()
    assert wait_until(lambda: len(live_pids(hub) - before) == 1 and len(live_pids(hub)) == 2, timeout=20)
    assert pool.failed is None and pool.restarts == 1  # it had joined: replaced, not a failed start
    assert run(hub.request(5)) == 25


@pytest.mark.timeout(60)
def test_a_worker_that_keeps_dying_after_joining_is_restarted_with_a_growing_delay(
    served: Callable[..., Hub]
) -> None:
    """Replaced at once the first time; then after 0.5 s, 1 s, 2 s...: not a
    restart loop (each restart may cost a whole model load)."""
    from gibbs_test_models import DiesSoon

    hub = served()
    pool = hub.serve(DiesSoon, 0.8, gibbs_workers=1, gibbs_model="dies")
    time.sleep(7.0)
    restarts = pool.restarts
    assert pool.failed is None  # it served each time: not a broken constructor
    # At once each time: about 7 restarts; with the delays: 3 or 4.
    assert 2 <= restarts <= 4, f"{restarts} restarts in 7 s"


def test_a_constructor_that_raises_is_not_restarted_in_a_loop(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import BadInit

    hub = served()
    t0 = time.monotonic()
    pool = hub.serve(BadInit, gibbs_workers=2, gibbs_model="bad")
    with pytest.raises(NoWorkersError) as info:
        run(hub.request(1, gibbs_model="bad"))
    took = time.monotonic() - t0
    assert "cannot load weights from /nowhere" in str(info.value)  # the constructor's traceback
    assert "Traceback" in str(info.value)
    assert took < 10, took
    time.sleep(1.0)
    assert pool.restarts == 0 and pool.failed
    assert all(not w.is_alive() for w in pool.workers())
    with pytest.raises(NoWorkersError):  # new requests fail at once too
        run(hub.request(2, gibbs_model="bad"), timeout=2)


def test_scaling_down_under_load_loses_nothing(served: Callable[..., Hub], tmp_path: Any) -> None:
    from gibbs_test_models import Recorder

    hub = served()
    log = tmp_path / "ran"
    pool = hub.serve(Recorder, str(log), 0.1, gibbs_workers=4)
    hub.wait_for_workers_sync(4, timeout=30)

    async def go() -> list[Any]:
        calls = [asyncio.ensure_future(hub.request(i)) for i in range(24)]
        await asyncio.sleep(0.15)
        pool.scale(1)
        return await asyncio.gather(*calls)

    assert run(go()) == list(range(24))
    stats = hub.statistics()
    assert stats["retried"] == 0 and stats["worker_deaths"] == 0  # drained, not killed: nothing re-sent
    starts = [line for line in log.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 24  # each ran exactly once
    assert wait_until(lambda: hub.statistics()["workers"] == 1, 10)
    assert pool.size == 1
    pool.scale(3)
    hub.wait_for_workers_sync(3, timeout=30)
    with pytest.raises(ValueError):
        pool.scale(-1)


def test_pools_stop_with_the_hub(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    pool = hub.serve(Square, gibbs_workers=2)
    hub.wait_for_workers_sync(2, timeout=30)
    workers = pool.workers()
    hub.close(grace=1)
    assert all(not w.is_alive() for w in workers)
    assert not hub.pools()


# ---------------------------------------------------------------- devices


def test_devices_are_spread_and_each_worker_sees_only_its_own(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import DeviceEnv

    hub = served()
    pool = hub.serve(DeviceEnv, gibbs_devices=["cuda:0", 1], gibbs_workers_per_device=2)
    assert pool.devices() == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    hub.wait_for_workers_sync(4, timeout=60)

    async def four() -> list[Any]:
        return await asyncio.gather(*(hub.request(0.5) for _ in range(4)))  # one per idle worker

    seen = {a["pid"]: a for a in run(four())}
    by_device = sorted((a["now"][0], a["import"][0], a["now"][1]) for a in seen.values())
    # Spawned (the default with devices): set before the model's module was imported.
    assert by_device == [("0", "0", "cuda:0"), ("0", "0", "cuda:0"), ("1", "1", "cuda:1"), ("1", "1", "cuda:1")]
    assert sorted(w["device"] for w in hub.workers()) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_resolve_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_devices(None) == []
    assert resolve_devices([0, "1", "cuda:2", "cpu"]) == ["cuda:0", "cuda:1", "cuda:2", "cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert resolve_devices("auto") == ["cuda:2", "cuda:3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: no GPU
    assert resolve_devices("auto") == []
    with pytest.raises(ValueError):
        resolve_devices(["gpu0"])


def test_worker_command_spreads_devices(served: Callable[..., Hub]) -> None:
    hub = served()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:DeviceEnv", "--devices", "0,1",
         "--hub", f"127.0.0.1:{hub.port}"],
        env=env(), start_new_session=True,
    )
    try:
        hub.wait_for_workers_sync(2, timeout=60)
        assert sorted(w["device"] for w in hub.workers()) == ["cuda:0", "cuda:1"]

        async def two() -> list[Any]:
            return await asyncio.gather(*(hub.request(0.5) for _ in range(2)))

        assert sorted(a["now"][0] for a in run(two())) == ["0", "1"]
    finally:
        proc.terminate()
        proc.wait(60)


# ---------------------------------------------------------------- loading, health


def test_loading_workers_are_shown(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import SlowInit

    hub = served()
    hub.serve(SlowInit, 3.0, gibbs_workers=2, gibbs_model="slow")
    assert wait_until(lambda: sum(w["state"] == "loading" for w in hub.workers()) == 2, 10)
    loading = [w for w in hub.workers() if w["state"] == "loading"]
    assert {w["model"] for w in loading} == {"slow"}
    assert hub.statistics()["models"]["slow"]["states"]["loading"] == 2
    with pytest.raises(NoWorkersError) as info:
        hub.wait_for_workers_sync(2, timeout=0.5, model="slow")
    assert "2 worker(s) loading their model" in str(info.value)
    assert hub.health()["status"] == "down"
    hub.wait_for_workers_sync(2, timeout=30, model="slow")
    assert not [w for w in hub.workers() if w["state"] == "loading"]
    assert hub.health()["status"] == "ok"


def test_health(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    assert hub.health()["status"] == "down"
    hub.serve(Square, gibbs_workers=1)
    hub.wait_for_workers_sync(1, timeout=30)
    h = hub.health()
    assert h["status"] == "ok" and h["ready"] == ["default"]
    assert h["models"]["default"]["workers"]["ready"] == 1

    async def queue_one() -> None:
        waiting = asyncio.ensure_future(hub.request(1, gibbs_model="nobody"))
        await asyncio.sleep(0.3)
        h = hub.health()
        assert h["status"] == "degraded" and h["models"]["nobody"]["queued"] == 1
        assert h["oldest_queued_seconds"] >= 0.25
        waiting.cancel()

    run(queue_one())
    json.dumps(hub.health())  # fit for a /healthz endpoint as it is


# ---------------------------------------------------------------- metrics


def test_prometheus_text_parses_and_matches_the_traffic(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Raises, Square

    hub = served()
    hub.serve(Square, gibbs_workers=2)
    hub.serve(Raises, gibbs_workers=1, gibbs_model="raises")
    hub.wait_for_workers_sync(3, timeout=30)

    async def traffic() -> None:
        await asyncio.gather(*(hub.request(i) for i in range(30)))
        for _ in range(4):
            with pytest.raises(UserCodeException):
                await hub.request("boom", gibbs_model="raises")
        assert await hub.request("fine", gibbs_model="raises") == "fine"

    run(traffic())
    families = {f.name: f for f in text_string_to_metric_families(hub.prometheus())}

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError(f"no {sample} {labels} in {families[family].samples}")

    assert families["gibbs_requests"].type == "counter"
    assert value("gibbs_requests", "gibbs_requests_total", model="default") == 30
    assert value("gibbs_requests_completed", "gibbs_requests_completed_total", model="default") == 30
    assert value("gibbs_requests", "gibbs_requests_total", model="raises") == 5
    assert value("gibbs_request_errors", "gibbs_request_errors_total", model="raises", kind="user") == 4
    assert value("gibbs_workers", "gibbs_workers", model="default", state="ready") == 2
    lat = families["gibbs_request_latency_seconds"]
    assert lat.type == "histogram"
    assert value("gibbs_request_latency_seconds", "gibbs_request_latency_seconds_count", model="default") == 30
    assert value("gibbs_request_latency_seconds", "gibbs_request_latency_seconds_bucket", model="default", le="+Inf") == 30
    m = hub.statistics()["models"]["default"]
    assert m["latency"]["p50"] is not None and m["latency"]["p50"] <= m["latency"]["p99"]
    assert m["queue_wait"]["count"] == 30
    # Strict JSON (web frameworks' JSON responses refuse Infinity and NaN).
    stats = hub.statistics()
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats


# ---------------------------------------------------------------- status


def test_status_once_against_a_live_hub(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    hub.serve(Square, gibbs_workers=2, gibbs_model="squares")
    hub.wait_for_workers_sync(2, timeout=30)
    run(hub.request(3, gibbs_model="squares"))
    proc = subprocess.run(
        [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{hub.port}", "--once"],
        env=env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "squares" in proc.stdout and "gibbs_test_models:Square" in proc.stdout
    for w in hub.workers():
        assert str(w["pid"]) in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{hub.port}", "--once", "--json"],
        env=env(), capture_output=True, text=True, timeout=60,
    )
    snap = json.loads(proc.stdout)
    assert snap["statistics"]["models"]["squares"]["requests"] == 1
    assert len(snap["workers"]) == 2


def test_status_without_a_hub_is_a_one_line_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "gibbs", "status", "--hub", f"127.0.0.1:{port}", "--once"],
        env=env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("gibbs: error: no hub") and "Traceback" not in proc.stderr


def test_an_observer_can_read_but_not_send_work(served: Callable[..., Hub]) -> None:
    hub = served()
    sock = t.connect("127.0.0.1", hub.port, timeout=5)
    sock.settimeout(5)
    t.client_handshake(sock, b"", False)
    reader = p.FrameReader()
    frames: list[Any] = []
    while not frames:
        frames = reader.feed(sock.recv(65536))  # WELCOME
    sock.sendall(p.pack_json(p.HELLO, {"role": "observer", "pid": os.getpid()}))
    sock.sendall(b"".join(bytes(b) for b in p.pack_forward(1, "default", 0, p.encode(((1,), {})).body)))
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    sock.close()
    assert wait_until(lambda: hub.statistics()["queued"] == 0 and hub.statistics()["clients"] == 0, 5)
    assert hub.statistics()["models"].get("default", {}).get("requests", 0) == 0  # nothing was submitted


def _observer(hub: Hub) -> tuple[socket.socket, Any]:
    sock = t.connect("127.0.0.1", hub.port, timeout=5)
    sock.settimeout(5)
    t.client_handshake(sock, b"", False)
    reader = p.FrameReader()
    frames: list[Any] = []
    while not frames:
        frames = reader.feed(sock.recv(65536))  # WELCOME
    return sock, reader


def _read_kind(sock: socket.socket, reader: Any, kind: int) -> bytes:
    while True:
        data = sock.recv(65536)
        assert data, "the hub closed the connection"
        for k, _, body in reader.feed(data):
            if k == kind:
                return body


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "stats-split-mid-frame"])
def test_a_request_right_behind_hello_is_answered(served: Callable[..., Hub], split: bool) -> None:
    # `gibbs status` sends STATS as soon as it has sent HELLO; both can reach
    # the hub in one read of its handshake, which must not drop the second.
    hub = served()
    sock, reader = _observer(hub)
    try:
        hello = p.pack_json(p.HELLO, {"role": "observer", "pid": os.getpid()})
        stats = b"".join(bytes(b) for b in p.pack_frame(p.STATS, 0))
        if split:  # HELLO and half a frame together, the rest later
            sock.sendall(bytes(hello) + stats[:3])
            time.sleep(0.3)
            sock.sendall(stats[3:])
        else:
            sock.sendall(bytes(hello) + stats)
        body = json.loads(_read_kind(sock, reader, p.STATS))
        assert "statistics" in body and "workers" in body
    finally:
        sock.close()


def test_a_worker_that_speaks_before_spoken_to_is_refused(served: Callable[..., Hub]) -> None:
    hub = served()
    sock, reader = _observer(hub)
    try:
        hello = p.pack_json(p.HELLO, {"role": "worker", "pid": os.getpid(), "cls": "x:Y"})
        sock.sendall(bytes(hello) + b"".join(bytes(b) for b in p.pack_frame(p.HEARTBEAT, 0)))
        assert sock.recv(65536) == b""  # closed at the handshake
    finally:
        sock.close()
    assert wait_until(lambda: hub.statistics()["handshake_failures"] >= 1, 5)
    assert hub.statistics()["workers"] == 0
