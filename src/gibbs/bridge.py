"""The bridge: the driver around the core, and the one thread of a hub that
talks to workers.

Every rule of a call's life is in ``core.py``; this module only turns I/O
into core events and carries out the core's actions. The thread waits
(``selectors``) on the listeners, each worker's socket and a wake-up pipe,
and:

* hands each new connection to a short-lived handshake thread (HMAC
  challenge both ways, WELCOME/HELLO) under a deadline for the whole
  handshake, within bounds (connections not yet authenticated: per pool,
  per source, a short deadline; authenticated ones apart); the HELLO is
  checked field by field (``records.Hello``) and an authenticated worker
  becomes ``core.worker_joined``; a LOADING connection is watched here
  until it closes;
* reads frames without ever blocking on a partial one: RESULT/ERROR become
  ``core.answered``, GOODBYE ``core.worker_leaving``; end of file, a bad
  frame (or a bug met reading it: logged, that peer only), too many bytes
  buffered from all peers, or silence beyond the heartbeat bound become ``core.worker_lost``
  (for a worker process started here, once its exit status is known, so the
  error says how it died);
* carries out the actions: ``Send`` writes frames (non-blocking; the rest
  waits for the socket to be writable), ``Resolve`` hands the outcome to its
  caller, ``Release`` frees the payload's shared memory, ``Refuse`` and
  ``Drop`` close a connection.

The same thread serves the other hubs of a family of processes. As the
router, it accepts client hubs beside workers: their FORWARD frames become
``core.submit`` with a ``ClientSink`` whose outcome (and chunks) go back on
that connection, unpickled nowhere; STOP/RESEND/CREDIT from them become
``core.cancel``/``resend``/``consumed``; a client that goes has its calls
cancelled. As a client, its core holds one ``Relay`` worker per model (room
for any number of calls) standing for the router: a ``Send`` to a relay is a
FORWARD frame; the router's loss takes the relays back without counting an
attempt, and a rendezvous thread finds the router again or takes the address.

Callers submit from any thread: under ``_lock`` they call ``core.submit``
and carry out its ``Send`` at once (non-blocking). Outcomes are handed over
outside the lock: to asyncio callers with one ``call_soon_threadsafe`` per
loop per pass; to ``concurrent.futures`` callers on a delivery thread, so
that no user callback ever runs on this thread or under this lock.

Shared state below is owned by ``_lock`` unless marked "bridge thread only".
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import json
import logging
import os
import queue
import selectors
import socket
import ssl
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence

from . import errors, logs, protocol
from .core import (
    CANCELLED,
    DEFAULT_MODEL,
    Call,
    Core,
    Credit,
    Deliver,
    Drop,
    Outcome,
    OutcomeKind,
    Refuse,
    Release,
    Resend,
    Resolve,
    Send,
    Stop,
    WorkerInfo,
)
from .errors import GibbsError, NoWorkersError, ProtocolError, SerializationError
from .protocol import Buffer
from .records import Hello, InitFailed, Loading, Welcome
from .tls import tunnel
from .transport import ANY_APP, GRANT_ALL, authenticate, describe, is_local, peer_pid, peer_uid, tune

logger = logging.getLogger("gibbs")

#: Connections that have not authenticated yet, at most, per pool: TCP, and
#: the local socket for this user (another user's connections on the local
#: socket count as TCP's do, by user id): a flood on TCP never holds out a
#: local worker. From one source (an address, or another user) at most
#: _MAX_PER_SOURCE of them; they have _AUTH_DEADLINE seconds (or the
#: handshake timeout, if shorter) to pass the challenge.
_MAX_HANDSHAKES = 64
#: How long a pool asking why a worker failed waits for its report.
INIT_REPORT_WAIT = 2.0
#: Requests waiting this long with no worker of their model make a warning,
#: repeated at most this often per model.
_ABSENT_WARN_AFTER = 1.0
_ABSENT_WARN_EVERY = 30.0
_MAX_PER_SOURCE = 8
_AUTH_DEADLINE = 2.0
#: Authenticated connections that have not said HELLO yet (their own room:
#: never queued behind unauthenticated ones).
_MAX_AUTHENTICATED = 256
#: Workers building their model (LOADING), at most; each is listed until it
#: closes its connection or _LOADING_DEADLINE seconds pass. The bridge
#: thread watches them (no thread each).
_MAX_LOADING = 1024
_LOADING_DEADLINE = 3600.0


class _Pending:
    """A connection in its handshake (owned by ``Bridge._lock``): its deadline,
    where it comes from, and whether it has authenticated."""

    __slots__ = ("deadline", "source", "authed")

    def __init__(self, deadline: float, source: tuple[str, Any]) -> None:
        self.deadline = deadline
        self.source = source
        self.authed = False


#: How long the loss of a local worker waits for its exit status (so that
#: the error names the signal or exit code) before it is declared anyway.
_EXIT_STATUS_WAIT = 0.5


class LocalWorker:
    """What the bridge may ask of a worker process started in this process
    (``Worker.start()``): its pid, model, and exit status (non-blocking)."""

    __slots__ = ("pid", "model", "exitcode", "sentinel")

    def __init__(self, pid: int, model: str, exitcode: Callable[[], Optional[int]], sentinel: int) -> None:
        self.pid = pid
        self.model = model
        self.exitcode = exitcode
        self.sentinel = sentinel


def _has_data(sock: socket.socket) -> bool:
    """Whether bytes (or the end) wait to be read on ``sock``, without reading."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": the end waits
        return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # an error waits to be read


def _lend(bridge: "Bridge", peer: "Peer", name: str, size: int, views: list[memoryview]) -> list[Any]:
    """The buffers of an answer, lent in place on its worker's segment: one
    buffer object per view, each keeping the segment's mapping alive. When
    the last of them (and every array made on it) is freed, in whatever
    thread, the segment goes back to the worker (a RELEASE frame)."""
    n = len(views)
    counter = itertools.count(1)
    ref = weakref.ref(bridge)
    lent = []
    for v in views:
        buf = (ctypes.c_char * v.nbytes).from_buffer(v)
        done = weakref.finalize(buf, _returned, ref, peer, name, size, counter, n)
        done.atexit = False
        lent.append(buf)
    return lent


def _returned(ref: "weakref.ref[Bridge]", peer: "Peer", name: str, size: int, counter: "itertools.count[int]", n: int) -> None:
    """A lent buffer was freed; the last of a segment's gives it back. Runs
    wherever the object died (any thread, or the garbage collector): no lock
    but the loans' own."""
    if next(counter) != n:
        return
    bridge = ref()
    if bridge is not None:
        bridge._loan_back(peer, name, size)


class _LoopReader:
    """What an event loop needs to read worker sockets itself: its receive
    buffer (one per loop: two loops never share one)."""

    __slots__ = ("loop", "buf", "view")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.buf = bytearray(1 << 18)
        self.view = memoryview(self.buf)


class _Attachment:
    """A worker socket read by an event loop instead of the bridge thread.

    The loop watches a duplicate of the socket's descriptor (``fd``), which
    only it closes (after ``remove_reader``), or the bridge thread once the
    loop is closed: a descriptor number the loop still watches is never
    reused under it. ``lock`` owns ``fd`` and ``closed``."""

    __slots__ = ("reader", "fd", "closed", "lock")

    def __init__(self, reader: _LoopReader) -> None:
        self.reader = reader
        self.fd: Optional[int] = None
        self.closed = False
        self.lock = threading.Lock()

    @property
    def loop(self) -> Any:
        return self.reader.loop


class Peer:
    """One authenticated worker connection."""

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


#: Rendezvous outcomes: ("listen", [sockets]) this process took the address
#: and routes; ("client", (socket, welcome)) it joined the router there.
Rendezvous = Callable[[], Optional[tuple[str, Any]]]

#: Exceptions a router may name in an EXC frame (rebuilt by type name).
_EXC_TYPES: dict[str, type[BaseException]] = {
    name: getattr(errors, name)
    for name in (
        "GibbsError", "WorkerDiedError", "HubClosedError", "QueueFullError", "NoWorkersError", "SerializationError",
    )
}
_EXC_TYPES["TypeError"] = TypeError
_EXC_TYPES["ValueError"] = ValueError


def exc_to_json(exc: Optional[BaseException]) -> bytes:
    if exc is None:
        return json.dumps({"type": ""}).encode()  # cancelled
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.DeadlineExceededError):
        record["in_queue"] = exc.in_queue
    failures = getattr(exc, "failures", None)
    if failures:
        record["failures"] = list(failures)
    if exc.__cause__ is not None:
        record["cause"] = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
    return json.dumps(record).encode()


def exc_from_json(body: bytes) -> Optional[BaseException]:
    """None for "cancelled". Raises :class:`ProtocolError` for a record that
    is not one."""
    record = protocol.unpack_json(body)
    name = record.get("type", "")
    failures = record.get("failures") or []
    if not isinstance(name, str) or not isinstance(failures, list):
        raise ProtocolError("malformed EXC record")
    if not name:
        return None
    cls = _EXC_TYPES.get(name, GibbsError)
    message = str(record.get("message", ""))
    if cls is errors.WorkerDiedError:
        return errors.WorkerDiedError(message, [str(f) for f in failures])
    if name == "DeadlineExceededError":
        return errors.DeadlineExceededError(message, in_queue=bool(record.get("in_queue", True)))
    exc = cls(message) if cls is not GibbsError or name == "GibbsError" else GibbsError(f"{name}: {message}")
    if record.get("cause"):
        exc.__cause__ = GibbsError(f"in the router hub: {record['cause']}")
    return exc


