"""Fuzzers of everything that parses a peer's bytes: the frame reader, the
payload and shared-memory headers, BATCH/FORWARD/CREDIT bodies, the JSON
control records (HELLO, LOADING, INIT_FAILED, WELCOME, EXC) and the HMAC
handshake. Each parser raises ProtocolError (the handshake also
AuthenticationError or a closed connection) and nothing else, whatever it
is fed; valid input still parses to what was sent. A few seconds in all.

The live-hub fuzz, in each reading mode, is in ``test_hostile_peers.py``.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gibbs import AuthenticationError, ProtocolError, records
from gibbs import protocol as p
from gibbs import transport as t
from gibbs.records import exc_from_json

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RECORDS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

kinds = st.sampled_from(sorted(p.KIND_NAMES))
frames = st.tuples(kinds, st.integers(0, 2**64 - 1), st.binary(max_size=300))


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in points + [len(data)]:
        out.append(data[last:c])
        last = c
    return out


@FAST
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
def test_frames_come_out_as_sent_however_the_bytes_are_split(sent: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    data = b"".join(b"".join(bytes(b) for b in p.pack_frame(k, r, body)) for k, r, body in sent)
    reader = p.FrameReader(1 << 16)
    got: list[tuple[int, int, bytes]] = []
    for piece in _splits(data, cuts):
        got.extend((k, r, bytes(b)) for k, r, b in reader.feed(piece))
    assert got == sent
    assert reader.pending == 0


@FAST
@given(st.lists(st.binary(max_size=200), max_size=6), st.integers(1024, 1 << 20))
def test_the_frame_reader_raises_protocol_error_only(chunks: list[bytes], limit: int) -> None:
    reader = p.FrameReader(limit)
    try:
        for c in chunks:
            for _kind, _rid, body in reader.feed(c):
                assert len(body) <= limit
    except ProtocolError:
        pass


def _shm_bodies() -> st.SearchStrategy[bytes]:
    name = st.one_of(st.binary(max_size=40), st.just(b"gibbs-"), st.binary(max_size=20).map(lambda b: b"gibbs-w1-" + b))
    head = st.builds(
        lambda n, name_len, count, bufs, rest: b"\x01" + p.SHM_HEAD.pack(name_len, count) + n + bufs + rest,
        name,
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=64),
        st.binary(max_size=16),
    )
    return st.one_of(head, st.binary(max_size=40).map(lambda b: b"\x01" + b))


@FAST
@given(_shm_bodies())
def test_shared_memory_headers_raise_protocol_error_only(body: bytes) -> None:
    cache = p.MappingCache()
    for read in (lambda: p.read_views(body, cache, readonly=True), lambda: p.read_copy(body, cache), lambda: p.map_payload(body)):
        try:
            read()
        except ProtocolError:
            pass
        except OSError:
            pass  # a well-formed header naming no file: that one answer fails, not the parser


@FAST
@given(st.binary(max_size=300))
def test_batch_forward_credit_and_out_of_band_bodies_raise_protocol_error_only(body: bytes) -> None:
    for parse in (
        lambda: p.unpack_batch(body),
        lambda: p.unpack_forward(body),
        lambda: p.unpack_credit(body),
        lambda: p.unpack_request_id(body),
        lambda: p._unpack_oob(b"\x02" + body),
    ):
        try:
            parse()
        except ProtocolError:
            pass


@FAST
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=50)), max_size=6))
def test_batches_come_out_as_packed(items: list[tuple[int, bytes]]) -> None:
    packed = b"".join(bytes(b) for b in p.pack_batch(items))
    (kind, n, length), body = p.HEADER.unpack_from(packed), packed[p.HEADER_SIZE :]
    assert kind == p.BATCH and n == len(items) and length == len(body)
    assert [(r, bytes(b)) for r, b in p.unpack_batch(body)] == items


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_HELLO_KEYS = [
    "pid", "host", "name", "role", "heartbeat_interval", "shm", "model", "cls",
    "batch_size", "batch_wait", "concurrency", "device", "token", "exc_type", "message", "traceback", "shm_probe",
]
control_objects = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(_HELLO_KEYS), json_values, max_size=len(_HELLO_KEYS)),
    st.fixed_dictionaries({"pid": st.integers(-5, 2**40), "host": st.text(max_size=5)}, optional={k: json_values for k in _HELLO_KEYS if k not in ("pid", "host")}),
)


@RECORDS
@given(control_objects)
def test_control_records_raise_protocol_error_only(obj: Any) -> None:
    for record in (records.Hello, records.Loading, records.InitFailed, records.Welcome):
        try:
            r = record.from_wire(obj)
        except ProtocolError:
            continue
        assert isinstance(obj, dict)
        for value in vars(r).values():  # what passed is what the hub expects
            assert isinstance(value, (int, float, str, bool, dict, type(None)))
        if isinstance(r, records.Hello):
            assert r.pid >= 1 and r.batch_size >= 1 and r.concurrency >= 1
            assert 0 < r.heartbeat_interval <= records.MAX_SECONDS and 0 <= r.batch_wait <= records.MAX_SECONDS
            assert r.role in records.ROLES


@RECORDS
@given(control_objects)
def test_an_exc_record_is_an_exception_or_a_protocol_error(obj: Any) -> None:
    try:
        got = exc_from_json(json.dumps(obj).encode())
    except ProtocolError:
        return
    assert got is None or isinstance(got, BaseException)


def test_an_overloaded_error_crosses_a_hub_with_its_fields() -> None:
    """A router's shed call reaches its client hub's caller as the same
    error: type, retry_after and reason (a web app answers 503 with
    Retry-After from them)."""
    from gibbs.errors import DeadlineExceededError, OverloadedError, QueueFullError
    from gibbs.records import exc_to_json

    for exc in (OverloadedError("busy", retry_after=1.5, reason="deadline"), QueueFullError("full", retry_after=0.25)):
        got = exc_from_json(exc_to_json(exc))
        assert type(got) is type(exc) and str(got) == str(exc)
        assert (got.retry_after, got.reason) == (exc.retry_after, exc.reason)  # type: ignore[union-attr]
    late = exc_from_json(exc_to_json(DeadlineExceededError("late", in_queue=False)))
    assert isinstance(late, DeadlineExceededError) and not late.in_queue
    for bad in ({"type": "OverloadedError", "retry_after": "soon"}, {"type": "OverloadedError", "reason": 3}):
        with pytest.raises(ProtocolError):
            exc_from_json(json.dumps(bad).encode())


@FAST
@given(st.binary(max_size=200))
def test_json_bodies_raise_protocol_error_only(body: bytes) -> None:
    try:
        assert isinstance(p.unpack_json(body), dict)
    except ProtocolError:
        pass


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        p.unpack_json(b"[" * 100_000)


def test_a_worker_hello_passes_the_checks() -> None:
    h = records.Hello.from_wire(
        {"pid": 12, "host": "h", "name": "n", "heartbeat_interval": 0.5, "shm": True, "model": "m", "cls": "C",
         "batch_size": 8, "batch_wait": 0.002, "concurrency": 1, "device": None, "token": "abc"}
    )
    assert (h.pid, h.batch_size, h.token, h.device, h.role) == (12, 8, "abc", None, "worker")


_HANDSHAKE_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


_small = st.builds(
    lambda head, rest: struct.pack("!H", len(head + rest)) + head + rest,
    st.sampled_from([t._CHALLENGE, t._SAME_USER, t._SAME_USER_OK, t._USE_KEY, t._WELCOME, t._FAILURE, b""]),
    st.binary(max_size=40),
)


@_HANDSHAKE_FUZZ
@given(st.lists(st.one_of(st.binary(max_size=80), _small), max_size=4), st.booleans())
def test_the_handshake_raises_only_authentication_or_protocol_errors(replies: list[bytes], server: bool) -> None:
    """Either side of the handshake, fed bytes from a peer that does not know the key."""
    ours, theirs = socket.socketpair()
    ours.settimeout(2)
    theirs.settimeout(2)

    def peer() -> None:
        try:
            theirs.sendall(b"".join(replies))
            theirs.shutdown(socket.SHUT_WR)  # then the end: the handshake must not wait for more
            while theirs.recv(4096):
                pass
        except OSError:
            pass
        finally:
            theirs.close()

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    try:
        (t.server_handshake if server else t.client_handshake)(ours, b"the-key", True)
        raise AssertionError("random bytes passed the handshake")
    except (ProtocolError, AuthenticationError, ConnectionError, socket.timeout):
        pass
    finally:
        ours.close()
        th.join(5)
