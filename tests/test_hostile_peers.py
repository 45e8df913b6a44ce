"""Peers that hold the key and send bytes that are wrong: one bad frame or one
badly typed HELLO field closes that connection only, in every reading mode
(the bridge thread reads, or the event loop that makes the requests), and
the hub goes on answering correctly; errors from a peer's bytes reach the
caller as GibbsError subclasses with the cause chained.

Each test here failed on the code before the edge checks (``records.py``,
``shm._parse_shm_head``, the guards in ``_reading.Reader.read``/``_loops.LoopReads._loop_read``, and
``_delivery._unwrap``): the hub's bridge thread died, or asyncio logged the error
and kept the peer, or the caller got ``SystemExit`` / a bare decode error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import pickle
import random
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import run, shm_files, wait_until
from gibbs_test_models import Square

from gibbs import GibbsError, Hub, ProtocolError, SerializationError, Worker
from gibbs import protocol as p
from gibbs import transport as t

KEY = b"hostile-peers-test-key"
EVIL = "evil"  # the model only our fake workers serve


# ------------------------------------------------------------------ wire helpers


def frame(kind: int, req_id: int, body: bytes = b"") -> bytes:
    return b"".join(bytes(b) for b in p.pack_frame(kind, req_id, body))


def authenticated(port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection that passed the HMAC handshake and read WELCOME."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    t.client_handshake(sock, KEY)
    reader = p.FrameReader(1 << 16)
    while True:
        data = sock.recv(65536)
        assert data, "the hub closed the connection after a correct handshake"
        got = reader.feed(data)
        if got:
            assert got[0][0] == p.WELCOME
            return sock


def hello_info(**extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"pid": 4000000, "host": "fake", "name": "fake", "heartbeat_interval": 5.0, "shm": False}
    info.update(extra)
    return info


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def closed_by_hub(sock: socket.socket, within: float = 5.0) -> bool:
    """Whether the hub closes the connection within ``within`` seconds
    (whatever it sends first is read and dropped)."""
    deadline = time.monotonic() + within
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                if not sock.recv(65536):
                    return True
            except socket.timeout:
                continue
            except OSError:
                return True
    finally:
        sock.close()


def workers_of(hub: Hub) -> int:
    return int(hub.statistics()["workers"])


def join_fake_worker(hub: Hub, **extra: Any) -> socket.socket:
    """A fake worker of model ``evil`` that joined ``hub``."""
    before = workers_of(hub)
    sock = authenticated(hub.port)
    sock.sendall(p.pack_json(p.HELLO, hello_info(model=EVIL, **extra)))
    assert wait_until(lambda: workers_of(hub) > before, 10), "the fake worker was not accepted"
    return sock


def read_frame(sock: socket.socket, reader: p.FrameReader, want: int) -> tuple[int, int, bytes]:
    """The next frame of kind ``want`` from the hub (heartbeats skipped)."""
    pending: list[tuple[int, int, bytes]] = []
    while True:
        while pending:
            f = pending.pop(0)
            if f[0] == want:
                return f
        data = sock.recv(65536)
        assert data, "the hub closed the connection"
        pending.extend(reader.feed(data))


def bridge_alive(hub: Hub) -> bool:
    bridge = hub._bridge
    return bridge is not None and bridge.thread.is_alive()


# ------------------------------------------------------------------ hubs: one per reading mode, shared by a module


def _start(loop_reads: bool) -> tuple[Hub, Worker]:
    old = os.environ.get("GIBBS_LOOP_READS")
    os.environ["GIBBS_LOOP_READS"] = "1" if loop_reads else "0"
    try:
        hub = Hub(port=0, authkey=KEY, heartbeat_interval=0.5, handshake_timeout=2.0, max_frame_bytes=1 << 20)
        hub.start()
    finally:
        if old is None:
            del os.environ["GIBBS_LOOP_READS"]
        else:
            os.environ["GIBBS_LOOP_READS"] = old
    worker = Worker(Square, gibbs_port=hub.port, gibbs_host="127.0.0.1", gibbs_authkey=KEY, gibbs_heartbeat_interval=0.5)
    worker.start()
    return hub, worker


_SHARED: list[Worker] = []  # the module's workers: not reaped between tests


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """As conftest's, but the module's shared workers live on to the end."""
    yield
    keep = {w.pid for w in _SHARED}
    for child in multiprocessing.active_children():
        if child.pid not in keep:
            child.kill()
            child.join(5)


@pytest.fixture(scope="module")
def hubs() -> Iterator[dict[str, Hub]]:
    made: list[tuple[Hub, Worker]] = []
    try:
        for mode in ("loop", "thread"):
            made.append(_start(mode == "loop"))
            _SHARED.append(made[-1][1])
        for hub, _ in made:
            hub.wait_for_workers_sync(1, timeout=30)
        yield {"loop": made[0][0], "thread": made[1][0]}
    finally:
        for hub, worker in made:
            worker.kill()
            worker.join(10)
            hub.close(grace=0)
        _SHARED.clear()


def serving(hub: Hub, x: int = 7) -> None:
    """The hub answers correctly, through the real worker."""
    assert bridge_alive(hub), "the hub's bridge thread stopped"
    assert hub.submit(x).result(timeout=30) == x * x
    assert wait_until(lambda: workers_of(hub) == 1, 10), "a fake worker was not dropped"


def in_mode(hub: Hub, mode: str, attack: Callable[[], None]) -> None:
    """Run ``attack`` (blocking, in a thread) while ``mode`` reads the worker
    sockets: in "loop" mode an event loop making requests reads them (and is
    checked to); in "thread" mode the bridge thread does."""
    bridge = hub._bridge
    assert bridge is not None

    async def main() -> None:
        assert await hub.request(3) == 9
        if mode == "loop":
            assert wait_until(lambda: bridge.loop_reads() >= 1, 5), "the event loop does not read the workers"
        await asyncio.get_running_loop().run_in_executor(None, attack)
        assert await hub.request(4) == 16
        if mode == "loop":
            assert bridge.loop_reads() >= 1

    run(main())
    serving(hub)


MODES = ["loop", "thread"]


# ------------------------------------------------------------------ frames with a bad shared-memory header

_NAME = b"gibbs-w1-0123456789abcdef"
BAD_SHM_BODIES = {
    "one-byte": b"\x01",  # a 14-byte RESULT frame in all
    "short-header": b"\x01\x00\x05",
    "more-buffers-than-carried": b"\x01" + p.SHM_HEAD.pack(len(_NAME), 1000) + _NAME + p.SHM_BUF.pack(0, 8),
    "name-past-the-end": b"\x01" + p.SHM_HEAD.pack(60000, 0) + _NAME,
    "name-not-utf8": b"\x01" + p.SHM_HEAD.pack(4, 0) + b"\xff\xfe\xfd\xfc",
    "name-outside-gibbs": b"\x01" + p.SHM_HEAD.pack(6, 0) + b"passwd",
    "name-with-slash": b"\x01" + p.SHM_HEAD.pack(15, 0) + b"gibbs-../passwd",
    "no-such-segment": b"\x01" + p.SHM_HEAD.pack(len(_NAME), 0) + _NAME,
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD_SHM_BODIES))
def test_a_bad_shared_memory_header_drops_that_peer_only(hubs: dict[str, Hub], mode: str, case: str) -> None:
    hub = hubs[mode]

    def attack() -> None:
        sock = join_fake_worker(hub)
        send_quietly(sock, frame(p.RESULT, 1, BAD_SHM_BODIES[case]))
        if case == "no-such-segment":  # well formed, but nothing to read: that answer fails, the peer stays
            sock.close()
            return
        assert closed_by_hub(sock), "the hub kept a peer that sent a malformed frame"

    in_mode(hub, mode, attack)


# ------------------------------------------------------------------ badly typed HELLO fields

BAD_HELLOS: dict[str, dict[str, Any]] = {}
for _key, _values in {
    "pid": ["1", [1], {}, None, math.inf, math.nan, True, 0, -5, 2**40, 1.5],
    "batch_size": ["2", [2], {}, None, math.inf, 0, -3, 2**40, 2.0],
    "concurrency": ["2", [2], {}, None, math.nan, 0, 2**40],
    "heartbeat_interval": ["1", [1], {}, None, math.nan, math.inf, -1, 0, 1e300],
    "batch_wait": ["x", [0], {}, None, math.nan, -1.0],
    "host": [5, None, ["h"]],
    "name": [5, {}],
    "role": [5, "boss", "router"],
    "shm": ["yes", 1],
    "model": [5, ["m"]],
    "cls": [5],
    "token": [5, ["t"]],
    "device": [5],
}.items():
    for _i, _v in enumerate(_values):
        BAD_HELLOS[f"{_key}-{_i}-{_v!r}"[:40]] = {_key: _v}


def _json(info: dict[str, Any]) -> bytes:
    import json

    body = json.dumps(info).encode()  # NaN and Infinity as Python's json writes them (and reads them)
    return p.HEADER.pack(p.HELLO, 0, len(body)) + body


@pytest.mark.parametrize("case", list(BAD_HELLOS))
def test_a_badly_typed_hello_field_closes_that_connection_only(
    hubs: dict[str, Hub], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub = hubs["thread"]
    field, value = next(iter(BAD_HELLOS[case].items()))
    info = hello_info(model=EVIL)
    info[field] = value
    with caplog.at_level(logging.WARNING, logger="gibbs"):
        sock = authenticated(hub.port)
        send_quietly(sock, _json(info))
        assert closed_by_hub(sock), "the hub kept a peer whose HELLO was malformed"
        assert wait_until(lambda: any(f"malformed HELLO: {field}" in r.getMessage() or "unknown role" in r.getMessage() for r in caplog.records), 5), (
            f"no log line says why: {[r.getMessage() for r in caplog.records]}"
        )
    serving(hub)


@pytest.mark.parametrize("kind", [p.LOADING, p.INIT_FAILED])
@pytest.mark.parametrize("pid", [None, "7", [7], math.nan])
def test_a_badly_typed_loading_or_init_failed_report_closes_that_connection_only(
    hubs: dict[str, Hub], kind: int, pid: Any, caplog: pytest.LogCaptureFixture
) -> None:
    hub = hubs["thread"]
    with caplog.at_level(logging.WARNING, logger="gibbs"):
        sock = authenticated(hub.port)
        send_quietly(sock, p.pack_json(kind, {"pid": pid, "host": "fake", "name": "fake", "model": EVIL}))
        assert closed_by_hub(sock)
        what = f"malformed {p.KIND_NAMES[kind]}: pid"
        assert wait_until(lambda: any(what in r.getMessage() for r in caplog.records), 5), (
            f"no log line says why: {[r.getMessage() for r in caplog.records]}"
        )
    serving(hub)
    assert not [w for w in hub.workers() if w["state"] == "loading"]


def test_a_valid_hello_still_joins(hubs: dict[str, Hub]) -> None:
    """The checks refuse what is wrong, not what a worker sends."""
    hub = hubs["thread"]
    sock = join_fake_worker(hub, batch_size=4, concurrency=1, batch_wait=0.001, token="tok", device="cpu", cls="Fake")
    sock.close()
    serving(hub)


# ------------------------------------------------------------------ errors from a peer's bytes reach callers as GibbsError


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


class _Exit:
    """Unpickling this raises SystemExit (a peer's pickle runs code)."""

    def __reduce__(self) -> Any:
        return (sys.exit, (3,))


class _Interrupt:
    """Unpickling this raises KeyboardInterrupt."""

    def __reduce__(self) -> Any:
        return (_raise_keyboard_interrupt, ())


def _bad_error_records() -> dict[str, bytes]:
    return {
        "garbage": b"\x80\x05not a pickle",
        "not-a-dict": pickle.dumps([1, 2, 3]),
        "raises-systemexit": pickle.dumps(_Exit()),
        "raises-keyboardinterrupt": pickle.dumps(_Interrupt()),
        "record-fields-wrong": pickle.dumps({"kind": "user", "type": 5, "message": ["x"], "traceback": None, "exception": b"\x80garbage"}),
        "exception-raises-systemexit": pickle.dumps(
            {"kind": "user", "type": "X", "message": "m", "traceback": "", "exception": pickle.dumps(_Exit())}
        ),
        "empty": b"",
    }


def _bad_results() -> dict[str, bytes]:
    return {
        "raises-systemexit": b"\x00" + pickle.dumps(_Exit()),
        "raises-keyboardinterrupt": b"\x00" + pickle.dumps(_Interrupt()),
        "garbage": b"\x00\x80\x05garbage",
        "unknown-flavour": b"\x09abc",
        "empty": b"",
        "oob-truncated": b"\x02\x00\x00\x00\x05",
    }


def _answer_with(hub: Hub, kind: int, body: bytes, sync: bool) -> BaseException:
    """Make a call of model ``evil``; the fake worker answers it with ``body``;
    return what the caller raised."""
    sock = join_fake_worker(hub)
    try:
        reader = p.FrameReader(1 << 20)
        if sync:
            fut = hub.submit(1, gibbs_model=EVIL)
        else:
            fut = None
        box: list[BaseException] = []

        async def call() -> None:
            try:
                await hub.request(1, gibbs_model=EVIL)
            except BaseException as exc:  # noqa: BLE001 - what the caller sees is the point
                box.append(exc)

        async def main() -> None:
            task = asyncio.ensure_future(call()) if fut is None else None
            loop = asyncio.get_running_loop()
            _, req_id, _ = await loop.run_in_executor(None, read_frame, sock, reader, p.REQUEST)
            await loop.run_in_executor(None, sock.sendall, frame(kind, req_id, body))
            if task is not None:
                await task

        run(main())
        if fut is not None:
            try:
                fut.result(timeout=30)
            except BaseException as exc:  # noqa: BLE001
                box.append(exc)
        assert box, "the call succeeded"
        return box[0]
    finally:
        sock.close()


@pytest.mark.parametrize("sync", [False, True], ids=["request", "submit"])
@pytest.mark.parametrize("case", list(_bad_error_records()))
def test_a_bad_error_record_reaches_the_caller_as_a_serialization_error(hubs: dict[str, Hub], case: str, sync: bool) -> None:
    hub = hubs["thread"]
    exc = _answer_with(hub, p.ERROR, _bad_error_records()[case], sync)
    assert isinstance(exc, GibbsError), f"{type(exc).__name__}: {exc}"
    if case not in ("record-fields-wrong", "exception-raises-systemexit"):
        assert isinstance(exc, SerializationError), f"{type(exc).__name__}: {exc}"
    if case in ("garbage", "raises-systemexit", "raises-keyboardinterrupt", "empty"):
        assert exc.__cause__ is not None  # the unpickling error, chained
    serving(hub)


@pytest.mark.parametrize("sync", [False, True], ids=["request", "submit"])
@pytest.mark.parametrize("case", list(_bad_results()))
def test_a_bad_result_reaches_the_caller_as_a_gibbs_error(hubs: dict[str, Hub], case: str, sync: bool) -> None:
    hub = hubs["thread"]
    exc = _answer_with(hub, p.RESULT, _bad_results()[case], sync)
    assert isinstance(exc, (SerializationError, ProtocolError)), f"{type(exc).__name__}: {exc}"
    assert exc.__cause__ is not None or isinstance(exc, ProtocolError)
    serving(hub)


def test_struct_error_never_leaves_the_parser() -> None:
    """The shared-memory header parser raises ProtocolError only."""
    cache = p.MappingCache()
    for body in BAD_SHM_BODIES.values():
        try:
            p.read_views(body, cache, readonly=True)
        except ProtocolError:
            pass
        except FileNotFoundError:
            assert body == BAD_SHM_BODIES["no-such-segment"]
    with pytest.raises(ProtocolError):
        p.read_copy(b"\x01", cache)
    with pytest.raises(ProtocolError):
        p.decode(b"\x01" + struct.pack("!H", 3))


# ------------------------------------------------------------------ a live fuzz, in each reading mode


def _random_frame(rng: random.Random) -> bytes:
    kind = rng.choice(sorted(p.KIND_NAMES) + [0, 99, 255])
    pick = rng.random()
    if pick < 0.3:
        body = rng.choice(list(BAD_SHM_BODIES.values()))
    elif pick < 0.5:
        body = rng.randbytes(rng.randrange(0, 64))
    elif pick < 0.6:
        body = b"\x02" + rng.randbytes(rng.randrange(0, 32))  # out-of-band flavour
    else:
        body = b""
    if pick > 0.9:  # a lying length
        return p.HEADER.pack(kind, rng.randrange(2**64), rng.randrange(2**32)) + body
    return p.HEADER.pack(kind, rng.randrange(4), len(body)) + body


def _fuzz_once(hub: Hub, rng: random.Random) -> None:
    stage = rng.random()
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    try:
        if stage < 0.2:  # before the handshake
            send_quietly(sock, rng.randbytes(rng.randrange(1, 200)))
            return
        t.client_handshake(sock, KEY)
        if stage < 0.5:  # a HELLO with one field wrong
            info = hello_info(model=EVIL)
            info.update(rng.choice(list(BAD_HELLOS.values())))
            send_quietly(sock, _json(info))
            return
        send_quietly(sock, p.pack_json(p.HELLO, hello_info(model=EVIL)))
        time.sleep(0.02)  # joined: now the frames of a worker
        for _ in range(rng.randrange(1, 6)):
            send_quietly(sock, _random_frame(rng))
    except (OSError, ProtocolError):
        pass  # the hub hung up on us: allowed
    finally:
        sock.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_live_hub_fuzzed_keeps_answering_correctly(hubs: dict[str, Hub], mode: str) -> None:
    """Random and broken frames from peers with the key, for a few seconds,
    while the real worker answers: every answer is right, the hub's bridge
    thread lives, and in "loop" mode the event loop still reads."""
    hub = hubs[mode]
    bridge = hub._bridge
    assert bridge is not None
    rng = random.Random(f"live-fuzz-{mode}")
    stop = threading.Event()
    attempts = [0]

    def fuzz() -> None:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            _fuzz_once(hub, rng)
            attempts[0] += 1
        stop.set()

    async def main() -> int:
        assert await hub.request(2) == 4
        if mode == "loop":
            assert wait_until(lambda: bridge.loop_reads() >= 1, 5)
        loop = asyncio.get_running_loop()
        fuzzing = loop.run_in_executor(None, fuzz)
        answered = 0
        while not stop.is_set():
            xs = list(range(answered, answered + 8))
            assert await asyncio.gather(*(hub.request(x) for x in xs)) == [x * x for x in xs]
            answered += 8
        await fuzzing
        return answered

    answered = run(main())
    assert answered > 0 and attempts[0] > 20
    serving(hub)


# ------------------------------------------------------------------ a peer's claimed pid is not its identity


def _answer_segments(pid: int) -> list[str]:
    return shm_files(f"gibbs-w{pid}-")


def test_a_peer_claiming_a_local_workers_pid_cannot_remove_its_shared_memory(make_hub, make_workers) -> None:
    np = pytest.importorskip("numpy")
    from gibbs_test_models import Identity

    hub = make_hub(authkey=KEY)
    (w,) = make_workers(hub, Identity, 1, gibbs_authkey=KEY)
    hub.wait_for_workers_sync(1, timeout=30)
    a = np.arange(1 << 19, dtype=np.float64)
    np.testing.assert_array_equal(hub.submit(a).result(timeout=30), a)
    assert _answer_segments(w.pid), "the worker answered without shared memory"
    # Over TCP, the kernel vouches for nothing: the HELLO claims the worker's pid.
    sock = authenticated(hub.port)
    send_quietly(sock, p.pack_json(p.HELLO, hello_info(pid=w.pid, shm=True)))
    closed_by_hub(sock, within=2)
    assert wait_until(lambda: workers_of(hub) == 1, 10)
    time.sleep(1.0)  # had it joined, its loss (which waits up to 0.5 s for an exit status) is handled by now
    assert _answer_segments(w.pid), "the hub removed another worker's shared-memory files"
    for _ in range(5):
        np.testing.assert_array_equal(hub.submit(a).result(timeout=30), a)


def test_a_peer_naming_another_workers_segment_is_dropped(make_hub, make_workers) -> None:
    np = pytest.importorskip("numpy")
    from gibbs_test_models import Identity

    hub = make_hub(authkey=KEY)
    (w,) = make_workers(hub, Identity, 1, gibbs_authkey=KEY)
    hub.wait_for_workers_sync(1, timeout=30)
    a = np.arange(1 << 19, dtype=np.float64)
    np.testing.assert_array_equal(hub.submit(a).result(timeout=30), a)
    (theirs, *_) = _answer_segments(w.pid)
    sock = join_fake_worker(hub, shm=True)
    name = theirs.encode()
    body = b"\x01" + p.SHM_HEAD.pack(len(name), 1) + name + p.SHM_BUF.pack(0, 8) + b"\x00" + pickle.dumps(None)
    send_quietly(sock, frame(p.RESULT, 1, body))
    assert closed_by_hub(sock), "the hub read a segment of another worker for this peer"
    assert _answer_segments(w.pid)
    np.testing.assert_array_equal(hub.submit(a).result(timeout=30), a)


def test_an_answer_whose_segment_is_gone_is_sent_again_not_failed(make_hub, make_workers) -> None:
    """A worker that took its hub for lost lets go of its segments, one of
    them holding an answer it had sent: the hub cannot read that answer.
    The answer is lost, not the call: that worker is dropped and the call
    goes to another worker (promise 1), instead of failing its caller."""
    from gibbs_test_models import Identity

    hub = make_hub(authkey=KEY)
    sock = join_fake_worker(hub, shm=True)
    future = hub.submit("again", gibbs_model=EVIL)
    reader = p.FrameReader(1 << 20)
    sock.settimeout(10)
    kind, req_id, _ = read_frame(sock, reader, p.REQUEST)
    name = f"{p.SHM_PREFIX}w{hello_info()['pid']}-gone".encode()  # its own name; no such file
    body = b"\x01" + p.SHM_HEAD.pack(len(name), 1) + name + p.SHM_BUF.pack(0, 8) + b"\x00" + pickle.dumps(None)
    send_quietly(sock, frame(p.RESULT, req_id, body))
    assert closed_by_hub(sock), "the hub kept a worker whose answer it could not read"
    assert not future.done(), f"the call was failed instead of sent again: {future.exception(0)!r}"
    make_workers(hub, Identity, 1, gibbs_authkey=KEY, gibbs_model=EVIL)
    assert future.result(timeout=30) == "again"
    assert hub.statistics()["worker_deaths"] >= 1  # the fake worker's loss, which sent the call again


# ------------------------------------------------------------------ handshakes that cannot starve workers


def test_a_flood_of_unauthenticated_tcp_connections_does_not_hold_out_a_local_worker(make_hub, make_workers) -> None:
    """Strangers keep every TCP handshake slot full (each silent until the hub
    cuts it off); a worker on the local socket still joins, at once."""
    hub = make_hub(authkey=KEY, handshake_timeout=30.0)
    stop = threading.Event()
    held: list[socket.socket] = []

    def flood() -> None:
        while not stop.is_set():
            while len(held) < 150 and not stop.is_set():
                try:
                    held.append(socket.create_connection(("127.0.0.1", hub.port), timeout=2))
                except OSError:
                    break
            time.sleep(0.05)

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    try:
        assert wait_until(lambda: len(held) >= 100, 10)
        make_workers(hub, Square, 1, gibbs_authkey=KEY)
        hub.wait_for_workers_sync(1, timeout=15)  # before: held out as long as the flood went on
        assert hub.submit(5).result(timeout=30) == 25
    finally:
        stop.set()
        th.join(10)
        for s in held:
            s.close()


def test_unauthenticated_connections_have_a_short_deadline(make_hub) -> None:
    hub = make_hub(authkey=KEY, handshake_timeout=30.0)
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
    t0 = time.monotonic()
    assert closed_by_hub(sock, within=15), "a silent stranger kept its slot"
    assert time.monotonic() - t0 < 15  # well under the 30 s an authenticated peer has for its HELLO


def test_one_source_cannot_take_every_handshake_slot(make_hub) -> None:
    hub = make_hub(authkey=KEY, handshake_timeout=30.0)
    socks = [socket.create_connection(("127.0.0.1", hub.port), timeout=5) for _ in range(30)]
    try:
        refused = sum(closed_by_hub(s, within=0.5) for s in socks)  # closes each: the slots free up after
        assert refused >= 30 - 8 - 2, f"only {refused} of 30 silent connections from one address were refused"
    finally:
        for s in socks:
            s.close()


def test_loading_connections_are_counted_and_need_no_thread_each(make_hub) -> None:
    hub = make_hub(authkey=KEY)
    bridge = hub._bridge
    assert bridge is not None
    before = threading.active_count()
    socks = []
    try:
        for i in range(120):
            s = authenticated(hub.port)
            s.sendall(p.pack_json(p.LOADING, {"pid": 1000 + i, "host": "fake", "name": f"l{i}", "model": EVIL}))
            socks.append(s)
        assert wait_until(lambda: len(bridge.loading()) == 120, 15)
        assert threading.active_count() - before < 20, "a thread per LOADING connection"
        for s in socks[:60]:
            s.close()
        assert wait_until(lambda: len(bridge.loading()) == 60, 10)
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: bridge.loading() == [], 10)


