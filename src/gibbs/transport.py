"""Addresses, keys, sockets and the HMAC handshake.

Every TCP connection between a hub and a worker starts with a mutual
challenge-response over HMAC-SHA256, the scheme of
``multiprocessing.connection``: the hub challenges the worker, then the worker
challenges the hub. Handshake messages are tiny length-prefixed byte strings
read with a deadline and a size cap; nothing is unpickled before both sides
have proven they hold the key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import multiprocessing
import os
import shlex
import socket
import struct
import sys
from typing import TYPE_CHECKING, Optional, Sequence, Union

if TYPE_CHECKING:
    import ssl

from . import protocol
from .errors import AuthenticationError, ProtocolError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5019
AUTHKEY_ENV = "GIBBS_AUTHKEY"
PORT_ENV = "GIBBS_PORT"
APP_ENV = "GIBBS_APP"
#: "0": connect over TCP even to a hub on this machine (not its local socket).
LOCAL_SOCKET_ENV = "GIBBS_LOCAL_SOCKET"
#: The application name of a hub that routes for client hubs of any
#: application (``python -m gibbs hub``).
ANY_APP = "*"

_logger = logging.getLogger("gibbs")

_CHALLENGE = b"#GIBBS-CHALLENGE#"
_SAME_USER = b"#GIBBS-SAME-USER#"  # server: "the kernel says you are my user; keys needed?"
_SAME_USER_OK = b"#GIBBS-SAME-USER-OK#"  # client: "and you are mine: no key needed"
_USE_KEY = b"#GIBBS-USE-KEY#"  # client: "I hold an explicit key: challenge me"
_WELCOME = b"#GIBBS-WELCOME#"
_FAILURE = b"#GIBBS-FAILURE#"
_NONCE_SIZE = 32
_SMALL = struct.Struct("!H")
_SMALL_MAX = 256

KeyLike = Union[bytes, str, None]


def resolve_authkey(authkey: KeyLike) -> tuple[bytes, bool]:
    """The key to use and whether it was given explicitly.

    Order: the argument, then ``GIBBS_AUTHKEY``, then the process authkey that
    multiprocessing children inherit from their parent (so processes descended
    from one parent need no configuration).
    """
    if authkey is not None:
        key = authkey.encode() if isinstance(authkey, str) else bytes(authkey)
        if not key:
            raise ValueError("authkey must not be empty")
        return key, True
    env = os.environ.get(AUTHKEY_ENV)
    if env:
        return env.encode(), True
    return bytes(multiprocessing.current_process().authkey), False


def default_port() -> int:
    """The port hubs and workers use when none is given: ``GIBBS_PORT``, else 5019."""
    text = os.environ.get(PORT_ENV)
    if not text:
        return DEFAULT_PORT
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"{PORT_ENV}={text!r} is not a TCP port number")
    return port


def default_app() -> str:
    """What makes the processes of one application one: ``GIBBS_APP`` when
    set, else the program (its command line and working directory).

    The web processes of ``gunicorn -w N`` or ``uvicorn --workers N`` share
    their command line and directory (forked, or spawned with the parent's
    ``sys.argv``): they find each other's hub and form one family. Two
    different programs of one user on one machine do not: the second cannot
    join the first's hub by accident, and is told to use another address.
    """
    name = os.environ.get(APP_ENV)
    if name:
        return name[:200]
    argv = list(sys.argv) or [""]
    prog = argv[0]
    if prog and prog not in ("-c", "-m") and os.path.exists(prog):
        prog = os.path.abspath(prog)
    try:
        where = os.getcwd()
    except OSError:
        where = "?"
    text = f"{shlex.join([prog, *argv[1:]])} (in {where})"
    return text if len(text) <= 400 else text[:397] + "..."


OBSERVER_KEY_ENV = "GIBBS_OBSERVER_KEY"
WORKER_KEY_ENV = "GIBBS_WORKER_KEY"


def limited_keys(observer_key: KeyLike, worker_key: KeyLike, full_key: bytes) -> list[tuple[str, bytes]]:
    """(role, key) pairs of the keys that give one role only: the arguments,
    else ``GIBBS_OBSERVER_KEY`` and ``GIBBS_WORKER_KEY``. Each must differ
    from the hub's key and from the other."""
    out: list[tuple[str, bytes]] = []
    for role, given, env in (("observer", observer_key, OBSERVER_KEY_ENV), ("worker", worker_key, WORKER_KEY_ENV)):
        value: KeyLike = given if given is not None else (os.environ.get(env) or None)
        if value is None:
            continue
        key = value.encode() if isinstance(value, str) else bytes(value)
        if not key:
            raise ValueError(f"the {role} key must not be empty")
        if key == full_key or any(key == k for _, k in out):
            raise ValueError(f"the {role} key must differ from the hub's key and from the other limited key")
        out.append((role, key))
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in infos
        )


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``"host:port"``, ``"host"``, ``"[v6]:port"`` -> (host, port)."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {text!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
    else:
        host, port_s = text, ""
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if port_s:
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"bad address {text!r}: port {port_s!r} is not a number") from None
    else:
        port = default_port
    if not 0 < port < 65536:
        raise ValueError(f"bad address {text!r}: port {port} out of range")
    return host, port


