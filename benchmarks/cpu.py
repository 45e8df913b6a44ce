"""Where the time of a request goes: CPU time per request in each process
(and each thread of the hub's process), for gibbs and for the asyncio floor,
one caller and 64 callers, trivial model. With ``py-spy`` installed
(``pip install py-spy``; it needs ptrace, e.g. root), the functions that
take the hub's and a worker's time, from a sampling profile.

    python -m benchmarks.cpu [--seconds 3] [--no-profile] [--write]

On 2 cores the throughput of 64 callers is bounded by the CPU all processes
spend per request (hub + workers) over 2 cores, and the sequential latency
by the CPU on its path plus the kernel's wake-ups: these tables say how much
each side spends, where the targets of ``python -m benchmarks`` are missed.
It ends with the two ratios the request path is held to (hub CPU per
request at 64 callers against the floor's loop, sequential latency against
the floor's), then the interpreter's work per request (bytecodes executed
and Python calls made, counted by ``sys.settrace``, per function) of the
floor's loop, the hub (at one caller and at 64) and a worker: a figure
that the machine's noise does not move, to tell what a change to the
request path saves;
``--write`` puts the tables in benchmarks/RESULTS.md too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Awaitable, Callable, Optional

from gibbs import Hub, Worker

from .baselines import AsyncioFloor
from .models import CountingEcho, Echo
from .report import write_section

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int, tid: Optional[int] = None) -> float:
    """User + system CPU seconds of a process (or one of its threads)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_of(pid: int) -> dict[int, str]:
    if pid == os.getpid():  # Python's names for our own threads
        return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except OSError:
            pass
    return out


async def drive(call: Callable[[Any], Awaitable[Any]], seconds: float, callers: int) -> int:
    stop = time.perf_counter() + seconds
    n = 0

    async def one() -> None:
        nonlocal n
        while time.perf_counter() < stop:
            await call(1)
            n += 1

    await asyncio.gather(*(one() for _ in range(callers)))
    return n


#: Leaf frames where a thread waits rather than works.
IDLE = ("Selector.select (selectors.py", "_read_frames (gibbs/worker.py", "wait (threading.py",
        "_recv (multiprocessing/", "recv_bytes (", "_heartbeat_loop (gibbs/worker.py")

#: Samples per second of the py-spy profiles.
SPY_RATE = 1000


