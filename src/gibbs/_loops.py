"""Loop reads: the event loop that makes the asyncio requests reads the
worker sockets itself (in a client hub, its router's socket).

When one event loop makes a hub's asyncio requests, it watches the worker
sockets (``add_reader`` on a duplicate of each descriptor) and reads the
answers itself, so that an answer reaches its caller with no thread hop.
The bridge thread takes them back when that loop stops, closes, blocks
(user code holds it: answers wait unread) or a second loop comes; then, and
while closing, the bridge thread reads for all.

Who reads a socket is ``peer.owner`` (None: the bridge thread; else an
:class:`_Attachment` of a loop), changed and read under ``peer.rlock``.
The loop watches its duplicate descriptor, which only it closes (after
``remove_reader``), or the bridge thread once the loop is closed: a number
the loop still watches is never reused under it.

State below is owned by the bridge's lock unless marked "bridge thread only".
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Optional

from . import logs
from ._peers import Peer, has_data, internal_error

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["LoopReads"]

logger = logging.getLogger("gibbs")


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


class LoopReads:
    def __init__(self, bridge: "Bridge") -> None:
        self._b = bridge
        self._lock = bridge._lock
        self._core = bridge._core
        self.loop: Any = None  # the home loop: it reads the worker sockets
        # Two loops at once, or closing: the bridge reads for all. GIBBS_LOOP_READS=0
        # keeps the bridge thread reading always (to compare, or to rule it out).
        self.off = os.environ.get("GIBBS_LOOP_READS", "1").strip() == "0"
        self.changed = False
        self.returned: list[tuple[Peer, Optional[str]]] = []  # given back by a loop (and why)
        self._reader: Optional[_LoopReader] = None  # bridge thread only
        self.detaching: list[_Attachment] = []  # bridge thread only: not yet closed by their loop

    def home(self, loop: Any) -> None:
        """An asyncio request from ``loop``: let it read the worker sockets
        (unless another loop is running requests too). Cheap when nothing
        changes: called on every request."""
        if self.loop is loop or self.off:
            return
        with self._lock:
            if self.loop is loop or self.off or self._core.closing:
                return
            old = self.loop
            if old is not None and old.is_running() and not old.is_closed():
                self.off = True  # two loops at once: the bridge thread reads for both
                self.loop = None
            else:
                self.loop = loop
            self.changed = True
            self._b._wake_locked()

    def has_home(self) -> bool:
        return self.loop is not None

    def leave_home(self, loop: Any) -> None:
        """``loop`` is about to block (a caller waits synchronously in its
        thread): if it reads the workers, the bridge thread takes them back
        now. Its next request makes it home again."""
        if self.loop is not loop:
            return
        with self._lock:
            if self.loop is loop:
                self.loop = None
                self.changed = True
                self._b._wake_locked()

    def loop_reads(self) -> int:
        """How many sockets (workers', our router's) an event loop reads now
        (the rest: the bridge thread)."""
        with self._lock:
            return len(self.owned_locked())

    def sync(self) -> None:
        """Bridge thread: attach the worker sockets to the home loop, or take
        them back from a loop that is no longer it."""
        with self._lock:
            self.changed = False
            home = self.loop
            if home is not None and (home.is_closed() or not home.is_running()):
                home = self.loop = None  # it stopped: the next request makes a loop home again
            if self.off or self._core.closing:
                home = self.loop = None
            peers = self.readable_locked()
        reader = self._reader
        if home is None:
            reader = self._reader = None
        elif reader is None or reader.loop is not home:
            reader = self._reader = _LoopReader(home)
        for peer in peers:
            att = peer.owner
            if att is not None and (reader is None or att.reader is not reader):
                self.reclaim(peer)
            if reader is not None and peer.owner is None:
                self.attach(peer, reader)
        if reader is not None and self.loop is not reader.loop:
            self.sync()  # it closed while its sockets were handed over: take back those it has

    def readable_locked(self) -> list[Peer]:
        """The sockets a home loop reads: the workers', and our router's
        (a client hub's answers come from it)."""
        peers = [p for p in self._b._peers.values() if p.role == "worker" and not p.gone]
        up = self._b._upstream
        if up is not None and not up.gone:
            peers.append(up)
        return peers

    def owned_locked(self) -> list[Peer]:
        """The sockets an event loop reads now (under the lock, or in a
        forked child, where no other thread is)."""
        return [p for p in self._b._peers.values() if p.owner is not None and not p.gone] + [
            up for up in (self._b._upstream,) if up is not None and up.owner is not None and not up.gone
        ]

    def attach(self, peer: Peer, reader: _LoopReader) -> None:
        """Bridge thread: from now on ``reader.loop`` reads ``peer``."""
        att = _Attachment(reader)
        with peer.rlock:
            peer.owner = att
        self._b._update_registration(peer)  # no more read interest here
        try:
            reader.loop.call_soon_threadsafe(self._attach_in_loop, peer, att)
        except RuntimeError:  # closed meanwhile
            with peer.rlock:
                peer.owner = None
            self._b._update_registration(peer)
            with self._lock:
                if self.loop is reader.loop:
                    self.loop = None  # _sync_home takes back the sockets attached before this one

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
                self.close_att(att)
                self.give_back(peer, None)
                raise

    def _loop_read(self, peer: Peer, att: _Attachment) -> None:
        """In the home loop: the worker's socket is readable."""
        with peer.rlock:
            mine = peer.owner is att
            try:
                if not mine:
                    why = None
                elif peer.role == "worker":
                    why = self._b._reader.read_worker(peer, att.reader.buf, att.reader.view)
                else:  # our router
                    why = self._b._reader.read_hub_into(peer, att.reader.buf, att.reader.view)
            except Exception as exc:  # noqa: BLE001 - as in the bridge thread: drop that peer only
                why = internal_error(peer, exc)
            if mine and why is not None:
                peer.owner = None
        if not mine:  # taken back: stop watching (the bridge thread reads it now)
            self.close_att(att)
            return
        if why is not None:  # its end, or garbage: the bridge thread drops it
            self.close_att(att)
            self.give_back(peer, why)
        if self._b._outcomes:
            self._b._hand_over()  # to this loop's callers directly, no thread hop

    def give_back(self, peer: Peer, why: Optional[str]) -> None:
        with self._lock:
            self.returned.append((peer, why))
            self._b._wake_locked()

    def close_att(self, att: _Attachment) -> None:
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

    def reclaim(self, peer: Peer) -> None:
        """Bridge thread: read ``peer`` here again (its loop lets go of it
        when it next runs; until then its duplicate descriptor stays open)."""
        with peer.rlock:  # waits for a read in progress in the loop
            att = peer.owner
            if att is None:
                return
            peer.owner = None
        self._b._update_registration(peer)
        self.detaching.append(att)
        if not att.loop.is_running():
            # A stopped loop may never run again (a loop of run_until_complete
            # that is dropped unclosed): close its duplicate now. Nothing is
            # polling it, so removing the reader from this thread is safe.
            self.close_att(att)
            return
        try:
            att.loop.call_soon_threadsafe(self.close_att, att)
        except RuntimeError:  # the loop is closed: nothing watches the descriptor
            self.close_att(att)

    def check(self, now: float) -> None:
        """Bridge thread, now and then: take the sockets back from a home loop
        that stopped, closed, or has not read what its workers sent for a
        while (user code blocks it), so that no caller waits on it; close
        the duplicates of loops that closed before letting go."""
        home = self.loop
        if home is None and not self.changed:
            with self._lock:
                orphans = bool(self.owned_locked())
            if orphans:  # owned by a loop that is home no more: take them back
                self.sync()
        if home is not None:
            stuck = home.is_closed() or not home.is_running()
            if not stuck:
                with self._lock:
                    owned = self.owned_locked()
                for peer in owned:
                    if now - peer.last_heard > min(0.5, peer.interval) and has_data(peer.sock):
                        logger.info("gibbs hub: the event loop did not read %s for %.1f s; the bridge "
                                    "thread reads its workers", peer.describe(), now - peer.last_heard, extra=logs.peer(peer))
                        stuck = True
                        break
            if stuck:
                with self._lock:
                    if self.loop is home:
                        self.loop = None
                self.sync()
        if self.detaching:
            for att in list(self.detaching):
                if not att.closed and not att.loop.is_running():
                    self.close_att(att)
                if att.closed:
                    self.detaching.remove(att)