def tune(sock: socket.socket) -> None:
    """Low latency for small frames; large buffers for large ones."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def local_name(port: int) -> str:
    """The abstract unix socket a hub on ``port`` also listens on (Linux), so
    workers on this machine skip the TCP stack. Abstract names live in the
    network namespace, like the TCP address, and vanish with the socket."""
    return f"\0gibbs-{port}"


def listen_local(port: int) -> Optional[socket.socket]:
    """The hub's local socket, or None where there is none: another hub of
    this user on this port number (TCP only, quietly), or a process of
    another user that took the name first (said loudly: workers of this
    user will not connect to it, see :func:`connect_local`, and go by TCP)."""
    if not sys.platform.startswith("linux"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(local_name(port))
        sock.listen(128)
    except OSError:
        sock.close()
        holder = _local_holder(port)
        if holder is not None and holder != os.geteuid():
            _logger.error(
                "gibbs hub: the local socket name %r is held by another user (uid %d): not listening on it; "
                "workers on this machine connect over TCP",
                local_name(port).lstrip("\0"), holder,
            )
        return None
    return sock


def _local_holder(port: int) -> Optional[int]:
    """The user id of the process listening on the local socket of ``port``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(local_name(port))
        return peer_uid(probe)
    except OSError:
        return None
    finally:
        probe.close()