def py_spy_samples(pid: int, seconds: float) -> Optional[list[tuple[str, list[str], int]]]:
    """Sample one process with py-spy for ``seconds`` (at least 1): the
    stacks where a thread worked, as (thread, frames outermost first, count);
    each frame reads ``function (file:line)``. None when py-spy is missing or
    may not read the process."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "raw.txt")
        try:
            r = subprocess.run(
                [exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", str(SPY_RATE), "-f", "raw",
                 "-o", out, "--threads", "--nonblocking"],
                capture_output=True, timeout=seconds + 60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode != 0 or not os.path.exists(out):
            return None
        samples = []
        with open(out) as f:
            for line in f:
                stack, _, count = line.rstrip().rpartition(" ")
                if not stack:
                    continue
                thread, *frames = stack.split(";")
                if not frames or any(idle in frames[-1] for idle in IDLE):
                    continue
                samples.append((thread, frames, int(count)))
    return samples


def py_spy_profile(pid: int, seconds: float) -> Optional[dict[str, Any]]:
    """A sampling profile of one process: per thread, the samples where it
    worked (not waiting), and per function the samples that had it on the
    stack (inclusive), over ``seconds``."""
    samples = py_spy_samples(pid, seconds)
    if samples is None:
        return None
    busy: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for thread, frames, k in samples:
        name = "bridge" if any(f.startswith("Bridge._run ") for f in frames) else (
            "main" if any(f.startswith(("BaseEventLoop.run_forever", "_Runtime.run ", "_Runtime._serve ")) for f in frames)
            else thread)
        busy[name] += k
        for fn in {f.split(" (")[0] for f in frames}:
            incl[fn] += k
    return {"busy": busy, "incl": incl, "rate": SPY_RATE, "seconds": max(1, int(seconds))}


KEY_FUNCTIONS = (
    "Hub.request", "Hub._encode", "Bridge.submit", "Core.submit", "Bridge._flush_locked", "_unwrap",
    "LoopReads._loop_read", "Reader.read_worker", "FrameReader.feed", "Core.answered", "Bridge._hand_over",
    "_deliver_async", "_Runtime._handle", "_Runtime._serve_batch", "decode", "encode", "_Runtime._send",
)


def show_profile(where: str, prof: Optional[dict[str, Any]], requests_per_s: float) -> None:
    if prof is None:
        out()
        out(f"(no profile of the {where}: py-spy missing or not permitted)")
        return
    per = 1e6 / (prof["rate"] * prof["seconds"] * requests_per_s)  # µs per request of one sample
    busy = ", ".join(f"{k} {v * per:.1f}" for k, v in prof["busy"].most_common() if v * per >= 0.5)
    out()
    out(f"{where}: µs per request at work, by thread: {busy}")
    rows = [(fn, prof["incl"][fn] * per) for fn in KEY_FUNCTIONS if prof["incl"][fn]]
    out("  inclusive, µs per request: " + ", ".join(f"{fn} {us:.1f}" for fn, us in rows))


async def measure(label: str, call: Callable[[Any], Awaitable[Any]], pids: dict[str, int], seconds: float,
                  callers: int) -> dict[str, Any]:
    await drive(call, 0.3, callers)  # warm
    me = os.getpid()
    threads = threads_of(me)
    before = {name: cpu_of(pid) for name, pid in pids.items()}
    tbefore = {tid: cpu_of(me, tid) for tid in threads}
    t0 = time.perf_counter()
    n = await drive(call, seconds, callers)
    wall = time.perf_counter() - t0
    after = {name: cpu_of(pid) for name, pid in pids.items()}
    per = {name: (after[name] - before[name]) / n * 1e6 for name in pids}
    per_thread = {}
    for tid, name in threads.items():
        try:
            per_thread[name] = per_thread.get(name, 0.0) + (cpu_of(me, tid) - tbefore[tid]) / n * 1e6
        except (OSError, KeyError):
            pass
    return {"label": label, "n": n, "rate": n / wall, "latency_us": wall / n * callers * 1e6, "cpu_us": per,
            "threads_us": per_thread}


#: Lines printed, for --write.
LINES: list[str] = []


def out(line: str = "") -> None:
    print(line)
    LINES.append(line)


def show(r: dict[str, Any]) -> None:
    total = sum(r["cpu_us"].values())
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us"].items())
    out(f"| {r['label']} | {r['rate']:,.0f} req/s | {r['latency_us']:.1f} µs | {total:.1f} µs ({parts}) |")
    threads = {k: v for k, v in r["threads_us"].items() if v >= 0.5}
    if threads:
        out(f"|   threads of the caller's process | | | {', '.join(f'{k} {v:.1f}' for k, v in threads.items())} |")


async def count_work(call: Callable[[Any], Awaitable[Any]], n: int = 500, callers: int = 1) -> dict[str, Any]:
    """The interpreter's work of ``n`` requests in this thread, made by
    ``callers`` concurrent callers: bytecodes executed and Python calls made,
    per function (``sys.settrace`` with opcode events). Unlike times, the
    same on a busy machine as on an idle one (at one caller exactly; with
    many, how many answers one read brings moves it a little: tracing slows
    the run to about one a read)."""
    ops: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            calls[frame.f_code.co_qualname] += 1
        elif event == "opcode":
            ops[frame.f_code.co_qualname] += 1
        return trace

    left = [n]

    async def caller() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call(1)

    async def requests() -> None:  # a new frame: traced from its start
        await asyncio.gather(*[caller() for _ in range(callers)])

    for _ in range(100):
        await call(1)  # warm
    sys.settrace(trace)
    try:
        await requests()
    finally:
        sys.settrace(None)
    for k in [k for k in ops if k.startswith("count_work")]:
        del ops[k]
        calls.pop(k, None)
    return {"ops": ops, "calls": calls, "n": n}


def show_work(where: str, work: Optional[dict[str, Any]], floor: Optional[dict[str, Any]] = None, top: int = 8) -> None:
    if work is None:
        out(f"- {where}: not counted")
        return
    n = work["n"]
    ops, calls = sum(work["ops"].values()) / n, sum(work["calls"].values()) / n
    vs = ""
    if floor is not None:
        fops = sum(floor["ops"].values()) / floor["n"]
        vs = f" ({ops / fops:.2f}× the floor's {fops:.0f})"
    most = ", ".join(f"{k} {v / n:.0f}" for k, v in sorted(work["ops"].items(), key=lambda kv: -kv[1])[:top])
    out(f"- {where}: {ops:.0f} bytecodes{vs} and {calls:.0f} Python calls per request; most: {most}")


async def count_worker_work(hub: Hub) -> Optional[dict[str, Any]]:
    """``count_work`` in a worker: one of CountingEcho, on model ``counting``."""
    import json

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "work.json")
        os.environ["GIBBS_BENCH_COUNT_OUT"] = path
        w = Worker(CountingEcho, gibbs_host="127.0.0.1", gibbs_port=hub.port, gibbs_model="counting")
        w.start()
        try:
            await hub.wait_for_workers(1, model="counting", timeout=60)
            for _ in range(CountingEcho.COUNT_FROM + CountingEcho.COUNT_CALLS):
                await hub.request(1, gibbs_model="counting")
            for _ in range(200):
                if os.path.exists(path):
                    with open(path) as f:
                        return dict(json.load(f))
                await asyncio.sleep(0.05)
            return None
        finally:
            os.environ.pop("GIBBS_BENCH_COUNT_OUT", None)
            w.terminate()
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join()


def show_targets(floor: dict[int, dict[str, Any]], gibbs: dict[int, dict[str, Any]]) -> None:
    """The request path's two targets, as ratios within this run."""
    cpu = gibbs[64]["cpu_us"]["hub"] / floor[64]["cpu_us"]["loop"]
    lat = gibbs[1]["latency_us"] / floor[1]["latency_us"]
    out()
    out(f"- hub CPU per request at 64 callers: {gibbs[64]['cpu_us']['hub']:.1f} µs, {cpu:.2f}× the asyncio floor's "
        f"loop ({floor[64]['cpu_us']['loop']:.1f} µs; target ≤ 2×: {'met' if cpu <= 2 else 'missed'})")
    out(f"- sequential latency: {gibbs[1]['latency_us']:.1f} µs, {lat:.2f}× the asyncio floor's "
        f"({floor[1]['latency_us']:.1f} µs; target ≤ 1.2×: {'met' if lat <= 1.2 else 'missed'})")


