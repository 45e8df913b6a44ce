"""The driver's small units, each through its own interface: no hub, no
process, no socket but a pipe."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from gibbs._loans import LoanBook


class _Peer:  # the loan book only carries its peer back
    pass


def _views(n: int, size: int) -> list[memoryview]:
    return [memoryview(bytearray(size)) for _ in range(n)]


def test_a_segment_goes_back_when_its_last_buffer_is_freed() -> None:
    woken: list[int] = []
    book = LoanBook(1000, lambda: woken.append(1))
    peer: Any = _Peer()
    lent = book.lend(peer, "seg-a", 300, _views(2, 100))
    assert lent is not None and len(lent) == 2
    assert book.snapshot()["lent"] == 1 and book.snapshot()["lent_bytes"] == 300
    first = lent.pop()
    del first
    gc.collect()
    assert not book.has_returns() and not woken  # one buffer of the segment is still held
    lent.clear()
    gc.collect()
    assert book.has_returns() and woken
    assert book.take_back() == [(peer, "seg-a")]
    assert book.take_back() == []
    snap = book.snapshot()
    assert (snap["lent"], snap["lent_bytes"], snap["answers_lent"], snap["answers_copied"]) == (0, 0, 1, 0)


def test_over_the_limit_an_answer_is_copied_not_lent() -> None:
    book = LoanBook(500, lambda: None)
    peer: Any = _Peer()
    held = book.lend(peer, "seg-a", 400, _views(1, 10))
    assert held is not None
    assert book.lend(peer, "seg-b", 200, _views(1, 10)) is None  # 600 > 500: the caller copies
    assert book.snapshot()["answers_copied"] == 1
    del held
    gc.collect()
    assert book.lend(peer, "seg-b", 200, _views(1, 10)) is not None  # room again


def test_after_close_a_freed_answer_wakes_nobody() -> None:
    woken: list[int] = []
    book = LoanBook(1000, lambda: woken.append(1))
    lent = book.lend(_Peer(), "seg-a", 10, _views(1, 10))  # type: ignore[arg-type]
    book.close()
    del lent
    gc.collect()
    assert not woken and book.take_back() == [] and book.snapshot()["lent"] == 0
    assert book.lend(_Peer(), "seg-b", 10, _views(1, 10)) is None  # type: ignore[arg-type]


def test_hub_options_name_the_field_that_is_wrong() -> None:
    import math

    from gibbs._options import HubOptions

    ok = HubOptions(heartbeat_interval=2, app="x")
    assert ok.heartbeat_interval == 2.0 and isinstance(ok.heartbeat_interval, float)
    bad = {
        "heartbeat_interval": [0, -1, math.nan, "1"],
        "heartbeat_misses": [0, 1.5, True],
        "max_attempts": [0],
        "max_queued": [-1, "3"],
        "max_frame_bytes": [1023],
        "handshake_timeout": [0],
        "pipeline_depth": [0],
        "shm_threshold": [-1],
        "max_lent_bytes": [-1, 1.0],
        "close_grace": [-0.5],
        "no_worker_timeout": [0, -1],
        "app": ["", None],
    }
    for field, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=field):
                HubOptions(**{field: value})  # type: ignore[arg-type]


# ---------------------------------------------------------------- the door, with sockets and no process


_made: list[Any] = []


def _bridge_for_door(app: str = "door-tests") -> Any:
    """A bridge whose thread never starts: only its door is driven."""
    from gibbs._options import HubOptions
    from gibbs.bridge import Bridge

    bridge = Bridge(
        [],
        authkey=b"door-key",
        options=HubOptions(app=app, handshake_timeout=5.0),
        shm_probe=None,
        deliver_async=lambda items: None,
        deliver_sync=lambda call, outcome: None,
    )
    _made.append(bridge)
    return bridge


@pytest.fixture(autouse=True)
def _close_bridges() -> Any:
    """Its descriptors (selector, wake-up pipe, sockets it holds) closed, whatever the test did."""
    yield
    while _made:
        _made.pop().forget_after_fork()


def _through_the_door(bridge: Any, client: Any) -> Any:
    """Accept one connection on a loopback listener, run ``client(port)``
    against it in a thread, and return what it returned (or raised)."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            got["value"] = client(port)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            got["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not bridge._door.handshaking and t.is_alive() and time.monotonic() < deadline:
        bridge._door.accept(listener)  # what the bridge thread does when the listener is readable
        time.sleep(0.005)
    t.join(10)
    listener.close()
    assert not t.is_alive()
    return got


def test_the_door_takes_a_worker_in_after_the_challenge_and_welcome() -> None:
    import json
    import time

    from gibbs import protocol
    from gibbs.transport import dial

    bridge = _bridge_for_door()

    def worker(port: int) -> Any:
        sock, welcome, _, _ = dial("127.0.0.1", port, b"door-key", True, 5.0)
        hello = {"pid": 4242, "host": "h", "name": "w", "heartbeat_interval": 1.0, "shm": False, "model": "m"}
        sock.sendall(protocol.pack_json(protocol.HELLO, hello))
        time.sleep(0.2)
        return sock, welcome

    got = _through_the_door(bridge, worker)
    sock, welcome = got["value"]
    assert welcome["app"] == "door-tests" and welcome["heartbeat_interval"] == 1.0
    assert welcome["request_ids"] == bridge.request_ids
    deadline = time.monotonic() + 5
    while not bridge._new_peers and time.monotonic() < deadline:
        time.sleep(0.01)
    (taken, hello, early, partial), = bridge._new_peers  # handed to the bridge thread to become a peer
    assert (hello.pid, hello.model, hello.role, early, partial) == (4242, "m", "worker", [], b"")
    assert not bridge._door.handshaking
    taken.close()
    sock.close()
    assert json.dumps(bridge.failures()) == "[]"


