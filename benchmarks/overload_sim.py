"""Queue disciplines under overload, measured on the core itself.

The core does no I/O and reads no clock, so a discrete-event simulation can
drive it with simulated time: Poisson arrivals at 2x and 10x the capacity of
2 workers of a 10 ms model (service times 8-12 ms), every call with a 200 ms
deadline, 20 simulated seconds each. Same seed for every discipline:

* ``caller timer``: the deadline is the caller's own timer, which cancels
  the call (gibbs before the core owned deadlines);
* ``fifo, early drop``: the core's deadline, and admission control: a new
  call is shed at once when its predicted wait and service time exceed a
  share of its deadline (the whole of it; half, the default; a quarter: a
  CoDel-like target on the queue's delay, set by the deadline);
* ``lifo``: newest first (adaptive LIFO: the queue is only long when
  congested), the oldest expire in the queue; with or without early drop.

    python -m benchmarks.overload_sim
"""

from __future__ import annotations

import heapq
import random
from typing import Any, Optional

from gibbs.core import Call, Core, Outcome, OutcomeKind, Resolve, Send, WorkerInfo
from gibbs.errors import OverloadedError

from .common import percentile

SERVICE = 0.010
WORKERS = 2
DEADLINE = 0.2
CAPACITY = WORKERS / SERVICE

VARIANTS: dict[str, dict[str, Any]] = {
    "caller timer": {"core": {}, "caller_timer": True},
    "fifo, early drop (whole deadline)": {"core": {"queue_share": 1.0}},
    "fifo, early drop (1/2 deadline, default)": {"core": {}},
    "fifo, early drop (1/4 deadline)": {"core": {"queue_share": 0.25}},
    "lifo, expiry only": {"core": {"discipline": "lifo", "queue_share": 1e9}},
    "lifo, early drop (1/2 deadline)": {"core": {"discipline": "lifo"}},
}


def simulate(factor: float, variant: dict[str, Any], seconds: float = 20.0, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    core = Core(**variant["core"])
    caller_timer = variant.get("caller_timer", False)
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    busy_until = {w: 0.0 for w in range(WORKERS)}
    submitted: dict[int, float] = {}
    latencies: list[float] = []
    counts = {"ok": 0, "late": 0, "shed": 0, "expired": 0, "cancelled": 0, "ran": 0}
    tick_at: Optional[float] = None

    def apply(now: float, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                start = max(now, busy_until[a.worker])
                end = start + SERVICE * rng.uniform(0.8, 1.2)
                busy_until[a.worker] = end
                push(end, "done", (a.worker, [c.id for c in a.calls]))
            elif isinstance(a, Resolve):
                cid = a.call.id
                if a.outcome.kind is OutcomeKind.RESULT:
                    dt = now - submitted[cid]
                    if dt <= DEADLINE + 1e-9:
                        counts["ok"] += 1
                        latencies.append(dt)
                    else:
                        counts["late"] += 1
                elif a.outcome.kind is OutcomeKind.EXPIRED:
                    counts["expired"] += 1
                elif a.outcome.kind is OutcomeKind.CANCELLED:
                    counts["cancelled"] += 1

    for w in range(WORKERS):
        apply(0.0, core.worker_joined(WorkerInfo(w, "m"), 0.0))
    t, n = 0.0, 0
    rate = factor * CAPACITY
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        push(t, "arrive", n)
        n += 1
    calls: dict[int, Call] = {}
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            call = Call(data, "m", None, timeout=None if caller_timer else DEADLINE)
            submitted[data] = now
            try:
                acts = core.submit(call, now)
            except OverloadedError:
                counts["shed"] += 1
                continue
            calls[data] = call
            if caller_timer:
                push(now + DEADLINE, "timer", data)
            apply(now, acts)
        elif kind == "done":
            wid, ids = data
            for cid in ids:
                counts["ran"] += 1
                apply(now, core.answered(wid, cid, Outcome(OutcomeKind.RESULT, None), now))
        elif kind == "timer":
            call = calls[data]
            if not call.done:
                apply(now, core.cancel(call))
        elif kind == "tick":
            tick_at = None
            apply(now, core.tick(now))
        nd = core.next_deadline()
        if nd is not None and (tick_at is None or nd < tick_at):
            tick_at = nd
            push(nd, "tick")
    ok = counts["ok"]
    return {
        "goodput": ok / seconds / CAPACITY,
        "wasted": (counts["ran"] - ok) / counts["ran"] if counts["ran"] else 0.0,
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        "shed": counts["shed"] / n,
        "expired": (counts["expired"] + counts["cancelled"]) / n,
    }


def main() -> None:
    print(f"{WORKERS} workers of a {SERVICE * 1000:.0f} ms model (simulated), {DEADLINE * 1000:.0f} ms deadlines")
    print("| load | discipline | goodput / capacity | wasted model calls | p50 | p99 answered | shed at once | expired |")
    print("|---|---|---|---|---|---|---|---|")
    for factor in (1, 2, 10):
        for name, variant in VARIANTS.items():
            r = simulate(factor, variant)
            print(
                f"| {factor}x | {name} | {r['goodput']:.2f} | {100 * r['wasted']:.1f} % | {r['p50'] * 1000:.0f} ms | "
                f"{r['p99'] * 1000:.0f} ms | {100 * r['shed']:.0f} % | {100 * r['expired']:.0f} % |"
            )


if __name__ == "__main__":
    main()
