"""Timing, statistics, machine description, process reaping, and the
open-loop arrivals the overload benchmarks share."""

from __future__ import annotations

import asyncio
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence

perf = time.perf_counter


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of the samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    try:
        import numpy

        np_version = numpy.__version__
    except ImportError:  # pragma: no cover
        np_version = "missing"
    import gibbs

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "src")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.dirname(os.path.abspath(gibbs.__file__))
    in_repo = where.startswith(os.path.join(root, "src"))
    elsewhere = "" if in_repo else f", imported from {where}"
    dirty = dirty if in_repo else ""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory": mem,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "numpy": np_version,
        "gibbs": f"{gibbs.__version__} (commit {commit or '?'}{', src/ modified' if dirty else ''}{elsewhere})",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "executable": sys.executable,
    }


def reap(processes: Iterable[Any], grace: float = 5.0) -> None:
    """Terminate, join, and kill what did not stop: every process we started
    (multiprocessing.Process or gibbs.Worker) is gone afterwards."""
    procs = [p for p in processes if p is not None]
    for p in procs:
        try:
            if p.is_alive():
                p.terminate()
        except Exception:  # noqa: BLE001 - not started, already gone
            pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.join(max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001
            pass
    for p in procs:
        try:
            if p.is_alive():
                p.kill()
                p.join(5)
        except Exception:  # noqa: BLE001
            pass


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt_rate(per_s: float) -> str:
    if per_s != per_s:
        return "n/a"
    if per_s >= 1e4:
        return f"{per_s / 1e3:.1f} k req/s"
    return f"{per_s:,.0f} req/s"


def fmt_bytes(n: float) -> str:
    if n != n:
        return "n/a"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if abs(n) >= 1 << 10:
        return f"{n / 1024:.2f} KiB"
    return f"{n:.0f} B"


def deadline_counts() -> dict[str, int]:
    """The fates :func:`request_by_deadline` counts."""
    return {"ok": 0, "late": 0, "shed": 0, "expired_queued": 0, "expired_running": 0, "timeout": 0}


async def request_by_deadline(hub: Any, x: Any, deadline: float, core_deadline: bool, counts: dict[str, int]) -> Optional[float]:
    """One request given up after ``deadline``: by the hub (``gibbs_timeout``,
    ``core_deadline``) or by the caller (``asyncio.wait_for``). Counts its
    fate; returns its latency when it was answered in time."""
    from gibbs import DeadlineExceededError, OverloadedError

    t0 = time.perf_counter()
    try:
        if core_deadline:
            await hub.request(x, gibbs_timeout=deadline)
        else:
            await asyncio.wait_for(hub.request(x), deadline)
    except OverloadedError:
        counts["shed"] += 1
        return None
    except DeadlineExceededError as exc:
        counts["expired_queued" if exc.in_queue else "expired_running"] += 1
        return None
    except asyncio.TimeoutError:
        counts["timeout"] += 1
        return None
    dt = time.perf_counter() - t0
    counts["ok" if dt <= deadline else "late"] += 1
    return dt if dt <= deadline else None


async def arrivals(
    one: Callable[[int], Awaitable[None]], rate: float, seconds: Optional[float] = None, count: Optional[int] = None
) -> tuple[int, float]:
    """Open-loop arrivals: ``one(i)`` started at ``rate`` a second, whatever
    came back, for ``seconds`` or until ``count`` were started; then waits
    for them all. Returns (calls started, seconds of arrivals and waiting)."""
    tasks: list[asyncio.Future[None]] = []
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if (seconds is not None and elapsed >= seconds) or (count is not None and len(tasks) >= count):
            break
        due = int(elapsed * rate) + 1
        if count is not None:
            due = min(count, due)
        while len(tasks) < due:
            tasks.append(asyncio.ensure_future(one(len(tasks))))
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)
    return len(tasks), time.perf_counter() - t0