class Bridge:
    def __init__(
        self,
        listeners: list[socket.socket],
        *,
        authkey: bytes,
        heartbeat_interval: float,
        heartbeat_misses: int,
        max_attempts: int,
        max_queued: Optional[int],
        max_frame: int,
        handshake_timeout: float,
        pipeline_depth: int,
        shm_probe: Optional[dict[str, str]],
        deliver_async: Callable[[list[tuple[Call, Outcome]]], None],
        deliver_sync: Callable[[Call, Outcome], None],
        local_workers: Callable[[], list[LocalWorker]] = lambda: [],
        mappings: Optional[protocol.MappingCache] = None,
        authkey_explicit: bool = True,
        upstream: Optional[tuple[Any, ...]] = None,
        rendezvous: Optional[Rendezvous] = None,
        on_role: Callable[[str, list[socket.socket]], None] = lambda role, listeners: None,
        max_lent_bytes: int = 512 << 20,
        request_pool: Optional[protocol.SegmentPool] = None,
        app: Optional[str] = None,
        no_worker_timeout: Optional[float] = None,
        limited_keys: Sequence[tuple[str, bytes]] = (),
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self._listeners = listeners
        self._ssl_context = ssl_context  # set: TCP connections carry TLS (the local socket does not)  # TCP, and on Linux a local (unix) socket
        self._authkey = authkey
        self._explicit = authkey_explicit
        self._limited_keys = list(limited_keys)  # (role, key): keys that give one role only
        self._interval = heartbeat_interval
        self._misses = heartbeat_misses
        self._max_frame = max_frame
        # Bytes of incomplete frames held from all peers together, at most
        # (each may hold up to max_frame): two frames' worth.
        self._max_buffered = 2 * max_frame
        self._buffered_lock = threading.Lock()  # owns _buffered
        self._buffered: dict[Peer, int] = {}  # peers holding part of a frame -> bytes
        self._handshake_timeout = handshake_timeout
        self._depth = pipeline_depth
        self._shm_probe = shm_probe
        self._deliver_async = deliver_async
        self._deliver_sync = deliver_sync
        self._local_workers = local_workers
        self._maps = mappings or protocol.MappingCache()  # whichever thread reads the workers (own lock)
        self._rbuf = bytearray(1 << 18)  # bridge thread only: every read lands here
        # Answers' shared memory lent to callers (read in place, given back
        # when freed), up to _max_lent bytes; beyond that, answers are copied.
        self._max_lent = max_lent_bytes
        self._request_pool = request_pool
        self._loan_lock = threading.RLock()  # owns the six below (RLock: a finalizer may run under it)
        self._lent_bytes = 0
        self._lent_segments = 0
        self._loans_back: list[tuple[Peer, str]] = []
        self._loans_open = True
        self._answers_lent = 0  # counters
        self._answers_copied = 0
        self._rview = memoryview(self._rbuf)

        self._lock = threading.Lock()
        # --- owned by _lock
        self._core = Core(max_attempts=max_attempts, max_queued=max_queued, no_worker_timeout=no_worker_timeout)
        self._app = app  # the application we route for (None or "*": any)
        self._peers: dict[int, Peer] = {}  # fd -> peer, connected and not yet lost
        self._outcomes: list[tuple[Call, Outcome]] = []  # to hand over outside the lock
        # (socket, HELLO, frames that came after HELLO in the same read,
        # bytes of a frame begun after it).
        self._new_peers: list[tuple[socket.socket, Hello, list[tuple[int, int, bytes]], bytes]] = []
        self._dirty: list[Peer] = []  # peers whose write interest changed off-thread
        self._init_failures: collections.deque[tuple[int, str]] = collections.deque(maxlen=16)  # (pid, text)
        self._handshake_failures: collections.deque[str] = collections.deque(maxlen=16)
        self._n_handshake_failures = 0
        self._joined_pids: set[int] = set()
        self._joined_tokens: set[str] = set()  # the HELLO's "token" (optional: older workers send none)
        self._check_locals = False  # a report came in: look at local workers now
        self._waiters: dict[int, Callable[[], None]] = {}
        self._next_waiter = 0
        self._closed = False
        self._crashed: Optional[BaseException] = None
        self._wake_pending = False
        self._wake_at = 0.0  # (under _lock) when the loop's select ends, at the latest
        self._handshaking: dict[socket.socket, _Pending] = {}  # sockets in handshake threads
        self._loading: dict[socket.socket, dict[str, Any]] = {}  # workers building their model
        self._new_loading: list[socket.socket] = []  # for the bridge thread to watch
        self._next_id = 1
        self.request_ids = protocol.request_id_prefix()  # a call's request id is this + its id, unless given
        self._on_closed: list[Callable[[], None]] = []
        self._batched_models: set[str] = set()  # read without the lock (a hint for callers)
        # --- the two roles of a hub in a family of processes (owned by _lock)
        # Router: the hub that holds the address; workers and client hubs connect to it.
        self._clients: dict[int, Peer] = {}  # fd -> client hub routing through us
        # Client: a hub that routes through the router (another process's hub).
        self._rendezvous = rendezvous  # finds the router again, or takes the address over
        self._on_role = on_role
        self._upstream: Optional[Peer] = None  # our connection to the router
        self._relays: dict[str, WorkerInfo] = {}  # model -> its relay worker in our core
        self._relay_of: dict[int, WorkerInfo] = {}  # call id -> relay holding it
        self._pool_info: dict[str, dict[str, Any]] = {}  # the router's models, from POOL
        self._client_mode = upstream is not None or (rendezvous is not None and not listeners)
        self._pending_upstream: Optional[tuple[str, Any]] = None  # from the rendezvous thread
        self._rendezvous_thread: Optional[threading.Thread] = None
        self._initial_upstream = upstream
        self._listeners_closed = False
        # --- the home loop (owned by _lock): when one event loop makes the
        # asyncio requests, it reads the worker sockets itself (add_reader),
        # so that an answer reaches its caller with no thread hop; the bridge
        # thread takes them back when the loop stops, closes, blocks, or a
        # second loop comes.
        self._home: Any = None
        # Two loops at once, or closing: the bridge reads for all. GIBBS_LOOP_READS=0
        # keeps the bridge thread reading always (to compare, or to rule it out).
        self._home_off = os.environ.get("GIBBS_LOOP_READS", "1").strip() == "0"
        self._home_changed = False
        self._returned: list[tuple[Peer, Optional[str]]] = []  # given back by a loop (and why)
        self._home_reader: Optional[_LoopReader] = None  # bridge thread only
        self._detaching: list[_Attachment] = []  # bridge thread only: not yet closed by their loop
        # The hub's statistics() (with its pools' restarts), weakly: for observers.
        self.stats_source: Optional[Callable[[], Optional[Callable[[], dict[str, Any]]]]] = None
        # The hub's account of why no worker of a model is there, weakly.
        self.explain_source: Optional[Callable[[], Optional[Callable[[str], str]]]] = None
        # Requests waiting with no worker of their model (written by the bridge
        # thread only; the text is read by whichever thread hands outcomes over).
        self._absent_warned: dict[str, float] = {}  # model -> when we last warned
        self._absence_text: dict[str, str] = {}  # model -> the hub's explanation, kept fresh
        # --- bridge thread only
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._fds_closed = False
        # lost peers waiting for an exit status: [deadline, reason, local worker, exiting]
        self._losing: dict[Peer, list[Any]] = {}
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="gibbs-bridge", daemon=True)
        self._sync_queue: Optional["queue.SimpleQueue[Optional[tuple[Call, Outcome]]]"] = None
        self._handing = 0  # hand-overs putting outcomes on _sync_queue now (owned by _lock)
        self._sync_stopped = False  # the delivery thread was told to stop (owned by _lock)
        self._sync_thread: Optional[threading.Thread] = None

    # ================================================================ callers

    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def join(self) -> None:
        """Wait for the bridge thread and the delivery thread to end."""
        if self._thread is not threading.current_thread():
            self._thread.join()
        sync = self._sync_thread
        if sync is not None and sync is not threading.current_thread():
            sync.join()

    def set_default_timeout(self, model: str, seconds: Optional[float]) -> None:
        """gibbs_timeout for the model's calls that give none (None: no limit)."""
        with self._lock:
            if seconds is None:
                self._core.default_timeouts.pop(model, None)
            else:
                self._core.default_timeouts[model] = seconds

    def set_hedging(self, model: str, on: bool) -> None:
        """Hedge the model's calls by default (a second attempt on an idle
        worker once one has run past the model's p95 service time)."""
        with self._lock:
            self._core._model(model).hedge = on

    def is_batched(self, model: str) -> bool:
        return model in self._batched_models

    def home(self, loop: Any) -> None:
        """An asyncio request from ``loop``: let it read the worker sockets
        (unless another loop is running requests too). Cheap when nothing
        changes: called on every request."""
        if self._home is loop or self._home_off:
            return
        with self._lock:
            if self._home is loop or self._home_off or self._core.closing or self._client_mode:
                return
            old = self._home
            if old is not None and old.is_running() and not old.is_closed():
                self._home_off = True  # two loops at once: the bridge thread reads for both
                self._home = None
            else:
                self._home = loop
            self._home_changed = True
            self._wake_locked()

    def has_home(self) -> bool:
        return self._home is not None

    def leave_home(self, loop: Any) -> None:
        """``loop`` is about to block (a caller waits synchronously in its
        thread): if it reads the workers, the bridge thread takes them back
        now. Its next request makes it home again."""
        if self._home is not loop:
            return
        with self._lock:
            if self._home is loop:
                self._home = None
                self._home_changed = True
                self._wake_locked()

    def loop_reads(self) -> int:
        """How many worker sockets an event loop reads now (the rest: the
        bridge thread)."""
        with self._lock:
            peers = list(self._peers.values())
        return sum(1 for p in peers if p.owner is not None and not p.gone)

    def submit(
        self,
        payload: protocol.Payload,
        sink: Any,
        model: str = DEFAULT_MODEL,
        stream: bool = False,
        timeout: Optional[float] = None,
        retries: int = 0,
        hedge: bool = False,
    ) -> Call:
        home = self._home
        if home is not None and not home.is_running():
            # A caller while the home loop is stopped: the bridge takes the
            # sockets back now rather than at its next check.
            with self._lock:
                self._home_changed = True
                self._wake_locked()
        with self._lock:
            if self._crashed is not None:
                raise GibbsError("the hub's bridge thread stopped unexpectedly") from self._crashed
            call = Call(self._next_id, model, payload, sink, stream, timeout=timeout, retries=retries)
            if hedge and not stream:
                call.hedge = 1
            self._next_id += 1
            if self._upstream is not None and model not in self._relays and not self._core.closing:
                self._add_relay_locked(model)
            self._apply_locked(self._core.submit(call, time.monotonic()))
            if call.queued and self._core.models[model].batch_wait:
                self._wake_locked()  # the bridge's next tick is this batch's deadline
            elif call.deadline is not None and call.deadline < self._wake_at and not call.done:
                self._wake_locked()  # its deadline comes before the loop's next tick
            elif call.hedge and not call.done:
                self._wake_locked()  # its hedging time is the loop's next tick
        if self._outcomes:
            self._hand_over()
        return call

    def request_id(self, call: Call) -> str:
        """The request id of ``call``: its caller's, else this hub's own."""
        rid = call.payload.rid
        return rid if rid is not None else self.request_ids + str(call.id)

    def cancel(self, call: Call) -> None:
        """The caller gave up (cancelled, timed out): a queued call is removed
        and never runs; a running one's answer will be dropped."""
        with self._lock:
            # A relayed call: the core says Stop to the relay, and the router
            # removes it from its queue, or drops its answer.
            self._apply_locked(self._core.cancel(call))
        if self._outcomes:
            self._hand_over()

    def consumed(self, call: Call, n: int) -> None:
        """The caller of a stream took ``n`` chunks: the worker may send more."""
        with self._lock:
            self._apply_locked(self._core.consumed(call, n))

    def resend(self, call: Call) -> None:
        """gibbs_retries: send a running call again to the next free worker
        (the first answer of any attempt wins)."""
        with self._lock:
            self._apply_locked(self._core.resend(call, time.monotonic()))
        if self._outcomes:
            self._hand_over()

    # ---------------------------------------------------------------- waiting for workers

    def add_waiter(self, callback: Callable[[], None]) -> int:
        """``callback`` (no argument, any thread) runs whenever the set of
        workers changes or a model becomes unavailable, and when the bridge
        ends. Returns a token for :meth:`remove_waiter`."""
        with self._lock:
            self._next_waiter += 1
            self._waiters[self._next_waiter] = callback
            return self._next_waiter

    def remove_waiter(self, token: int) -> None:
        with self._lock:
            self._waiters.pop(token, None)

    def _notify_waiters(self) -> None:
        with self._lock:
            waiters = list(self._waiters.values())
        for cb in waiters:
            cb()

    @property
    def role(self) -> str:
        """"router" (holds the address; workers connect here) or "client"
        (sends its calls through the router, another process's hub)."""
        return "client" if self._client_mode else "router"

    def worker_count(self, model: Optional[str] = None) -> int:
        with self._lock:
            if self._client_mode:
                return sum(
                    int(v.get("workers", 0)) for k, v in self._pool_info.items() if model is None or k == model
                )
            return sum(
                1 for p in self._peers.values() if not p.info.leaving and (model is None or p.info.model == model)
            )

    def unavailable(self, model: Optional[str] = None) -> Optional[BaseException]:
        """Why no worker of ``model`` (None: of any model) can come, if that is known."""
        with self._lock:
            if self._client_mode:
                return None
            models = self._core.models
            if model is not None:
                m = models.get(model)
                return m.unavailable if m is not None and not m.workers else None
            if self._peers:
                return None
            local_models = {w.model for w in self._local_workers()}
            errs = [models[m].unavailable for m in local_models if m in models and models[m].unavailable]
            return errs[0] if errs and len(errs) == len(local_models) else None

    # ---------------------------------------------------------------- views

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def closing(self) -> bool:
        return self._core.closing

    def failures(self) -> list[str]:
        """What the hub saw that explains missing workers: constructors that
        raised, handshakes that failed."""
        with self._lock:
            return [t for _, t in self._init_failures] + list(self._handshake_failures)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            core = self._core
            peers = [p for p in self._peers.values() if not p.info.leaving]
            busy = sum(1 for p in peers if p.info.units)
            stats = core.stats
            models = {}
            now = time.monotonic()
            loading = collections.Counter(e["model"] for e in self._loading.values())
            # (a model whose first worker is loading is known to the core: workers_loading)
            for name, m in core.models.items():
                ws = [w for w in m.workers.values() if not w.leaving]
                busy_n = sum(1 for w in ws if w.units)
                ms = m.stats
                models[name] = {
                    "class": m.cls,
                    "workers": len(ws),
                    "busy": busy_n,
                    "queued": len(m.queue),
                    "in_flight": sum(len(w.held) for w in ws),
                    "batch_size": max((w.batch_size for w in ws), default=1),
                    "batch_sizes": dict(sorted(m.batch_sizes.items())),
                    "requests": ms["requests"],
                    "completed": ms["completed"],
                    "errors": ms["errors"],
                    "failed": ms["failed"],
                    "cancelled": ms["cancelled"],
                    "expired": {"queued": ms["expired_queued"], "running": ms["expired_running"]},
                    "shed": {"deadline": ms["shed_deadline"], "max_queued": ms["shed_max_queued"]},
                    "resent": ms["resent"],
                    "hedged": ms["hedged"],
                    "retried": ms["retried"],
                    "states": {
                        "loading": loading.get(name, 0),
                        "ready": len(ws) - busy_n,
                        "busy": busy_n,
                        "leaving": sum(1 for w in m.workers.values() if w.leaving),
                    },
                    "oldest_queued_seconds": core.oldest_queued(now, name),
                    "versions": _versions(ws),
                    "latency": m.latency.snapshot(),
                    "queue_wait": m.queue_wait.snapshot(),
                }
            if self._client_mode:
                # The workers are the router's: what it last said of them.
                for entry in models.values():
                    entry["workers"] = entry["busy"] = 0
                for name, v in self._pool_info.items():
                    entry = models.setdefault(
                        name, {"class": "", "busy": 0, "queued": 0, "in_flight": 0, "batch_size": 1, "batch_sizes": {}}
                    )
                    entry["class"] = v.get("class", "")
                    entry["workers"] = int(v.get("workers", 0))
                n_workers = sum(int(v.get("workers", 0)) for v in self._pool_info.values())
                peers = []
            else:
                n_workers = len(peers)
            return {
                "role": self.role,
                "clients": sum(1 for p in self._clients.values() if p.role == "client"),
                "workers": n_workers,
                "busy": busy,
                "idle": max(0, n_workers - busy),
                "queued": core.n_queued,
                "in_flight": sum(len(p.info.held) for p in peers),
                "completed": stats["completed"],
                "failed": stats["errors"] + stats["failed"],
                "errors": stats["errors"],
                "retried": stats["retried"],
                "resent": stats["resent"],
                "hedged": stats["hedged"],
                "cancelled": stats["cancelled"],
                "abandoned": stats["abandoned"],
                # of the cancelled and abandoned: those that their deadline ended
                "expired": {"queued": stats["expired_queued"], "running": stats["expired_running"]},
                # refused at once (OverloadedError), by reason
                "shed": {"deadline": stats["shed_deadline"], "max_queued": stats["shed_max_queued"]},
                "worker_deaths": stats["deaths"],
                "handshake_failures": self._n_handshake_failures,
                "init_failures": len(self._init_failures),
                "closing": core.closing,
                "oldest_queued_seconds": core.oldest_queued(now),
                "loading": sum(loading.values()),
                "models": models,
            }

    def workers(self) -> list[dict[str, Any]]:
        """Connected workers (state "ready", "busy" or "leaving") and workers
        building their model (state "loading", with ``seconds``)."""
        loading = [dict(e, state="loading") for e in self.loading()]
        with self._lock:
            return loading + [
                {
                    "state": "leaving" if p.info.leaving else "busy" if p.info.units else "ready",
                    "device": p.device,
                    "pid": p.pid,
                    "host": p.host,
                    "name": p.name,
                    "model": p.info.model,
                    "class": p.info.cls,
                    "address": p.address,
                    "in_flight": len(p.info.held),
                    "served": p.info.served,
                    "batch_size": p.info.batch_size,
                    "shared_memory": p.shm,
                    "version": p.version,
                    "token": p.token,
                }
                for p in self._peers.values()
            ]

    def models(self) -> dict[str, dict[str, Any]]:
        return dict(self.statistics()["models"])

    # ---------------------------------------------------------------- closing

    def begin_close(self, grace: float, on_closed: Callable[[], None]) -> None:
        """Stop taking calls; fail the queued ones; let the running ones finish
        within ``grace`` seconds; then close everything. ``on_closed`` is
        called (from the bridge thread, or here if already closed) at the end."""
        with self._lock:
            if self._closed:
                done = True
            else:
                done = False
                self._on_closed.append(on_closed)
                # Client hubs' calls are not failed: they are cancelled here and
                # the clients, seeing the connection end, send them again to
                # whichever hub takes the address over.
                for peer in self._clients.values():
                    calls = list(peer.calls.values()) if peer.calls else []
                    if peer.calls:
                        peer.calls.clear()
                    for call in calls:
                        self._apply_locked(self._core.cancel(call))
                    try:
                        peer.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._apply_locked(self._core.close(time.monotonic(), grace))
                self._wake_locked()
        if self._outcomes:
            self._hand_over()
        if done:
            on_closed()

    def _wake_locked(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    # ================================================================ actions (under _lock)

    def _apply_locked(self, actions: list[Any]) -> None:
        touched: Optional[list[Peer]] = None
        peer: Peer
        for action in actions:
            if type(action) is Send:
                if type(action.worker) is Relay:
                    up = self._upstream_for_locked(action.worker)
                    if up is None:
                        continue
                    relay = self._relays[action.worker.model]
                    for c in action.calls:
                        self._relay_of[c.id] = relay
                        flags = (protocol.FWD_STREAM if c.stream else 0) | getattr(c.payload, "flags", 0)
                        rid = c.payload.rid or self.request_ids + str(c.id)  # the router's calls keep our id
                        up.out.extend(
                            protocol.pack_forward(c.id, c.model, flags, self._inline(c.payload), rid, c.payload.trace)
                        )
                    peer = up
                    if touched is None:
                        touched = [peer]
                    elif peer not in touched:
                        touched.append(peer)
                    continue
                peer = action.worker  # type: ignore[assignment]
                calls = action.calls
                if peer.deadlines:
                    now = 0.0
                    for c in calls:
                        final = c.final_deadline
                        if final is not None:
                            now = now or time.monotonic()
                            peer.out.extend(protocol.pack_deadline(c.id, final - now))
                for c in calls:
                    if c.payload.rid is not None:
                        peer.out.extend(protocol.pack_request_id(c.id, c.payload.rid))
                    if c.payload.trace is not None:  # its caller traces (gibbs.tracing)
                        peer.out.extend(protocol.pack_trace(c.id, c.payload.trace, time.monotonic() - c.t0))
                if peer.batched:
                    items = [(c.id, self._body_for(peer, c)) for c in calls]
                    peer.out.extend(protocol.pack_batch(items))
                else:
                    c = calls[0]
                    kind = protocol.STREAM if c.stream else protocol.REQUEST
                    peer.out.extend(protocol.pack_frame(kind, c.id, self._body_for(peer, c)))
                if touched is None:
                    touched = [peer]
                elif peer not in touched:
                    touched.append(peer)
            elif type(action) is Resolve:
                if type(action.call.sink) is ClientSink:
                    answered = self._answer_client_locked(action.call, action.outcome)
                    if answered is not None:
                        if touched is None:
                            touched = [answered]
                        elif answered not in touched:
                            touched.append(answered)
                elif action.outcome.kind is not OutcomeKind.CANCELLED:  # the caller knows
                    self._outcomes.append((action.call, action.outcome))
            elif type(action) is Deliver:
                if type(action.call.sink) is ClientSink:
                    sink = action.call.sink
                    peer = sink.peer
                    if not peer.gone and peer.calls is not None and sink.cid in peer.calls:
                        peer.out.extend(protocol.pack_frame(protocol.CHUNK, sink.cid, action.chunk.value))
                        if touched is None:
                            touched = [peer]
                        elif peer not in touched:
                            touched.append(peer)
                else:
                    self._outcomes.append((action.call, action.chunk))
            elif type(action) is Release:
                action.call.payload.release()
            elif type(action) is Resend:
                up = self._upstream_for_locked(action.worker)  # type: ignore[arg-type]
                if up is not None:
                    # The router owns the attempts: it sends it again to another of its workers.
                    up.out.extend(protocol.pack_frame(protocol.RESEND, action.call.id))
                    if touched is None:
                        touched = [up]
                    elif up not in touched:
                        touched.append(up)
            elif type(action) is Stop or type(action) is Credit:
                if type(action.worker) is Relay:
                    up = self._upstream_for_locked(action.worker)
                    if up is None:
                        continue
                    peer = up
                else:
                    peer = action.worker  # type: ignore[assignment]
                if isinstance(action, Credit):
                    peer.out.extend(protocol.pack_credit(action.call.id, action.n))
                else:
                    peer.out.extend(protocol.pack_frame(protocol.STOP, action.call.id))
                if touched is None:
                    touched = [peer]
                elif peer not in touched:
                    touched.append(peer)
            elif type(action) is Refuse:
                peer = action.worker  # type: ignore[assignment]
                logger.error("gibbs hub: refused %s: %s", peer.describe(), action.reason, extra=logs.peer(peer))
                self._handshake_failures.append(f"{peer.describe()} refused: {action.reason}")
                self._n_handshake_failures += 1
                try:
                    peer.sock.setblocking(True)
                    peer.sock.settimeout(1.0)
                    peer.sock.sendall(protocol.pack_json(protocol.REFUSED, {"reason": action.reason}))
                except OSError:
                    pass
                peer.sock.close()
                peer.gone = True
            elif type(action) is Drop:
                pass  # the core never drops on its own yet; the driver drops on I/O
        if touched:
            for peer in touched:
                self._flush_locked(peer)

    def _upstream_for_locked(self, relay: "Relay") -> Optional[Peer]:
        up = self._upstream
        return up if up is not None and not up.gone else None

    @staticmethod
    def _inline(payload: Any) -> Buffer:
        return payload.body if payload.shm_path is None else payload.inline_body()

    def _answer_client_locked(self, call: Call, outcome: Outcome) -> Optional[Peer]:
        """A client hub's call is done here: its answer goes back to it (the
        answer's bytes as the worker sent them; nothing is unpickled)."""
        sink: ClientSink = call.sink
        peer = sink.peer
        if peer.gone or peer.calls is None or peer.calls.pop(sink.cid, None) is None:
            return None
        kind, value = outcome
        if kind is OutcomeKind.RESULT:
            frames = protocol.pack_frame(protocol.RESULT, sink.cid, value)
        elif kind is OutcomeKind.COPIED:
            pickled, copies = value
            frames = protocol.pack_frame(protocol.RESULT, sink.cid, protocol.pack_oob(pickled, copies))
        elif kind is OutcomeKind.ERROR:
            frames = protocol.pack_frame(protocol.ERROR, sink.cid, value)
        elif kind is OutcomeKind.EXCEPTION:
            frames = protocol.pack_frame(protocol.EXC, sink.cid, exc_to_json(value))
        elif kind is OutcomeKind.EXPIRED:  # the router's own default timeout
            err = errors.DeadlineExceededError(value.describe(), in_queue=value.in_queue)
            frames = protocol.pack_frame(protocol.EXC, sink.cid, exc_to_json(err))
        else:  # CANCELLED: the client asked; this tells it the router let go
            frames = protocol.pack_frame(protocol.EXC, sink.cid, exc_to_json(None))
        peer.out.extend(frames)
        return peer

    @staticmethod
    def _body_for(peer: Peer, call: Call) -> Buffer:
        payload = call.payload
        return payload.body if (peer.shm or payload.shm_path is None) else payload.inline_body()

    def _hand_over(self) -> None:
        """Hand outcomes to their callers, outside the lock."""
        with self._lock:
            items, self._outcomes = self._outcomes, []
        if not items:
            return
        for i, (call, outcome) in enumerate(items):
            value = outcome.value
            if isinstance(value, NoWorkersError) and getattr(value, "model", None) and not getattr(value, "explained", False):
                # The core failed it for want of workers: add what we saw.
                value.explained = True  # type: ignore[attr-defined]
                text = self._explain(call.model)
                if text:
                    value.args = (f"{value.args[0]}: {text}",)
            elif outcome.kind is OutcomeKind.EXPIRED and value.no_worker and not value.detail:
                # Its deadline passed while no worker of its model was there: say so.
                text = self._explain(call.model)
                if text:
                    items[i] = (call, Outcome(OutcomeKind.EXPIRED, value._replace(detail=text)))
        sync = [it for it in items if not hasattr(it[0].sink, "get_loop")]
        if len(sync) != len(items):
            self._deliver_async([it for it in items if hasattr(it[0].sink, "get_loop")])
        if sync:
            with self._lock:
                q = self._sync_queue
                if q is None:
                    q = self._sync_queue = queue.SimpleQueue()
                    self._sync_thread = threading.Thread(
                        target=self._sync_loop, args=(q,), name="gibbs-deliver", daemon=True
                    )
                    self._sync_thread.start()
                self._handing += 1
            try:
                for it in sync:
                    q.put(it)
            finally:
                # The delivery thread stops after the last outcome: whoever
                # is last, this hand-over or the bridge thread closing, says
                # so (a stop put while another thread still puts outcomes
                # would strand them; none put would leave it waiting).
                with self._lock:
                    self._handing -= 1
                    last = self._closed and not self._handing and not self._sync_stopped
                    if last:
                        self._sync_stopped = True
                if last:
                    q.put(None)

    def _explain(self, model: str) -> Optional[str]:
        """Why no worker of ``model`` is there, as the hub explains it."""
        text = self._absence_text.get(model)
        if text is None and self.explain_source is not None:
            source = self.explain_source()
            if source is not None:
                text = source(model)
        return text

    def _sync_loop(self, q: "queue.SimpleQueue[Optional[tuple[Call, Outcome]]]") -> None:
        """Resolves ``concurrent.futures`` callers: their done-callbacks (user
        code) run here, never on the bridge thread nor under its lock."""
        while True:
            item = q.get()
            if item is None:
                return
            try:
                self._deliver_sync(*item)
            except BaseException:  # noqa: BLE001 - a callback's error is the caller's
                call = item[0]
                logger.exception("gibbs hub: delivering a result failed",
                                 extra=logs.fields(call.model, None, self.request_id(call)))
            # Hold nothing while waiting: an answer lent from a worker's
            # shared memory goes back when its caller frees it, not later.
            del item

    def _flush_locked(self, peer: Peer) -> None:
        out = peer.out
        try:
            while out:
                chunk = [out[0]] if len(out) == 1 else list(itertools.islice(out, 64))
                sent = peer.sock.sendmsg(chunk)
                peer.last_sent = time.monotonic()
                while sent and out:
                    head = out[0]
                    n = head.nbytes if isinstance(head, memoryview) else len(head)
                    if sent >= n:
                        sent -= n
                        out.popleft()
                    else:
                        out[0] = memoryview(head)[sent:]
                        sent = 0
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # The read side will see the error or end of file and drop it.
            out.clear()
        want = bool(out)
        if want != peer.want_write:
            peer.want_write = want
            if threading.current_thread() is not self._thread:
                self._dirty.append(peer)  # the selector is the bridge thread's
                self._wake_locked()
            else:
                self._update_registration(peer)

    # ================================================================ bridge thread

    def _update_registration(self, peer: Peer) -> None:
        if peer.gone:
            return
        events = (selectors.EVENT_READ if peer.owner is None else 0) | (
            selectors.EVENT_WRITE if peer.want_write else 0
        )
        try:
            if not events:  # an event loop reads it, and nothing waits to be written
                self._selector.unregister(peer.sock)
                return
            try:
                self._selector.modify(peer.sock, events, peer)
            except KeyError:
                self._selector.register(peer.sock, events, peer)
        except (KeyError, ValueError, OSError):
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - fail every waiter, never hang them
            logger.exception("gibbs bridge thread crashed")
            err = GibbsError("the hub's bridge thread stopped unexpectedly")
            err.__cause__ = exc
            with self._lock:
                self._crashed = exc
                self._apply_locked(self._core.abort(err))
            self._shutdown_sockets()
        finally:
            self._hand_over()
            with self._lock:
                self._closed = True
                callbacks, self._on_closed = self._on_closed, []
                sync_q = self._sync_queue
                stop = sync_q is not None and not self._handing and not self._sync_stopped
                if stop:
                    self._sync_stopped = True
            if stop:
                assert sync_q is not None
                sync_q.put(None)
            self._notify_waiters()
            for cb in callbacks:
                cb()

    def _loop(self) -> None:
        sel = self._selector
        for listener in self._listeners:
            listener.setblocking(False)
            sel.register(listener, selectors.EVENT_READ, ("listener", listener))
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self._initial_upstream is not None:
            joined, self._initial_upstream = self._initial_upstream, None
            self._install_upstream(*joined)
        elif self._client_mode:
            self._start_rendezvous()
        next_check = time.monotonic()
        while True:
            deadline = next_check
            if self._losing:
                soon = time.monotonic() + 0.002
                for entry in self._losing.values():
                    deadline = min(deadline, soon if entry[3] else entry[0])
            with self._lock:
                core_deadline = self._core.next_deadline()
                if core_deadline is not None and core_deadline < deadline:
                    deadline = core_deadline
                # A call submitted from now on with an earlier deadline wakes the loop.
                self._wake_at = deadline
            events = sel.select(max(0.0, deadline - time.monotonic()))
            for key, mask in events:
                data = key.data
                if data == "wake":
                    self._drain_wake()
                elif isinstance(data, tuple):
                    if data[0] == "listener":
                        self._accept(data[1])
                    elif data[0] == "loading":
                        self._read_loading(data[1])
                    else:  # ("exit", peer): a lost local worker's process is ending
                        self._sentinel_fired(data[1])
                else:
                    peer: Peer = data
                    if mask & selectors.EVENT_READ:
                        self._read(peer)
                    if mask & selectors.EVENT_WRITE and not peer.gone:
                        with self._lock:
                            self._flush_locked(peer)
            if self._new_loading:
                with self._lock:
                    new_loading, self._new_loading = self._new_loading, []
                for sock in new_loading:
                    self._selector.register(sock, selectors.EVENT_READ, ("loading", sock))
            if self._new_peers or self._dirty or self._returned:
                with self._lock:
                    new_peers, self._new_peers = self._new_peers, []
                    dirty, self._dirty = self._dirty, []
                    returned, self._returned = self._returned, []
                for peer in dirty:
                    self._update_registration(peer)
                for peer, why in returned:
                    if why is not None:
                        self._drop(peer, why)
                    else:
                        self._update_registration(peer)
                for sock, hello, early, partial in new_peers:
                    try:
                        self._add_peer(sock, hello, early, partial)
                    except Exception as exc:  # noqa: BLE001 - that connection only
                        logger.exception("gibbs hub: internal error taking in %s (pid %d on %s); closed", hello.name, hello.pid, hello.host,
                                         extra=logs.fields(hello.model, hello.name))
                        self._forget_new_peer(sock, exc)
                if new_peers and self._home is not None:
                    self._home_changed = True
            if self._loans_back:
                self._send_loans_back()
            if self._home_changed:
                self._sync_home()
            if self._pending_upstream is not None:
                self._take_rendezvous()
            if self._core.closing and not self._listeners_closed:
                with self._lock:
                    self._home_off = True
                    self._home = None
                self._sync_home()
                self._close_listeners()
            now = time.monotonic()
            with self._lock:
                self._apply_locked(self._core.tick(now))
            if self._check_locals:
                self._check_locals = False
                self._check_local_workers()
            if self._losing:
                self._check_losses(now)
            if now >= next_check:
                self._check_absent(now)
                self._check_home(now)
                self._check_heartbeats(now)
                self._check_handshakes(now)
                self._check_local_workers()
                next_check = now + min([self._interval / 2] + [p.interval / 2 for p in self._peers.values()])
            if self._outcomes:
                self._hand_over()
            if self._core.closing and self._close_step():
                return

    def _check_absent(self, now: float) -> None:
        """Requests wait and no worker of their model is there: say so, in
        the log, once per model and interval (the error that ends the wait
        says it again). Bridge thread, outside the lock."""
        with self._lock:
            waiting = {
                name: self._core.oldest_queued(now, name)
                for name, m in self._core.models.items()
                if m.queue and m.absent_since is not None
            }
        for name in list(self._absent_warned):
            if name not in waiting:
                del self._absent_warned[name]
                self._absence_text.pop(name, None)
        source = self.explain_source() if self.explain_source is not None else None
        for name, waited in waiting.items():
            text = source(name) if source is not None else f"no worker of model {name!r} is connected"
            self._absence_text[name] = text
            last = self._absent_warned.get(name)
            if waited >= _ABSENT_WARN_AFTER and (last is None or now - last >= _ABSENT_WARN_EVERY):
                self._absent_warned[name] = now
                logger.warning(
                    "gibbs hub: requests of model %r have waited %.0f s and %s",
                    name, waited, text.replace("\n", "\n  "), extra=logs.fields(name),
                )

    def _drain_wake(self) -> None:
        # Empty the pipe first, then clear the flag: the other way round, a
        # wake-up between the two (flag set, byte written) was read away with
        # the flag left set, and every later wake-up skipped its write: the
        # bridge slept until its next timer (up to half a heartbeat).
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            self._wake_pending = False

    # ---------------------------------------------------------------- new connections

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("gibbs hub: accept failed: %s", exc)
                return
            source = _source_of(sock, addr)
            with self._lock:
                why = self._admit_locked(source)
                if why is not None:
                    sock.close()
                    logger.warning("gibbs hub: refused connection from %s (%s)", describe(addr) if addr else "local socket", why)
                    continue
                deadline = time.monotonic() + min(self._handshake_timeout, _AUTH_DEADLINE)
                self._handshaking[sock] = _Pending(deadline, source)
            threading.Thread(
                target=self._handshake, args=(sock, addr), name="gibbs-handshake", daemon=True
            ).start()

    def _admit_locked(self, source: tuple[str, Any]) -> Optional[str]:
        """Why a new connection from ``source`` is refused, if it is."""
        if self._core.closing:
            return "closing"
        pool = source[0]
        in_pool = in_source = 0
        for pending in self._handshaking.values():
            if not pending.authed and pending.source[0] == pool:
                in_pool += 1
                in_source += pending.source == source
        if in_pool >= _MAX_HANDSHAKES:
            return f"{in_pool} connections are authenticating already"
        if pool != "local" and in_source >= _MAX_PER_SOURCE:
            return f"{in_source} connections from there are authenticating already"
        return None

    def _check_handshakes(self, now: float) -> None:
        """A handshake has its deadline in all, not per read: a peer that
        trickles a byte at a time is cut off at the deadline. LOADING
        connections past theirs are closed too."""
        with self._lock:
            late = [s for s, pending in self._handshaking.items() if now > pending.deadline]
            stale = [s for s, e in self._loading.items() if now - e["since"] > _LOADING_DEADLINE]
        for sock in stale:
            self._end_loading(sock)
        for sock in late:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the handshake thread's recv returns
            except OSError:
                pass

    def _handshake(self, sock: socket.socket, addr: Any) -> None:
        """Runs in its own short-lived thread: a peer that stalls holds up only itself."""
        who = describe(addr) if addr else "local socket"
        try:
            sock.setblocking(True)
            sock.settimeout(min(self._handshake_timeout, _AUTH_DEADLINE))
            tune(sock)
            if self._ssl_context is not None and sock.family != getattr(socket, "AF_UNIX", None):
                sock = self._tls_handshake(sock, addr)
                sock.settimeout(min(self._handshake_timeout, _AUTH_DEADLINE))
            grant = authenticate(sock, self._authkey, self._explicit, self._limited_keys)
            with self._lock:  # authenticated: out of the unauthenticated pools, into its own room
                pending = self._handshaking.get(sock)
                if pending is None:
                    raise ConnectionAbortedError("closed meanwhile")
                authed = sum(1 for q in self._handshaking.values() if q.authed)
                if authed >= _MAX_AUTHENTICATED:
                    raise ConnectionRefusedError(f"{authed} authenticated connections have not said HELLO yet")
                pending.authed = True
                pending.deadline = time.monotonic() + self._handshake_timeout
            sock.settimeout(self._handshake_timeout)
            welcome = {
                "heartbeat_interval": self._interval,
                "shm_probe": self._shm_probe,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "app": self._app,
                "request_ids": self.request_ids,
            }
            sock.sendall(protocol.pack_json(protocol.WELCOME, welcome))
            reader = protocol.FrameReader(1 << 16)
            frames: list[tuple[int, int, bytes]] = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("closed before HELLO")
                frames = reader.feed(data)
            kind, _, body = frames[0]
            early = frames[1:]
            if kind in (protocol.LOADING, protocol.INIT_FAILED) and grant not in GRANT_ALL and grant != "worker":
                raise ProtocolError(f"a key limited to {grant} may not report a worker's model")
            if kind == protocol.LOADING:
                self._hold_loading(sock, Loading.from_wire(protocol.unpack_json(body)))
                return
            if kind == protocol.INIT_FAILED:
                failed = InitFailed.from_wire(protocol.unpack_json(body))
            if kind == protocol.INIT_FAILED and failed.final:
                model = failed.model or DEFAULT_MODEL
                why = (
                    f"the supervisor {failed.name} (pid {failed.pid} on {failed.host}) stopped "
                    f"starting workers of model {model!r}: {failed.message}"
                )
                logger.error("gibbs hub: %s", why, extra=logs.fields(model))
                sock.close()
                self.give_up_model(model, why)
                return
            if kind == protocol.INIT_FAILED:
                line = (
                    f"worker {failed.name} (pid {failed.pid} on {failed.host}) "
                    f"failed to build model {failed.model or DEFAULT_MODEL!r}: "
                    f"{failed.exc_type}: {failed.message}\n{failed.traceback}"
                )
                logger.error("gibbs hub: %s", line, extra=logs.fields(failed.model or DEFAULT_MODEL, failed.name))
                with self._lock:
                    self._init_failures.append((failed.pid, line))
                    self._check_locals = True
                    self._wake_locked()
                sock.close()
                return
            if kind != protocol.HELLO:
                raise ProtocolError(f"expected HELLO, got {protocol.KIND_NAMES.get(kind)}")
            info = Hello.from_wire(protocol.unpack_json(body))
            if grant not in GRANT_ALL and info.role != grant:
                # Roles are privileges: a client hub submits work, a worker
                # answers calls; a key limited to one role gives no other.
                raise ProtocolError(f"a key limited to {grant} may not join as {info.role}")
            if info.role == "client" and info.app is not None and self._app not in (None, ANY_APP, info.app):
                # A hub of another program found our address: never route
                # its calls to our models (it is told why, and raises).
                reason = (
                    f"this address is held by the hub of another application ({self._app}); "
                    f"the client hub's application is {info.app}"
                )
                sock.sendall(protocol.pack_json(protocol.REFUSED, {"reason": reason, "app": self._app}))
                raise ProtocolError(f"refused a client hub of another application ({info.app})")
            if (early or reader.pending) and info.role == "worker":
                # A worker speaks only when spoken to.
                raise ProtocolError("unexpected bytes after HELLO")
            # A client or an observer may send its first request right
            # behind its HELLO (e.g. ``gibbs status``): it is read here, in
            # the same recv, and must reach the peer, not be dropped.
            partial = reader.take_pending()
            sock.settimeout(None)
            sock.setblocking(False)
            with self._lock:
                self._handshaking.pop(sock, None)
                if self._core.closing:
                    sock.close()
                    return
                self._new_peers.append((sock, info, early, partial))
                self._wake_locked()
        except Exception as exc:  # noqa: BLE001 - any failure closes this connection only
            logger.warning("gibbs hub: rejected connection from %s: %s", who, exc)
            with self._lock:
                self._n_handshake_failures += 1
                self._handshake_failures.append(f"a connection from {who} failed its handshake: {exc}")
            sock.close()
        finally:
            with self._lock:
                self._handshaking.pop(sock, None)

    def _tls_handshake(self, sock: socket.socket, addr: Any) -> socket.socket:
        """TLS on a new TCP connection, within its handshake deadline (the
        TLS socket, then the tunnel, take the raw socket's place among the
        pending handshakes, so the deadline still cuts them off). Returns
        the tunnel's socket: a TCP stranger to the key check, whatever the
        kernel says of a socketpair (:func:`gibbs.transport.is_local`)."""
        assert self._ssl_context is not None
        tls = self._ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        current: socket.socket = tls
        try:
            self._rekey_handshake(sock, tls)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                raise ConnectionRefusedError(f"TLS handshake failed (a peer without TLS, or an untrusted certificate?): {exc}") from None
            current = tunnel(tls, addr, name="gibbs-tls-hub")
            self._rekey_handshake(tls, current)
            return current
        except BaseException:
            with self._lock:
                self._handshaking.pop(current, None)
            current.close()  # the tunnel's end: its pump closes the TLS socket
            raise

    def _rekey_handshake(self, old: socket.socket, new: socket.socket) -> None:
        with self._lock:
            pending = self._handshaking.pop(old, None)
            if pending is None:
                raise ConnectionAbortedError("closed meanwhile")
            self._handshaking[new] = pending

    def _hold_loading(self, sock: socket.socket, info: Loading) -> None:
        """A worker building its model: listed as loading until it closes
        this connection (built, or failed), watched by the bridge thread.
        Runs in its handshake thread, which ends here."""
        entry = {
            "pid": info.pid,
            "host": info.host,
            "name": info.name,
            "model": info.model or DEFAULT_MODEL,
            "device": info.device,
            "since": time.monotonic(),
        }
        with self._lock:
            self._handshaking.pop(sock, None)
            refused = "closing" if self._core.closing else None
            if refused is None and len(self._loading) >= _MAX_LOADING:
                refused = f"{len(self._loading)} workers are loading already"
            if refused is None:
                sock.setblocking(False)
                self._loading[sock] = entry
                self._new_loading.append(sock)
                self._count_loading_locked(str(entry["model"]))
                self._wake_locked()
        if refused is not None:
            logger.warning("gibbs hub: refused LOADING from %s (pid %d on %s): %s", info.name, info.pid, info.host, refused,
                           extra=logs.fields(info.model, info.name))
            sock.close()
            return
        self._notify_waiters()

    def _read_loading(self, sock: socket.socket) -> None:
        """Bridge thread: a LOADING connection is readable: its end (the model
        is built, or failed), or bytes it had no reason to send."""
        try:
            if sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end_loading(sock)

    def _end_loading(self, sock: socket.socket) -> None:
        with self._lock:
            entry = self._loading.pop(sock, None)
            if entry is not None:
                self._count_loading_locked(str(entry["model"]))
                self._wake_locked()  # a deadline of the core may have moved
        if entry is None:
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self._notify_waiters()

    def _count_loading_locked(self, model: str) -> None:
        n = sum(1 for e in self._loading.values() if e["model"] == model)
        self._apply_locked(self._core.workers_loading(model, n, time.monotonic()))

    def roll_out(self, model: str, cls: Optional[str]) -> None:
        """A pool's rolling update begins (the new class may serve the model
        beside the old) or ends (None)."""
        with self._lock:
            self._apply_locked(self._core.roll_out(model, cls))

    def init_failure_of(self, pid: Optional[int]) -> Optional[str]:
        """The constructor failure a local worker (by pid) reported, waiting
        a moment for its report (sent as the process exits)."""
        deadline = time.monotonic() + INIT_REPORT_WAIT
        while True:
            with self._lock:
                text = next((t for p, t in reversed(self._init_failures) if pid is not None and p == pid), None)
            if text is not None or time.monotonic() >= deadline:
                return text
            time.sleep(0.05)

    def observe(self, model: str) -> dict[str, Any]:
        """What a pool supervising ``model`` needs: calls queued, the oldest
        one's wait, busy workers, and each worker's state and calls served
        by the token in its HELLO."""
        now = time.monotonic()
        with self._lock:
            m = self._core.models.get(model)
            if m is None:
                return {"queued": 0, "oldest": 0.0, "busy": 0, "workers": {}}
            workers = {
                token: {"served": w.served, "state": "leaving" if w.leaving else "busy" if w.units else "ready"}
                for w in m.workers.values()
                if (token := getattr(w.id, "token", None))
            }
            return {
                "queued": len(m.queue),
                "oldest": self._core.oldest_queued(now, model),
                "busy": sum(1 for w in m.workers.values() if w.units and not w.leaving),
                "workers": workers,
            }

    def has_joined(self, token: str) -> bool:
        """Whether the worker whose HELLO carried ``token`` ever joined this
        hub (a token, unlike a pid, is unique across machines)."""
        with self._lock:
            return token in self._joined_tokens

    def give_up_model(self, model: str, why: str) -> None:
        """A pool stopped restarting the workers of ``model``: its queued and
        new requests fail at once (until a worker of it joins), with the
        constructor's traceback when one was reported."""
        with self._lock:
            lines = [t for _, t in self._init_failures if f"model {model!r}" in t]
            err = NoWorkersError(why + ("\n  " + "\n  ".join(x.rstrip().replace("\n", "\n  ") for x in lines[-1:]) if lines else ""))
            self._apply_locked(self._core.model_unavailable(model, err))
        if self._outcomes:
            self._hand_over()
        self._notify_waiters()

    def loading(self) -> list[dict[str, Any]]:
        """Workers building their model now: pid, host, name, model, device, seconds."""
        now = time.monotonic()
        with self._lock:
            return [
                {k: v for k, v in e.items() if k != "since"} | {"seconds": now - e["since"]}
                for e in self._loading.values()
            ]

    def _add_peer(
        self,
        sock: socket.socket,
        hello: Hello,
        early: Sequence[tuple[int, int, bytes]] = (),
        partial: bytes = b"",
    ) -> None:
        peer = Peer(sock, hello, self._max_frame)
        if peer.role in ("client", "observer"):
            self._selector.register(sock, selectors.EVENT_READ, peer)
            with self._lock:
                self._clients[peer.fd] = peer
                if peer.role == "client":
                    peer.out.append(self._pool_frame_locked())
                    self._flush_locked(peer)
            logger.info("gibbs hub: %s joined", peer.describe(), extra=logs.peer(peer))
            try:
                peer.reader.feed(partial)  # an incomplete frame: nothing comes out yet
                if early:
                    if peer.role == "client":
                        self._client_frames(peer, list(early))
                    else:
                        self._observer_frames(peer, list(early))
            except (ProtocolError, ValueError) as exc:
                logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
                self._drop(peer, f"protocol error: {exc}")
            return
        if peer.role != "worker":
            logger.warning("gibbs hub: %s named an unknown role %r; closed", peer.describe(), peer.role, extra=logs.peer(peer))
            sock.close()
            return
        if peer.shm:
            with self._lock:
                twin = next((q for q in self._peers.values() if q.pid == peer.pid and q.shm and not q.gone), None)
            if twin is not None and (not peer.vouched or not twin.vouched):
                # Two peers on one machine cannot share a pid: one of them lies,
                # and the pid names the shared-memory files the hub reads and removes.
                logger.warning(
                    "gibbs hub: refused %s: pid %d is already that of %s", peer.describe(), peer.pid, twin.describe(),
                    extra=logs.peer(peer),
                )
                sock.close()
                return
        model = hello.model or DEFAULT_MODEL
        peer.info = WorkerInfo(
            peer,
            model,
            hello.cls,
            slots=hello.concurrency,
            batch_size=hello.batch_size,
            depth=self._depth,
            describe=peer.describe(),
            token=hello.token,
        )
        self._selector.register(sock, selectors.EVENT_READ, peer)
        with self._lock:
            self._peers[peer.fd] = peer
            actions = self._core.worker_joined(peer.info, time.monotonic(), hello.batch_wait)
            self._apply_locked(actions)
            if peer.gone:  # refused
                del self._peers[peer.fd]
            else:
                if peer.vouched:
                    self._joined_pids.add(peer.pid)
                if hello.token:
                    self._joined_tokens.add(hello.token)
                self._refresh_batched_locked(model)
                self._broadcast_pool_locked()
        if peer.gone:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            return
        logger.info("gibbs hub: %s joined (model %r)", peer.describe(), model, extra=logs.peer(peer))
        self._notify_waiters()

    def _forget_new_peer(self, sock: socket.socket, exc: BaseException) -> None:
        """Bridge thread: ``_add_peer`` failed on a bug: close that
        connection, and if it got as far as joining, its loss reaches the core."""
        with self._lock:
            peer = self._peers.get(sock.fileno()) or self._clients.get(sock.fileno())
        if peer is not None and peer.sock is sock:
            self._drop(peer, f"internal error: {exc!r}")
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # ---------------------------------------------------------------- reading

    def _read(self, peer: Peer) -> None:
        why: Optional[str]
        try:
            if peer.role != "worker":
                self._read_hub(peer)
                return
            why = self._read_worker(peer, self._rbuf, self._rview)
        except Exception as exc:  # noqa: BLE001 - a bug met on one peer's bytes drops that peer, not the hub
            why = _internal_error(peer, exc)
        if why is not None:
            self._drop(peer, why)

    def _read_worker(self, peer: Peer, buf: bytearray, view: memoryview) -> Optional[str]:
        """Read and act on what a worker sent; in the bridge thread, or in the
        event loop that reads this socket. Returns why to drop it, if so."""
        try:
            # Into one reused buffer: a fresh 256 KiB bytes object per read
            # would be an mmap and munmap each time.
            n = peer.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return f"connection error: {exc}"
        if not n:
            return "connection closed (end of file)"
        peer.last_heard = time.monotonic()
        held = peer.reader.pending
        try:
            frames = peer.reader.feed(view[:n])
        except ProtocolError as exc:
            logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
            return f"protocol error: {exc}"
        if held or peer.reader.pending:
            why = self._account_buffered(peer)
            if why is not None:
                return why
        if not frames:
            return None
        releases: list[Buffer] = []
        answers: list[tuple[int, int, Optional[Outcome]]] = []
        bad: Optional[str] = None  # a malformed frame: the answers before it count, then the peer goes
        for kind, req_id, body in frames:
            if kind == protocol.RESULT:
                if protocol.is_shm(body):
                    # Read in place and lent to the caller (the segment goes
                    # back when the caller frees it); or, over the limit of
                    # what is lent, copied out so that the worker can reuse
                    # its segment at once (RELEASE below).
                    try:
                        pickled, views, name, size = protocol.read_views(
                            body, self._maps, readonly=False, owner=f"{protocol.SHM_PREFIX}w{peer.pid}-"
                        )
                        if not peer.vouched and len(peer.segments) < 4096:
                            peer.segments.add(name)
                        with self._loan_lock:
                            lend = self._loans_open and self._lent_bytes + size <= self._max_lent
                            if lend:
                                self._lent_bytes += size
                                self._lent_segments += 1
                                self._answers_lent += 1
                            else:
                                self._answers_copied += 1
                        if lend:
                            buffers: list[Any] = _lend(self, peer, name, size, views)
                        else:
                            buffers = [bytearray(v) for v in views]
                        del views
                    except ProtocolError as exc:
                        logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
                        bad = f"protocol error: {exc}"
                        break
                    except (OSError, ValueError) as exc:
                        err = SerializationError(f"the answer's shared-memory segment could not be read: {exc}")
                        answers.append((kind, req_id, Outcome(OutcomeKind.EXCEPTION, err)))
                    else:
                        answers.append((kind, req_id, Outcome(OutcomeKind.COPIED, (pickled, buffers))))
                        if not lend:
                            releases.extend(protocol.pack_frame(protocol.RELEASE, 0, name.encode()))
                else:
                    answers.append((kind, req_id, Outcome(OutcomeKind.RESULT, body)))
            elif kind == protocol.ERROR:
                answers.append((kind, req_id, Outcome(OutcomeKind.ERROR, body)))
            elif kind == protocol.CHUNK:
                answers.append((kind, req_id, Outcome(OutcomeKind.CHUNK, body)))
            else:
                answers.append((kind, req_id, None))
        now = time.monotonic()
        core = self._core
        with self._lock:
            for kind, req_id, outcome in answers:
                if kind == protocol.CHUNK:
                    self._apply_locked(core.chunk(peer, req_id, outcome))  # type: ignore[arg-type]
                elif outcome is not None:
                    self._apply_locked(core.answered(peer, req_id, outcome, now))
                elif kind == protocol.HEARTBEAT:
                    pass
                elif kind == protocol.GOODBYE:
                    logger.info("gibbs hub: %s is leaving", peer.describe(), extra=logs.peer(peer))
                    self._apply_locked(core.worker_leaving(peer, now))
                else:
                    logger.warning("gibbs hub: %s sent unexpected %s", peer.describe(), protocol.KIND_NAMES.get(kind),
                                   extra=logs.peer(peer))
            if releases:
                peer.out.extend(releases)
                self._flush_locked(peer)
        return bad

    # ---------------------------------------------------------------- lent answers

    def _account_buffered(self, peer: Peer) -> Optional[str]:
        """Any reading thread: ``peer`` holds this many bytes of a frame not
        complete yet. Over ``max_buffered`` bytes from all peers together,
        the peer that holds the most is dropped: returned here if it is
        this one, else handed to the bridge thread to drop."""
        pending = peer.reader.pending
        with self._buffered_lock:
            if pending:
                self._buffered[peer] = pending
            else:
                self._buffered.pop(peer, None)
            total = sum(self._buffered.values())
            if total <= self._max_buffered:
                return None
            worst = max(self._buffered, key=self._buffered.__getitem__)
            del self._buffered[worst]
        why = (
            f"bytes buffered from peers over the hub's bound of {self._max_buffered} "
            f"({total} in all, {worst.reader.pending} from this one)"
        )
        logger.warning("gibbs hub: dropping %s: %s", worst.describe(), why, extra=logs.peer(worst))
        if worst is peer:
            return why
        self._give_back(worst, why)
        return None

    def _loan_back(self, peer: Peer, name: str, size: int) -> None:
        """Any thread: a lent segment was freed by its caller."""
        with self._loan_lock:
            self._lent_bytes -= size
            self._lent_segments -= 1
            if not self._loans_open:
                return  # the hub closed: the worker's connection is gone with it
            self._loans_back.append((peer, name))
            try:
                os.write(self._wake_w, b"\0")  # the bridge thread sends the RELEASE
            except OSError:
                pass

    def _send_loans_back(self) -> None:
        """Bridge thread: RELEASE frames for the segments callers freed."""
        with self._loan_lock:
            back, self._loans_back = self._loans_back, []
        with self._lock:
            for peer, name in back:
                if not peer.gone:  # else its worker is gone, or was told to forget its files
                    peer.out.extend(protocol.pack_frame(protocol.RELEASE, 0, name.encode()))
                    self._flush_locked(peer)

    def shared_memory(self) -> dict[str, Any]:
        """What shared memory holds now: the requests' segments (this hub's
        pool) and the answers lent to callers."""
        with self._loan_lock:
            out: dict[str, Any] = {
                "lent": self._lent_segments,
                "lent_bytes": self._lent_bytes,
                "lent_limit_bytes": self._max_lent,
                "answers_lent": self._answers_lent,
                "answers_copied": self._answers_copied,
            }
        pool = self._request_pool
        out["requests"] = pool.stats() if pool is not None else {"leased": 0, "leased_bytes": 0, "free": 0, "free_bytes": 0}
        return out

    # ---------------------------------------------------------------- the home loop

    def _sync_home(self) -> None:
        """Bridge thread: attach the worker sockets to the home loop, or take
        them back from a loop that is no longer it."""
        with self._lock:
            self._home_changed = False
            home = self._home
            if home is not None and (home.is_closed() or not home.is_running()):
                home = self._home = None  # it stopped: the next request makes a loop home again
            if self._home_off or self._core.closing:
                home = self._home = None
            peers = [p for p in self._peers.values() if p.role == "worker" and not p.gone]
        reader = self._home_reader
        if home is None:
            reader = self._home_reader = None
        elif reader is None or reader.loop is not home:
            reader = self._home_reader = _LoopReader(home)
        for peer in peers:
            att = peer.owner
            if att is not None and (reader is None or att.reader is not reader):
                self._reclaim(peer)
            if reader is not None and peer.owner is None:
                self._attach(peer, reader)
        if reader is not None and self._home is not reader.loop:
            self._sync_home()  # it closed while its sockets were handed over: take back those it has

    def _attach(self, peer: Peer, reader: _LoopReader) -> None:
        """Bridge thread: from now on ``reader.loop`` reads ``peer``."""
        att = _Attachment(reader)
        with peer.rlock:
            peer.owner = att
        self._update_registration(peer)  # no more read interest here
        try:
            reader.loop.call_soon_threadsafe(self._attach_in_loop, peer, att)
        except RuntimeError:  # closed meanwhile
            with peer.rlock:
                peer.owner = None
            self._update_registration(peer)
            with self._lock:
                if self._home is reader.loop:
                    self._home = None  # _sync_home takes back the sockets attached before this one

    def _attach_in_loop(self, peer: Peer, att: _Attachment) -> None:
        """In the home loop: watch a duplicate of the socket's descriptor."""
        with peer.rlock:
            if peer.owner is not att or peer.gone:
                return  # taken back before this ran
            with att.lock:
                if att.closed:
                    return
                att.fd = os.dup(peer.fd)
            try:
                att.loop.add_reader(att.fd, self._loop_read, peer, att)
            except BaseException:
                peer.owner = None
                self._close_att(att)
                self._give_back(peer, None)
                raise

    def _loop_read(self, peer: Peer, att: _Attachment) -> None:
        """In the home loop: the worker's socket is readable."""
        with peer.rlock:
            mine = peer.owner is att
            try:
                why = self._read_worker(peer, att.reader.buf, att.reader.view) if mine else None
            except Exception as exc:  # noqa: BLE001 - as in the bridge thread: drop that peer only
                why = _internal_error(peer, exc)
            if mine and why is not None:
                peer.owner = None
        if not mine:  # taken back: stop watching (the bridge thread reads it now)
            self._close_att(att)
            return
        if why is not None:  # its end, or garbage: the bridge thread drops it
            self._close_att(att)
            self._give_back(peer, why)
        if self._outcomes:
            self._hand_over()  # to this loop's callers directly, no thread hop

    def _give_back(self, peer: Peer, why: Optional[str]) -> None:
        with self._lock:
            self._returned.append((peer, why))
            self._wake_locked()

    def _close_att(self, att: _Attachment) -> None:
        """In the attachment's loop (or once it is closed): stop watching and
        close the duplicate descriptor. Once."""
        with att.lock:
            if att.closed:
                return
            att.closed = True
            fd, att.fd = att.fd, None
        if fd is None:
            return
        try:
            if not att.loop.is_closed():
                att.loop.remove_reader(fd)
        finally:
            os.close(fd)

    def _reclaim(self, peer: Peer) -> None:
        """Bridge thread: read ``peer`` here again (its loop lets go of it
        when it next runs; until then its duplicate descriptor stays open)."""
        with peer.rlock:  # waits for a read in progress in the loop
            att = peer.owner
            if att is None:
                return
            peer.owner = None
        self._update_registration(peer)
        self._detaching.append(att)
        if not att.loop.is_running():
            # A stopped loop may never run again (a loop of run_until_complete
            # that is dropped unclosed): close its duplicate now. Nothing is
            # polling it, so removing the reader from this thread is safe.
            self._close_att(att)
            return
        try:
            att.loop.call_soon_threadsafe(self._close_att, att)
        except RuntimeError:  # the loop is closed: nothing watches the descriptor
            self._close_att(att)

    def _check_home(self, now: float) -> None:
        """Bridge thread, now and then: take the sockets back from a home loop
        that stopped, closed, or has not read what its workers sent for a
        while (user code blocks it), so that no caller waits on it; close
        the duplicates of loops that closed before letting go."""
        home = self._home
        if home is None and not self._home_changed:
            with self._lock:
                orphans = any(p.owner is not None and not p.gone for p in self._peers.values())
            if orphans:  # owned by a loop that is home no more: take them back
                self._sync_home()
        if home is not None:
            stuck = home.is_closed() or not home.is_running()
            if not stuck:
                with self._lock:
                    owned = [p for p in self._peers.values() if p.owner is not None and not p.gone]
                for peer in owned:
                    if now - peer.last_heard > min(0.5, peer.interval) and _has_data(peer.sock):
                        logger.info("gibbs hub: the event loop did not read %s for %.1f s; the bridge "
                                    "thread reads its workers", peer.describe(), now - peer.last_heard, extra=logs.peer(peer))
                        stuck = True
                        break
            if stuck:
                with self._lock:
                    if self._home is home:
                        self._home = None
                self._sync_home()
        if self._detaching:
            for att in list(self._detaching):
                if not att.closed and not att.loop.is_running():
                    self._close_att(att)
                if att.closed:
                    self._detaching.remove(att)

    def _drop(self, peer: Peer, reason: str) -> None:
        """Close a worker's connection; its loss reaches the core once the
        exit status of a local worker process is known (or soon anyway)."""
        if peer.gone:
            return
        with self._buffered_lock:
            self._buffered.pop(peer, None)
        if peer.role in ("client", "observer"):
            self._drop_client(peer, reason)
            return
        if peer.role == "router":
            self._lose_upstream(reason)
            return
        if peer.owner is not None:
            self._reclaim(peer)
        peer.gone = True
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        try:
            # An event loop may still hold a duplicate of the descriptor (or a
            # forked child an inherited one): make the end reach the worker.
            peer.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        peer.sock.close()
        local = None
        if not peer.info.leaving and peer.vouched:
            local = next((w for w in self._local_workers() if w.pid == peer.pid), None)
        if local is not None and local.exitcode() is None:
            # Its socket closes a moment before its exit status is known:
            # wait (a little) for the status, so the error can say how it died.
            try:
                self._selector.register(local.sentinel, selectors.EVENT_READ, ("exit", peer))
            except (KeyError, ValueError, OSError):
                pass
            self._losing[peer] = [time.monotonic() + _EXIT_STATUS_WAIT, reason, local, False]
            return
        self._lose(peer, reason, local)

    def _sentinel_fired(self, peer: Peer) -> None:
        entry = self._losing.get(peer)
        if entry is not None:
            self._unregister_sentinel(entry[2])
            entry[3] = True  # exiting now: poll for the status until it is there

    def _unregister_sentinel(self, local: LocalWorker) -> None:
        try:
            self._selector.unregister(local.sentinel)
        except (KeyError, ValueError, OSError):
            pass

    def _check_losses(self, now: float) -> None:
        for peer, (deadline, reason, local, _) in list(self._losing.items()):
            if local.exitcode() is not None or now >= deadline:
                del self._losing[peer]
                self._unregister_sentinel(local)
                self._lose(peer, reason, local)

    def _lose(self, peer: Peer, reason: str, local: Optional[LocalWorker]) -> None:
        if local is not None:
            code = local.exitcode()
            if code is not None:
                reason = f"{reason}; {describe_exit(code)}"
        with self._lock:
            self._peers.pop(peer.fd, None)
            if peer.info.leaving and not peer.info.held:
                logger.info("gibbs hub: %s left", peer.describe(), extra=logs.peer(peer))
            else:
                rids = ",".join(self.request_id(c) for c in peer.info.held.values()) or None
                logger.warning("gibbs hub: lost %s: %s", peer.describe(), reason, extra=logs.peer(peer, rids))
            self._apply_locked(self._core.worker_lost(peer, reason, time.monotonic()))
            self._refresh_batched_locked(peer.info.model)
            self._broadcast_pool_locked()
        if peer.shm:
            # The worker's segments: answers it never sent, and its pool.
            prefix = f"{protocol.SHM_PREFIX}w{peer.pid}-"
            if peer.vouched:
                self._maps.forget(prefix)
                if not peer.info.leaving:
                    protocol.remove_segments(prefix)
            else:  # its pid is a claim: only the files it showed us are its own
                for name in peer.segments:
                    self._maps.forget(name)
                    if not peer.info.leaving:
                        protocol.remove_segments(name)
        self._notify_waiters()

    def _refresh_batched_locked(self, model: str) -> None:
        """Whether calls to ``model`` must be batchable: while a batched
        worker serves it (a name may change hands once its workers left)."""
        m = self._core.models.get(model)
        if m is not None and any(w.batch_size > 1 for w in m.workers.values()):
            self._batched_models.add(model)
        else:
            self._batched_models.discard(model)

    # ---------------------------------------------------------------- local workers

    def _check_local_workers(self) -> None:
        """Fail fast when no worker can come: every worker process this
        process started for a model has exited without ever joining (its
        constructor raised, or it could not start), and none is connected."""
        locals_ = self._local_workers()
        if not locals_:
            return
        by_model: dict[str, list[LocalWorker]] = {}
        for w in locals_:
            by_model.setdefault(w.model, []).append(w)
        changed = False
        with self._lock:
            for model, ws in by_model.items():
                m = self._core.models.get(model)
                if m is not None and (m.workers or m.unavailable is not None):
                    continue
                codes = [w.exitcode() for w in ws]
                if any(c is None for c in codes) or any(w.pid in self._joined_pids for w in ws):
                    continue
                pids = {w.pid for w in ws}
                lines = [t for pid, t in self._init_failures if pid in pids]
                lines += [f"local worker pid {w.pid} exited: {describe_exit(c)}" for w, c in zip(ws, codes) if c]
                err = NoWorkersError(
                    f"no worker can serve model {model!r}: every worker started for it in this process "
                    f"({len(ws)}) exited without joining:\n  " + "\n  ".join(x.rstrip().replace("\n", "\n  ") for x in lines)
                )
                self._apply_locked(self._core.model_unavailable(model, err))
                changed = True
        if changed:
            if self._outcomes:
                self._hand_over()
            self._notify_waiters()

    # ---------------------------------------------------------------- heartbeats

    def _check_heartbeats(self, now: float) -> None:
        hb = protocol.pack_frame(protocol.HEARTBEAT, 0)[0]
        peers = list(self._peers.values()) + list(self._clients.values())
        if self._upstream is not None:
            peers.append(self._upstream)
        for peer in peers:
            if peer.gone:
                continue
            silent = now - peer.last_heard
            limit = peer.interval * self._misses
            if silent > limit:
                self._drop(peer, f"silent for {silent:.1f} s (no heartbeat within {limit:.1f} s)")
                continue
            if now - peer.last_sent >= self._interval / 2:
                with self._lock:
                    peer.out.append(hb)
                    self._flush_locked(peer)

    # ---------------------------------------------------------------- closing

    def _close_step(self) -> bool:
        """While closing: True once everything is closed."""
        now = time.monotonic()
        with self._lock:
            self._apply_locked(self._core.tick(now))
            # An idle worker is let go at once: it goes back to looking for a
            # hub, and finds the one that takes the address over (if any)
            # without waiting for this one's grace period.
            idle = [p for p in self._peers.values() if not p.info.held and not p.gone]
            for p in idle:
                self._apply_locked(self._core.worker_leaving(p, now))
            busy = not self._core.idle
        for p in idle:
            self._drop(p, "the hub is closing")
        if busy:
            return False
        self._hand_over()
        self._shutdown_sockets()
        self._maps.clear()
        return True

    def _shutdown_sockets(self) -> None:
        for att in self._detaching:
            if not att.closed and not att.loop.is_running():
                self._close_att(att)  # a stopped loop may never run again to close it
        if any(not att.closed for att in self._detaching):
            # Event loops may hold duplicates of worker sockets until they
            # next run: shut the connections down so that the workers see
            # their end now.
            for p in list(self._peers.values()):
                try:
                    p.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self._lock:
            loading = list(self._loading)
        for sock in loading:
            self._end_loading(sock)
        socks = [p.sock for p in self._peers.values()] + [p.sock for p in self._clients.values()]
        if self._upstream is not None:
            socks.append(self._upstream.sock)
        with self._lock:
            pending, self._pending_upstream = self._pending_upstream, None
        socks += self._rendezvous_sockets(pending)
        self._close_descriptors(socks)
        self._peers.clear()
        self._clients.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptors without touching
        the parent's connections (no shutdown, no messages). The lock may have
        been held by a thread that does not exist here: do not take it (nor
        the loans' lock: a thread of the parent may have held it at the fork,
        a finalizer giving an answer back; this process gets a fresh one)."""
        self._loan_lock = threading.RLock()
        socks = [p.sock for p in self._peers.values()] + [p.sock for p in self._clients.values()]
        socks += list(self._handshaking) + [entry[0] for entry in self._new_peers] + list(self._loading)
        if self._upstream is not None:
            socks.append(self._upstream.sock)
        socks += self._rendezvous_sockets(self._pending_upstream)
        for p in list(self._peers.values()):
            att = p.owner
            if att is not None and att.fd is not None:
                try:
                    os.close(att.fd)
                except OSError:
                    pass
        self._close_descriptors(socks)

    def _close_descriptors(self, socks: list[socket.socket]) -> None:
        """Close ``socks``, the listeners, the selector and the wake-up pipe
        (a plain close: no shutdown, so a forked child can use it too). Once
        only: afterwards the pipe's numbers may belong to someone else."""
        if self._fds_closed:
            return
        self._fds_closed = True
        for sock in socks + self._listeners:
            try:
                sock.close()
            except OSError:
                pass
        try:
            self._selector.close()
        except (OSError, RuntimeError):
            pass
        with self._loan_lock:  # a lent answer freed from now on writes no wake-up
            self._loans_open = False
            self._loans_back.clear()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


    # ================================================================ family of hubs

    # ---------------------------------------------------------------- router side

    def _pool_frame_locked(self) -> bytes:
        models = {}
        for name, m in self._core.models.items():
            n = sum(1 for w in m.workers.values() if not w.leaving)
            if n or m.queue:
                models[name] = {
                    "class": m.cls,
                    "workers": n,
                    "batched": name in self._batched_models,
                    "queued": len(m.queue),
                }
        return protocol.pack_json(protocol.POOL, {"models": models})

    def _broadcast_pool_locked(self) -> None:
        """Tell every client hub what the pool now holds (their
        ``wait_for_workers``, ``models()`` and batching checks read it)."""
        if not self._clients:
            return
        frame = self._pool_frame_locked()
        for peer in self._clients.values():
            if not peer.gone and peer.role == "client":
                peer.out.append(frame)
                self._flush_locked(peer)

    def _read_hub(self, peer: Peer) -> None:
        """Frames from another hub: a client routing through us, or our router."""
        try:
            n = peer.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(peer, f"connection error: {exc}")
            return
        if not n:
            self._drop(peer, "connection closed (end of file)")
            return
        peer.last_heard = time.monotonic()
        try:
            frames = peer.reader.feed(self._rview[:n])
            why = self._account_buffered(peer) if peer.reader.pending or peer in self._buffered else None
            if why is not None:
                self._drop(peer, why)
                return
            if peer.role == "client":
                self._client_frames(peer, frames)
            elif peer.role == "observer":
                self._observer_frames(peer, frames)
            else:
                self._router_frames(peer, frames)
        except (ProtocolError, ValueError) as exc:
            logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
            self._drop(peer, f"protocol error: {exc}")

    def _client_frames(self, peer: Peer, frames: list[tuple[int, int, bytes]]) -> None:
        core = self._core
        calls = peer.calls
        assert calls is not None
        now = time.monotonic()
        with self._lock:
            for kind, cid, body in frames:
                if kind == protocol.FORWARD:
                    model, flags, payload, rid, trace = protocol.unpack_forward(body)
                    if cid in calls:
                        raise ProtocolError(f"call id {cid} forwarded twice")
                    stream = bool(flags & protocol.FWD_STREAM)
                    call = Call(self._next_id, model, Forwarded(payload, rid, trace), ClientSink(peer, cid), stream)
                    call.origin = peer.hello.within  # a client hub inside a worker: that worker's token
                    self._next_id += 1
                    err: Optional[BaseException] = None
                    if model in self._batched_models and (stream or not flags & protocol.FWD_SINGLE):
                        err = TypeError(
                            f"model {model!r} is batched: a request takes exactly one positional argument and "
                            "no keyword arguments, and cannot be streamed"
                        )
                    else:
                        try:
                            actions = core.submit(call, now)
                        except Exception as exc:  # noqa: BLE001 - the caller's to see
                            err = exc
                    if err is not None:
                        peer.out.extend(protocol.pack_frame(protocol.EXC, cid, exc_to_json(err)))
                        continue
                    calls[cid] = call
                    self._apply_locked(actions)
                elif kind == protocol.STOP:
                    held = calls.get(cid)
                    if held is not None:
                        self._apply_locked(core.cancel(held))
                elif kind == protocol.RESEND:
                    held = calls.get(cid)
                    if held is not None:
                        self._apply_locked(core.resend(held, now))
                elif kind == protocol.CREDIT:
                    held = calls.get(cid)
                    if held is not None:
                        self._apply_locked(core.consumed(held, protocol.unpack_credit(body)))
                elif kind != protocol.HEARTBEAT:
                    raise ProtocolError(f"unexpected {protocol.KIND_NAMES.get(kind)} from a client hub")
            self._flush_locked(peer)
        if self._outcomes:
            self._hand_over()

    def _observer_frames(self, peer: Peer, frames: list[tuple[int, int, bytes]]) -> None:
        """``python -m gibbs status``: it may read statistics, nothing else."""
        for kind, _, _ in frames:
            if kind == protocol.STATS:
                source = self.stats_source() if self.stats_source is not None else None
                stats = source() if source is not None else self.statistics()
                body = json.dumps({"statistics": stats, "workers": self.workers()}, default=str).encode()
                with self._lock:
                    peer.out.extend(protocol.pack_frame(protocol.STATS, 0, body))
                    self._flush_locked(peer)
            elif kind != protocol.HEARTBEAT:
                raise ProtocolError(f"an observer may only ask for STATS, not {protocol.KIND_NAMES.get(kind)}")

    def _drop_client(self, peer: Peer, reason: str) -> None:
        """A client hub went away (its process died or closed): its calls are
        cancelled; queued ones never run (it sends them again elsewhere, if
        it can)."""
        peer.gone = True
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        with self._lock:
            self._clients.pop(peer.fd, None)
            calls = list(peer.calls.values()) if peer.calls else []
            if peer.calls:
                peer.calls.clear()
            for call in calls:
                self._apply_locked(self._core.cancel(call))
        logger.info("gibbs hub: %s left (%s); %d of its calls cancelled", peer.describe(), reason, len(calls),
                    extra=logs.peer(peer, ",".join(self.request_id(c) for c in calls) or None))
        if self._outcomes:
            self._hand_over()

    def _close_listeners(self) -> None:
        """Closing: let go of the address at once, so that another hub of the
        family can take it over while our running calls finish."""
        self._listeners_closed = True
        for listener in self._listeners:
            try:
                self._selector.unregister(listener)
            except (KeyError, ValueError):
                pass
            try:
                listener.close()
            except OSError:
                pass

    # ---------------------------------------------------------------- client side

    def _add_relay_locked(self, model: str) -> None:
        up = self._upstream
        assert up is not None
        relay = WorkerInfo(
            Relay(model), model, "", slots=1 << 30, depth=1 << 30, describe=f"the router hub ({up.describe()})",
            relay=True,
        )
        self._relays[model] = relay
        self._apply_locked(self._core.worker_joined(relay, time.monotonic()))

    def _install_upstream(
        self, sock: socket.socket, welcome: dict[str, Any], reader: protocol.FrameReader, frames: list[Any]
    ) -> None:
        """Bridge thread: we route through the hub at the other end of
        ``sock``; ``reader`` and ``frames`` hold what it sent after taking us
        in (its POOL)."""
        sock.setblocking(False)
        try:
            w = Welcome.from_wire(welcome)
        except ProtocolError as exc:
            logger.warning("gibbs hub: the router hub sent a bad WELCOME (%s); looking again", exc)
            sock.close()
            self._start_rendezvous()
            return
        hello = Hello(role="router", name="router", pid=w.pid, host=w.host, heartbeat_interval=w.heartbeat_interval)
        peer = Peer(sock, hello, self._max_frame)
        peer.reader = reader
        self._selector.register(sock, selectors.EVENT_READ, peer)
        try:
            self._router_frames(peer, frames)  # the pool first: is_batched() is right before any call goes
        except ProtocolError as exc:
            logger.warning("gibbs hub: the router hub sent a bad frame (%s); looking again", exc)
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
            self._start_rendezvous()
            return
        with self._lock:
            self._upstream = peer
            for model in list(self._core.models):
                self._add_relay_locked(model)
        logger.info("gibbs hub: routing through %s", peer.describe())
        if self._outcomes:
            self._hand_over()
        self._notify_waiters()

    def _router_frames(self, peer: Peer, frames: list[tuple[int, int, bytes]]) -> None:
        core = self._core
        now = time.monotonic()
        changed = False
        with self._lock:
            for kind, cid, body in frames:
                if kind == protocol.CHUNK:
                    relay = self._relay_of.get(cid)
                    if relay is not None:
                        self._apply_locked(core.chunk(relay.id, cid, Outcome(OutcomeKind.CHUNK, body)))
                    continue
                if kind in (protocol.RESULT, protocol.ERROR, protocol.EXC):
                    relay = self._relay_of.get(cid)
                    if relay is None:
                        continue
                    if kind == protocol.RESULT:
                        outcome = Outcome(OutcomeKind.RESULT, body)
                    elif kind == protocol.ERROR:
                        outcome = Outcome(OutcomeKind.ERROR, body)
                    else:
                        exc = exc_from_json(body)
                        if exc is None:  # the router let go of a call we cancelled
                            call = relay.held.get(cid)
                            if call is None or not call.done:
                                continue
                            outcome = CANCELLED
                        else:
                            outcome = Outcome(OutcomeKind.EXCEPTION, exc)
                    del self._relay_of[cid]
                    self._apply_locked(core.answered(relay.id, cid, outcome, now))
                elif kind == protocol.POOL:
                    models = protocol.unpack_json(body).get("models", {})
                    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
                        raise ProtocolError("malformed POOL")
                    self._pool_info = dict(models)
                    for name, v in self._pool_info.items():
                        if v.get("batched"):
                            self._batched_models.add(name)
                        else:
                            self._batched_models.discard(name)
                    changed = True
                elif kind != protocol.HEARTBEAT:
                    raise ProtocolError(f"unexpected {protocol.KIND_NAMES.get(kind)} from the router hub")
        if self._outcomes:
            self._hand_over()
        if changed:
            self._notify_waiters()

    def _lose_upstream(self, reason: str) -> None:
        """The router is gone (its process died or closed): every call it
        held goes back to our queue, without counting as an attempt, and we
        look for the router again, or take the address over."""
        peer = self._upstream
        if peer is None or peer.gone:
            return
        peer.gone = True
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        now = time.monotonic()
        with self._lock:
            self._upstream = None
            relays = list(self._relays.values())
            self._relays.clear()
            self._relay_of.clear()
            self._pool_info = {}
            held = sum(len(r.held) for r in relays)
            for r in relays:
                self._apply_locked(self._core.worker_leaving(r.id, now))
                self._apply_locked(self._core.worker_lost(r.id, reason, now))
            closing = self._core.closing
        if not closing:
            logger.warning("gibbs hub: lost the router hub %s (%s); %d calls to send again", peer.describe(), reason, held)
            self._start_rendezvous()
        if self._outcomes:
            self._hand_over()
        self._notify_waiters()

    def _start_rendezvous(self) -> None:
        if self._rendezvous is None:
            return
        t = self._rendezvous_thread
        if t is not None and t.is_alive():
            return
        self._rendezvous_thread = threading.Thread(target=self._rendezvous_loop, name="gibbs-rendezvous", daemon=True)
        self._rendezvous_thread.start()

    def _rendezvous_loop(self) -> None:
        """Its own thread (it blocks on connect and handshake): find the
        router again, or take the address over; hand the result to the
        bridge thread."""
        assert self._rendezvous is not None
        backoff = 0.01
        failures = 0
        while True:
            with self._lock:
                if self._core.closing or self._closed:
                    return
            try:
                result = self._rendezvous()
            except Exception as exc:  # noqa: BLE001 - keep looking; say why now and then
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logger.warning("gibbs hub: no router hub yet (%s); still trying", exc)
                result = None
            if result is not None:
                with self._lock:
                    if not (self._core.closing or self._closed):
                        self._pending_upstream = result
                        self._wake_locked()
                        return
                for sock in self._rendezvous_sockets(result):
                    sock.close()
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.25)

    @staticmethod
    def _rendezvous_sockets(result: Optional[tuple[str, Any]]) -> list[socket.socket]:
        if result is None:
            return []
        if result[0] == "listen":
            return list(result[1])
        return [result[1][0]]

    def _take_rendezvous(self) -> None:
        with self._lock:
            result, self._pending_upstream = self._pending_upstream, None
            closing = self._core.closing
        if result is None:
            return
        if closing:
            for sock in self._rendezvous_sockets(result):
                sock.close()
            return
        if result[0] == "client":
            self._install_upstream(*result[1])
            return
        # We took the address over: from now on workers connect here.
        listeners = list(result[1])
        for listener in listeners:
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, ("listener", listener))
        self._listeners.extend(listeners)
        with self._lock:
            self._client_mode = False
            self._pool_info = {}
        logger.warning("gibbs hub: took the address over; this process now routes the family's calls")
        self._on_role("router", listeners)
        self._notify_waiters()