def connect_local(port: int, timeout: Optional[float]) -> Optional[socket.socket]:
    """A connection to the local socket of the hub on ``port``, or None. A
    listener of another user is not ours: anyone can take an abstract name
    first, so it is refused (loudly) and the caller goes by TCP."""
    if not sys.platform.startswith("linux"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(local_name(port))
    except OSError:
        sock.close()
        return None
    uid = peer_uid(sock)
    if uid is not None and uid != os.geteuid():
        sock.close()
        _logger.warning(
            "gibbs: the local socket name %r is held by another user (uid %d), not the hub's; connecting over TCP",
            local_name(port).lstrip("\0"), uid,
        )
        return None
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionResetError("connection closed during handshake")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _send_small(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_SMALL.pack(len(data)) + data)


def _recv_small(sock: socket.socket) -> bytes:
    (n,) = _SMALL.unpack(recv_exact(sock, _SMALL.size))
    if n > _SMALL_MAX:
        raise ProtocolError(f"handshake message of {n} bytes is over {_SMALL_MAX}")
    return recv_exact(sock, n)


def _digest(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, hashlib.sha256).digest()


def deliver_challenge(sock: socket.socket, key: bytes, role: bytes, others: Sequence[bytes] = ()) -> int:
    """Challenge the peer to prove it holds ``key`` (or one of ``others``);
    raise if it does not. Returns which: 0 for ``key``, i + 1 for ``others[i]``."""
    nonce = os.urandom(_NONCE_SIZE)
    _send_small(sock, _CHALLENGE + nonce)
    answer = _recv_small(sock)
    for i, k in enumerate((key, *others)):
        if hmac.compare_digest(answer, _digest(k, role, nonce)):
            _send_small(sock, _WELCOME)
            return i
    try:
        _send_small(sock, _FAILURE)
    except OSError:
        pass
    raise AuthenticationError("peer failed the HMAC challenge (wrong authkey?)")


def answer_challenge(sock: socket.socket, key: bytes, role: bytes, message: Optional[bytes] = None) -> None:
    """Answer the peer's challenge (``message``, if already read); raise if it
    does not accept the answer."""
    if message is None:
        message = _recv_small(sock)
    if not message.startswith(_CHALLENGE) or len(message) != len(_CHALLENGE) + _NONCE_SIZE:
        raise ProtocolError("peer did not send a gibbs challenge (is it a gibbs hub?)")
    _send_small(sock, _digest(key, role, message[len(_CHALLENGE) :]))
    verdict = _recv_small(sock)
    if verdict != _WELCOME:
        raise AuthenticationError(
            "the peer rejected our key: the hub and the worker do not share the same "
            f"authkey (set the same {AUTHKEY_ENV} on both sides)"
        )


def is_local(sock: socket.socket) -> bool:
    """Whether ``sock`` is a unix socket to a process of this machine (the
    local socket). A TLS tunnel is a unix socket too, to this very process:
    its peer is a TCP stranger, never local (see :mod:`gibbs.tls`)."""
    return sock.family == getattr(socket, "AF_UNIX", None) and not getattr(sock, "tunnelled", False)


def peer_uid(sock: socket.socket) -> Optional[int]:
    """The user id of the process at the other end of a local (unix) socket,
    as the kernel recorded it when the connection was made (``SO_PEERCRED``;
    for the connecting side, the listener's owner). None where unknown."""
    if not is_local(sock) or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process at the other end of a local (unix) socket, as
    the kernel recorded it (``SO_PEERCRED``), in this process's pid
    namespace. None over TCP or where unknown."""
    if not is_local(sock) or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", raw)
    return pid if pid > 0 else None


def same_user(sock: socket.socket) -> bool:
    """Whether the kernel vouches that the peer runs as this process's user."""
    uid = peer_uid(sock)
    return uid is not None and uid == os.geteuid()


# Role tags keep a hub's answer from being replayed as a worker's and back.
ROLE_WORKER = b"gibbs-worker:"
ROLE_HUB = b"gibbs-hub:"


#: What a peer that passed the handshake may do (``authenticate``): "uid"
#: (same user, keyless) and "key" (the hub's key) anything; a limited key
#: only what its name says: "observer" (read statistics) or "worker" (serve).
GRANT_ALL = ("uid", "key")
LIMITED_ROLES = ("observer", "worker")


def authenticate(
    sock: socket.socket, key: bytes, explicit: bool = True, limited: Sequence[tuple[str, bytes]] = ()
) -> str:
    """The server side of the handshake, with keys of limited rights beside
    the hub's key: returns "uid" (the peer is this user, keyless), "key"
    (it holds the hub's key) or the name of the limited key it holds
    (``limited``: (role, key) pairs). The hub proves itself back with the
    same key."""
    if not explicit and same_user(sock):
        _send_small(sock, _SAME_USER)
        reply = _recv_small(sock)
        if reply == _SAME_USER_OK:
            return "uid"
        if reply != _USE_KEY:
            raise ProtocolError("unexpected reply to the same-user offer")
    i = deliver_challenge(sock, key, ROLE_WORKER, [k for _, k in limited])
    answer_challenge(sock, key if i == 0 else limited[i - 1][1], ROLE_HUB)
    return "key" if i == 0 else limited[i - 1][0]


def server_handshake(sock: socket.socket, key: bytes, explicit: bool = True) -> bool:
    """Authenticate a new connection; True if it was by the peer's user id.

    With no explicit key (``explicit=False``) a peer on the local socket whose
    user id, as the kernel reports it, is ours needs no key: both sides check
    the other's credentials and say so. A peer of another user, a TCP peer,
    or a peer that holds an explicit key goes through the HMAC challenge both
    ways."""
    if not explicit and same_user(sock):
        _send_small(sock, _SAME_USER)
        reply = _recv_small(sock)
        if reply == _SAME_USER_OK:
            return True
        if reply != _USE_KEY:
            raise ProtocolError("unexpected reply to the same-user offer")
    deliver_challenge(sock, key, ROLE_WORKER)
    answer_challenge(sock, key, ROLE_HUB)
    return False


def client_handshake(sock: socket.socket, key: bytes, explicit: bool = True) -> bool:
    """The connecting side of :func:`server_handshake`; True if authenticated
    by user id (this side checks the listener's credentials too)."""
    message: Optional[bytes] = _recv_small(sock)
    if message == _SAME_USER:
        if not explicit and same_user(sock):
            _send_small(sock, _SAME_USER_OK)
            return True
        _send_small(sock, _USE_KEY)
        message = None
    answer_challenge(sock, key, ROLE_WORKER, message)
    deliver_challenge(sock, key, ROLE_HUB)
    return False


def connect(
    host: str, port: int, timeout: Optional[float], ssl_context: Optional["ssl.SSLContext"] = None
) -> socket.socket:
    """Connect to a hub: through its local socket when it is on this machine's
    loopback (unless ``GIBBS_LOCAL_SOCKET=0``), else TCP; with
    ``ssl_context``, TCP carries TLS (checking the hub's certificate is for
    ``host``) and the socket returned is the tunnel's (:mod:`gibbs.tls`)."""
    if is_loopback(host) and os.environ.get(LOCAL_SOCKET_ENV, "1") != "0":
        local = connect_local(port, timeout)
        if local is not None:
            return local
    sock = socket.create_connection((host, port), timeout=timeout)
    tune(sock)
    if ssl_context is None:
        return sock
    from .tls import client_wrap

    try:
        return client_wrap(sock, ssl_context, host, timeout)
    except BaseException:
        sock.close()
        raise


def describe(sock_name: object) -> str:
    if isinstance(sock_name, tuple) and len(sock_name) >= 2:
        host, port = sock_name[0], sock_name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sock_name)


