"""One wake-up primitive: a non-blocking pipe that any thread writes to
wake a thread waiting in ``select`` (the bridge's selector, a pool's
``multiprocessing.connection.wait``).

At most one byte is in flight: :meth:`wake` writes only when no wake-up is
pending, and :meth:`drain` empties the pipe *before* it clears the flag.
The other order loses wake-ups: a wake-up between the two (flag set, byte
written) would be read away with the flag left set, and every later
:meth:`wake` would skip its write. The invariant the tests check: whenever
the flag says a wake-up is pending, a byte waits in the pipe.
"""

from __future__ import annotations

import os
import threading


class Wakeup:
    """A wake-up pipe. ``fileno()`` is the end to wait on."""

    __slots__ = ("_r", "_w", "_lock", "_pending", "_closed")

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # owns _pending and _closed
        self._pending = False
        self._closed = False

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        """Any thread: the waiter's next (or current) wait returns."""
        if self._pending:
            # A byte is in the pipe, or a drain is under way: the waiter
            # looks at everything published before this call once its wait
            # returns (it drains first, then reads the state). No lock, no
            # write: the common case when many calls wake it in one pass.
            return
        with self._lock:
            if self._pending or self._closed:
                return
            self._pending = True
            try:
                os.write(self._w, b"\0")
            except OSError:  # full (cannot be: one byte at most) or closed
                pass

    def drain(self) -> None:
        """The waiting thread: take the wake-up (or wake-ups) away."""
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # closed
            pass
        with self._lock:
            self._pending = False

    def close(self) -> None:
        """Close both ends (a plain close: a forked child may call it too).
        Once; wake() does nothing afterwards (the numbers may be reused)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def forget_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held
        at the fork by a thread that does not exist here), then close."""
        self._lock = threading.Lock()
        self.close()
