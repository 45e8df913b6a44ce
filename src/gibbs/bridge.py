"""The bridge: the one thread of a hub that talks to workers.

It owns the listener, every worker connection and the scheduling state. It
waits (``selectors``) on the listener, each worker's socket and a wake-up
pipe, and:

* hands each new connection to a short-lived handshake thread (HMAC challenge
  both ways, WELCOME/HELLO), which passes an authenticated peer back to it;
* reads frames without ever blocking on a partial one; a RESULT or ERROR
  resolves its call and frees the worker, which gets the next queued call in
  the same pass (idle workers pull work: never round-robin onto a busy one);
* notices a worker's death at once (end of file on its socket) or, for a hung
  worker or a lost host, when it has been silent for ``heartbeat_interval *
  heartbeat_misses``; its unfinished calls go back to the front of the queue,
  the one it was running counting one attempt;
* sends heartbeats so that workers notice a hub that went away.

Callers submit from any thread: under ``_lock`` they append to the queue and,
when a worker is idle, send at once (non-blocking; the bridge finishes a
partial send). Outcomes go back through ``deliver``, one batch per pass.

Shared state below is owned by ``_lock`` unless marked "bridge thread only".
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable, Optional

from . import protocol
from .errors import GibbsError, HubClosedError, ProtocolError, QueueFullError, SerializationError, WorkerDiedError
from .protocol import Buffer
from .transport import describe, server_handshake, tune

logger = logging.getLogger("gibbs")

# Call states
QUEUED = 0  # in _queue, not yet sent
RUNNING = 1  # sent to a worker, answer awaited
DONE = 2  # outcome handed to deliver
CANCELLED = 3  # removed while queued: never sent
ABANDONED = 4  # caller gone while running: the answer will be dropped

# Outcome kinds handed to deliver()
OUT_RESULT = 0  # value: RESULT payload body (bytes)
OUT_ERROR = 1  # value: ERROR record body (bytes)
OUT_EXCEPTION = 2  # value: an exception instance
OUT_COPIED = 3  # value: (pickle, buffers) of an answer read out of shared memory

Outcome = tuple[int, Any]

_MAX_HANDSHAKES = 64
#: A busy worker may be sent more calls only while the work already committed
#: to it stays under this many seconds (by its moving-average service time):
#: fast models do not wait a round trip between calls, and no call waits long
#: behind another while a worker could free up. Slow models (a call of this
#: length or more) never get a second call.
PIPELINE_WINDOW = 0.001


class Call:
    """One request on its way. ``sink`` receives the outcome (from ``deliver``)."""

    __slots__ = ("id", "payload", "sink", "state", "attempts", "failures", "peer", "sent_at")

    def __init__(self, call_id: int, payload: protocol.Payload, sink: Any) -> None:
        self.id = call_id
        self.payload = payload
        self.sink = sink
        self.state = QUEUED
        self.attempts = 0
        self.failures: Optional[list[tuple[str, int, str]]] = None  # (worker, pid, how it ended)
        self.peer: Optional[Peer] = None
        self.sent_at = 0.0


class Peer:
    """One authenticated worker connection."""

    __slots__ = (
        "sock", "fd", "reader", "out", "inflight", "pid", "host", "name", "address",
        "interval", "shm", "last_heard", "last_sent", "ewma", "last_done", "leaving",
        "want_write", "served",
    )

    def __init__(self, sock: socket.socket, hello: dict[str, Any], max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = protocol.FrameReader(max_frame)
        self.out: collections.deque[memoryview] = collections.deque()
        self.inflight: dict[int, Call] = {}  # in the order sent: the first is running
        self.pid = int(hello.get("pid", 0))
        self.host = str(hello.get("host", "?"))
        self.name = str(hello.get("name", "worker"))
        if sock.family == socket.AF_UNIX:
            self.address = "local socket"
        else:
            try:
                self.address = describe(sock.getpeername())
            except OSError:
                self.address = "?"
        self.interval = max(0.01, float(hello.get("heartbeat_interval", 1.0)))
        self.shm = bool(hello.get("shm", False))
        now = time.monotonic()
        self.last_heard = now
        self.last_sent = now
        self.ewma: Optional[float] = None
        self.last_done = now
        self.leaving = False
        self.want_write = False
        self.served = 0

    def describe(self) -> str:
        return f"worker {self.name} (pid {self.pid} on {self.host}, {self.address})"


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
        deliver: Callable[[list[tuple[Call, Outcome]]], None],
        describe_exit: Callable[[int], Optional[str]],
        mappings: Optional[protocol.MappingCache] = None,
    ) -> None:
        self._listeners = listeners  # TCP, and on Linux a local (unix) socket
        self._authkey = authkey
        self._interval = heartbeat_interval
        self._misses = heartbeat_misses
        self._max_attempts = max_attempts
        self._max_queued = max_queued
        self._max_frame = max_frame
        self._handshake_timeout = handshake_timeout
        self._depth = pipeline_depth
        self._shm_probe = shm_probe
        self._deliver = deliver
        self._describe_exit = describe_exit
        self._maps = mappings or protocol.MappingCache()  # bridge thread only
        self._rbuf = bytearray(1 << 18)  # bridge thread only: every read lands here
        self._rview = memoryview(self._rbuf)

        self._lock = threading.Lock()
        # --- owned by _lock
        self._queue: collections.deque[Call] = collections.deque()  # may hold stale (non-QUEUED) calls
        self._n_queued = 0
        self._peers: dict[int, Peer] = {}
        self._idle: list[Peer] = []  # peers with nothing in flight, not leaving
        self._outcomes: list[tuple[Call, Outcome]] = []
        self._new_peers: list[tuple[socket.socket, dict[str, Any]]] = []
        self._dirty: list[Peer] = []  # peers whose write interest changed off-thread
        self._init_failures: collections.deque[str] = collections.deque(maxlen=16)
        self._worker_waiters: list[tuple[int, Callable[[], None]]] = []
        self._closing = False
        self._close_deadline = 0.0
        self._closed = False
        self._crashed: Optional[BaseException] = None
        self._wake_pending = False
        self._handshaking: set[socket.socket] = set()  # sockets in handshake threads
        self._next_id = 1
        self._stats = collections.Counter[str]()
        self._on_closed: list[Callable[[], None]] = []
        # --- bridge thread only
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._fds_closed = False
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="gibbs-bridge", daemon=True)

    # ================================================================ callers

    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, payload: protocol.Payload, sink: Any) -> Call:
        with self._lock:
            self._check_open_locked()
            if (
                self._max_queued is not None
                and self._n_queued >= self._max_queued
                and not self._idle
            ):
                raise QueueFullError(
                    f"{self._n_queued} requests are already queued (max_queued={self._max_queued})"
                )
            call = Call(self._next_id, payload, sink)
            self._next_id += 1
            self._queue.append(call)
            self._n_queued += 1
            if self._idle:
                self._dispatch_locked()
        return call

    def _check_open_locked(self) -> None:
        if self._crashed is not None:
            raise GibbsError("the hub's bridge thread stopped unexpectedly") from self._crashed
        if self._closing:
            raise HubClosedError("the hub is closed")

    def cancel(self, call: Call) -> None:
        """The caller gave up (cancelled, timed out): a queued call is removed
        and never runs; a running one's answer will be dropped."""
        with self._lock:
            if call.state == QUEUED:
                call.state = CANCELLED
                self._n_queued -= 1
                self._stats["cancelled"] += 1
            elif call.state == RUNNING:
                call.state = ABANDONED
                self._stats["abandoned"] += 1

    def resubmit(self, call: Call) -> Call:
        """gibbs_retries: the caller's timeout expired with retries left. A call
        still queued keeps its place; a running one is sent again (to the first
        free worker) and the first answer wins."""
        with self._lock:
            self._check_open_locked()
            if call.state != RUNNING:
                return call
            call.state = ABANDONED
            new = Call(self._next_id, call.payload, call.sink)
            self._next_id += 1
            new.attempts = call.attempts
            new.failures = call.failures
            self._queue.appendleft(new)
            self._n_queued += 1
            self._stats["resent"] += 1
            if self._idle:
                self._dispatch_locked()
            return new

    def add_worker_waiter(self, n: int, callback: Callable[[], None]) -> bool:
        """Call ``callback`` (from the bridge thread) once ``n`` workers are
        connected. Returns True, without registering, if they already are."""
        with self._lock:
            if self._count_workers_locked() >= n:
                return True
            self._worker_waiters.append((n, callback))
            return False

    def remove_worker_waiter(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._worker_waiters = [w for w in self._worker_waiters if w[1] is not callback]

    def init_failures(self) -> list[str]:
        with self._lock:
            return list(self._init_failures)

    def _count_workers_locked(self) -> int:
        return sum(1 for p in self._peers.values() if not p.leaving)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            peers = [p for p in self._peers.values() if not p.leaving]
            busy = sum(1 for p in peers if p.inflight)
            return {
                "workers": len(peers),
                "busy": busy,
                "idle": len(peers) - busy,
                "queued": self._n_queued,
                "in_flight": sum(len(p.inflight) for p in peers),
                "completed": self._stats["completed"],
                "failed": self._stats["failed"],
                "retried": self._stats["retried"],
                "resent": self._stats["resent"],
                "cancelled": self._stats["cancelled"],
                "abandoned": self._stats["abandoned"],
                "worker_deaths": self._stats["deaths"],
                "closing": self._closing,
            }

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "pid": p.pid,
                    "host": p.host,
                    "name": p.name,
                    "address": p.address,
                    "in_flight": len(p.inflight),
                    "served": p.served,
                    "shared_memory": p.shm,
                }
                for p in self._peers.values()
                if not p.leaving
            ]

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
                if not self._closing:
                    self._closing = True
                    self._close_deadline = time.monotonic() + max(0.0, grace)
                    while self._queue:
                        call = self._queue.popleft()
                        if call.state == QUEUED:
                            err = HubClosedError("the hub was closed before a worker took this request")
                            self._finish_locked(call, (OUT_EXCEPTION, err))
                    self._n_queued = 0
                self._wake_locked()
        if done:
            on_closed()

    def _wake_locked(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    # ================================================================ scheduling (under _lock)

    def _finish_locked(self, call: Call, outcome: Outcome) -> None:
        call.state = DONE
        call.peer = None
        self._outcomes.append((call, outcome))

    def _pick_locked(self) -> Optional[Peer]:
        idle = self._idle
        while idle:
            peer = idle.pop()
            if not peer.inflight and not peer.leaving and peer.fd in self._peers:
                return peer
        if self._depth > 1:
            best: Optional[Peer] = None
            for peer in self._peers.values():
                ewma = peer.ewma
                if peer.leaving or ewma is None or ewma >= PIPELINE_WINDOW:
                    continue
                n = len(peer.inflight)
                if n < self._depth and n * ewma < PIPELINE_WINDOW and (
                    best is None or n < len(best.inflight)
                ):
                    best = peer
            return best
        return None

    def _dispatch_locked(self) -> None:
        queue = self._queue
        touched: dict[int, Peer] = {}
        while self._n_queued:
            peer = self._pick_locked()
            if peer is None:
                break
            call = queue.popleft()
            while call.state != QUEUED:
                call = queue.popleft()
            self._n_queued -= 1
            payload = call.payload
            body = payload.body if (peer.shm or payload.shm_path is None) else payload.inline_body()
            now = time.monotonic()
            if not peer.inflight:
                peer.last_done = now
            call.state = RUNNING
            call.peer = peer
            call.sent_at = now
            peer.inflight[call.id] = call
            for b in protocol.pack_frame(protocol.REQUEST, call.id, body):
                peer.out.append(memoryview(b))
            touched[peer.fd] = peer
        for peer in touched.values():
            self._flush_locked(peer)

    def _flush_locked(self, peer: Peer) -> None:
        out = peer.out
        try:
            while out:
                chunk = [out[0]] if len(out) == 1 else list(itertools.islice(out, 64))
                sent = peer.sock.sendmsg(chunk)
                peer.last_sent = time.monotonic()
                while sent and out:
                    head = out[0]
                    if sent >= head.nbytes:
                        sent -= head.nbytes
                        out.popleft()
                    else:
                        out[0] = head[sent:]
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
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.want_write else 0)
        try:
            self._selector.modify(peer.sock, events, peer)
        except (KeyError, ValueError, OSError):
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - fail every waiter, never hang them
            logger.exception("gibbs bridge thread crashed")
            with self._lock:
                self._crashed = exc
                for call in self._all_open_calls_locked():
                    err = GibbsError("the hub's bridge thread stopped unexpectedly")
                    err.__cause__ = exc
                    self._finish_locked(call, (OUT_EXCEPTION, err))
                self._n_queued = 0
                self._queue.clear()
            self._shutdown_sockets()
        finally:
            with self._lock:
                outcomes, self._outcomes = self._outcomes, []
                self._closed = True
                callbacks, self._on_closed = self._on_closed, []
                waiters, self._worker_waiters = self._worker_waiters, []
            if outcomes:
                self._deliver(outcomes)
            for _, cb in waiters:
                cb()
            for cb in callbacks:
                cb()

    def _all_open_calls_locked(self) -> list[Call]:
        calls = [c for c in self._queue if c.state == QUEUED]
        for peer in self._peers.values():
            calls.extend(c for c in peer.inflight.values() if c.state == RUNNING)
            peer.inflight.clear()
        return calls

    def _loop(self) -> None:
        sel = self._selector
        for listener in self._listeners:
            listener.setblocking(False)
            sel.register(listener, selectors.EVENT_READ, ("listener", listener))
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_check = time.monotonic()
        while True:
            timeout = max(0.0, next_check - time.monotonic())
            events = sel.select(timeout)
            for key, mask in events:
                data = key.data
                if data == "wake":
                    self._drain_wake()
                elif isinstance(data, tuple):
                    self._accept(data[1])
                else:
                    peer: Peer = data
                    if mask & selectors.EVENT_READ:
                        self._read(peer)
                    if mask & selectors.EVENT_WRITE and peer.fd in self._peers:
                        with self._lock:
                            self._flush_locked(peer)
            if self._new_peers or self._dirty:
                with self._lock:
                    new_peers, self._new_peers = self._new_peers, []
                    dirty, self._dirty = self._dirty, []
                for peer in dirty:
                    self._update_registration(peer)
                for sock, hello in new_peers:
                    self._add_peer(sock, hello)
            now = time.monotonic()
            if now >= next_check:
                self._check_heartbeats(now)
                next_check = now + min(
                    [self._interval / 2] + [p.interval / 2 for p in self._peers.values()]
                )
            if self._outcomes:
                with self._lock:
                    outcomes, self._outcomes = self._outcomes, []
                self._deliver(outcomes)
            if self._closing and self._close_step():
                return

    def _drain_wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

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
            with self._lock:
                if self._closing or len(self._handshaking) >= _MAX_HANDSHAKES:
                    sock.close()
                    logger.warning("gibbs hub: refused connection from %s (busy or closing)", describe(addr))
                    continue
                self._handshaking.add(sock)
            threading.Thread(
                target=self._handshake, args=(sock, addr), name="gibbs-handshake", daemon=True
            ).start()

    def _handshake(self, sock: socket.socket, addr: Any) -> None:
        """Runs in its own short-lived thread: a peer that stalls holds up only itself."""
        who = describe(addr)
        try:
            sock.setblocking(True)
            sock.settimeout(self._handshake_timeout)
            tune(sock)
            server_handshake(sock, self._authkey)
            welcome = {"heartbeat_interval": self._interval, "shm_probe": self._shm_probe}
            sock.sendall(protocol.pack_json(protocol.WELCOME, welcome))
            reader = protocol.FrameReader(1 << 16)
            frame = None
            while frame is None:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("closed before HELLO")
                frames = reader.feed(data)
                if frames:
                    frame = frames[0]
            kind, _, body = frame
            info = protocol.unpack_json(body)
            if kind == protocol.INIT_FAILED:
                line = (
                    f"worker {info.get('name')} (pid {info.get('pid')} on {info.get('host')}) "
                    f"failed to build its model: {info.get('exc_type')}: {info.get('message')}\n"
                    f"{info.get('traceback', '')}"
                )
                logger.error("gibbs hub: %s", line)
                with self._lock:
                    self._init_failures.append(line)
                    self._wake_locked()
                sock.close()
                return
            if kind != protocol.HELLO:
                raise ProtocolError(f"expected HELLO, got {protocol.KIND_NAMES.get(kind)}")
            if reader.pending:
                raise ProtocolError("unexpected bytes after HELLO")
            sock.settimeout(None)
            sock.setblocking(False)
            with self._lock:
                self._handshaking.discard(sock)
                if self._closing:
                    sock.close()
                    return
                self._new_peers.append((sock, info))
                self._wake_locked()
        except Exception as exc:  # noqa: BLE001 - any failure closes this connection only
            logger.warning("gibbs hub: rejected connection from %s: %s", who, exc)
            sock.close()
        finally:
            with self._lock:
                self._handshaking.discard(sock)

    def _add_peer(self, sock: socket.socket, hello: dict[str, Any]) -> None:
        peer = Peer(sock, hello, self._max_frame)
        self._selector.register(sock, selectors.EVENT_READ, peer)
        logger.info("gibbs hub: %s joined", peer.describe())
        with self._lock:
            self._peers[peer.fd] = peer
            self._idle.append(peer)
            self._dispatch_locked()
            n = self._count_workers_locked()
            ready = [w for w in self._worker_waiters if w[0] <= n]
            self._worker_waiters = [w for w in self._worker_waiters if w[0] > n]
        for _, cb in ready:
            cb()

    # ---------------------------------------------------------------- reading

    def _read(self, peer: Peer) -> None:
        try:
            # Into one reused buffer: a fresh 256 KiB bytes object per read
            # would be an mmap and munmap each time.
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
        except ProtocolError as exc:
            logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc)
            self._drop(peer, f"protocol error: {exc}")
            return
        if not frames:
            return
        releases: list[Buffer] = []
        answers: list[tuple[int, int, Outcome]] = []
        for kind, req_id, body in frames:
            if kind == protocol.RESULT:
                if protocol.is_shm(body):
                    # Copied out here, outside the lock, so the worker can
                    # reuse its segment at once (RELEASE below).
                    try:
                        pickled, copies, name = protocol.read_copy(body, self._maps)
                    except (OSError, ValueError, ProtocolError) as exc:
                        err = SerializationError(f"the answer's shared-memory segment could not be read: {exc}")
                        answers.append((kind, req_id, (OUT_EXCEPTION, err)))
                    else:
                        answers.append((kind, req_id, (OUT_COPIED, (pickled, copies))))
                        releases.extend(protocol.pack_frame(protocol.RELEASE, 0, name.encode()))
                else:
                    answers.append((kind, req_id, (OUT_RESULT, body)))
            elif kind == protocol.ERROR:
                answers.append((kind, req_id, (OUT_ERROR, body)))
            else:
                answers.append((kind, req_id, (-1, None)))
        with self._lock:
            for kind, req_id, outcome in answers:
                if kind == protocol.RESULT or kind == protocol.ERROR:
                    self._answer_locked(peer, req_id, kind, outcome)
                elif kind == protocol.HEARTBEAT:
                    pass
                elif kind == protocol.GOODBYE:
                    self._goodbye_locked(peer)
                else:
                    logger.warning("gibbs hub: %s sent unexpected %s", peer.describe(), protocol.KIND_NAMES.get(kind))
            if releases:
                peer.out.extend(memoryview(b) for b in releases)
            if self._n_queued:
                self._dispatch_locked()
            if releases and peer.out:
                self._flush_locked(peer)

    def _answer_locked(self, peer: Peer, req_id: int, kind: int, outcome: Outcome) -> None:
        call = peer.inflight.pop(req_id, None)
        now = time.monotonic()
        service = now - max(peer.last_done, call.sent_at if call else 0.0)
        peer.ewma = service if peer.ewma is None else 0.8 * peer.ewma + 0.2 * service
        peer.last_done = now
        peer.served += 1
        if not peer.inflight and not peer.leaving:
            self._idle.append(peer)
        if call is None or call.state != RUNNING:
            # An answer nobody waits for any more (cancelled, or sent twice).
            return
        self._stats["completed" if kind == protocol.RESULT else "failed"] += 1
        self._finish_locked(call, outcome)

    def _goodbye_locked(self, peer: Peer) -> None:
        """The worker is leaving on purpose: what it has not answered was never
        started; put it back at the front of the queue, without penalty."""
        logger.info("gibbs hub: %s is leaving", peer.describe())
        peer.leaving = True
        self._requeue_locked(peer, penalty=None)

    def _requeue_locked(self, peer: Peer, penalty: Optional[str]) -> None:
        calls = list(peer.inflight.values())
        peer.inflight.clear()
        back: list[Call] = []
        for i, call in enumerate(calls):
            if call.state != RUNNING:
                continue  # abandoned by its caller: nothing to retry
            if i == 0 and penalty is not None:
                call.attempts += 1
                if call.failures is None:
                    call.failures = []
                call.failures.append((peer.describe(), peer.pid, penalty))
                if call.attempts >= self._max_attempts:
                    self._stats["failed"] += 1
                    self._finish_locked(call, (OUT_EXCEPTION, self._died_error(call)))
                    continue
                self._stats["retried"] += 1
            call.state = QUEUED
            call.peer = None
            back.append(call)
        self._queue.extendleft(reversed(back))
        self._n_queued += len(back)

    def _died_error(self, call: Call) -> WorkerDiedError:
        lines = []
        for who, pid, how in call.failures or ():
            exit_info = self._describe_exit(pid)
            lines.append(f"{who}: {how}" + (f"; {exit_info}" if exit_info else ""))
        n = len(lines)
        msg = (
            f"the request was lost with the worker that ran it, {n} time{'s' if n != 1 else ''} "
            f"(max_attempts={self._max_attempts}):\n  " + "\n  ".join(lines)
        )
        return WorkerDiedError(msg, lines)

    def _drop(self, peer: Peer, reason: str) -> None:
        if peer.fd not in self._peers:
            return
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        with self._lock:
            del self._peers[peer.fd]
            if peer in self._idle:
                self._idle.remove(peer)
            if peer.leaving and not peer.inflight:
                logger.info("gibbs hub: %s left", peer.describe())
            else:
                self._stats["deaths"] += 1
                logger.warning("gibbs hub: lost %s: %s", peer.describe(), reason)
            self._requeue_locked(peer, penalty=reason)
            if self._n_queued:
                self._dispatch_locked()
        if peer.shm:
            # The worker's segments: answers it never sent, and its pool.
            prefix = f"{protocol.SHM_PREFIX}w{peer.pid}-"
            self._maps.forget(prefix)
            if not peer.leaving:
                protocol.remove_segments(prefix)

    # ---------------------------------------------------------------- heartbeats

    def _check_heartbeats(self, now: float) -> None:
        hb = b"".join(protocol.pack_frame(protocol.HEARTBEAT, 0))
        for peer in list(self._peers.values()):
            silent = now - peer.last_heard
            limit = peer.interval * self._misses
            if silent > limit:
                self._drop(
                    peer,
                    f"silent for {silent:.1f} s (no heartbeat within {limit:.1f} s)",
                )
                continue
            if now - peer.last_sent >= self._interval / 2:
                with self._lock:
                    peer.out.append(memoryview(hb))
                    self._flush_locked(peer)

    # ---------------------------------------------------------------- closing

    def _close_step(self) -> bool:
        """While closing: True once everything is closed."""
        with self._lock:
            running = [c for p in self._peers.values() for c in p.inflight.values() if c.state == RUNNING]
            if running and time.monotonic() < self._close_deadline:
                return False
            for call in running:
                err = HubClosedError("the hub was closed before the worker answered (grace period over)")
                self._finish_locked(call, (OUT_EXCEPTION, err))
            for peer in self._peers.values():
                peer.inflight.clear()
            outcomes, self._outcomes = self._outcomes, []
        if outcomes:
            self._deliver(outcomes)
        self._shutdown_sockets()
        self._maps.clear()
        return True

    def _shutdown_sockets(self) -> None:
        self._close_descriptors([p.sock for p in self._peers.values()])
        self._peers.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptors without touching
        the parent's connections (no shutdown, no messages). The lock may have
        been held by a thread that does not exist here: do not take it."""
        socks = [p.sock for p in self._peers.values()]
        socks += list(self._handshaking) + [s for s, _ in self._new_peers]
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
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