def dial(
    host: str,
    port: int,
    key: bytes,
    explicit: bool,
    timeout: float,
    ssl_context: Optional["ssl.SSLContext"] = None,
    max_frame: int = 1 << 16,
) -> tuple[socket.socket, dict, "protocol.FrameReader", list[tuple[int, int, bytes]]]:
    """Connect to a hub and pass its door: the connection (local socket,
    TCP, or TLS's tunnel), the HMAC challenge both ways, then the hub's
    WELCOME. Returns the socket (with ``timeout`` set), the WELCOME record,
    the frame reader and any frames read after WELCOME. The one way in for
    a worker, a client hub and ``gibbs status``; each then says HELLO in
    its own role. A REFUSED before WELCOME raises ConnectionRefusedError."""
    sock = connect(host, port, timeout=timeout, ssl_context=ssl_context)
    try:
        sock.settimeout(timeout)
        client_handshake(sock, key, explicit)
        reader = protocol.FrameReader(max_frame)
        frames: list[tuple[int, int, bytes]] = []
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("the hub closed the connection after the handshake")
            frames.extend(reader.feed(data))
            while frames:
                kind, _, body = frames.pop(0)
                if kind == protocol.WELCOME:
                    return sock, protocol.unpack_json(body), reader, frames
                if kind == protocol.REFUSED:
                    raise ConnectionRefusedError(protocol.unpack_json(body).get("reason", "refused"))
    except BaseException:
        sock.close()
        raise
