"""Hostile and broken input on the hub's port, and values that cannot be pickled.

Promise 5 (DESIGN.md): nothing from an unauthenticated peer is unpickled;
oversized or malformed frames close that connection only. Promise 2: an
argument or result that cannot be pickled fails that one request; nothing
else is disturbed.

Every raw connection below must end in end-of-file (or a reset) on our side,
and the hub must answer requests before and after.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
import struct
import threading
import time
from typing import Any

import pytest
from conftest import run, shm_files
from gibbs_test_models import BadResult, Square

from gibbs import AuthenticationError, Hub, SerializationError
from gibbs import protocol as p
from gibbs import transport as t

KEY = b"bad-input-test-key"
HANDSHAKE_TIMEOUT = 0.5
MAX_FRAME = 4096


@pytest.fixture
def served_hub(make_hub, make_workers) -> Hub:
    """A started hub with one Square worker, a short handshake timeout and a small frame limit."""
    hub = make_hub(authkey=KEY, handshake_timeout=HANDSHAKE_TIMEOUT, max_frame_bytes=MAX_FRAME)
    make_workers(hub, Square, 1, gibbs_authkey=KEY)
    run(hub.wait_for_workers(1, timeout=30))
    assert_serving(hub)
    return hub


def assert_serving(hub: Hub, x: int = 7) -> None:
    assert run(hub.request(x), timeout=30) == x * x
    assert hub.statistics()["workers"] == 1


def raw(hub: Hub, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """The hub may hang up before it has read everything: that is allowed."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def assert_closed_by_hub(sock: socket.socket, within: float = 5.0) -> bytes:
    """Read until the hub closes the connection (EOF or reset); fail if it
    keeps it open longer than ``within`` seconds. Returns what was read."""
    got = bytearray()
    deadline = time.monotonic() + within
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the hub kept the connection open for {within} s (read {bytes(got[:64])!r})")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk
    finally:
        sock.close()


def authenticate(sock: socket.socket, key: bytes = KEY) -> dict[str, Any]:
    """Pass the HMAC handshake and read the hub's WELCOME."""
    t.client_handshake(sock, key)
    reader = p.FrameReader(1 << 16)
    while True:
        data = sock.recv(65536)
        assert data, "the hub closed the connection after a correct handshake"
        for kind, _, body in reader.feed(data):
            assert kind == p.WELCOME
            return p.unpack_json(body)


def hello(**extra: Any) -> bytes:
    info = {"pid": 999999, "host": "fake", "name": "fake", "heartbeat_interval": 5.0, "shm": False}
    info.update(extra)
    return p.pack_json(p.HELLO, info)


def frame(kind: int, req_id: int, body: bytes = b"") -> bytes:
    return b"".join(bytes(b) for b in p.pack_frame(kind, req_id, body))


# ------------------------------------------------------------------ before the handshake


@pytest.mark.parametrize("seed,size", [(1, 1), (2, 2), (3, 40), (4, 300), (5, 5000), (6, 70000)])
def test_random_bytes_close_that_connection_only(served_hub: Hub, seed: int, size: int) -> None:
    sock = raw(served_hub)
    send_quietly(sock, random.Random(seed).randbytes(size))
    assert_closed_by_hub(sock)
    assert_serving(served_hub)


def test_random_bytes_on_many_connections_at_once(served_hub: Hub) -> None:
    socks = [raw(served_hub) for _ in range(20)]
    for i, sock in enumerate(socks):
        send_quietly(sock, random.Random(100 + i).randbytes(64 + i))
    for sock in socks:
        assert_closed_by_hub(sock)
    assert_serving(served_hub)


def test_lying_length_prefix_then_stall(served_hub: Hub) -> None:
    sock = raw(served_hub)
    t._recv_small(sock)  # the hub's challenge
    sock.sendall(struct.pack("!H", 100) + b"x" * 10)  # claims 100 bytes, sends 10, then nothing
    t0 = time.monotonic()
    assert_closed_by_hub(sock, within=HANDSHAKE_TIMEOUT + 5)
    assert time.monotonic() - t0 >= HANDSHAKE_TIMEOUT * 0.5  # closed by the deadline, not at once
    assert_serving(served_hub)


