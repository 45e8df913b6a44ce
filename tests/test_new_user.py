"""What a new user meets first, through the public API: two applications on
one machine, calls waiting with no worker, a model that cannot be built,
``hub.serve`` in every web process, ``gibbs status`` into a closed pipe, and
gibbs errors as HTTP statuses."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import InThreadServer, free_port, run, wait_until
from gibbs_test_models import Square

from gibbs import AddressInUseError, Hub, NoWorkersError, Worker

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("GIBBS_HUB", "GIBBS_AUTHKEY", "GIBBS_APP", "GIBBS_PORT")}
    e["PYTHONPATH"] = os.pathsep.join([SRC, HERE, e.get("PYTHONPATH", "")])
    e.update(extra)
    return e


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


# An application: its hub on the default address (GIBBS_PORT), a worker of
# its own model (x * FACTOR), one request, then it answers "again" on stdin.
APP = textwrap.dedent(
    """
    import asyncio, sys
    from gibbs import Hub, Worker

    class Times:
        def __init__(self, k):
            self.k = k
        def __call__(self, x):
            return x * self.k

    async def main(k):
        hub = Hub()
        try:
            hub.start()
        except Exception as exc:
            print("ERROR", type(exc).__name__, exc, flush=True)
            return
        if hub.role == "router":
            Worker(Times, k, gibbs_port=hub.port).start()
        print("RESULT", await asyncio.wait_for(hub.request(10), 30), flush=True)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "again":
            print("RESULT", await asyncio.wait_for(hub.request(10), 30), flush=True)
        hub.close()

    if __name__ == "__main__":
        asyncio.run(main(int(sys.argv[1])))
    """
)


def test_two_applications_on_one_address_never_mix(tmp_path: Any, procs: list[subprocess.Popen[str]]) -> None:
    """Two programs of one user, each with the default Hub(): the second
    never joins the first's hub (it would get the first's answers); it
    raises AddressInUseError saying how to part them, the first logs the
    refusal and keeps answering with its own model."""
    port = free_port()
    for name in ("app_a.py", "app_b.py"):
        (tmp_path / name).write_text(APP)
    e = env(GIBBS_PORT=str(port))
    a = subprocess.Popen(
        [sys.executable, "app_a.py", "10"], cwd=tmp_path, env=e, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    procs.append(a)
    assert a.stdout is not None and a.stdin is not None
    assert a.stdout.readline().split() == ["RESULT", "100"]
    b = subprocess.run(
        [sys.executable, "app_b.py", "2"], cwd=tmp_path, env=e, text=True, capture_output=True, timeout=60,
    )
    assert "RESULT" not in b.stdout, f"the second application got answers from the first's hub: {b.stdout}"
    assert b.stdout.startswith("ERROR AddressInUseError"), b.stdout + b.stderr
    assert "another application" in b.stdout and "app_a.py" in b.stdout
    assert "GIBBS_PORT" in b.stdout and "GIBBS_APP" in b.stdout
    a.stdin.write("again\n")
    a.stdin.flush()
    assert a.stdout.readline().split() == ["RESULT", "100"]
    # The same two programs, named one application, are one family again.
    named = env(GIBBS_PORT=str(port), GIBBS_APP="shop")
    a.stdin.close()
    a.wait(30)
    a2 = subprocess.Popen(
        [sys.executable, "app_a.py", "10"], cwd=tmp_path, env=named, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    procs.append(a2)
    assert a2.stdout is not None
    assert a2.stdout.readline().split() == ["RESULT", "100"]
    b2 = subprocess.run(
        [sys.executable, "app_b.py", "2"], cwd=tmp_path, env=named, text=True, capture_output=True, timeout=60,
    )
    assert b2.stdout.split() == ["RESULT", "100"], b2.stdout + b2.stderr


def test_the_router_refuses_a_client_hub_of_another_application(make_hub: Callable[..., Hub]) -> None:
    """Both sides refuse: the client from the router's WELCOME, and the
    router from the client's HELLO (a client that would not check), on the
    wire."""
    from gibbs import protocol
    from gibbs.transport import client_handshake, connect, resolve_authkey

    port = free_port()
    router = make_hub(port=port, app="one")
    assert router.role == "router"
    with pytest.raises(AddressInUseError, match="another application"):
        Hub(port=port, app="two").start()
    sock = connect("127.0.0.1", port, timeout=10)
    try:
        sock.settimeout(10)
        key, explicit = resolve_authkey(None)
        client_handshake(sock, key, explicit)
        reader = protocol.FrameReader(1 << 16)
        frames: list[Any] = []
        while not frames:
            frames = reader.feed(sock.recv(65536))
        assert frames[0][0] == protocol.WELCOME
        assert protocol.unpack_json(frames[0][2])["app"] == "one"
        hello = {"role": "client", "app": "two", "pid": os.getpid(), "host": "h", "name": "x", "heartbeat_interval": 1.0}
        sock.sendall(protocol.pack_json(protocol.HELLO, hello))
        frames = []
        while not frames:
            data = sock.recv(65536)
            assert data, "closed without saying why"
            frames = reader.feed(data)
        assert frames[0][0] == protocol.REFUSED
        assert "another application" in protocol.unpack_json(frames[0][2])["reason"]
    finally:
        sock.close()
    assert router.statistics()["handshake_failures"] >= 1
    # A client of the same application is let in.
    same = make_hub(port=port, app="one")
    assert same.role == "client"


def test_a_request_with_no_worker_says_why_and_ends(
    make_hub: Callable[..., Hub], caplog: pytest.LogCaptureFixture
) -> None:
    """No worker at all: a warning once, and the request fails at
    no_worker_timeout with NoWorkersError saying what the hub saw."""
    hub = make_hub(no_worker_timeout=1.5)
    caplog.set_level(logging.WARNING, logger="gibbs")
    started = time.monotonic()
    with pytest.raises(NoWorkersError) as info:
        run(hub.request(3), timeout=20)
    waited = time.monotonic() - started
    assert 1.4 <= waited < 10, waited
    assert "no worker of model 'default' is connected" in str(info.value)
    assert "no_worker_timeout" in str(info.value)
    warnings = [r.getMessage() for r in caplog.records if "have waited" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "no worker of model 'default' is connected" in warnings[0]


def test_a_timeout_with_no_worker_says_so(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    """A gibbs_timeout that fires while no worker of the model is there says
    that, and which models do have workers (a wrong --model)."""
    hub = make_hub(no_worker_timeout=None)
    make_workers(hub, Square, 1, gibbs_model="squares")
    run(hub.wait_for_workers(1, timeout=30))
    with pytest.raises(asyncio.TimeoutError) as info:
        run(hub.request(3, gibbs_timeout=0.3), timeout=20)
    text = str(info.value)
    assert "no worker of model 'default' is connected" in text
    assert "'squares'" in text and "--model" in text


def test_a_closing_hub_fails_calls_waiting_for_workers_at_once(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(no_worker_timeout=None)
    fut = hub.submit(1)
    time.sleep(0.2)
    started = time.monotonic()
    hub.close(grace=30)
    with pytest.raises(Exception) as info:
        fut.result(timeout=5)
    assert time.monotonic() - started < 5
    assert type(info.value).__name__ == "HubClosedError"


def test_no_worker_timeout_is_checked(make_hub: Callable[..., Hub]) -> None:
    with pytest.raises(ValueError):
        Hub(port=0, no_worker_timeout=0)
    with pytest.raises(ValueError):
        Hub(port=0, app="")


def test_worker_command_stops_restarting_a_broken_model(make_hub: Callable[..., Hub]) -> None:
    """``python -m gibbs worker`` with a constructor that raises: no restart
    loop; it exits non-zero with the traceback once; the hub's waiting
    request fails with NoWorkersError carrying the traceback, and its
    statistics count the failure."""
    hub = make_hub(no_worker_timeout=None)
    fut = hub.submit(2)
    cmd = [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:BadInit", "-n", "2",
           "--hub", f"127.0.0.1:{hub.port}"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("cannot load weights from /nowhere") <= 4, proc.stderr  # once per process, no loop
    assert "not restarting" in proc.stderr
    assert "restarting in" not in proc.stderr
    with pytest.raises(NoWorkersError, match="cannot load weights"):
        fut.result(timeout=10)
    with pytest.raises(NoWorkersError, match="cannot load weights"):
        run(hub.request(2), timeout=10)  # new requests fail at once too
    assert hub.statistics()["init_failures"] >= 1


def test_worker_with_a_wrong_key_says_so(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(authkey=b"right")
    cmd = [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:Square", "--hub", f"127.0.0.1:{hub.port}"]
    proc = subprocess.Popen(cmd, env=env(GIBBS_AUTHKEY="wrong"), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)

        threading.Thread(target=read, daemon=True).start()
        assert wait_until(lambda: any("refused this worker's key" in x for x in lines), timeout=30), lines
        assert not any("serving the hub" in x for x in lines), lines
    finally:
        proc.terminate()
        proc.wait(30)


ROUTER_SERVES = textwrap.dedent(
    """
    import sys
    from gibbs import Hub
    from gibbs_test_models import Square

    hub = Hub(port=int(sys.argv[1]), heartbeat_interval=0.2)
    hub.serve(Square, gibbs_workers=2)
    hub.wait_for_workers_sync(2, timeout=60)
    print("ready", flush=True)
    sys.stdin.readline()
    hub.close(grace=0)
    """
)


def test_serve_in_a_client_hub_starts_no_second_pool(
    make_hub: Callable[..., Hub], procs: list[subprocess.Popen[str]]
) -> None:
    """hub.serve in every web process of a family: the router's pool works,
    the client's waits (standby) and starts only when its hub takes the
    address over. The router is another process, as a web process is."""
    port = free_port()
    router = subprocess.Popen(
        [sys.executable, "-c", ROUTER_SERVES, str(port)], env=env(GIBBS_APP="family"), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    procs.append(router)
    assert router.stdout is not None and router.stdin is not None
    assert router.stdout.readline().strip() == "ready"
    os.environ["GIBBS_APP"] = "family"
    try:
        client = make_hub(port=port)
    finally:
        del os.environ["GIBBS_APP"]
    assert client.role == "client"
    standby = client.serve(Square, gibbs_workers=2)
    assert standby.standby
    assert run(client.request(4), timeout=30) == 16
    time.sleep(0.5)
    assert standby.workers() == [], "the client's pool started workers of its own"
    assert client.statistics()["workers"] == 2  # the router's two
    router.stdin.write("close\n")
    router.stdin.flush()
    assert router.wait(30) == 0
    assert wait_until(lambda: client.role == "router", timeout=30)
    assert wait_until(lambda: not standby.standby and len(standby.workers()) == 2, timeout=30)
    assert run(client.request(5), timeout=60) == 25


def test_status_into_a_closed_pipe_is_not_the_hubs_fault(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub()
    status = subprocess.Popen(
        [sys.executable, "-m", "gibbs", "status", "--json", "--interval", "0.05", "--hub", f"127.0.0.1:{hub.port}"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert status.stdout is not None
        status.stdout.readline()
        status.stdout.close()  # as `| head -1` does
        _, err = status.communicate(timeout=30)
    finally:
        if status.poll() is None:
            status.kill()
    assert status.returncode == 0, err
    assert b"lost the hub" not in err and b"Broken pipe" not in err


# ------------------------------------------------------------------ HTTP statuses


@pytest.fixture
def errors_app() -> Iterator[str]:
    """examples/errors_app.py under a real uvicorn, with its hub and workers."""
    pytest.importorskip("uvicorn")
    sys.path.insert(0, EXAMPLES)
    try:
        import errors_app as mod
    finally:
        sys.path.remove(EXAMPLES)
    mod.hub = Hub(port=0, max_queued=2, no_worker_timeout=None)
    mod.hub.start()
    workers = [Worker(mod.Model, gibbs_port=mod.hub.port, gibbs_heartbeat_interval=0.2) for _ in range(1)]
    for w in workers:
        w.start()
    server = InThreadServer(mod.app)
    try:
        mod.hub.wait_for_workers_sync(1, timeout=30)
        yield server.url
    finally:
        server.stop()
        mod.hub.close(grace=0)
        for w in workers:
            w.kill()
            w.join(10)


def test_errors_app_maps_gibbs_errors_to_http_statuses(errors_app: str) -> None:
    import concurrent.futures

    import requests

    ok = requests.get(f"{errors_app}/square", params={"x": 3}, timeout=30)
    assert (ok.status_code, ok.json()) == (200, {"result": 9.0})
    raised = requests.get(f"{errors_app}/square", params={"x": -1}, timeout=30)
    assert raised.status_code == 500 and raised.json()["error"] == "ValueError"
    late = requests.get(f"{errors_app}/slow", params={"seconds": 3}, timeout=30)
    assert late.status_code == 504, late.text
    # One worker busy for 2 s, two queued (max_queued=2): the next is shed.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(requests.get, f"{errors_app}/slow", params={"seconds": 0.8}, timeout=30) for _ in range(8)]
        codes = sorted(f.result().status_code for f in futs)
        shed = [f.result() for f in futs if f.result().status_code == 503]
    assert 503 in codes, codes
    assert shed[0].headers.get("Retry-After") == "1"
    assert shed[0].json()["error"] == "QueueFullError"
