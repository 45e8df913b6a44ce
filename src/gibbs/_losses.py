"""Losses: a connection dropped, and its loss declared to the core.

A worker's connection is dropped on its end of file, a bad frame, too many
bytes buffered or silence beyond the heartbeat bound (``misses`` times its
interval). For a worker process started in this process, its loss waits
(a little: ``_EXIT_STATUS_WAIT``) for the process's exit status, so that
the error its callers get says how it died (a signal, an exit code). Its
shared-memory files go with it: all of them when the kernel vouched for
its pid, else only those it showed us.

Also here: heartbeats sent to every peer, and local fail-fast (every worker
process this process started for a model exited without ever joining:
its callers fail at once with the constructors' tracebacks).

Bridge thread only, except where the bridge's lock is taken.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from typing import TYPE_CHECKING, Any, Optional

from . import logs, protocol
from ._peers import LocalWorker, Peer, describe_exit
from .errors import NoWorkersError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["Losses"]

logger = logging.getLogger("gibbs")

#: How long the loss of a local worker waits for its exit status (so that
#: the error names the signal or exit code) before it is declared anyway.
_EXIT_STATUS_WAIT = 0.5


class Losses:
    def __init__(self, bridge: "Bridge") -> None:
        self._b = bridge
        self._lock = bridge._lock
        self._core = bridge._core
        # lost peers waiting for an exit status: [deadline, reason, local worker, exiting]
        self.losing: dict[Peer, list[Any]] = {}

    def close_socket(self, peer: Peer) -> None:
        """Bridge thread: the end of a worker's or our router's connection.
        An event loop that reads it lets go; it may still hold a duplicate
        of the descriptor for a moment (or a forked child an inherited one),
        so the connection is shut down for the other end to see it now."""
        if peer.owner is not None:
            self._b._loops.reclaim(peer)
        peer.gone = True
        try:
            self._b._selector.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        try:
            peer.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        peer.sock.close()

    def drop(self, peer: Peer, reason: str) -> None:
        """Close a worker's connection; its loss reaches the core once the
        exit status of a local worker process is known (or soon anyway)."""
        if peer.gone:
            return
        with self._b._reader._buffered_lock:
            self._b._reader.buffered.pop(peer, None)
        if peer.role in ("client", "observer"):
            self._b._router_role.drop_client(peer, reason)
            return
        if peer.role == "router":
            self._b._client_role.lose_upstream(reason)
            return
        self.close_socket(peer)
        local = None
        if not peer.info.leaving and peer.vouched:
            local = next((w for w in self._b._local_workers() if w.pid == peer.pid), None)
        if local is not None and local.exitcode() is None:
            # Its socket closes a moment before its exit status is known:
            # wait (a little) for the status, so the error can say how it died.
            try:
                self._b._selector.register(local.sentinel, selectors.EVENT_READ, ("exit", peer))
            except (KeyError, ValueError, OSError):
                pass
            self.losing[peer] = [time.monotonic() + _EXIT_STATUS_WAIT, reason, local, False]
            return
        self._lose(peer, reason, local)

    def sentinel_fired(self, peer: Peer) -> None:
        entry = self.losing.get(peer)
        if entry is not None:
            self._unregister_sentinel(entry[2])
            entry[3] = True  # exiting now: poll for the status until it is there

    def _unregister_sentinel(self, local: LocalWorker) -> None:
        try:
            self._b._selector.unregister(local.sentinel)
        except (KeyError, ValueError, OSError):
            pass

    def check_losses(self, now: float) -> None:
        for peer, (deadline, reason, local, _) in list(self.losing.items()):
            if local.exitcode() is not None or now >= deadline:
                del self.losing[peer]
                self._unregister_sentinel(local)
                self._lose(peer, reason, local)

    def _lose(self, peer: Peer, reason: str, local: Optional[LocalWorker]) -> None:
        if local is not None:
            code = local.exitcode()
            if code is not None:
                reason = f"{reason}; {describe_exit(code)}"
        with self._lock:
            self._b._peers.pop(peer.fd, None)
            if peer.info.leaving and not peer.info.held:
                logger.info("gibbs hub: %s left", peer.describe(), extra=logs.peer(peer))
            else:
                rids = ",".join(self._b.request_id(c) for c in peer.info.held.values()) or None
                logger.warning("gibbs hub: lost %s: %s", peer.describe(), reason, extra=logs.peer(peer, rids))
            self._b._apply_locked(self._core.worker_lost(peer, reason, time.monotonic()))
            self._b._router_role.broadcast_pool_locked()
        if peer.shm:
            # The worker's segments: answers it never sent, and its pool.
            prefix = f"{protocol.SHM_PREFIX}w{peer.pid}-"
            if peer.vouched:
                self._b._maps.forget(prefix)
                if not peer.info.leaving:
                    protocol.remove_segments(prefix)
            else:  # its pid is a claim: only the files it showed us are its own
                for name in peer.segments:
                    self._b._maps.forget(name)
                    if not peer.info.leaving:
                        protocol.remove_segments(name)
        self._b._notify_waiters()

    def check_local_workers(self) -> None:
        """Fail fast when no worker can come: every worker process this
        process started for a model has exited without ever joining (its
        constructor raised, or it could not start), and none is connected."""
        locals_ = self._b._local_workers()
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
                if any(c is None for c in codes) or any(w.pid in self._b._joined_pids for w in ws):
                    continue
                pids = {w.pid for w in ws}
                lines = [t for pid, t in self._b._door.init_failures if pid in pids]
                lines += [f"local worker pid {w.pid} exited: {describe_exit(c)}" for w, c in zip(ws, codes) if c]
                err = NoWorkersError(
                    f"no worker can serve model {model!r}: every worker started for it in this process "
                    f"({len(ws)}) exited without joining:\n  " + "\n  ".join(x.rstrip().replace("\n", "\n  ") for x in lines)
                )
                self._b._apply_locked(self._core.model_unavailable(model, err))
                changed = True
        if changed:
            if self._b._outcomes:
                self._b._hand_over()
            self._b._notify_waiters()

    def check_heartbeats(self, now: float) -> None:
        hb = protocol.pack_frame(protocol.HEARTBEAT, 0)[0]
        peers = list(self._b._peers.values()) + list(self._b._clients.values())
        if self._b._upstream is not None:
            peers.append(self._b._upstream)
        for peer in peers:
            if peer.gone:
                continue
            silent = now - peer.last_heard
            limit = peer.interval * self._b._misses
            if silent > limit:
                self.drop(peer, f"silent for {silent:.1f} s (no heartbeat within {limit:.1f} s)")
                continue
            if now - peer.last_sent >= self._b._interval / 2:
                with self._lock:
                    peer.out.append(hb)
                    self._b._flush_locked(peer)
