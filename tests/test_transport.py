"""transport.py: addresses, keys, and the HMAC handshake (over socket pairs, one side per thread)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import threading
from typing import Any, Callable

import pytest

from gibbs import AuthenticationError, ProtocolError
from gibbs import transport as t

# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:5019", ("127.0.0.1", 5019)),
        ("localhost:80", ("localhost", 80)),
        ("example.com", ("example.com", t.DEFAULT_PORT)),
        ("  10.0.0.1:1234  ", ("10.0.0.1", 1234)),
        ("[::1]:6000", ("::1", 6000)),
        ("[::1]", ("::1", t.DEFAULT_PORT)),
        ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
        ("::1", ("::1", t.DEFAULT_PORT)),  # a bare IPv6 address: no port
        ("h:65535", ("h", 65535)),
        ("h:1", ("h", 1)),
        ("h:", ("h", t.DEFAULT_PORT)),  # an empty port means the default
    ],
)
def test_parse_address_good(text: str, expected: tuple[str, int]) -> None:
    assert t.parse_address(text) == expected


def test_parse_address_default_port() -> None:
    assert t.parse_address("somehost", default_port=9) == ("somehost", 9)


@pytest.mark.parametrize(
    "text",
    ["", "   ", ":5019", "host:abc", "host:0", "host:65536", "host:-1", "[::1", "[]:80", "[::1]:x", "h:1.5"],
)
def test_parse_address_bad(text: str) -> None:
    with pytest.raises(ValueError):
        t.parse_address(text)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_is_loopback_true(host: str) -> None:
    assert t.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "192.168.1.1", "8.8.8.8", "::", "no-such-host.invalid"])
def test_is_loopback_false(host: str) -> None:
    assert not t.is_loopback(host)


def test_describe() -> None:
    assert t.describe(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert t.describe(("::1", 80, 0, 0)) == "[::1]:80"
    assert t.describe("/tmp/sock") == "/tmp/sock"


# ------------------------------------------------------------------ keys


def test_resolve_authkey_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(t.AUTHKEY_ENV, "from-env")
    assert t.resolve_authkey(b"from-arg") == (b"from-arg", True)
    assert t.resolve_authkey("str-key") == (b"str-key", True)
    assert t.resolve_authkey(bytearray(b"ba")) == (b"ba", True)


def test_resolve_authkey_env_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(t.AUTHKEY_ENV, "from-env")
    assert t.resolve_authkey(None) == (b"from-env", True)


def test_resolve_authkey_process_key_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(t.AUTHKEY_ENV, raising=False)
    key, explicit = t.resolve_authkey(None)
    assert key == bytes(multiprocessing.current_process().authkey)
    assert explicit is False
    monkeypatch.setenv(t.AUTHKEY_ENV, "")  # empty: as if unset
    assert t.resolve_authkey(None) == (key, False)


@pytest.mark.parametrize("empty", [b"", ""])
def test_resolve_authkey_refuses_an_empty_key(empty: Any) -> None:
    with pytest.raises(ValueError):
        t.resolve_authkey(empty)


# ------------------------------------------------------------------ handshake


def _both_sides(
    server: Callable[[socket.socket], Any], client: Callable[[socket.socket], Any], timeout: float = 5.0
) -> tuple[Any, Any]:
    """Run ``server`` and ``client`` on the two ends of a socket pair, each in
    its own thread; return what each returned or raised."""
    a, b = socket.socketpair()
    a.settimeout(timeout)
    b.settimeout(timeout)
    results: dict[str, Any] = {}

    def side(name: str, fn: Callable[[socket.socket], Any], sock: socket.socket) -> None:
        try:
            results[name] = fn(sock)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[name] = exc
        finally:
            # Like a real peer: once done (or failed), the connection goes away.
            if isinstance(results.get(name), BaseException):
                sock.close()

    threads = [
        threading.Thread(target=side, args=("server", server, a), daemon=True),
        threading.Thread(target=side, args=("client", client, b), daemon=True),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout * 3)
        assert not th.is_alive(), "handshake hung"
    a.close()
    b.close()
    return results["server"], results["client"]


def test_handshake_with_matching_keys() -> None:
    key = os.urandom(32)
    server, client = _both_sides(lambda s: t.server_handshake(s, key), lambda s: t.client_handshake(s, key))
    assert server is False and client is False  # by key, not by user id


def test_handshake_then_data_flows() -> None:
    key = b"shared"

    def server(s: socket.socket) -> bytes:
        t.server_handshake(s, key)
        return t.recv_exact(s, 5)

    def client(s: socket.socket) -> None:
        t.client_handshake(s, key)
        s.sendall(b"hello")

    assert _both_sides(server, client) == (b"hello", None)


def test_handshake_with_wrong_key_fails_on_both_sides() -> None:
    server, client = _both_sides(
        lambda s: t.server_handshake(s, b"hub-key"), lambda s: t.client_handshake(s, b"other-key")
    )
    assert isinstance(server, AuthenticationError), server
    assert isinstance(client, AuthenticationError), client


def test_a_hub_answer_cannot_be_replayed_as_a_worker_answer() -> None:
    # The role tag is part of the digest: proving the key as a hub is not
    # proving it as a worker.
    nonce = os.urandom(32)
    assert t._digest(b"k", t.ROLE_HUB, nonce) != t._digest(b"k", t.ROLE_WORKER, nonce)

    def replaying_client(s: socket.socket) -> None:
        message = t._recv_small(s)
        t._send_small(s, t._digest(b"k", t.ROLE_HUB, message[len(t._CHALLENGE) :]))
        t._recv_small(s)

    server, _ = _both_sides(lambda s: t.server_handshake(s, b"k"), replaying_client)
    assert isinstance(server, AuthenticationError)


def _send_raw(data: bytes) -> Callable[[socket.socket], None]:
    def peer(s: socket.socket) -> None:
        s.sendall(data)
        try:
            while s.recv(4096):  # read whatever comes back until the other side closes
                pass
        except OSError:
            pass

    return peer


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff" + b"x" * 100,  # announces 65535 bytes: over the cap
        struct.pack("!H", t._SMALL_MAX + 1) + b"x" * (t._SMALL_MAX + 1),
    ],
    ids=["huge", "just-over-cap"],
)
def test_server_refuses_oversized_handshake_message(garbage: bytes) -> None:
    server, _ = _both_sides(lambda s: t.server_handshake(s, b"k"), _send_raw(garbage))
    assert isinstance(server, ProtocolError), server


def test_server_refuses_garbage_answer() -> None:
    garbage = struct.pack("!H", 32) + os.urandom(32)  # well formed, wrong digest
    server, _ = _both_sides(lambda s: t.server_handshake(s, b"k"), _send_raw(garbage))
    assert isinstance(server, AuthenticationError), server


def test_server_sees_peer_closing_mid_handshake() -> None:
    def half_answer_then_close(s: socket.socket) -> None:
        t._recv_small(s)
        s.sendall(b"\x00\x20abc")  # announces 32 bytes, sends 3, hangs up
        s.shutdown(socket.SHUT_WR)

    server, _ = _both_sides(lambda s: t.server_handshake(s, b"k"), half_answer_then_close)
    assert isinstance(server, ConnectionResetError), server


def test_server_times_out_on_a_silent_peer() -> None:
    def silent(s: socket.socket) -> None:
        while s.recv(4096):  # reads the challenge, answers nothing, until the server hangs up
            pass

    server, _ = _both_sides(lambda s: _with_timeout(s, 0.3, t.server_handshake, b"k"), silent)
    assert isinstance(server, socket.timeout), server


def _with_timeout(s: socket.socket, timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
    s.settimeout(timeout)
    return fn(s, *args)


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("!H", 5) + b"hello",  # not a challenge
        struct.pack("!H", len(t._CHALLENGE) + 3) + t._CHALLENGE + b"abc",  # a challenge with a short nonce
        b"\xff\xff" + b"x" * 10,  # oversized
        b"HTTP/1.1 200 OK\r\n\r\n",  # not gibbs at all
    ],
    ids=["not-a-challenge", "short-nonce", "oversized", "http"],
)
def test_client_refuses_a_peer_that_is_not_a_gibbs_hub(garbage: bytes) -> None:
    _, client = _both_sides(_send_raw(garbage), lambda s: t.client_handshake(s, b"k"))
    assert isinstance(client, ProtocolError), client


def test_client_sees_rejection_verdict() -> None:
    def hub_that_rejects(s: socket.socket) -> None:
        t._send_small(s, t._CHALLENGE + os.urandom(t._NONCE_SIZE))
        t._recv_small(s)
        t._send_small(s, t._FAILURE)

    _, client = _both_sides(hub_that_rejects, lambda s: t.client_handshake(s, b"k"))
    assert isinstance(client, AuthenticationError)
    assert t.AUTHKEY_ENV in str(client)


def test_recv_exact_raises_on_early_end() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"abc")
        b.close()
        with pytest.raises(ConnectionResetError):
            t.recv_exact(a, 10)


# ------------------------------------------------------------------ sockets


def test_listen_connect_tune() -> None:
    listener = t.listen("127.0.0.1", 0)
    with listener:
        port = listener.getsockname()[1]
        client = t.connect("127.0.0.1", port, timeout=5)
        with client:
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            server, _ = listener.accept()
            with server:
                t.tune(server)
                assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


def test_listen_on_a_busy_port_raises_and_leaks_nothing() -> None:
    first = t.listen("127.0.0.1", 0)
    with first:
        port = first.getsockname()[1]
        before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        with pytest.raises(OSError):
            t.listen("127.0.0.1", port)
        if before is not None:
            assert len(os.listdir("/proc/self/fd")) == before


def test_tune_on_a_unix_socket_is_a_no_op() -> None:
    a, b = socket.socketpair()
    with a, b:
        t.tune(a)
