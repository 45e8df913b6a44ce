"""The loan book: answers read in place from their worker's shared memory
and lent to their callers.

An answer a worker wrote to a shared-memory segment is not copied: its
caller gets buffers on the segment itself, and the segment goes back to the
worker (a RELEASE frame) when the last of those buffers, and every array
made on them, is freed, in whatever thread. Up to ``limit`` bytes are lent
at once; beyond that, answers are copied out and their segments released
at once, so that callers that hold answers never starve the workers of
segments.

Its lock is its own and a leaf (an RLock: a finalizer may run in a thread
that holds it). The bridge thread takes the segments given back
(:meth:`take_back`) and writes their RELEASE frames.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import weakref
from typing import Any, Callable, Optional

from ._peers import Peer
from .protocol import SegmentPool

__all__ = ["LoanBook"]


class LoanBook:
    def __init__(self, limit: int, wake: Callable[[], None], request_pool: Optional[SegmentPool] = None) -> None:
        self.limit = limit
        self._wake = wake  # the bridge thread sends the RELEASE frames
        self._request_pool = request_pool
        self._lock = threading.RLock()  # owns the six below
        self._bytes = 0
        self._segments = 0
        self._back: list[tuple[Peer, str]] = []
        self._open = True
        self._lent = 0  # counters
        self._copied = 0

    def lend(self, peer: Peer, name: str, size: int, views: list[memoryview]) -> Optional[list[Any]]:
        """Buffers lent on ``views`` (one per view, each keeping the segment's
        mapping alive), or None when the limit is reached (or closed): then
        the caller copies, and releases the segment itself."""
        with self._lock:
            if not self._open or self._bytes + size > self.limit:
                self._copied += 1
                return None
            self._bytes += size
            self._segments += 1
            self._lent += 1
        n = len(views)
        counter = itertools.count(1)
        ref = weakref.ref(self)
        lent = []
        for v in views:
            buf = (ctypes.c_char * v.nbytes).from_buffer(v)
            done = weakref.finalize(buf, _returned, ref, peer, name, size, counter, n)
            done.atexit = False
            lent.append(buf)
        return lent

    def _given_back(self, peer: Peer, name: str, size: int) -> None:
        """Any thread: a lent segment was freed by its caller."""
        with self._lock:
            self._bytes -= size
            self._segments -= 1
            if not self._open:
                return  # the hub closed: the worker's connection is gone with it
            self._back.append((peer, name))
        self._wake()

    def has_returns(self) -> bool:
        return bool(self._back)

    def take_back(self) -> list[tuple[Peer, str]]:
        """The segments given back since the last call: (peer, name)."""
        with self._lock:
            back, self._back = self._back, []
        return back

    def close(self) -> None:
        """A lent answer freed from now on wakes nobody."""
        with self._lock:
            self._open = False
            self._back.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: a thread of the parent may have held the lock
        at the fork (a finalizer giving an answer back): a fresh one."""
        self._lock = threading.RLock()

    def snapshot(self) -> dict[str, Any]:
        """What shared memory holds now: the requests' segments (this hub's
        pool) and the answers lent to callers."""
        with self._lock:
            out: dict[str, Any] = {
                "lent": self._segments,
                "lent_bytes": self._bytes,
                "lent_limit_bytes": self.limit,
                "answers_lent": self._lent,
                "answers_copied": self._copied,
            }
        pool = self._request_pool
        out["requests"] = pool.stats() if pool is not None else {"leased": 0, "leased_bytes": 0, "free": 0, "free_bytes": 0}
        return out


def _returned(ref: "weakref.ref[LoanBook]", peer: Peer, name: str, size: int, counter: "itertools.count[int]", n: int) -> None:
    """A lent buffer was freed; the last of a segment's gives it back. Runs
    wherever the object died (any thread, or the garbage collector): no lock
    but the book's own."""
    if next(counter) != n:
        return
    book = ref()
    if book is not None:
        book._given_back(peer, name, size)