def _versions(workers: Sequence[WorkerInfo]) -> dict[str, dict[str, Any]]:
    """Workers by version (a rolling update shows two): version -> class, count."""
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        version = getattr(w.id, "version", None) or ""
        entry = out.setdefault(version, {"class": w.cls, "workers": 0})
        entry["workers"] += 1
    return out


def _source_of(sock: socket.socket, addr: Any) -> tuple[str, Any]:
    """Where a new connection comes from, for the handshake limits: ("tcp",
    address) over TCP; on the local socket ("local", uid) for this user, and
    ("tcp", "uid N") for another user (counted as strangers are)."""
    if sock.family == getattr(socket, "AF_UNIX", None):
        uid = peer_uid(sock)
        if uid is not None and uid == os.geteuid():
            return ("local", uid)
        return ("tcp", f"uid {uid}")
    return ("tcp", addr[0] if isinstance(addr, tuple) and addr else str(addr))


def _internal_error(peer: Peer, exc: BaseException) -> str:
    """A bug met while reading a peer: said loudly, with the traceback; the
    caller drops that peer (its calls fail or go elsewhere), the hub serves on."""
    logger.error("gibbs hub: internal error reading %s; dropping it", peer.describe(), exc_info=exc, extra=logs.peer(peer))
    return f"internal error reading its frames: {exc!r}"


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
