"""The bridge: the driver around the core, and the one thread of a hub that
talks to workers.

Every rule of a call's life is in ``core.py``; this module only turns I/O
into core events and carries out the core's actions. The thread waits
(``selectors``) on the listeners, each worker's socket and a wake-up pipe,
and:

* hands each new connection to a short-lived handshake thread (HMAC
  challenge both ways, WELCOME/HELLO) under a deadline for the whole
  handshake; an authenticated worker becomes ``core.worker_joined``;
* reads frames without ever blocking on a partial one: RESULT/ERROR become
  ``core.answered``, GOODBYE ``core.worker_leaving``; end of file, a bad
  frame or silence beyond the heartbeat bound become ``core.worker_lost``
  (for a worker process started here, once its exit status is known, so the
  error says how it died);
* carries out the actions: ``Send`` writes frames (non-blocking; the rest
  waits for the socket to be writable), ``Resolve`` hands the outcome to its
  caller, ``Release`` frees the payload's shared memory, ``Refuse`` and
  ``Drop`` close a connection.

Callers submit from any thread: under ``_lock`` they call ``core.submit``
and carry out its ``Send`` at once (non-blocking). Outcomes are handed over
outside the lock: to asyncio callers with one ``call_soon_threadsafe`` per
loop per pass; to ``concurrent.futures`` callers on a delivery thread, so
that no user callback ever runs on this thread or under this lock.

Shared state below is owned by ``_lock`` unless marked "bridge thread only".
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import selectors
import socket
import threading
import time
from typing import Any, Callable, Optional

from . import protocol
from .core import (
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
    Resolve,
    Send,
    Stop,
    WorkerInfo,
)
from .errors import GibbsError, NoWorkersError, ProtocolError, SerializationError
from .protocol import Buffer
from .transport import describe, server_handshake, tune

logger = logging.getLogger("gibbs")

_MAX_HANDSHAKES = 64
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


class Peer:
    """One authenticated worker connection."""

    __slots__ = (
        "sock", "fd", "reader", "out", "pid", "host", "name", "address", "interval", "shm",
        "last_heard", "last_sent", "want_write", "info", "batched", "gone",
    )

    def __init__(self, sock: socket.socket, hello: dict[str, Any], max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = protocol.FrameReader(max_frame)
        self.out: collections.deque[Buffer] = collections.deque()
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
        self.want_write = False
        self.batched = int(hello.get("batch_size", 1)) > 1
        self.gone = False  # closed; its loss may still wait for an exit status
        self.info: WorkerInfo  # set by the bridge

    def describe(self) -> str:
        return f"worker {self.name} (pid {self.pid} on {self.host}, {self.address})"

    def __repr__(self) -> str:
        return f"<Peer {self.describe()}>"


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
    ) -> None:
        self._listeners = listeners  # TCP, and on Linux a local (unix) socket
        self._authkey = authkey
        self._interval = heartbeat_interval
        self._misses = heartbeat_misses
        self._max_frame = max_frame
        self._handshake_timeout = handshake_timeout
        self._depth = pipeline_depth
        self._shm_probe = shm_probe
        self._deliver_async = deliver_async
        self._deliver_sync = deliver_sync
        self._local_workers = local_workers
        self._maps = mappings or protocol.MappingCache()  # bridge thread only
        self._rbuf = bytearray(1 << 18)  # bridge thread only: every read lands here
        self._rview = memoryview(self._rbuf)

        self._lock = threading.Lock()
        # --- owned by _lock
        self._core = Core(max_attempts=max_attempts, max_queued=max_queued)
        self._peers: dict[int, Peer] = {}  # fd -> peer, connected and not yet lost
        self._outcomes: list[tuple[Call, Outcome]] = []  # to hand over outside the lock
        self._new_peers: list[tuple[socket.socket, dict[str, Any]]] = []
        self._dirty: list[Peer] = []  # peers whose write interest changed off-thread
        self._init_failures: collections.deque[tuple[int, str]] = collections.deque(maxlen=16)  # (pid, text)
        self._handshake_failures: collections.deque[str] = collections.deque(maxlen=16)
        self._n_handshake_failures = 0
        self._joined_pids: set[int] = set()
        self._check_locals = False  # a report came in: look at local workers now
        self._waiters: dict[int, Callable[[], None]] = {}
        self._next_waiter = 0
        self._closed = False
        self._crashed: Optional[BaseException] = None
        self._wake_pending = False
        self._handshaking: dict[socket.socket, float] = {}  # sockets in handshake threads -> deadline
        self._next_id = 1
        self._on_closed: list[Callable[[], None]] = []
        self._batched_models: set[str] = set()  # read without the lock (a hint for callers)
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

    def is_batched(self, model: str) -> bool:
        return model in self._batched_models

    def submit(self, payload: protocol.Payload, sink: Any, model: str = DEFAULT_MODEL, stream: bool = False) -> Call:
        with self._lock:
            if self._crashed is not None:
                raise GibbsError("the hub's bridge thread stopped unexpectedly") from self._crashed
            call = Call(self._next_id, model, payload, sink, stream)
            self._next_id += 1
            self._apply_locked(self._core.submit(call, time.monotonic()))
            if call.queued and self._core.models[model].batch_wait:
                self._wake_locked()  # the bridge's next tick is this batch's deadline
        if self._outcomes:
            self._hand_over()
        return call

    def cancel(self, call: Call) -> None:
        """The caller gave up (cancelled, timed out): a queued call is removed
        and never runs; a running one's answer will be dropped."""
        with self._lock:
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

    def worker_count(self, model: Optional[str] = None) -> int:
        with self._lock:
            return sum(
                1 for p in self._peers.values() if not p.info.leaving and (model is None or p.info.model == model)
            )

    def unavailable(self, model: Optional[str] = None) -> Optional[BaseException]:
        """Why no worker of ``model`` (None: of any model) can come, if that is known."""
        with self._lock:
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
            for name, m in core.models.items():
                ws = [w for w in m.workers.values() if not w.leaving]
                models[name] = {
                    "class": m.cls,
                    "workers": len(ws),
                    "busy": sum(1 for w in ws if w.units),
                    "queued": len(m.queue),
                    "in_flight": sum(len(w.held) for w in ws),
                    "batch_size": max((w.batch_size for w in ws), default=1),
                    "batch_sizes": dict(sorted(m.batch_sizes.items())),
                }
            return {
                "workers": len(peers),
                "busy": busy,
                "idle": len(peers) - busy,
                "queued": core.n_queued,
                "in_flight": sum(len(p.info.held) for p in peers),
                "completed": stats["completed"],
                "failed": stats["errors"] + stats["failed"],
                "errors": stats["errors"],
                "retried": stats["retried"],
                "resent": stats["resent"],
                "cancelled": stats["cancelled"],
                "abandoned": stats["abandoned"],
                "worker_deaths": stats["deaths"],
                "handshake_failures": self._n_handshake_failures,
                "init_failures": len(self._init_failures),
                "closing": core.closing,
                "models": models,
            }

    def workers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
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
                }
                for p in self._peers.values()
                if not p.info.leaving
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
                peer = action.worker  # type: ignore[assignment]
                calls = action.calls
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
                if action.outcome.kind is not OutcomeKind.CANCELLED:  # the caller knows
                    self._outcomes.append((action.call, action.outcome))
            elif type(action) is Deliver:
                self._outcomes.append((action.call, action.chunk))
            elif type(action) is Release:
                action.call.payload.release()
            elif type(action) is Stop or type(action) is Credit:
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
                logger.error("gibbs hub: refused %s: %s", peer.describe(), action.reason)
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
        sync = [it for it in items if not hasattr(it[0].sink, "get_loop")]
        if len(sync) != len(items):
            self._deliver_async([it for it in items if hasattr(it[0].sink, "get_loop")])
        if sync:
            q = self._sync_queue
            if q is None:
                with self._lock:
                    if self._sync_queue is None:
                        self._sync_queue = queue.SimpleQueue()
                        self._sync_thread = threading.Thread(
                            target=self._sync_loop, args=(self._sync_queue,), name="gibbs-deliver", daemon=True
                        )
                        self._sync_thread.start()
                    q = self._sync_queue
            for it in sync:
                q.put(it)

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
                logger.exception("gibbs hub: delivering a result failed")

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
            if sync_q is not None:
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
        next_check = time.monotonic()
        while True:
            deadline = next_check
            with self._lock:
                core_deadline = self._core.next_deadline()
            if core_deadline is not None and core_deadline < deadline:
                deadline = core_deadline
            if self._losing:
                soon = time.monotonic() + 0.002
                for entry in self._losing.values():
                    deadline = min(deadline, soon if entry[3] else entry[0])
            events = sel.select(max(0.0, deadline - time.monotonic()))
            for key, mask in events:
                data = key.data
                if data == "wake":
                    self._drain_wake()
                elif isinstance(data, tuple):
                    if data[0] == "listener":
                        self._accept(data[1])
                    else:  # ("exit", peer): a lost local worker's process is ending
                        self._sentinel_fired(data[1])
                else:
                    peer: Peer = data
                    if mask & selectors.EVENT_READ:
                        self._read(peer)
                    if mask & selectors.EVENT_WRITE and not peer.gone:
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
            with self._lock:
                self._apply_locked(self._core.tick(now))
            if self._check_locals:
                self._check_locals = False
                self._check_local_workers()
            if self._losing:
                self._check_losses(now)
            if now >= next_check:
                self._check_heartbeats(now)
                self._check_handshakes(now)
                self._check_local_workers()
                next_check = now + min([self._interval / 2] + [p.interval / 2 for p in self._peers.values()])
            if self._outcomes:
                self._hand_over()
            if self._core.closing and self._close_step():
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
                if self._core.closing or len(self._handshaking) >= _MAX_HANDSHAKES:
                    sock.close()
                    logger.warning("gibbs hub: refused connection from %s (busy or closing)", describe(addr))
                    continue
                self._handshaking[sock] = time.monotonic() + self._handshake_timeout
            threading.Thread(
                target=self._handshake, args=(sock, addr), name="gibbs-handshake", daemon=True
            ).start()

    def _check_handshakes(self, now: float) -> None:
        """A handshake has ``handshake_timeout`` in all, not per read: a peer
        that trickles a byte at a time is cut off at the deadline."""
        with self._lock:
            late = [s for s, deadline in self._handshaking.items() if now > deadline]
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
                    f"failed to build model {info.get('model', DEFAULT_MODEL)!r}: "
                    f"{info.get('exc_type')}: {info.get('message')}\n{info.get('traceback', '')}"
                )
                logger.error("gibbs hub: %s", line)
                with self._lock:
                    self._init_failures.append((int(info.get("pid", 0) or 0), line))
                    self._check_locals = True
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
                self._handshaking.pop(sock, None)
                if self._core.closing:
                    sock.close()
                    return
                self._new_peers.append((sock, info))
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

    def _add_peer(self, sock: socket.socket, hello: dict[str, Any]) -> None:
        peer = Peer(sock, hello, self._max_frame)
        model = str(hello.get("model") or DEFAULT_MODEL)
        peer.info = WorkerInfo(
            peer,
            model,
            str(hello.get("cls", "")),
            slots=int(hello.get("concurrency", 1)),
            batch_size=int(hello.get("batch_size", 1)),
            depth=self._depth,
            describe=peer.describe(),
        )
        self._selector.register(sock, selectors.EVENT_READ, peer)
        with self._lock:
            self._peers[peer.fd] = peer
            actions = self._core.worker_joined(peer.info, time.monotonic(), float(hello.get("batch_wait", 0.0)))
            self._apply_locked(actions)
            if peer.gone:  # refused
                del self._peers[peer.fd]
            else:
                self._joined_pids.add(peer.pid)
                self._refresh_batched_locked(model)
        if peer.gone:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            return
        logger.info("gibbs hub: %s joined (model %r)", peer.describe(), model)
        self._notify_waiters()

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
        answers: list[tuple[int, int, Optional[Outcome]]] = []
        for kind, req_id, body in frames:
            if kind == protocol.RESULT:
                if protocol.is_shm(body):
                    # Copied out here, outside the lock, so the worker can
                    # reuse its segment at once (RELEASE below).
                    try:
                        pickled, copies, name = protocol.read_copy(body, self._maps)
                    except (OSError, ValueError, ProtocolError) as exc:
                        err = SerializationError(f"the answer's shared-memory segment could not be read: {exc}")
                        answers.append((kind, req_id, Outcome(OutcomeKind.EXCEPTION, err)))
                    else:
                        answers.append((kind, req_id, Outcome(OutcomeKind.COPIED, (pickled, copies))))
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
                    logger.info("gibbs hub: %s is leaving", peer.describe())
                    self._apply_locked(core.worker_leaving(peer, now))
                else:
                    logger.warning("gibbs hub: %s sent unexpected %s", peer.describe(), protocol.KIND_NAMES.get(kind))
            if releases:
                peer.out.extend(releases)
                self._flush_locked(peer)

    def _drop(self, peer: Peer, reason: str) -> None:
        """Close a worker's connection; its loss reaches the core once the
        exit status of a local worker process is known (or soon anyway)."""
        if peer.gone:
            return
        peer.gone = True
        try:
            self._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        local = None
        if not peer.info.leaving:
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
                logger.info("gibbs hub: %s left", peer.describe())
            else:
                logger.warning("gibbs hub: lost %s: %s", peer.describe(), reason)
            self._apply_locked(self._core.worker_lost(peer, reason, time.monotonic()))
            self._refresh_batched_locked(peer.info.model)
        if peer.shm:
            # The worker's segments: answers it never sent, and its pool.
            prefix = f"{protocol.SHM_PREFIX}w{peer.pid}-"
            self._maps.forget(prefix)
            if not peer.info.leaving:
                protocol.remove_segments(prefix)
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
        for peer in list(self._peers.values()):
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
        with self._lock:
            self._apply_locked(self._core.tick(time.monotonic()))
            if not self._core.idle:
                return False
        self._hand_over()
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