def test_bytes_buffered_from_all_peers_together_are_bounded(make_hub, make_workers) -> None:
    """Each peer stays under the frame limit, together they would not: the
    one holding the most is dropped, the hub serves on."""
    limit = 1 << 20
    hub = make_hub(authkey=KEY, max_frame_bytes=limit)
    make_workers(hub, Square, 1, gibbs_authkey=KEY)
    hub.wait_for_workers_sync(1, timeout=30)
    socks = [join_fake_worker(hub) for _ in range(3)]
    try:
        part = limit - 1000
        for i, s in enumerate(socks):  # three frames begun, never finished: 3 MiB held, over the 2 MiB bound
            s.sendall(p.HEADER.pack(p.RESULT, 1, limit) + b"x" * (part - i * 1000))
        closed = [closed_by_hub(s, within=3) for s in socks]
        # One is dropped (the one holding the most when the bound was passed:
        # which, depends on how far the hub had read each), and that is enough.
        assert sum(closed) == 1, closed
        assert hub.submit(6).result(timeout=30) == 36
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ the local socket's name taken by another user

_SQUATTER = """
import os, socket, sys, time
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0gibbs-" + sys.argv[1])
s.listen(64)
print("ready", flush=True)
held = []
while True:
    held.append(s.accept()[0])  # and never says a word
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def squatter() -> Iterator[int]:
    """A process of another user holding the local socket name of a free port."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root, to run a process as another user")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SQUATTER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def test_a_local_socket_name_taken_by_another_user_is_refused_on_both_sides(
    squatter: int, make_hub, make_workers, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gibbs"):
        hub = make_hub(authkey=KEY, port=squatter)
        assert any("held by another user" in r.getMessage() for r in caplog.records), "the hub said nothing"
    make_workers(hub, Square, 1, gibbs_authkey=KEY)  # connects over TCP, not to the squatter
    hub.wait_for_workers_sync(1, timeout=20)
    assert hub.submit(9).result(timeout=30) == 81
    assert hub.workers()[0]["address"] != "local socket"


# ------------------------------------------------------------------ roles are privileges

OBSERVER_KEY = b"observer-only-key"
WORKER_KEY = b"worker-only-key"


def _try_role(port: int, key: bytes, kind: int, info: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    t.client_handshake(sock, key)
    sock.sendall(p.pack_json(kind, info))
    return sock


def _stats_of(sock: socket.socket) -> dict[str, Any]:
    sock.sendall(frame(p.STATS, 0))
    reader = p.FrameReader(1 << 20)
    _, _, body = read_frame(sock, reader, p.STATS)
    return p.unpack_json(body)


def test_a_key_limited_to_observing_or_serving_gives_no_other_role(make_hub, make_workers) -> None:
    hub = make_hub(authkey=KEY, observer_key=OBSERVER_KEY, worker_key=WORKER_KEY)
    make_workers(hub, Square, 1, gibbs_authkey=WORKER_KEY)  # a worker key serves
    hub.wait_for_workers_sync(1, timeout=30)
    assert hub.submit(3).result(timeout=30) == 9

    observer = _try_role(hub.port, OBSERVER_KEY, p.HELLO, hello_info(role="observer", name="status"))
    try:
        assert _stats_of(observer)["statistics"]["workers"] == 1  # an observer key observes
    finally:
        observer.close()
    refused = {
        "observer key as client": (OBSERVER_KEY, p.HELLO, hello_info(role="client")),
        "observer key as worker": (OBSERVER_KEY, p.HELLO, hello_info(model=EVIL)),
        "observer key loading": (OBSERVER_KEY, p.LOADING, hello_info(model=EVIL)),
        "worker key as client": (WORKER_KEY, p.HELLO, hello_info(role="client")),
        "worker key as observer": (WORKER_KEY, p.HELLO, hello_info(role="observer")),
    }
    for what, (key, kind, info) in refused.items():
        assert closed_by_hub(_try_role(hub.port, key, kind, info)), f"{what}: let in"
    assert workers_of(hub) == 1
    assert not [w for w in hub.workers() if w["state"] == "loading"]
    # The hub's own key still gives every role.
    full = _try_role(hub.port, KEY, p.HELLO, hello_info(role="observer", name="status"))
    try:
        assert _stats_of(full)["statistics"]["workers"] == 1
    finally:
        full.close()
    assert hub.submit(4).result(timeout=30) == 16


def test_limited_keys_must_differ_from_the_hubs() -> None:
    with pytest.raises(ValueError):
        Hub(port=0, authkey=KEY, observer_key=KEY)
    with pytest.raises(ValueError):
        Hub(port=0, authkey=KEY, observer_key=WORKER_KEY, worker_key=WORKER_KEY)


def test_the_limited_keys_example_runs() -> None:
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "limited_keys.py")
    env = dict(os.environ, HUB_PORT=str(_free_port()))
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "worker key: 49" in out.stdout
    assert 'gibbs status with the observer key: {"statistics"' in out.stdout


# ------------------------------------------------------------------ a bug met on a peer's bytes


@pytest.mark.parametrize("mode", MODES)
def test_a_bug_met_reading_one_peer_drops_that_peer_not_the_hub(
    hubs: dict[str, Hub], mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault put in the reading path (as a bug would be) for one body only:
    that peer is dropped with the traceback logged; the hub serves on, in
    either reading mode."""
    from gibbs import _reading

    hub = hubs[mode]
    real = _reading.Outcome

    def buggy(kind: Any, body: Any) -> Any:
        if isinstance(body, (bytes, bytearray)) and bytes(body[:4]) == b"\x00BUG":
            raise RuntimeError("a bug in the hub")
        return real(kind, body)

    monkeypatch.setattr(_reading, "Outcome", buggy)  # what the read of an answer makes of its body

    def attack() -> None:
        sock = join_fake_worker(hub)
        send_quietly(sock, frame(p.RESULT, 1, b"\x00BUG"))
        assert closed_by_hub(sock), "the peer whose bytes met the bug was kept"

    with caplog.at_level(logging.ERROR, logger="gibbs"):
        in_mode(hub, mode, attack)
    assert any("internal error reading" in r.getMessage() and r.exc_info for r in caplog.records)
