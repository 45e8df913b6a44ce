"""Reading peers: their bytes become frames, and frames become core events.

A worker's frames (in the bridge thread, or in the event loop that reads
that socket itself: ``_loops.py``): RESULT/ERROR become ``core.answered``
(an answer in shared memory is read in place and lent to its caller, see
``_loans.py``; one whose segment is gone drops its worker, so that the
call is sent again), CHUNK ``core.chunk``, GOODBYE ``core.worker_leaving``;
the answers of one read are applied together, so that the calls they free
go out in one write. Another hub's frames go to its role (``_family.py``).

Reading never blocks on a partial frame: the bytes of frames not complete
yet are bounded for all peers together (``max_buffered``); over the bound,
the peer that holds the most is dropped. A bad frame, or a bug met reading
one, drops that peer only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from . import logs, protocol
from ._peers import Peer, internal_error
from .core import Outcome, OutcomeKind
from .errors import ProtocolError
from .protocol import Buffer

_RESULT, _RESULT_KIND = protocol.RESULT, OutcomeKind.RESULT

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["Reader"]

logger = logging.getLogger("gibbs")


class Reader:
    def __init__(self, bridge: "Bridge", max_frame: int) -> None:
        self._b = bridge
        self._lock = bridge._lock
        self._core = bridge._core
        # Bytes of incomplete frames held from all peers together, at most
        # (each may hold up to max_frame): two frames' worth.
        self.max_buffered = 2 * max_frame
        self._buffered_lock = threading.Lock()  # owns buffered
        self.buffered: dict[Peer, int] = {}  # peers holding part of a frame -> bytes
        self.rbuf = bytearray(1 << 18)  # bridge thread only: every read lands here
        self.rview = memoryview(self.rbuf)

    def read(self, peer: Peer) -> None:
        why: Optional[str]
        try:
            if peer.role != "worker":
                self.read_hub(peer)
                return
            why = self.read_worker(peer, self.rbuf, self.rview)
        except Exception as exc:  # noqa: BLE001 - a bug met on one peer's bytes drops that peer, not the hub
            why = internal_error(peer, exc)
        if why is not None:
            self._b._losses.drop(peer, why)

    def read_worker(self, peer: Peer, buf: bytearray, view: memoryview) -> Optional[str]:
        """Read and act on what a worker sent; in the bridge thread, or in the
        event loop that reads this socket. Returns why to drop it, if so."""
        n, why = _recv(peer, buf)
        if not n:
            return why
        reader = peer.reader
        held = reader.pending
        try:
            frames = reader.feed(view[:n])
        except ProtocolError as exc:
            logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
            return f"protocol error: {exc}"
        if held or reader.pending:
            why = self.account_buffered(peer)
            if why is not None:
                return why
        if not frames:
            return None
        releases: list[Buffer] = []
        answers: list[tuple[int, int, Optional[Outcome]]] = []
        bad: Optional[str] = None  # a malformed frame: the answers before it count, then the peer goes
        for kind, req_id, body in frames:
            if kind == _RESULT:
                if protocol.is_shm(body):
                    # Read in place and lent to the caller (the segment goes
                    # back when the caller frees it); or, over the limit of
                    # what is lent, copied out so that the worker can reuse
                    # its segment at once (RELEASE below).
                    try:
                        pickled, views, name, size = protocol.read_views(
                            body, self._b._maps, readonly=False, owner=f"{protocol.SHM_PREFIX}w{peer.pid}-"
                        )
                        if not peer.vouched and len(peer.segments) < 4096:
                            peer.segments.add(name)
                        lent = self._b._loans.lend(peer, name, size, views)
                        buffers: list[Any] = [bytearray(v) for v in views] if lent is None else lent
                        del views
                    except ProtocolError as exc:
                        logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
                        bad = f"protocol error: {exc}"
                        break
                    except (OSError, ValueError) as exc:
                        # Its file is gone (the worker took its hub for lost and
                        # let go of its segments) or cannot be mapped: the answer
                        # is lost, not the call. The worker is dropped, and the
                        # core sends its calls again, this one with them.
                        logger.warning("gibbs hub: %s sent an answer whose segment could not be read: %s", peer.describe(), exc,
                                       extra=logs.peer(peer))
                        bad = f"the shared-memory segment of its answer to call {req_id} could not be read: {exc}"
                        break
                    else:
                        answers.append((kind, req_id, Outcome(OutcomeKind.COPIED, (pickled, buffers))))
                        if lent is None:
                            releases.extend(protocol.pack_frame(protocol.RELEASE, 0, name.encode()))
                else:
                    answers.append((kind, req_id, Outcome(_RESULT_KIND, body)))
            elif kind == protocol.ERROR:
                answers.append((kind, req_id, Outcome(OutcomeKind.ERROR, body)))
            elif kind == protocol.CHUNK:
                answers.append((kind, req_id, Outcome(OutcomeKind.CHUNK, body)))
            else:
                answers.append((kind, req_id, None))
        now = time.monotonic()
        core = self._core
        with self._lock:
            # The actions of every answer of this read are applied together:
            # the calls they free go out in one write per worker, not one each.
            actions: list[Any] = []
            for kind, req_id, outcome in answers:
                if kind == protocol.CHUNK:
                    actions += core.chunk(peer, req_id, outcome)  # type: ignore[arg-type]
                elif outcome is not None:
                    actions += core.answered(peer, req_id, outcome, now)
                elif kind == protocol.HEARTBEAT:
                    pass
                elif kind == protocol.GOODBYE:
                    logger.info("gibbs hub: %s is leaving", peer.describe(), extra=logs.peer(peer))
                    actions += core.worker_leaving(peer, now)
                else:
                    logger.warning("gibbs hub: %s sent unexpected %s", peer.describe(), protocol.KIND_NAMES.get(kind),
                                   extra=logs.peer(peer))
            if actions:
                self._b._apply_locked(actions)
            if releases:
                peer.out.extend(releases)
                self._b._flush_locked(peer)
        return bad

    def account_buffered(self, peer: Peer) -> Optional[str]:
        """Any reading thread: ``peer`` holds this many bytes of a frame not
        complete yet. Over ``max_buffered`` bytes from all peers together,
        the peer that holds the most is dropped: returned here if it is
        this one, else handed to the bridge thread to drop."""
        pending = peer.reader.pending
        with self._buffered_lock:
            if pending:
                self.buffered[peer] = pending
            else:
                self.buffered.pop(peer, None)
            total = sum(self.buffered.values())
            if total <= self.max_buffered:
                return None
            worst = max(self.buffered, key=self.buffered.__getitem__)
            del self.buffered[worst]
        why = (
            f"bytes buffered from peers over the hub's bound of {self.max_buffered} "
            f"({total} in all, {worst.reader.pending} from this one)"
        )
        logger.warning("gibbs hub: dropping %s: %s", worst.describe(), why, extra=logs.peer(worst))
        if worst is peer:
            return why
        self._b._loops.give_back(worst, why)
        return None

    def read_hub(self, peer: Peer) -> None:
        """Frames from another hub: a client routing through us, or our router."""
        why = self.read_hub_into(peer, self.rbuf, self.rview)
        if why is not None:
            self._b._losses.drop(peer, why)

    def read_hub_into(self, peer: Peer, buf: bytearray, view: memoryview) -> Optional[str]:
        """Read and act on what another hub sent; in the bridge thread, or
        (our router's socket) in the event loop that reads it. Returns why
        to drop it, if so."""
        n, why = _recv(peer, buf)
        if not n:
            return why
        try:
            frames = peer.reader.feed(view[:n])
            why = self.account_buffered(peer) if peer.reader.pending or peer in self.buffered else None
            if why is not None:
                return why
            if peer.role == "client":
                self._b._router_role.client_frames(peer, frames)
            elif peer.role == "observer":
                self._b._router_role.observer_frames(peer, frames)
            else:
                self._b._client_role.router_frames(peer, frames)
        except (ProtocolError, ValueError) as exc:
            logger.warning("gibbs hub: %s sent a bad frame: %s", peer.describe(), exc, extra=logs.peer(peer))
            return f"protocol error: {exc}"
        return None


def _recv(peer: Peer, buf: bytearray) -> tuple[int, Optional[str]]:
    """One read of a peer's socket into ``buf`` (one reused buffer: a fresh
    256 KiB bytes object per read would be an mmap and munmap each time):
    the bytes read, or 0 and why to drop it (None: nothing to read now)."""
    try:
        n = peer.sock.recv_into(buf)
    except (BlockingIOError, InterruptedError):
        return 0, None
    except OSError as exc:
        return 0, f"connection error: {exc}"
    if not n:
        return 0, "connection closed (end of file)"
    peer.last_heard = time.monotonic()
    return n, None
