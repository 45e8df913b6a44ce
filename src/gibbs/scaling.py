"""How many workers a pool wants: the autoscaler's decision, with no I/O.

A pool's supervisor feeds it what the hub sees of the pool's model about
once a second (:class:`Load`: calls queued, how long the oldest has waited,
workers busy) and the pool's own state (workers running, workers still
starting); it answers +1, -1 or 0. The rules:

* **up** while calls wait: the oldest queued call has waited
  ``UP_AFTER`` seconds (or any call waits and no worker runs at all, for a
  pool at zero), one more worker, up to ``max``; no more than one worker
  starting per ``PER_STARTING`` calls queued, so a slow-loading model is not
  answered by a flood of starts;
* **down** after ``down_after`` seconds in which the pool never needed all
  of its workers (busy workers + queued calls stayed below its size), one
  worker fewer, down to ``min``; then the clock starts again.

``UP_AFTER`` is 0.1 s: well above the hub's own queueing (tens of
microseconds) and a model's service time for batching to fill, well below
any deadline a web request carries.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["Autoscaler", "Load", "UP_AFTER"]

#: A call queued this long means the pool is short of workers.
UP_AFTER = 0.1
#: At most one worker starting per this many queued calls (at least one).
PER_STARTING = 8


class Load(NamedTuple):
    queued: int  # calls of the model waiting for a worker
    oldest: float  # seconds the oldest of them has waited
    busy: int  # workers holding calls


class Autoscaler:
    """The decision of one pool (not thread-safe: the pool's lock)."""

    def __init__(self, lo: int, hi: int, down_after: float) -> None:
        if not isinstance(lo, int) or not isinstance(hi, int) or lo < 0 or hi < max(1, lo):
            raise ValueError(f"gibbs_workers=(min, max) needs 0 <= min <= max and max >= 1, got ({lo!r}, {hi!r})")
        if not down_after > 0:
            raise ValueError(f"gibbs_scale_down_after must be > 0, got {down_after!r}")
        self.lo = lo
        self.hi = hi
        self.down_after = float(down_after)
        self._needed_all_at: Optional[float] = None  # last time every worker was needed

    def decide(self, now: float, load: Load, running: int, starting: int) -> tuple[int, str]:
        """+1, -1 or 0, and why (for the log)."""
        if self._needed_all_at is None:
            self._needed_all_at = now
        need = load.busy + load.queued
        if need >= running:
            self._needed_all_at = now
        if running + starting < self.lo:
            return 1, f"below the minimum of {self.lo}"
        if load.queued and running + starting < self.hi:
            if starting < 1 + load.queued // PER_STARTING and (load.oldest >= UP_AFTER or running == 0):
                return 1, f"{load.queued} call(s) queued, the oldest for {load.oldest * 1000:.0f} ms"
        if running > self.lo and not starting and now - self._needed_all_at >= self.down_after:
            self._needed_all_at = now
            return -1, f"fewer than {running} worker(s) needed for {self.down_after:g} s"
        return 0, ""
