"""What the bridge knows of each connection: a ``Peer`` (one authenticated
connection, whatever its role), the ``Relay`` standing for the router in
a client hub's core, the sink of a call forwarded by a client hub, a
forwarded payload, and what a local worker process can be asked.

Plain records with no behaviour of their own beyond describing themselves:
the units of the driver (``bridge.py`` and its helpers) change them under
the bridge's lock.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from . import logs, protocol
from .core import Call, WorkerInfo
from .protocol import Buffer
from .records import Hello
from .transport import describe, is_local, peer_pid

if TYPE_CHECKING:
    from ._loops import _Attachment

__all__ = ["ClientSink", "Forwarded", "LocalWorker", "Peer", "Relay", "describe_exit", "has_data", "internal_error"]

logger = logging.getLogger("gibbs")


class LocalWorker:
    """What the bridge may ask of a worker process started in this process
    (``Worker.start()``): its pid, model, and exit status (non-blocking)."""

    __slots__ = ("pid", "model", "exitcode", "sentinel")

    def __init__(self, pid: int, model: str, exitcode: Callable[[], Optional[int]], sentinel: int) -> None:
        self.pid = pid
        self.model = model
        self.exitcode = exitcode
        self.sentinel = sentinel


def has_data(sock: socket.socket) -> bool:
    """Whether bytes (or the end) wait to be read on ``sock``, without reading."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": the end waits
        return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # an error waits to be read


class Peer:
    """One authenticated connection: a worker, a client hub routing through
    us, an observer (``gibbs status``), or our router (``role``)."""

    __slots__ = (
        "sock", "fd", "reader", "out", "pid", "host", "name", "address", "interval", "shm", "deadlines",
        "last_heard", "last_sent", "want_write", "info", "batched", "gone", "calls", "role", "device",
        "owner", "rlock", "hello", "vouched", "segments", "token", "version",
    )

    def __init__(self, sock: socket.socket, hello: Hello, max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = protocol.FrameReader(max_frame)
        self.out: collections.deque[Buffer] = collections.deque()
        self.hello = hello  # checked at the edge (records.Hello.from_wire)
        self.pid = hello.pid
        self.host = hello.host
        self.name = hello.name
        if is_local(sock):
            self.address = "local socket"
        else:
            try:
                self.address = describe(sock.getpeername())
            except OSError:
                self.address = "?"
        self.interval = max(0.01, hello.heartbeat_interval)
        self.shm = hello.shm
        # Whether the kernel vouches for the pid it claims (a local socket:
        # SO_PEERCRED). Only then does its pid name its process, and its
        # shared-memory files, with authority: a pid over TCP is a claim.
        self.vouched = peer_pid(sock) == hello.pid
        # Its shared-memory segments the hub has read (its names, checked):
        # removed when it is lost, if its pid cannot be trusted to name them.
        self.segments: set[str] = set()
        self.deadlines = hello.deadlines  # it reads DEADLINE frames
        now = time.monotonic()
        self.last_heard = now
        self.last_sent = now
        self.want_write = False
        # Who reads this socket: None, the bridge thread; else the event loop
        # it is attached to. Changed, and the socket read, under ``rlock``.
        self.owner: Optional[_Attachment] = None
        self.rlock = threading.Lock()
        self.batched = hello.batch_size > 1
        self.device: Optional[str] = hello.device
        self.token: Optional[str] = hello.token
        self.version: Optional[str] = hello.version
        self.gone = False  # closed; its loss may still wait for an exit status
        self.role = hello.role  # "worker", "client" (routes through us), "observer", "router" (we route through it)
        # A client's open calls: its call id -> our call (owned by _lock).
        self.calls: Optional[dict[int, Call]] = {} if self.role == "client" else None
        self.info: WorkerInfo  # set by the bridge (workers only)

    def describe(self) -> str:
        what = {"worker": "worker", "client": "client hub", "observer": "observer"}.get(self.role, "router hub")
        return f"{what} {self.name} (pid {self.pid} on {self.host}, {self.address})"

    def __repr__(self) -> str:
        return f"<Peer {self.describe()}>"


class Relay:
    """The worker id, in a client hub's core, of "the router, for model M":
    one per model, each with room for any number of calls. Its calls go to
    the router as FORWARD frames; the router's workers run them."""

    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def __repr__(self) -> str:
        return f"<Relay {self.model}>"


class ClientSink:
    """The sink of a call a client hub forwarded to us: its answer goes back
    on the client's connection under the client's call id."""

    __slots__ = ("peer", "cid")

    def __init__(self, peer: Peer, cid: int) -> None:
        self.peer = peer
        self.cid = cid


class Forwarded:
    """A forwarded call's payload: inline bytes, nothing to release."""

    __slots__ = ("body", "rid", "trace")
    shm_path = None

    def __init__(self, body: Buffer, rid: Optional[str] = None, trace: Optional[str] = None) -> None:
        self.body = body
        self.rid = rid  # the request id its client hub gave
        self.trace = trace  # its caller's traceparent, when it traces

    def inline_body(self) -> Buffer:
        return self.body

    def release(self) -> None:
        pass


def describe_exit(code: int) -> str:
    """How a process ended, from its exit code (negative: a signal)."""
    import signal

    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"process killed by signal {name}"
    return f"process exit code {code}"


def internal_error(peer: Peer, exc: BaseException) -> str:
    """A bug met while reading a peer: said loudly, with the traceback; the
    caller drops that peer (its calls fail or go elsewhere), the hub serves on."""
    logger.error("gibbs hub: internal error reading %s; dropping it", peer.describe(), exc_info=exc, extra=logs.peer(peer))
    return f"internal error reading its frames: {exc!r}"