def test_oversized_handshake_message(served_hub: Hub) -> None:
    sock = raw(served_hub)
    send_quietly(sock, struct.pack("!H", 60000) + b"x" * 1000)
    assert_closed_by_hub(sock)
    assert_serving(served_hub)


def test_silent_connection_is_closed_after_the_handshake_timeout(served_hub: Hub) -> None:
    sock = raw(served_hub)
    t0 = time.monotonic()
    got = assert_closed_by_hub(sock, within=HANDSHAKE_TIMEOUT + 5)
    assert got.startswith(struct.pack("!H", len(t._CHALLENGE) + t._NONCE_SIZE) + t._CHALLENGE)
    assert time.monotonic() - t0 >= HANDSHAKE_TIMEOUT * 0.5
    assert_serving(served_hub)


def test_many_silent_connections_do_not_stop_real_workers(served_hub: Hub, make_workers) -> None:
    socks = [raw(served_hub) for _ in range(30)]
    try:
        # spawn: the new worker must not inherit the stalled sockets (see the next test)
        make_workers(served_hub, Square, 1, gibbs_authkey=KEY, gibbs_start_method="spawn")
        run(served_hub.wait_for_workers(2, timeout=30))
        assert run(served_hub.request(3)) == 9
    finally:
        for sock in socks:
            assert_closed_by_hub(sock, within=HANDSHAKE_TIMEOUT + 10)


def test_rejected_peer_sees_eof_even_if_a_worker_forked_during_its_handshake(
    served_hub: Hub, make_workers
) -> None:
    socks = [raw(served_hub) for _ in range(3)]
    for sock in socks:
        t._recv_small(sock)  # the hub's handshake thread holds the socket now
    make_workers(served_hub, Square, 1, gibbs_authkey=KEY, gibbs_start_method="fork")
    run(served_hub.wait_for_workers(2, timeout=30))
    for sock in socks:
        assert_closed_by_hub(sock, within=HANDSHAKE_TIMEOUT + 3)


def test_wrong_key(served_hub: Hub) -> None:
    sock = raw(served_hub)
    with pytest.raises(AuthenticationError):
        t.client_handshake(sock, b"not-the-hub-key")
    assert_closed_by_hub(sock)
    assert_serving(served_hub)


# ------------------------------------------------------------------ after a correct handshake


def test_silent_after_handshake_is_closed(served_hub: Hub) -> None:
    sock = raw(served_hub)
    welcome = authenticate(sock)
    assert "heartbeat_interval" in welcome
    assert_closed_by_hub(sock, within=HANDSHAKE_TIMEOUT + 5)  # no HELLO within the deadline
    assert_serving(served_hub)


@pytest.mark.parametrize(
    "data",
    [
        p.HEADER.pack(p.HELLO, 0, 70000) + b"x" * 100,  # a HELLO far over the control-message cap
        p.HEADER.pack(77, 0, 0),  # unknown kind
        frame(p.HELLO, 0, b"{not json"),
        frame(p.HELLO, 0, b"[1, 2, 3]"),
        frame(p.RESULT, 1, b"\x00" + pickle.dumps(1)),  # a result before saying HELLO
        hello() + b"trailing",  # bytes after HELLO in the same read
    ],
    ids=["oversized-hello", "unknown-kind", "bad-json", "json-list", "result-first", "trailing"],
)
def test_malformed_hello(served_hub: Hub, data: bytes) -> None:
    sock = raw(served_hub)
    authenticate(sock)
    send_quietly(sock, data)
    assert_closed_by_hub(sock)
    assert_serving(served_hub)


def _join_as_fake_worker(hub: Hub) -> socket.socket:
    sock = raw(hub)
    authenticate(sock)
    sock.sendall(hello())
    deadline = time.monotonic() + 10
    while hub.statistics()["workers"] < 2:
        assert time.monotonic() < deadline, "the fake worker was not accepted"
        time.sleep(0.01)
    return sock


