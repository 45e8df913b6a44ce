"""Closing a hub's bridge, and forgetting it in a forked child.

:meth:`Closing.begin` stops taking calls (the core fails the queued ones
and lets the running ones finish within the grace period); client hubs'
calls are cancelled, not failed (``core.client_gone``), and their
connections shut down, so that they send their calls again to whichever hub
takes the address over. The listeners close at once (another hub of the
family may take the address while our running calls finish); the core lets
idle workers go at once (its ``Drop``: they go looking for the hub that
takes over); once the core is idle every socket, the selector and the
wake-up pipe close.

In a forked child (:meth:`Closing.forget_after_fork`) the inherited
descriptors close without a word to the peers: they are the parent's
connections. The bridge's lock may have been held at the fork by a thread
that does not exist here: nothing there takes it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["Closing"]


class Closing:
    def __init__(self, bridge: "Bridge") -> None:
        self._b = bridge
        self._lock = bridge._lock
        self._core = bridge._core
        self.on_closed: list[Callable[[], None]] = []  # owned by the bridge's lock
        self.listeners_closed = False  # bridge thread only
        self._fds_closed = False

    def begin(self, grace: float, on_closed: Callable[[], None]) -> None:
        """Stop taking calls; fail the queued ones; let the running ones finish
        within ``grace`` seconds; then close everything. ``on_closed`` is
        called (from the bridge thread, or here if already closed) at the end."""
        with self._lock:
            if self._b._closed:
                done = True
            else:
                done = False
                self.on_closed.append(on_closed)
                # Client hubs' calls are not failed: they are cancelled here and
                # the clients, seeing the connection end, send them again to
                # whichever hub takes the address over.
                for peer in self._b._clients.values():
                    calls = list(peer.calls.values()) if peer.calls else []
                    if peer.calls:
                        peer.calls.clear()
                    self._b._apply_locked(self._core.client_gone(calls))
                    try:
                        peer.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._b._apply_locked(self._core.close(time.monotonic(), grace))
                self._b._wake_locked()
        if self._b._outcomes:
            self._b._hand_over()
        if done:
            on_closed()

    def step(self) -> bool:
        """While closing: True once everything is closed."""
        now = time.monotonic()
        with self._lock:
            self._b._apply_locked(self._core.tick(now))  # idle workers are let go (the core's Drop)
            busy = not self._core.idle
        self._b._take_handoffs()  # those Drops, now
        if busy:
            return False
        self._b._hand_over()
        self.shutdown_sockets()
        self._b._maps.clear()
        return True

    def shutdown_sockets(self) -> None:
        for att in self._b._loops.detaching:
            if not att.closed and not att.loop.is_running():
                self._b._loops.close_att(att)  # a stopped loop may never run again to close it
        if any(not att.closed for att in self._b._loops.detaching):
            # Event loops may hold duplicates of worker sockets (and of our
            # router's) until they next run: shut the connections down so
            # that the other ends see it now.
            for p in self._b._loops.readable_locked():  # (on the bridge thread, which alone changes them)
                try:
                    p.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self._lock:
            loading = list(self._b._door.loading_workers)
        for sock in loading:
            self._b._door.end_loading(sock)
        socks = [p.sock for p in self._b._peers.values()] + [p.sock for p in self._b._clients.values()]
        if self._b._upstream is not None:
            socks.append(self._b._upstream.sock)
        with self._lock:
            pending, self._b._pending_upstream = self._b._pending_upstream, None
        socks += self._b._client_role.rendezvous_sockets(pending)
        self._close_descriptors(socks)
        self._b._peers.clear()
        self._b._clients.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptors without touching
        the parent's connections (no shutdown, no messages). The lock may have
        been held by a thread that does not exist here: do not take it (nor
        the loans' lock: a thread of the parent may have held it at the fork,
        a finalizer giving an answer back; this process gets a fresh one)."""
        self._b._loans.forget_after_fork()
        self._b._wakeup.forget_after_fork()
        socks = [p.sock for p in self._b._peers.values()] + [p.sock for p in self._b._clients.values()]
        socks += list(self._b._door.handshaking) + [entry[0] for entry in self._b._new_peers] + list(self._b._door.loading_workers)
        if self._b._upstream is not None:
            socks.append(self._b._upstream.sock)
        socks += self._b._client_role.rendezvous_sockets(self._b._pending_upstream)
        for p in self._b._loops.owned_locked():
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
        for sock in socks + self._b._listeners:
            try:
                sock.close()
            except OSError:
                pass
        try:
            self._b._selector.close()
        except (OSError, RuntimeError):
            pass
        self._b._loans.close()  # a lent answer freed from now on writes no wake-up
        self._b._wakeup.close()

    def close_listeners(self) -> None:
        """Closing: let go of the address at once, so that another hub of the
        family can take it over while our running calls finish."""
        self.listeners_closed = True
        for listener in self._b._listeners:
            try:
                self._b._selector.unregister(listener)
            except (KeyError, ValueError):
                pass
            try:
                listener.close()
            except OSError:
                pass
