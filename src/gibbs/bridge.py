"""The bridge: the driver around the core, and the one thread of a hub that
talks to workers.

Every rule of a call's life is in ``core.py``; this module only turns I/O
into core events and carries out the core's actions. Here:

* the bridge thread's loop: it waits (``selectors``) on the listeners, each
  worker socket it reads, the wake-up pipe (``_wakeup.Wakeup``) and the
  sentinels of lost local workers, runs the core's ``tick`` and the
  periodic checks, and hands outcomes over;
* the callers' entry points (``submit``, ``cancel``, ``consumed``,
  ``resend``): under ``_lock`` they call the core and carry out its
  ``Send`` at once (non-blocking);
* the actions: ``Send`` writes frames (non-blocking; the rest waits for the
  socket to be writable), ``Resolve``/``Deliver`` hand outcomes and chunks
  to callers (or, for a client hub's call, back on its connection),
  ``Release`` frees a payload's shared memory, ``Stop``/``Credit`` tell a
  worker, ``Refuse`` closes a connection;
* peers taken in (``_add_peer``): a worker joins the core, a client hub or
  an observer is registered; their frames are read by ``_reading.py``;
* the hand-over: outcomes go to their callers outside the lock, to asyncio
  callers with one ``call_soon_threadsafe`` per loop per pass (or directly,
  from the loop that reads the sockets itself: ``_loops.py``), to
  ``concurrent.futures`` callers on a delivery thread, so that no user
  callback ever runs on this thread or under this lock.

Its units, each with one job: ``_door.py`` (new connections, handshakes,
workers loading), ``_reading.py`` (peers' frames into core events), ``_losses.py`` (dropped connections, losses, heartbeats),
``_loops.py`` (the home loop's reads), ``_loans.py`` (lent answers),
``_family.py`` (the router and client roles), ``_views.py`` (statistics and
other read-only views), ``_closing.py`` (closing and
forking). They share the bridge's lock and its peers; docs/concepts/
architecture.md maps them.

Shared state below is owned by ``_lock`` unless marked "bridge thread only".
"""

from __future__ import annotations

import itertools
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional, Sequence

