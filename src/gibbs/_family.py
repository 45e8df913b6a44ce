"""The two roles of a hub in a family of processes (the web processes of
one application share one pool).

The **router** holds the address: workers and client hubs connect to it.
:class:`RouterRole` turns a client hub's frames into core events (FORWARD
becomes ``core.submit`` with a ``ClientSink``, whose outcome and chunks go
back on that connection, unpickled nowhere; STOP/RESEND/CREDIT become
``cancel``/``resend``/``consumed``); a client that goes has its calls
cancelled; an observer (``gibbs status``) may ask for statistics; every
client is told what the pool holds (POOL).

A **client** hub routes through the router. :class:`ClientRole` keeps one
``Relay`` worker per model in its core (room for any number of calls)
standing for the router: the bridge writes a ``Send`` to a relay as a
FORWARD frame; the router's answers become ``core.answered``; the
router's loss is ``core.upstream_lost``: the relays go and their calls go
back to the queue with no attempt counted (sent again once the router is
found again), and a rendezvous thread finds the router again or takes the
address over.

Both run on the bridge thread (the rendezvous loop in its own thread) and
share the bridge's lock and state: its peers, relays and pool as seen.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import errors, logs, protocol
from ._peers import ClientSink, Forwarded, Peer, Relay
from .core import CANCELLED, PRIORITIES, Call, Outcome, OutcomeKind, WorkerInfo
from .errors import ProtocolError
from .records import Hello, Welcome, exc_from_json, exc_to_json

if TYPE_CHECKING:
    from .bridge import Bridge, Rendezvous

__all__ = ["ClientRole", "RouterRole"]

logger = logging.getLogger("gibbs")


class RouterRole:
    """The router's side: client hubs and observers connected to us."""

    def __init__(self, bridge: "Bridge") -> None:
        self._b = bridge
        self._lock = bridge._lock
        self._core = bridge._core

    def pool_frame_locked(self) -> bytes:
        models = {}
        for name, m in self._core.models.items():
            n = sum(1 for w in m.workers.values() if not w.leaving)
            if n or m.queue:
                models[name] = {
                    "class": m.cls,
                    "workers": n,
                    "batched": m.batched,
                    "queued": len(m.queue),
                }
        return protocol.pack_json(protocol.POOL, {"models": models})

    def broadcast_pool_locked(self) -> None:
        """Tell every client hub what the pool now holds (their
        ``wait_for_workers``, ``models()`` and batching checks read it)."""
        if not self._b._clients:
            return
        frame = self.pool_frame_locked()
        for peer in self._b._clients.values():
            if not peer.gone and peer.role == "client":
                peer.out.append(frame)
                self._b._flush_locked(peer)

    def client_frames(self, peer: Peer, frames: list[tuple[int, int, bytes]]) -> None:
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
                    call = Call(
                        self._b._next_id, model, Forwarded(payload, rid, trace), ClientSink(peer, cid), stream,
                        single=bool(flags & protocol.FWD_SINGLE),
                    )
                    bits = flags >> protocol.FWD_PRIORITY_SHIFT  # 0: none given (our default applies)
                    given = (bits - 1 if bits else None) if peer.hello.explicit_class else (bits or None)
                    if given is not None:
                        call.priority = min(given, PRIORITIES[-1])
                    call.origin = peer.hello.within  # a client hub inside a worker: that worker's token
                    self._b._next_id += 1
                    err: Optional[BaseException] = None
                    try:
                        actions = core.submit(call, now)
                    except Exception as exc:  # noqa: BLE001 - the caller's to see (a batched model's refusal too)
                        err = exc
                    if err is not None:
                        peer.out.extend(protocol.pack_frame(protocol.EXC, cid, exc_to_json(err)))
                        continue
                    calls[cid] = call
                    self._b._apply_locked(actions)
                elif kind == protocol.STOP:
                    held = calls.get(cid)
                    if held is not None:
                        self._b._apply_locked(core.cancel(held))
                elif kind == protocol.RESEND:
                    held = calls.get(cid)
                    if held is not None:
                        self._b._apply_locked(core.resend(held, now))
                elif kind == protocol.CREDIT:
                    held = calls.get(cid)
                    if held is not None:
                        self._b._apply_locked(core.consumed(held, protocol.unpack_credit(body)))
                elif kind != protocol.HEARTBEAT:
                    raise ProtocolError(f"unexpected {protocol.KIND_NAMES.get(kind)} from a client hub")
            self._b._flush_locked(peer)
        if self._b._outcomes:
            self._b._hand_over()

    def observer_frames(self, peer: Peer, frames: list[tuple[int, int, bytes]]) -> None:
        """``python -m gibbs status``: it may read statistics, nothing else."""
        for kind, _, _ in frames:
            if kind == protocol.STATS:
                source = self._b.stats_source() if self._b.stats_source is not None else None
                stats = source() if source is not None else self._b.statistics()
                body = json.dumps({"statistics": stats, "workers": self._b.workers()}, default=str).encode()
                with self._lock:
                    peer.out.extend(protocol.pack_frame(protocol.STATS, 0, body))
                    self._b._flush_locked(peer)
            elif kind != protocol.HEARTBEAT:
                raise ProtocolError(f"an observer may only ask for STATS, not {protocol.KIND_NAMES.get(kind)}")

    def drop_client(self, peer: Peer, reason: str) -> None:
        """A client hub went away (its process died or closed): its calls are
        cancelled; queued ones never run (it sends them again elsewhere, if
        it can)."""
        peer.gone = True
        try:
            self._b._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()
        with self._lock:
            self._b._clients.pop(peer.fd, None)
            calls = list(peer.calls.values()) if peer.calls else []
            if peer.calls:
                peer.calls.clear()
            self._b._apply_locked(self._core.client_gone(calls))
        logger.info("gibbs hub: %s left (%s); %d of its calls cancelled", peer.describe(), reason, len(calls),
                    extra=logs.peer(peer, ",".join(self._b.request_id(c) for c in calls) or None))
        if self._b._outcomes:
            self._b._hand_over()

    def answer_locked(self, call: Call, outcome: Outcome) -> Optional[Peer]:
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