async def main_async(seconds: float, profile: bool) -> None:
    out("| load | rate | latency per call | CPU per request, µs (by process) |")
    out("|---|---|---|---|")
    me = os.getpid()
    floors: dict[int, dict[str, Any]] = {}
    gibbs: dict[int, dict[str, Any]] = {}
    async with AsyncioFloor() as floor:
        pids = {"loop": me, "echo": floor.proc.pid}
        for callers in (1, 64):
            floors[callers] = await measure(f"asyncio floor, {callers} caller(s)", floor.call, pids, seconds, callers)
            show(floors[callers])
        floor_work = await count_work(floor.call)
    hub = Hub(port=0)
    hub.start()
    workers = [Worker(Echo, gibbs_host="127.0.0.1", gibbs_port=hub.port) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        await hub.wait_for_workers(2, timeout=60)
        pids = {"hub": me}
        for i, w in enumerate(workers):
            assert w.pid is not None
            pids[f"worker{i}"] = w.pid
        for callers in (1, 64):
            gibbs[callers] = await measure(f"gibbs, 2 workers, {callers} caller(s)", hub.request, pids, seconds, callers)
            show(gibbs[callers])
        show_targets(floors, gibbs)
        hub_work = await count_work(hub.request)
        hub_work_64 = await count_work(hub.request, 5000, 64)
        worker_work = await count_worker_work(hub)
        out()
        out("Interpreter work per request, one caller unless said (bytecodes executed and Python calls made, "
            "counted by sys.settrace over 500 sequential requests: the same on a busy machine as on an idle one):")
        show_work("the asyncio floor's loop", floor_work)
        show_work("gibbs, the hub's process", hub_work, floor_work)
        show_work("gibbs, the hub's process, 64 callers (5,000 requests; tracing slows the run to about one "
                  "answer a read)", hub_work_64)
        show_work("gibbs, a worker (the model's own work left out)", worker_work)
        if profile:
            for callers in (1, 64):
                result: dict[str, Any] = {}

                def spy(name: str, pid: int, result: dict[str, Any] = result) -> None:
                    result[name] = py_spy_profile(pid, seconds)

                assert workers[0].pid is not None
                ts = [threading.Thread(target=spy, args=("hub", me)),
                      threading.Thread(target=spy, args=("worker", workers[0].pid))]
                for t in ts:
                    t.start()
                t0 = time.perf_counter()
                n = await drive(hub.request, seconds + 1.0, callers)
                rate = n / (time.perf_counter() - t0)
                for t in ts:
                    t.join()
                out()
                out(f"Profile (py-spy), {callers} caller(s), {rate:,.0f} req/s:")
                show_profile("hub process", result.get("hub"), rate)
                show_profile("worker 0", result.get("worker"), rate / 2 if callers > 1 else rate)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join()
        await hub.aclose(grace=0)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--write", action="store_true", help="put the tables in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    asyncio.run(main_async(args.seconds, not args.no_profile))
    if args.write:
        head = (f"## CPU per request\n\nGenerated by `python -m benchmarks.cpu` (benchmarks/cpu.py), "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
                f"CPython {sys.version.split()[0]}: trivial model, {args.seconds:g} s per load; CPU time of each "
                f"process (from /proc) per request; the profile samples at work with py-spy (it slows the run).\n")
        path = write_section("cpu", head + "\n" + "\n".join(LINES))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