from . import _views, logs, protocol
from ._closing import Closing
from ._door import Door
from ._family import ClientRole, RouterRole
from ._loans import LoanBook
from ._loops import LoopReads
from ._losses import Losses
from ._options import HubOptions
from ._peers import ClientSink, LocalWorker, Peer, Relay
from ._reading import Reader
from ._wakeup import Wakeup
from .core import (
    DEFAULT_MODEL,
    Call,
    CallState,
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
from .errors import GibbsError, NoWorkersError, ProtocolError
from .protocol import Buffer
from .records import Hello

logger = logging.getLogger("gibbs")

#: Requests waiting this long with no worker of their model make a warning,
#: repeated at most this often per model.
_ABSENT_WARN_AFTER = 1.0
_ABSENT_WARN_EVERY = 30.0


#: Rendezvous outcomes: ("listen", [sockets]) this process took the address
#: and routes; ("client", (socket, welcome)) it joined the router there.
Rendezvous = Callable[[], Optional[tuple[str, Any]]]


class Bridge:
    def __init__(
        self,
        listeners: list[socket.socket],
        *,
        authkey: bytes,
        options: HubOptions,
        shm_probe: Optional[dict[str, str]],
        deliver_async: Callable[[list[tuple[Call, Outcome]]], None],
        deliver_sync: Callable[[Call, Outcome], None],
        offer_sync: Callable[[Call, Outcome], bool] = lambda call, outcome: False,
        local_workers: Callable[[], list[LocalWorker]] = lambda: [],
        mappings: Optional[protocol.MappingCache] = None,
        authkey_explicit: bool = True,
        upstream: Optional[tuple[Any, ...]] = None,
        rendezvous: Optional[Rendezvous] = None,
        on_role: Callable[[str, list[socket.socket]], None] = lambda role, listeners: None,
        request_pool: Optional[protocol.SegmentPool] = None,
        limited_keys: Sequence[tuple[str, bytes]] = (),
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self._listeners = listeners
        self._interval = options.heartbeat_interval
        self._misses = options.heartbeat_misses
        self._max_frame = max_frame = options.max_frame_bytes
        self._depth = options.pipeline_depth
        self._shm_probe = shm_probe
        self._deliver_async = deliver_async
        self._deliver_sync = deliver_sync
        self._offer_sync = offer_sync
        self._local_workers = local_workers
        self._maps = mappings or protocol.MappingCache()  # whichever thread reads the workers (own lock)
        self._wakeup = Wakeup()  # any thread wakes the bridge thread's select
        self._loans = LoanBook(options.max_lent_bytes, self._wakeup.wake, request_pool)  # answers lent in place

        self._lock = threading.Lock()
        # --- owned by _lock
        self._core = Core(
            max_attempts=options.max_attempts, max_queued=options.max_queued, no_worker_timeout=options.no_worker_timeout
        )
        self._app = options.app  # the application we route for ("*": any)
        self._peers: dict[int, Peer] = {}  # fd -> peer, connected and not yet lost
        self._outcomes: list[tuple[Call, Outcome]] = []  # to hand over outside the lock
        # (socket, HELLO, frames that came after HELLO in the same read,
        # bytes of a frame begun after it).
        self._new_peers: list[tuple[socket.socket, Hello, list[tuple[int, int, bytes]], bytes]] = []
        self._dirty: list[Peer] = []  # peers whose write interest changed off-thread
        self._drops: list[tuple[Peer, str]] = []  # the core's Drop actions, for the bridge thread
        self._joined_pids: set[int] = set()
        self._joined_tokens: set[str] = set()  # the HELLO's "token" (optional: older workers send none)
        self._check_locals = False  # a report came in: look at local workers now
        self._waiters: dict[int, Callable[[], None]] = {}
        self._next_waiter = 0
        self._closed = False
        self._crashed: Optional[BaseException] = None
        self._wake_at = 0.0  # (under _lock) when the loop's select ends, at the latest
        # New connections: handshakes, workers loading, reports of failures.
        self._door = Door(
            self,
            authkey=authkey,
            authkey_explicit=authkey_explicit,
            limited_keys=limited_keys,
            ssl_context=ssl_context,
            handshake_timeout=options.handshake_timeout,
        )
        self._next_id = 1
        self.request_ids = protocol.request_id_prefix()  # a call's request id is this + its id, unless given
        # --- the two roles of a hub in a family of processes (owned by _lock)
        # Router: the hub that holds the address; workers and client hubs connect to it.
        self._clients: dict[int, Peer] = {}  # fd -> client hub routing through us
        # Client: a hub that routes through the router (another process's hub).
        self._upstream: Optional[Peer] = None  # our connection to the router
        self._relays: dict[str, WorkerInfo] = {}  # model -> its relay worker in our core
        self._relay_of: dict[int, WorkerInfo] = {}  # call id -> relay holding it
        self._pool_info: dict[str, dict[str, Any]] = {}  # the router's models, from POOL
        self._client_mode = upstream is not None or (rendezvous is not None and not listeners)
        self._pending_upstream: Optional[tuple[str, Any]] = None  # from the rendezvous thread
        self._initial_upstream = upstream
        self._router_role = RouterRole(self)
        # The event loop that reads the worker sockets itself, if one does.
        self._loops = LoopReads(self)
        self.home = self._loops.home  # on every asyncio request: no extra call
        self.has_home = self._loops.has_home
        self.leave_home = self._loops.leave_home
        self.loop_reads = self._loops.loop_reads
        self._client_role = ClientRole(self, rendezvous, on_role)
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
        self._losses = Losses(self)  # connections dropped, losses declared, heartbeats
        self._reader = Reader(self, max_frame)  # peers' bytes into core events
        self._closing = Closing(self)  # closing, and forgetting everything after a fork
        self.begin_close = self._closing.begin
        self.forget_after_fork = self._closing.forget_after_fork
        self._thread = threading.Thread(target=self._run, name="gibbs-bridge", daemon=True)
        self._sync_queue: Optional["queue.SimpleQueue[Optional[tuple[Optional[Call], Any]]]"] = None
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

    def set_default_priority(self, model: str, priority: int) -> None:
        """gibbs_priority for the model's calls that give none."""
        with self._lock:
            self._core.default_priorities[model] = priority

    def set_hedging(self, model: str, on: bool) -> None:
        """Hedge the model's calls by default (a second attempt on an idle
        worker once one has run past the model's p95 service time)."""
        with self._lock:
            self._core._model(model).hedge = on


    def submit(
        self,
        payload: protocol.Payload,
        sink: Any,
        model: str = DEFAULT_MODEL,
        stream: bool = False,
        timeout: Optional[float] = None,
        retries: int = 0,
        hedge: bool = False,
        priority: Optional[int] = None,
    ) -> Call:
        home = self._loops.loop
        if home is not None and not home.is_running():
            # A caller while the home loop is stopped: the bridge takes the
            # sockets back now rather than at its next check.
            with self._lock:
                self._loops.changed = True
                self._wake_locked()
        with self._lock:
            if self._crashed is not None:
                raise GibbsError("the hub's bridge thread stopped unexpectedly") from self._crashed
            call = Call(
                self._next_id, model, payload, sink, stream, timeout=timeout, retries=retries, priority=priority,
                single=bool(payload.flags & protocol.FWD_SINGLE),
            )
            payload.priority = priority  # what a client hub forwards (the core sets the call's to the default)
            if hedge and not stream:
                call.hedge = 1
            self._next_id += 1
            if self._upstream is not None and model not in self._relays and not self._core.closing:
                self._client_role.add_relay_locked(model)
            actions = self._core.submit(call, time.monotonic())
            if actions:  # none while the call waits in the queue (a busy pool)
                self._apply_locked(actions)
            if call.state is CallState.QUEUED and self._core.models[model].batch_wait:
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
            return [t for _, t in self._door.init_failures] + list(self._door.handshake_failures)


    def statistics(self) -> dict[str, Any]:
        return _views.statistics(self)

    def workers(self) -> list[dict[str, Any]]:
        """Connected workers (state "ready", "busy" or "leaving") and workers
        building their model (state "loading", with ``seconds``)."""
        return _views.workers(self)

    def observe(self, model: str) -> dict[str, Any]:
        """What a pool supervising ``model`` needs (see ``_views.observe``)."""
        return _views.observe(self, model)

    def models(self) -> dict[str, dict[str, Any]]:
        return dict(self.statistics()["models"])

    def _wake_locked(self) -> None:
        self._wakeup.wake()

    # ================================================================ actions (under _lock)

    def _apply_locked(self, actions: list[Any]) -> None:
        touched: Optional[list[Peer]] = None
        peer: Peer
        for action in actions:
            if type(action) is Send:
                if type(action.worker) is Relay:
                    up = self._client_role.forward_locked(action.worker, action.calls)
                    if up is None:
                        continue
                    peer = up
                    if touched is None:
                        touched = [peer]
                    elif peer not in touched:
                        touched.append(peer)
                    continue
                peer = action.worker  # type: ignore[assignment]
                calls = action.calls
                # What travels just before each call, when it has it: its
                # deadline and class (to workers that read them), the request
                # id its caller gave, its caller's trace context.
                now = 0.0
                for c in calls:
                    if peer.deadlines:
                        final = c.final_deadline if c.deadline is not None else None
                        if final is not None:
                            now = now or time.monotonic()
                            peer.out.extend(protocol.pack_deadline(c.id, final - now))
                        if c.priority:
                            peer.out.extend(protocol.pack_priority(c.id, c.priority))
                    payload = c.payload
                    if payload.rid is not None:
                        peer.out.extend(protocol.pack_request_id(c.id, payload.rid))
                    if payload.trace is not None:  # its caller traces (gibbs.tracing)
                        now = now or time.monotonic()
                        peer.out.extend(protocol.pack_trace(c.id, payload.trace, now - c.t0))
                if peer.batched:
                    items = [(c.id, self._body_for(peer, c)) for c in calls]
                    peer.out.extend(protocol.pack_batch(items))
                else:
                    c = calls[0]
                    kind = protocol.STREAM if c.stream else protocol.REQUEST
                    payload = c.payload
                    body = payload.body if (peer.shm or payload.shm_path is None) else payload.inline_body()
                    protocol.pack_frame_to(peer.out, kind, c.id, body)  # (as _body_for)
                if touched is None:
                    touched = [peer]
                elif peer not in touched:
                    touched.append(peer)
            elif type(action) is Resolve:
                if type(action.call.sink) is ClientSink:
                    answered = self._router_role.answer_locked(action.call, action.outcome)
                    if answered is not None:
                        if touched is None:
                            touched = [answered]
                        elif answered not in touched:
                            touched.append(answered)
                elif action.outcome.kind is not OutcomeKind.CANCELLED:  # the caller knows
                    self._outcomes.append((action.call, action.outcome))
            elif type(action) is Release:
                payload = action.call.payload
                if payload.shm_path is not None:  # else nothing to give back
                    payload.release()
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
                self._door.refuse_locked(action.worker, action.reason)  # type: ignore[arg-type]
            elif type(action) is Drop:
                # The bridge thread closes it (the selector is its own).
                self._drops.append((action.worker, action.reason))  # type: ignore[arg-type]
                self._wake_locked()
        if touched:
            for peer in touched:
                self._flush_locked(peer)

    def _upstream_for_locked(self, relay: "Relay") -> Optional[Peer]:
        up = self._upstream
        return up if up is not None and not up.gone else None

    @staticmethod
    def _inline(payload: Any) -> Buffer:
        return payload.body if payload.shm_path is None else payload.inline_body()


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
        any_sync = False  # a sink that is not an event loop's future
        for i, (call, outcome) in enumerate(items):
            if not any_sync and not hasattr(call.sink, "get_loop"):
                any_sync = True
            kind = outcome.kind
            if kind is OutcomeKind.RESULT or kind is OutcomeKind.COPIED or kind is OutcomeKind.CHUNK:
                continue  # nothing to explain (the common case)
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
        if not any_sync:
            self._deliver_async(items)
            return
        sync = [it for it in items if not hasattr(it[0].sink, "get_loop")]
        if len(sync) != len(items):
            self._deliver_async([it for it in items if hasattr(it[0].sink, "get_loop")])
        if sync:
            # A blocking ``result()`` takes its outcome from here and settles
            # the future itself: no wake-up of the delivery thread between.
            offer = self._offer_sync
            rest: list[tuple[Optional[Call], Any]] = [it for it in sync if not offer(*it)]
            if rest and not self._to_delivery(rest):
                for c, o in rest:  # the delivery thread has ended (closing): here, then
                    assert c is not None
                    self._deliver_sync(c, o)

    def run_on_delivery(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the delivery thread (done-callbacks of a future a
        blocked caller settled itself); here when that thread has ended."""
        if not self._to_delivery([(None, fn)]):
            fn()

    def _to_delivery(self, items: list[tuple[Optional[Call], Any]]) -> bool:
        """Queue items for the delivery thread (started on first use).
        False when it was told to stop: nothing queued."""
        with self._lock:
            if self._sync_stopped:
                return False
            q = self._sync_queue
            if q is None:
                q = self._sync_queue = queue.SimpleQueue()
                self._sync_thread = threading.Thread(
                    target=self._sync_loop, args=(q,), name="gibbs-deliver", daemon=True
                )
                self._sync_thread.start()
            self._handing += 1
        try:
            for it in items:
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
        return True

    def _explain(self, model: str) -> Optional[str]:
        """Why no worker of ``model`` is there, as the hub explains it."""
        text = self._absence_text.get(model)
        if text is None and self.explain_source is not None:
            source = self.explain_source()
            if source is not None:
                text = source(model)
        return text

    def _sync_loop(self, q: "queue.SimpleQueue[Optional[tuple[Optional[Call], Any]]]") -> None:
        """Resolves ``concurrent.futures`` callers: their done-callbacks (user
        code) run here, never on the bridge thread nor under its lock."""
        while True:
            item = q.get()
            if item is None:
                return
            call: Optional[Call] = item[0]
            try:
                if call is None:
                    item[1]()
                else:
                    self._deliver_sync(call, item[1])
            except BaseException:  # noqa: BLE001 - a callback's error is the caller's
                if call is None:
                    logger.exception("gibbs hub: a done-callback failed")
                else:
                    logger.exception("gibbs hub: delivering a result failed",
                                     extra=logs.fields(call.model, None, self.request_id(call)))
            # Hold nothing while waiting: an answer lent from a worker's
            # shared memory goes back when its caller frees it, not later.
            del item, call

    def _flush_locked(self, peer: Peer) -> None:
        out = peer.out
        try:
            while out:
                if len(out) == 1:  # the common case: one joined frame (protocol.pack_frame_to)
                    head = out[0]
                    sent = peer.sock.send(head)
                    peer.last_sent = time.monotonic()
                    if sent == (head.nbytes if isinstance(head, memoryview) else len(head)):
                        out.popleft()
                    else:  # the rest when the socket can take it (a second try says so)
                        out[0] = memoryview(head)[sent:]
                    continue
                chunk = list(itertools.islice(out, 64))
                sent = peer.sock.sendmsg(chunk)
                peer.last_sent = time.monotonic()
                while out:  # what went, in order (an empty buffer goes too: never a write of nothing)
                    head = out[0]
                    n = head.nbytes if isinstance(head, memoryview) else len(head)
                    if sent < n:
                        if sent:
                            out[0] = memoryview(head)[sent:]
                        break
                    sent -= n
                    out.popleft()
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
            self._closing.shutdown_sockets()
        finally:
            self._hand_over()
            with self._lock:
                self._closed = True
                callbacks, self._closing.on_closed = self._closing.on_closed, []
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
        sel.register(self._wakeup, selectors.EVENT_READ, "wake")
        if self._initial_upstream is not None:
            joined, self._initial_upstream = self._initial_upstream, None
            self._client_role.install_upstream(*joined)
        elif self._client_mode:
            self._client_role.start_rendezvous()
        next_check = time.monotonic()
        while True:
            deadline = next_check
            if self._losses.losing:
                soon = time.monotonic() + 0.002
                for entry in self._losses.losing.values():
                    deadline = min(deadline, soon if entry[3] else entry[0])
            with self._lock:
                core_deadline = self._core.next_deadline()
                if core_deadline is not None and core_deadline < deadline:
                    deadline = core_deadline
                # A call submitted from now on with an earlier deadline wakes the loop.
                self._wake_at = deadline
            events = sel.select(max(0.0, deadline - time.monotonic()))
            self._dispatch_events(events)
            self._take_handoffs()
            if self._loans.has_returns():
                self._send_loans_back()
            if self._loops.changed:
                self._loops.sync()
            if self._pending_upstream is not None:
                self._client_role.take_rendezvous()
            if self._core.closing and not self._closing.listeners_closed:
                with self._lock:
                    self._loops.off = True
                    self._loops.loop = None
                self._loops.sync()
                self._closing.close_listeners()
            now = time.monotonic()
            with self._lock:
                self._apply_locked(self._core.tick(now))
            if self._check_locals:
                self._check_locals = False
                self._losses.check_local_workers()
            if self._losses.losing:
                self._losses.check_losses(now)
            if now >= next_check:
                self._check_absent(now)
                self._loops.check(now)
                self._losses.check_heartbeats(now)
                self._door.check(now)
                self._losses.check_local_workers()
                next_check = now + min([self._interval / 2] + [p.interval / 2 for p in self._peers.values()])
            if self._outcomes:
                self._hand_over()
            if self._core.closing and self._closing.step():
                return

    def _dispatch_events(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """Bridge thread: what the selector says is ready."""
        for key, mask in events:
            data = key.data
            if data == "wake":
                self._wakeup.drain()
            elif isinstance(data, tuple):
                if data[0] == "listener":
                    self._door.accept(data[1])
                elif data[0] == "loading":
                    self._door.read_loading(data[1])
                else:  # ("exit", peer): a lost local worker's process is ending
                    self._losses.sentinel_fired(data[1])
            else:
                peer: Peer = data
                if mask & selectors.EVENT_READ:
                    self._reader.read(peer)
                if mask & selectors.EVENT_WRITE and not peer.gone:
                    with self._lock:
                        self._flush_locked(peer)

    def _take_handoffs(self) -> None:
        """Bridge thread: what other threads handed over since the last pass:
        workers loading to watch, new peers to take in, sockets whose write
        interest changed or that an event loop gave back."""
        if self._door.new_loading:
            with self._lock:
                new_loading, self._door.new_loading = self._door.new_loading, []
            for sock in new_loading:
                self._selector.register(sock, selectors.EVENT_READ, ("loading", sock))
        if self._drops:
            with self._lock:
                drops, self._drops = self._drops, []
            for peer, reason in drops:
                self._losses.drop(peer, reason)
        if self._new_peers or self._dirty or self._loops.returned:
            with self._lock:
                new_peers, self._new_peers = self._new_peers, []
                dirty, self._dirty = self._dirty, []
                returned, self._loops.returned = self._loops.returned, []
            for peer in dirty:
                self._update_registration(peer)
            for peer, why in returned:
                if why is not None:
                    self._losses.drop(peer, why)
                else:
                    self._update_registration(peer)
            for sock, hello, early, partial in new_peers:
                try:
                    self._add_peer(sock, hello, early, partial)
                except Exception as exc:  # noqa: BLE001 - that connection only
                    logger.exception("gibbs hub: internal error taking in %s (pid %d on %s); closed", hello.name, hello.pid, hello.host,
                                     extra=logs.fields(hello.model, hello.name))
                    self._forget_new_peer(sock, exc)
            if new_peers and self._loops.loop is not None:
                self._loops.changed = True

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

    # ---------------------------------------------------------------- new connections


    def roll_out(self, model: str, cls: Optional[str]) -> None:
        """A pool's rolling update begins (the new class may serve the model
        beside the old) or ends (None)."""
        with self._lock:
            self._apply_locked(self._core.roll_out(model, cls))


    def has_joined(self, token: str) -> bool:
        """Whether the worker whose HELLO carried ``token`` ever joined this
        hub (a token, unlike a pid, is unique across machines)."""
        with self._lock:
            return token in self._joined_tokens

    def init_failure_of(self, pid: Optional[int]) -> Optional[str]:
        return self._door.init_failure_of(pid)

    def loading(self) -> list[dict[str, Any]]:
        """Workers building their model now: pid, host, name, model, device, seconds."""
        return self._door.loading()

    def give_up_model(self, model: str, why: str) -> None:
        """A pool stopped restarting the workers of ``model``: its queued and
        new requests fail at once (until a worker of it joins), with the
        constructor's traceback when one was reported."""
        with self._lock:
            lines = [t for _, t in self._door.init_failures if f"model {model!r}" in t]
            err = NoWorkersError(why + ("\n  " + "\n  ".join(x.rstrip().replace("\n", "\n  ") for x in lines[-1:]) if lines else ""))
            self._apply_locked(self._core.model_unavailable(model, err))
        if self._outcomes:
            self._hand_over()
        self._notify_waiters()


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
                    peer.out.append(self._router_role.pool_frame_locked())
                    self._flush_locked(peer)
            logger.info("gibbs hub: %s joined", peer.describe(), extra=logs.peer(peer))
            try:
                peer.reader.feed(partial)  # an incomplete frame: nothing comes out yet
                if early:
                    if peer.role == "client":
                        self._router_role.client_frames(peer, list(early))
                    else:
                        self._router_role.observer_frames(peer, list(early))
            except (ProtocolError, ValueError) as exc:
                logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
                self._losses.drop(peer, f"protocol error: {exc}")
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
                self._router_role.broadcast_pool_locked()
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
            self._losses.drop(peer, f"internal error: {exc!r}")
            return
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # ---------------------------------------------------------------- reading


    # ---------------------------------------------------------------- segments given back


    def _send_loans_back(self) -> None:
        """Bridge thread: RELEASE frames for the segments callers freed."""
        back = self._loans.take_back()
        with self._lock:
            for peer, name in back:
                if not peer.gone:  # else its worker is gone, or was told to forget its files
                    peer.out.extend(protocol.pack_frame(protocol.RELEASE, 0, name.encode()))
                    self._flush_locked(peer)

    def shared_memory(self) -> dict[str, Any]:
        return self._loans.snapshot()


    # ================================================================ family of hubs (see _family.py)


