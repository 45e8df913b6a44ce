"""The door: new connections, up to the moment they become peers.

The bridge thread accepts a connection and hands it to a short-lived
handshake thread of its own (a peer that stalls holds up only itself):
TLS on TCP when the hub has a certificate, the HMAC challenge both ways,
then WELCOME and the peer's first frame, all within a deadline for the
whole handshake and within bounds (connections not yet authenticated, per
pool and per source; authenticated ones apart, so that a flood of
strangers never holds out a worker). Then, by that first frame:

* HELLO: checked field by field (``records.Hello``), and handed to the
  bridge thread (``Bridge._new_peers``), which makes it a peer;
* LOADING: a worker building its model, listed as loading until it closes
  this connection, watched by the bridge thread (no thread each);
* INIT_FAILED: a constructor's traceback (kept for the errors that explain
  missing workers), or a supervisor giving up on a model.

Its state is owned by the bridge's lock; the bridge thread alone watches
the LOADING sockets in its selector.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import logs, protocol
from ._peers import Peer
from .core import DEFAULT_MODEL
from .errors import ProtocolError
from .records import Hello, InitFailed, Loading
from .tls import tunnel
from .transport import ANY_APP, GRANT_ALL, authenticate, describe, peer_uid, tune

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["Door", "INIT_REPORT_WAIT"]

logger = logging.getLogger("gibbs")

#: Connections that have not authenticated yet, at most, per pool: TCP, and
#: the local socket for this user (another user's connections on the local
#: socket count as TCP's do, by user id): a flood on TCP never holds out a
#: local worker. From one source (an address, or another user) at most
#: _MAX_PER_SOURCE of them; they have _AUTH_DEADLINE seconds (or the
#: handshake timeout, if shorter) to pass the challenge.
_MAX_HANDSHAKES = 64
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
#: How long a pool asking why a worker failed waits for its report.
INIT_REPORT_WAIT = 2.0


class _Pending:
    """A connection in its handshake (owned by ``Bridge._lock``): its deadline,
    where it comes from, and whether it has authenticated."""

    __slots__ = ("deadline", "source", "authed")

    def __init__(self, deadline: float, source: tuple[str, Any]) -> None:
        self.deadline = deadline
        self.source = source
        self.authed = False


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


class Door:
    def __init__(
        self,
        bridge: "Bridge",
        *,
        authkey: bytes,
        authkey_explicit: bool,
        limited_keys: Sequence[tuple[str, bytes]],
        ssl_context: Optional[ssl.SSLContext],
        handshake_timeout: float,
    ) -> None:
        self._b = bridge
        self._lock = bridge._lock  # owns everything below
        self._authkey = authkey
        self._explicit = authkey_explicit
        self._limited_keys = list(limited_keys)  # (role, key): keys that give one role only
        self._ssl_context = ssl_context  # set: TCP connections carry TLS (the local socket does not)
        self._handshake_timeout = handshake_timeout
        self.handshaking: dict[socket.socket, _Pending] = {}  # sockets in handshake threads
        self.loading_workers: dict[socket.socket, dict[str, Any]] = {}  # workers building their model
        self.new_loading: list[socket.socket] = []  # for the bridge thread to watch
        self.init_failures: collections.deque[tuple[int, str]] = collections.deque(maxlen=16)  # (pid, text)
        self.handshake_failures: collections.deque[str] = collections.deque(maxlen=16)
        self.n_handshake_failures = 0

    def accept(self, listener: socket.socket) -> None:
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
                self.handshaking[sock] = _Pending(deadline, source)
            threading.Thread(
                target=self._handshake, args=(sock, addr), name="gibbs-handshake", daemon=True
            ).start()

    def _admit_locked(self, source: tuple[str, Any]) -> Optional[str]:
        """Why a new connection from ``source`` is refused, if it is."""
        if self._b._core.closing:
            return "closing"
        pool = source[0]
        in_pool = in_source = 0
        for pending in self.handshaking.values():
            if not pending.authed and pending.source[0] == pool:
                in_pool += 1
                in_source += pending.source == source
        if in_pool >= _MAX_HANDSHAKES:
            return f"{in_pool} connections are authenticating already"
        if pool != "local" and in_source >= _MAX_PER_SOURCE:
            return f"{in_source} connections from there are authenticating already"
        return None

    def check(self, now: float) -> None:
        """A handshake has its deadline in all, not per read: a peer that
        trickles a byte at a time is cut off at the deadline. LOADING
        connections past theirs are closed too."""
        with self._lock:
            late = [s for s, pending in self.handshaking.items() if now > pending.deadline]
            stale = [s for s, e in self.loading_workers.items() if now - e["since"] > _LOADING_DEADLINE]
        for sock in stale:
            self.end_loading(sock)
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
                pending = self.handshaking.get(sock)
                if pending is None:
                    raise ConnectionAbortedError("closed meanwhile")
                authed = sum(1 for q in self.handshaking.values() if q.authed)
                if authed >= _MAX_AUTHENTICATED:
                    raise ConnectionRefusedError(f"{authed} authenticated connections have not said HELLO yet")
                pending.authed = True
                pending.deadline = time.monotonic() + self._handshake_timeout
            sock.settimeout(self._handshake_timeout)
            welcome = {
                "heartbeat_interval": self._b._interval,
                "shm_probe": self._b._shm_probe,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "app": self._b._app,
                "request_ids": self._b.request_ids,
                "explicit_class": True,  # see records.Hello.explicit_class
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
                self._b.give_up_model(model, why)
                return
            if kind == protocol.INIT_FAILED:
                line = (
                    f"worker {failed.name} (pid {failed.pid} on {failed.host}) "
                    f"failed to build model {failed.model or DEFAULT_MODEL!r}: "
                    f"{failed.exc_type}: {failed.message}\n{failed.traceback}"
                )
                logger.error("gibbs hub: %s", line, extra=logs.fields(failed.model or DEFAULT_MODEL, failed.name))
                with self._lock:
                    self.init_failures.append((failed.pid, line))
                    self._b._check_locals = True
                    self._b._wake_locked()
                sock.close()
                return
            if kind != protocol.HELLO:
                raise ProtocolError(f"expected HELLO, got {protocol.KIND_NAMES.get(kind)}")
            info = Hello.from_wire(protocol.unpack_json(body))
            if grant not in GRANT_ALL and info.role != grant:
                # Roles are privileges: a client hub submits work, a worker
                # answers calls; a key limited to one role gives no other.
                raise ProtocolError(f"a key limited to {grant} may not join as {info.role}")
            if info.role == "client" and info.app is not None and self._b._app not in (None, ANY_APP, info.app):
                # A hub of another program found our address: never route
                # its calls to our models (it is told why, and raises).
                reason = (
                    f"this address is held by the hub of another application ({self._b._app}); "
                    f"the client hub's application is {info.app}"
                )
                sock.sendall(protocol.pack_json(protocol.REFUSED, {"reason": reason, "app": self._b._app}))
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
                self.handshaking.pop(sock, None)
                if self._b._core.closing:
                    sock.close()
                    return
                self._b._new_peers.append((sock, info, early, partial))
                self._b._wake_locked()
        except Exception as exc:  # noqa: BLE001 - any failure closes this connection only
            logger.warning("gibbs hub: rejected connection from %s: %s", who, exc)
            with self._lock:
                self.n_handshake_failures += 1
                self.handshake_failures.append(f"a connection from {who} failed its handshake: {exc}")
            sock.close()
        finally:
            with self._lock:
                self.handshaking.pop(sock, None)

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
                self.handshaking.pop(current, None)
            current.close()  # the tunnel's end: its pump closes the TLS socket
            raise

    def _rekey_handshake(self, old: socket.socket, new: socket.socket) -> None:
        with self._lock:
            pending = self.handshaking.pop(old, None)
            if pending is None:
                raise ConnectionAbortedError("closed meanwhile")
            self.handshaking[new] = pending

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
            self.handshaking.pop(sock, None)
            refused = "closing" if self._b._core.closing else None
            if refused is None and len(self.loading_workers) >= _MAX_LOADING:
                refused = f"{len(self.loading_workers)} workers are loading already"
            if refused is None:
                sock.setblocking(False)
                self.loading_workers[sock] = entry
                self.new_loading.append(sock)
                self._count_loading_locked(str(entry["model"]))
                self._b._wake_locked()
        if refused is not None:
            logger.warning("gibbs hub: refused LOADING from %s (pid %d on %s): %s", info.name, info.pid, info.host, refused,
                           extra=logs.fields(info.model, info.name))
            sock.close()
            return
        self._b._notify_waiters()

    def read_loading(self, sock: socket.socket) -> None:
        """Bridge thread: a LOADING connection is readable: its end (the model
        is built, or failed), or bytes it had no reason to send."""
        try:
            if sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.end_loading(sock)

    def end_loading(self, sock: socket.socket) -> None:
        with self._lock:
            entry = self.loading_workers.pop(sock, None)
            if entry is not None:
                self._count_loading_locked(str(entry["model"]))
                self._b._wake_locked()  # a deadline of the core may have moved
        if entry is None:
            return
        try:
            self._b._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self._b._notify_waiters()

    def _count_loading_locked(self, model: str) -> None:
        n = sum(1 for e in self.loading_workers.values() if e["model"] == model)
        self._b._apply_locked(self._b._core.workers_loading(model, n, time.monotonic()))

    def refuse_locked(self, peer: Peer, reason: str) -> None:
        """The core's ``Refuse``: a worker that may not serve its model (say,
        a second class under one name) is told why, and closed."""
        logger.error("gibbs hub: refused %s: %s", peer.describe(), reason, extra=logs.peer(peer))
        self.handshake_failures.append(f"{peer.describe()} refused: {reason}")
        self.n_handshake_failures += 1
        try:
            peer.sock.setblocking(True)
            peer.sock.settimeout(1.0)
            peer.sock.sendall(protocol.pack_json(protocol.REFUSED, {"reason": reason}))
        except OSError:
            pass
        peer.sock.close()
        peer.gone = True

    def init_failure_of(self, pid: Optional[int]) -> Optional[str]:
        """The constructor failure a local worker (by pid) reported, waiting
        a moment for its report (sent as the process exits)."""
        deadline = time.monotonic() + INIT_REPORT_WAIT
        while True:
            with self._lock:
                text = next((t for p, t in reversed(self.init_failures) if pid is not None and p == pid), None)
            if text is not None or time.monotonic() >= deadline:
                return text
            time.sleep(0.05)

    def loading(self) -> list[dict[str, Any]]:
        """Workers building their model now: pid, host, name, model, device, seconds."""
        now = time.monotonic()
        with self._lock:
            return [
                {k: v for k, v in e.items() if k != "since"} | {"seconds": now - e["since"]}
                for e in self.loading_workers.values()
            ]