def test_the_door_refuses_a_wrong_key_and_says_why() -> None:
    from gibbs.errors import AuthenticationError
    from gibbs.transport import dial

    bridge = _bridge_for_door()
    got = _through_the_door(bridge, lambda port: dial("127.0.0.1", port, b"not-the-key", True, 5.0))
    assert isinstance(got.get("error"), (AuthenticationError, ConnectionError)), got
    import time

    deadline = time.monotonic() + 5
    while not bridge.failures() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge.failures() and "failed its handshake" in bridge.failures()[0]
    assert not bridge._new_peers and not bridge._door.handshaking


def test_the_door_refuses_a_client_hub_of_another_application() -> None:
    from gibbs import protocol
    from gibbs.transport import dial

    bridge = _bridge_for_door(app="ours")

    def client(port: int) -> Any:
        sock, _, reader, _ = dial("127.0.0.1", port, b"door-key", True, 5.0)
        hello = {"role": "client", "app": "theirs", "pid": 7, "host": "h", "name": "c", "heartbeat_interval": 1.0}
        sock.sendall(protocol.pack_json(protocol.HELLO, hello))
        frames: list[Any] = []
        while not frames:
            data = sock.recv(65536)
            if not data:
                break
            frames.extend(reader.feed(data))
        sock.close()
        return frames

    got = _through_the_door(bridge, client)
    (kind, _, body), = got["value"]
    assert kind == protocol.REFUSED and "another application" in protocol.unpack_json(body)["reason"]
    assert not bridge._new_peers


def test_the_door_lists_a_loading_worker_until_it_closes() -> None:
    import time

    from gibbs import protocol
    from gibbs.transport import dial

    bridge = _bridge_for_door()

    def loading(port: int) -> Any:
        sock, _, _, _ = dial("127.0.0.1", port, b"door-key", True, 5.0)
        sock.sendall(protocol.pack_json(protocol.LOADING, {"pid": 99, "host": "h", "name": "w", "model": "big"}))
        return sock

    sock = _through_the_door(bridge, loading)["value"]
    deadline = time.monotonic() + 5
    while not bridge.loading() and time.monotonic() < deadline:
        time.sleep(0.01)
    (entry,) = bridge.loading()
    assert (entry["pid"], entry["model"]) == (99, "big")
    assert bridge.statistics()["models"]["big"]["states"]["loading"] == 1
    sock.close()
    (held,) = list(bridge._door.loading_workers)
    bridge._door.end_loading(held)  # what the bridge thread does when it reads the end
    assert bridge.loading() == []


class _TrickleSocket:
    """Takes at most ``room`` bytes per write, then says it would block."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got = bytearray()
        self.blocked = False

    def _take(self, data: bytes) -> int:
        if self.blocked:
            raise BlockingIOError
        n = min(self.room, len(data))
        self.got += data[:n]
        self.blocked = n < len(data)
        return n

    def send(self, data: Any) -> int:
        return self._take(bytes(data))

    def sendmsg(self, buffers: list[Any]) -> int:
        return self._take(b"".join(bytes(b) for b in buffers))


@pytest.mark.parametrize("frames", [1, 5])
def test_a_write_that_takes_part_of_the_frames_keeps_the_rest_in_order(frames: int) -> None:
    import collections
    import types

    from gibbs import protocol

    bridge = _bridge_for_door()
    out: Any = collections.deque()
    sent = b""
    for i in range(frames):
        body = bytes([i]) * (10 + i)
        protocol.pack_frame_to(out, protocol.REQUEST, i, body)
        sent += b"".join(protocol.pack_frame(protocol.REQUEST, i, body))
    sock = _TrickleSocket(room=7)
    peer = types.SimpleNamespace(out=out, sock=sock, last_sent=0.0, want_write=False, gone=False, owner=None)
    with bridge._lock:
        bridge._flush_locked(peer)
        assert peer.want_write and out, "a partial write leaves the rest queued and asks to be told when to write"
        for _ in range(100):
            if not out:
                break
            sock.blocked = False  # writable again
            bridge._flush_locked(peer)
    assert not out and not peer.want_write
    assert bytes(sock.got) == sent
    reader = protocol.FrameReader()
    assert [(k, i) for k, i, _ in reader.feed(bytes(sock.got))] == [(protocol.REQUEST, i) for i in range(frames)]


def test_a_small_frame_is_one_buffer_and_a_large_one_is_not_copied() -> None:
    from gibbs import protocol

    small: list[Any] = []
    protocol.pack_frame_to(small, protocol.RESULT, 3, b"abc")
    assert small == [b"".join(protocol.pack_frame(protocol.RESULT, 3, b"abc"))]
    big_body = bytearray(protocol.JOIN_UNDER)
    big: list[Any] = []
    protocol.pack_frame_to(big, protocol.RESULT, 4, big_body)
    assert len(big) == 2 and big[1] is big_body


def test_empty_buffers_among_the_frames_never_make_a_write_of_nothing_loop() -> None:
    import collections
    import types

    bridge = _bridge_for_door()
    out: Any = collections.deque([b"", b"ab", b"", b"", b"cd", b""])
    sock = _TrickleSocket(room=1 << 20)
    peer = types.SimpleNamespace(out=out, sock=sock, last_sent=0.0, want_write=False, gone=False, owner=None)
    with bridge._lock:
        bridge._flush_locked(peer)
    assert not out and bytes(sock.got) == b"abcd"
    only_empty: Any = collections.deque([b"", b""])
    peer.out = only_empty
    with bridge._lock:
        bridge._flush_locked(peer)
    assert not only_empty