class ClientRole:
    """The client's side: our connection to the router, and finding it."""

    def __init__(
        self,
        bridge: "Bridge",
        rendezvous: Optional["Rendezvous"],
        on_role: Any,
    ) -> None:
        self._b = bridge
        self._lock = bridge._lock
        self._core = bridge._core
        self._rendezvous = rendezvous  # finds the router again, or takes the address over
        self._on_role = on_role
        self._rendezvous_thread: Optional[threading.Thread] = None

    def add_relay_locked(self, model: str) -> None:
        up = self._b._upstream
        assert up is not None
        relay = WorkerInfo(
            Relay(model), model, "", slots=1 << 30, depth=1 << 30, describe=f"the router hub ({up.describe()})",
            relay=True,
        )
        self._b._relays[model] = relay
        self._b._apply_locked(self._core.worker_joined(relay, time.monotonic()))

    def forward_locked(self, relay: Relay, calls: Sequence[Call]) -> Optional[Peer]:
        """The core's ``Send`` to a relay: FORWARD frames to the router (the
        call's request id, class and trace context with it). Returns the
        router's connection to flush, or None when there is none now (the
        calls come back when it is lost)."""
        up = self._b._upstream_for_locked(relay)
        if up is None:
            return None
        info = self._b._relays[relay.model]
        for c in calls:
            self._b._relay_of[c.id] = info
            payload = c.payload
            flags = (protocol.FWD_STREAM if c.stream else 0) | getattr(payload, "flags", 0)
            flags |= self._class_bits(c, up.hello.explicit_class) << protocol.FWD_PRIORITY_SHIFT
            rid = payload.rid or self._b.request_ids + str(c.id)  # the router's calls keep our id
            up.out.extend(protocol.pack_forward(c.id, c.model, flags, self._b._inline(payload), rid, payload.trace))
        return up

    def _class_bits(self, call: Call, explicit: bool) -> int:
        """A forwarded call's class, as FORWARD carries it: the class its
        caller gave (or inherited), else this hub's default for the model,
        else none, in which case the router's default applies. ``explicit``
        (the router reads it so): none is 0 and a class is itself + 1; else
        none and class 0 are both 0."""
        given = getattr(call.payload, "priority", None)
        if given is None and call.model in self._core.default_priorities:
            given = call.priority
        if not explicit:
            return given or 0
        return 0 if given is None else given + 1

    def install_upstream(
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
            self.start_rendezvous()
            return
        hello = Hello(role="router", name="router", pid=w.pid, host=w.host, heartbeat_interval=w.heartbeat_interval,
                      explicit_class=w.explicit_class)
        peer = Peer(sock, hello, self._b._max_frame)
        peer.reader = reader
        self._b._selector.register(sock, selectors.EVENT_READ, peer)
        try:
            self.router_frames(peer, frames)  # the pool first: wait_for_workers and models() are right at once
        except ProtocolError as exc:
            logger.warning("gibbs hub: the router hub sent a bad frame (%s); looking again", exc)
            try:
                self._b._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
            self.start_rendezvous()
            return
        with self._lock:
            self._b._upstream = peer
            for model in list(self._core.models):
                self.add_relay_locked(model)
            if self._b._loops.loop is not None:
                self._b._loops.changed = True  # the home loop reads it
        logger.info("gibbs hub: routing through %s", peer.describe())
        if self._b._outcomes:
            self._b._hand_over()
        self._b._notify_waiters()

    def router_frames(self, peer: Peer, frames: list[tuple[int, int, bytes]]) -> None:
        core = self._core
        now = time.monotonic()
        changed = False
        with self._lock:
            for kind, cid, body in frames:
                if kind == protocol.CHUNK:
                    relay = self._b._relay_of.get(cid)
                    if relay is not None:
                        self._b._apply_locked(core.chunk(relay.id, cid, Outcome(OutcomeKind.CHUNK, body)))
                    continue
                if kind in (protocol.RESULT, protocol.ERROR, protocol.EXC):
                    relay = self._b._relay_of.get(cid)
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
                    del self._b._relay_of[cid]
                    self._b._apply_locked(core.answered(relay.id, cid, outcome, now))
                elif kind == protocol.POOL:
                    models = protocol.unpack_json(body).get("models", {})
                    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
                        raise ProtocolError("malformed POOL")
                    self._b._pool_info = dict(models)
                    changed = True
                elif kind != protocol.HEARTBEAT:
                    raise ProtocolError(f"unexpected {protocol.KIND_NAMES.get(kind)} from the router hub")
        # The outcomes go to their callers once the reader lets go of the
        # socket: the bridge thread at the end of its pass, the event loop
        # that reads it right after the read.
        if changed:
            self._b._notify_waiters()

    def lose_upstream(self, reason: str) -> None:
        """The router is gone (its process died or closed): every call it
        held goes back to our queue, without counting as an attempt, and we
        look for the router again, or take the address over."""
        peer = self._b._upstream
        if peer is None or peer.gone:
            return
        self._b._losses.close_socket(peer)
        now = time.monotonic()
        with self._lock:
            self._b._upstream = None
            relays = list(self._b._relays.values())
            self._b._relays.clear()
            self._b._relay_of.clear()
            self._b._pool_info = {}
            held = sum(len(r.held) for r in relays)
            self._b._apply_locked(self._core.upstream_lost([r.id for r in relays], now))
            closing = self._core.closing
        if not closing:
            logger.warning("gibbs hub: lost the router hub %s (%s); %d calls to send again", peer.describe(), reason, held)
            self.start_rendezvous()
        if self._b._outcomes:
            self._b._hand_over()
        self._b._notify_waiters()

    def start_rendezvous(self) -> None:
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
                if self._core.closing or self._b._closed:
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
                    if not (self._core.closing or self._b._closed):
                        self._b._pending_upstream = result
                        self._b._wake_locked()
                        return
                for sock in self.rendezvous_sockets(result):
                    sock.close()
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.25)

    @staticmethod
    def rendezvous_sockets(result: Optional[tuple[str, Any]]) -> list[socket.socket]:
        if result is None:
            return []
        if result[0] == "listen":
            return list(result[1])
        return [result[1][0]]

    def take_rendezvous(self) -> None:
        with self._lock:
            result, self._b._pending_upstream = self._b._pending_upstream, None
            closing = self._core.closing
        if result is None:
            return
        if closing:
            for sock in self.rendezvous_sockets(result):
                sock.close()
            return
        if result[0] == "client":
            self.install_upstream(*result[1])
            return
        # We took the address over: from now on workers connect here.
        listeners = list(result[1])
        for listener in listeners:
            listener.setblocking(False)
            self._b._selector.register(listener, selectors.EVENT_READ, ("listener", listener))
        self._b._listeners.extend(listeners)
        with self._lock:
            self._b._client_mode = False
            self._b._pool_info = {}
        logger.warning("gibbs hub: took the address over; this process now routes the family's calls")
        self._on_role("router", listeners)
        self._b._notify_waiters()