def test_frame_over_max_frame_bytes_drops_that_worker_only(served_hub: Hub) -> None:
    sock = _join_as_fake_worker(served_hub)
    send_quietly(sock, p.HEADER.pack(p.RESULT, 1, MAX_FRAME + 1) + b"x" * (MAX_FRAME + 1))
    assert_closed_by_hub(sock)
    assert_serving(served_hub)


def test_unknown_kind_from_a_worker_drops_it(served_hub: Hub) -> None:
    sock = _join_as_fake_worker(served_hub)
    send_quietly(sock, p.HEADER.pack(99, 0, 0))
    assert_closed_by_hub(sock)
    assert_serving(served_hub)


def test_frame_at_max_frame_bytes_is_accepted(served_hub: Hub) -> None:
    # An answer to a request nobody made, exactly at the limit: ignored, the connection stays.
    sock = _join_as_fake_worker(served_hub)
    try:
        sock.sendall(frame(p.RESULT, 123456, b"\x00" + b"x" * (MAX_FRAME - 1)))
        sock.sendall(frame(p.HEARTBEAT, 0))
        time.sleep(0.3)
        assert served_hub.statistics()["workers"] == 2
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while served_hub.statistics()["workers"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert_serving(served_hub)


def test_lying_frame_length_from_a_worker_then_stall(make_hub, make_workers) -> None:
    hub = make_hub(authkey=KEY, max_frame_bytes=MAX_FRAME, heartbeat_misses=2)
    make_workers(hub, Square, 1, gibbs_authkey=KEY)
    run(hub.wait_for_workers(1, timeout=30))
    sock = raw(hub)
    authenticate(sock)
    sock.sendall(hello(heartbeat_interval=0.1))
    sock.sendall(p.HEADER.pack(p.RESULT, 1, 100) + b"x" * 10)  # claims 100, sends 10, stalls
    assert_closed_by_hub(sock, within=10)  # dropped as silent after 2 x 0.1 s
    assert_serving(hub)


# ------------------------------------------------------------------ nothing is unpickled


class _Marker:
    """Unpickling this creates the file at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def _evil(path: str) -> bytes:
    return pickle.dumps(_Marker(path), protocol=5)


def test_the_marker_pickle_really_works(tmp_path) -> None:
    marker = str(tmp_path / "control")
    pickle.loads(_evil(marker)).close()
    assert os.path.exists(marker)


def _attempts(marker: str) -> list[tuple[str, bool, bytes]]:
    """(name, after a correct handshake?, bytes to send)."""
    evil = _evil(marker)
    payload = b"\x00" + evil  # an inline payload body
    return [
        ("raw-pickle", False, evil),
        ("request-frame", False, frame(p.REQUEST, 1, payload)),
        ("result-frame", False, frame(p.RESULT, 1, payload)),
        ("error-frame", False, frame(p.ERROR, 1, evil)),
        ("hello-frame", False, frame(p.HELLO, 0, evil)),
        ("as-handshake-answer", False, struct.pack("!H", len(evil)) + evil),
        ("many-frames", False, b"".join(frame(k, 1, payload) for k in p.KIND_NAMES)),
        # Authenticated, but control messages are JSON only:
        ("pickled-hello", True, frame(p.HELLO, 0, evil)),
        ("pickled-init-failed", True, frame(p.INIT_FAILED, 0, evil)),
        ("result-instead-of-hello", True, frame(p.RESULT, 1, payload)),
        ("error-instead-of-hello", True, frame(p.ERROR, 1, evil)),
    ]


@pytest.mark.parametrize("index", range(11), ids=[a[0] for a in _attempts("x")])
def test_nothing_is_unpickled_before_authentication(served_hub: Hub, tmp_path, index: int) -> None:
    marker = str(tmp_path / "pwned")
    name, after_handshake, data = _attempts(marker)[index]
    sock = raw(served_hub)
    if after_handshake:
        authenticate(sock)
    else:
        t._recv_small(sock)  # the challenge: the hub is now waiting for our answer
    send_quietly(sock, data)
    assert_closed_by_hub(sock, within=HANDSHAKE_TIMEOUT + 5)
    assert_serving(served_hub)
    assert not os.path.exists(marker), f"{name}: the hub unpickled bytes from an unauthenticated peer"


def test_nothing_is_unpickled_after_a_failed_handshake(served_hub: Hub, tmp_path) -> None:
    marker = str(tmp_path / "pwned")
    sock = raw(served_hub)
    try:
        t.client_handshake(sock, b"wrong key")
    except AuthenticationError:
        pass
    send_quietly(sock, frame(p.HELLO, 0, _evil(marker)) + frame(p.RESULT, 1, b"\x00" + _evil(marker)))
    assert_closed_by_hub(sock)
    assert_serving(served_hub)
    assert not os.path.exists(marker)


# ------------------------------------------------------------------ values that cannot be pickled


def _no_shm_change(before: list[str]) -> None:
    assert shm_files() == before


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((lambda: 1,), {}),
        ((), {"lock": threading.Lock()}),
        (([1, 2, (lambda: 3)],), {}),
        ((b"x" * (1 << 20), threading.Lock()), {}),  # with a big buffer: no shared-memory file either
    ],
    ids=["lambda", "lock-kwarg", "nested-lambda", "big-buffer-and-lock"],
)
def test_unpicklable_argument_raises_at_the_call_site_and_sends_nothing(
    served_hub: Hub, args: tuple, kwargs: dict
) -> None:
    files = shm_files()
    before = served_hub.statistics()

    async def main() -> None:
        with pytest.raises(SerializationError) as info:
            await served_hub.request(*args, **kwargs)
        assert info.value.__cause__ is not None

    run(main())
    with pytest.raises(SerializationError):
        served_hub.submit(*args, **kwargs)  # the thread API too, at once, no future
    assert served_hub.statistics() == before
    _no_shm_change(files)
    assert_serving(served_hub)


def test_unpicklable_argument_in_a_batch_fails_only_itself(served_hub: Hub) -> None:
    import asyncio

    async def main() -> list[Any]:
        return await asyncio.gather(
            served_hub.request(2), served_hub.request(lambda: 0), served_hub.request(3), return_exceptions=True
        )

    r = run(main())
    assert r[0] == 4 and r[2] == 9
    assert isinstance(r[1], SerializationError)


def _fail_to_load() -> None:
    raise RuntimeError("cannot be rebuilt here")


class _UnloadableArg:
    """Pickles fine in the hub; unpickling it (in the worker) raises."""

    def __reduce__(self) -> Any:
        return (_fail_to_load, ())


def test_argument_the_worker_cannot_unpickle(served_hub: Hub) -> None:
    with pytest.raises(SerializationError, match="unpickle"):
        run(served_hub.request(_UnloadableArg()))
    assert_serving(served_hub)
    assert served_hub.statistics()["worker_deaths"] == 0


def test_unpicklable_result_fails_that_request_and_the_worker_serves_on(make_hub, make_workers) -> None:
    hub = make_hub()
    make_workers(hub, BadResult, 1)

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=30)
        assert await hub.request(5) == 5
        with pytest.raises(SerializationError) as info:
            await hub.request("lambda")
        assert "return value" in str(info.value)
        assert await hub.request(6) == 6  # the same (only) worker goes on
        fut = hub.submit("lambda")  # the thread API gets the same error
        with pytest.raises(SerializationError):
            await asyncio.wrap_future(fut)

    import asyncio

    run(main())
    stats = hub.statistics()
    assert stats["workers"] == 1
    assert stats["worker_deaths"] == 0


# ------------------------------------------------------------------ quiet by default

_QUIET_SCRIPT = """
import socket, sys, time
from gibbs import Hub
hub = Hub(port=0, handshake_timeout=0.2).start()
for data in (b"garbage" * 10, b"\\xff\\xff", b""):
    s = socket.create_connection(("127.0.0.1", hub.port))
    s.sendall(data)
    s.settimeout(5)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    s.close()
hub.close()
print("done")
"""


def test_rejected_connections_log_nothing_to_stderr_by_default() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _QUIET_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert proc.stderr == "", f"gibbs wrote to stderr without being asked: {proc.stderr!r}"
