"""The hub side of tests/test_two_hosts.py, run as its own process (inside a
network namespace, with ``ip netns exec``).

It binds a Hub to ``--host`` (the key comes from GIBBS_AUTHKEY), starts
``--local-workers`` workers in its own namespace, and keeps ``--callers``
concurrent callers sending requests in a loop. It checks every answer and
reports, as JSON lines on stdout (flushed one by one):

* ``{"event": "ready", "port": P, "local_pids": [...]}`` once listening;
* ``{"event": "tick", "t": ..., "ok": ..., "wrong": ..., "errors": ...,
  "by_pid": {pid: answers}, "workers": [{"pid", "address"}], "stats": {...}}``
  every ``--tick`` seconds (time.time(), comparable with the test's clock);
* ``{"event": "error", ...}`` at once for every request that raised, and
  ``{"event": "wrong", ...}`` for every wrong answer;
* ``{"event": "done", ...}`` with the totals after SIGTERM: callers finish the
  request in hand, the hub closes, the local workers stop. Exit status 0.

The model (``SquarePid``) returns ``(x * x, its pid)``, so each answer says
which worker served it. The module is importable without side effects: the
worker command in the other namespace imports the model from here.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from typing import Any


class SquarePid:
    def __init__(self, wait_time: float = 0.0) -> None:
        self.w = float(wait_time)

    def __call__(self, x: int) -> tuple[int, int]:
        if self.w:
            time.sleep(self.w)
        return x * x, os.getpid()


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def die_with_parent() -> None:
    """If the test process disappears (killed by a timeout), so do we."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


async def serve(ns: argparse.Namespace) -> int:
    from gibbs import Hub, Worker

    hub = Hub(
        port=0,
        host=ns.host,
        heartbeat_interval=ns.heartbeat_interval,
        heartbeat_misses=ns.heartbeat_misses,
    )
    hub.start()
    local = [
        Worker(
            SquarePid,
            ns.wait_time,
            gibbs_host=ns.host,
            gibbs_port=hub.port,
            gibbs_heartbeat_interval=ns.heartbeat_interval,
            gibbs_name="local",
        )
        for _ in range(ns.local_workers)
    ]
    for w in local:
        w.start()
    emit({"event": "ready", "t": time.time(), "port": hub.port, "pid": os.getpid(),
          "local_pids": [w.pid for w in local]})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    counts: dict[str, Any] = {"ok": 0, "wrong": 0, "errors": 0, "by_pid": {}}

    async def caller(i: int) -> None:
        n = 0
        while not stop.is_set():
            x = i * 1_000_000 + n
            n += 1
            try:
                value, pid = await hub.request(x)
            except Exception as exc:  # noqa: BLE001 - reported, never hidden
                counts["errors"] += 1
                emit({"event": "error", "t": time.time(), "caller": i, "x": x,
                      "type": type(exc).__name__, "message": str(exc)[:2000]})
                await asyncio.sleep(0.01)
                continue
            if value != x * x:
                counts["wrong"] += 1
                emit({"event": "wrong", "t": time.time(), "x": x, "got": value, "pid": pid})
                continue
            counts["ok"] += 1
            key = str(pid)
            counts["by_pid"][key] = counts["by_pid"].get(key, 0) + 1

    def tick() -> None:
        emit({
            "event": "tick",
            "t": time.time(),
            "ok": counts["ok"],
            "wrong": counts["wrong"],
            "errors": counts["errors"],
            "by_pid": dict(counts["by_pid"]),
            "workers": [{"pid": w["pid"], "address": w["address"]} for w in hub.workers() if w["state"] != "loading"],
            "stats": hub.statistics(),
        })

    await hub.wait_for_workers(ns.local_workers, timeout=30)
    tasks = [asyncio.ensure_future(caller(i)) for i in range(ns.callers)]
    while not stop.is_set():
        tick()
        try:
            await asyncio.wait_for(stop.wait(), ns.tick)
        except asyncio.TimeoutError:
            pass
    # Stopping: every caller finishes the request in hand.
    done, stuck = await asyncio.wait(tasks, timeout=15)
    for t in stuck:
        t.cancel()
    tick()
    await hub.aclose(grace=2)
    for w in local:
        w.terminate()
    for w in local:
        w.join(10)
        if w.is_alive():
            w.kill()
            w.join(5)
    emit({
        "event": "done",
        "t": time.time(),
        "ok": counts["ok"],
        "wrong": counts["wrong"],
        "errors": counts["errors"],
        "stuck_callers": len(stuck),
        "by_pid": counts["by_pid"],
        "stats": hub.statistics(),
        "local_exitcodes": [w.exitcode for w in local],
    })
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--local-workers", type=int, default=1)
    parser.add_argument("--wait-time", type=float, default=0.005)
    parser.add_argument("--heartbeat-interval", type=float, default=0.2)
    parser.add_argument("--heartbeat-misses", type=int, default=3)
    parser.add_argument("--tick", type=float, default=0.02)
    ns = parser.parse_args()
    die_with_parent()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(serve(ns))
    except BaseException:
        emit({"event": "crash", "t": time.time(), "traceback": traceback.format_exc()})
        raise


if __name__ == "__main__":
    sys.exit(main())
