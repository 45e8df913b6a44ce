"""HTTP end to end: the walkthrough's FastAPI app with gibbs and 2 workers
per model, beside plain FastAPI calling the model in process and, when
installed, LitServe serving the same models with the same number of workers;
all driven by ``wrk`` over keep-alive connections.

    apt-get install wrk             # Debian's package; without it this prints a line and exits
    pip install litserve            # optional: its rows are skipped without it
    python -m benchmarks.http [--duration 10] [--connections 32] [--repeat 3] [--no-write]

Each server runs alone in its own process group (one uvicorn process for the
FastAPI apps, ``benchmarks.http_app``; LitServe's own server,
``benchmarks.litserve_app --trivial``), and is warmed up before wrk measures
it. For reference, FastAPI awaiting the asyncio floor (``benchmarks.baselines.AsyncioFloor``:
one echo process behind a socketpair the event loop reads itself, no
thread) on the trivial endpoint. The servers take turns, repetition by repetition, so that a change of
machine load affects them alike; the table gives medians. Writes its table
to the end of benchmarks/RESULTS.md (section ``http``).

Beside each FastAPI row, the time the web process spent in Python's cyclic
garbage collector per request (the app's ``GET /gc``, from ``gc.callbacks``),
and a row of FastAPI + gibbs with ``gc.freeze()`` called after startup. When
the trivial target (0.9x FastAPI in process) is missed and ``py-spy`` is
installed, one more run of each FastAPI app is profiled: the web process's
time per request by whose code it runs in (gibbs, the web framework,
asyncio), which is what holds the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, AsyncIterator, Optional

from .common import machine_info, median
from .cpu import SPY_RATE, py_spy_samples
from .report import write_section
from .serving import ROOT, HttpPool, Unavailable, child_env, free_port, litserve_server, missing, stop_group

FROZEN = "FastAPI + gibbs, gc.freeze()"

WRK_SCRIPT = 'wrk.method = "POST"\nwrk.body = \'{"x": 7}\'\nwrk.headers["Content-Type"] = "application/json"\n'


def log(msg: str) -> None:
    print(f"[http] {msg}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def fastapi_server(
    mode: str, workers: int, start_timeout: float = 60.0, gc_freeze: bool = False
) -> AsyncIterator[HttpPool]:
    """uvicorn serving benchmarks.http_app in ``mode`` (gibbs, floor or
    inprocess); with ``gc_freeze``, the app calls ``gc.freeze()`` once started."""
    port = free_port()
    env = child_env()
    env.update(GIBBS_BENCH_MODE=mode, GIBBS_BENCH_WORKERS=str(workers), GIBBS_BENCH_HUB_PORT=str(free_port()),
               GIBBS_BENCH_GC_FREEZE="1" if gc_freeze else "0")
    logf = tempfile.NamedTemporaryFile("w+", prefix=f"gibbs-bench-http-{mode}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.http_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
    )
    pool = HttpPool("127.0.0.1", port, proc.pid)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                logf.seek(0)
                raise Unavailable(f"the {mode} app exited ({proc.returncode}): {logf.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise Unavailable(f"the {mode} app was not ready within {start_timeout:.0f} s")
            try:
                await pool.post("/trivial", {"x": 1})
                await pool.post("/batched", {"x": 1})
                break
            except (OSError, asyncio.IncompleteReadError, RuntimeError):
                pool.close()
                await asyncio.sleep(0.1)
        yield pool
    finally:
        pool.close()
        stop_group(proc)
        logf.close()
        with contextlib.suppress(OSError):
            os.unlink(logf.name)


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk's time {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests per second, p50 and p99 (seconds), errors, from wrk --latency."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99 and total):
        raise ValueError(f"cannot read wrk's output:\n{out}")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return {"rps": float(rps.group(1)), "p50": _seconds(p50.group(1)), "p99": _seconds(p99.group(1)), "errors": errors,
            "requests": float(total.group(1))}


def run_wrk(port: int, path: str, duration: float, connections: int, threads: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", f.name,
             f"http://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, timeout=duration + 60, check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    return parse_wrk(out)


async def measure(name: str, server: Any, args: argparse.Namespace, res: dict[str, list[dict[str, float]]]) -> None:
    try:
        async with server as pool:
            for path in ("/trivial", "/batched"):
                run_wrk(pool.port, path, 2, args.connections, args.threads)  # warm-up
                r = await wrk_run(pool, path, args.duration, args)
                log(f"{name} {path}: {r['rps']:,.0f} req/s, p50 {r['p50'] * 1e3:.1f} ms, p99 {r['p99'] * 1e3:.1f} ms"
                    + (f", {r['errors']:.0f} errors" if r["errors"] else ""))
                res.setdefault(f"{name} {path}", []).append(r)
    except Unavailable as exc:
        log(f"{name}: skipped: {exc}")


async def _gc_seconds(pool: HttpPool) -> Optional[float]:
    """Seconds the server's process has spent in the garbage collector
    (the FastAPI apps' ``GET /gc``; None for a server without it)."""
    if pool.pid is None:
        return None
    pool.close()  # a new connection: the last may have passed uvicorn's keep-alive timeout during the run
    try:
        return float((await pool.get("/gc"))["seconds"])
    except (OSError, RuntimeError, KeyError, ValueError, asyncio.IncompleteReadError):
        return None


async def wrk_run(pool: HttpPool, path: str, seconds: float, args: argparse.Namespace) -> dict[str, float]:
    """One wrk run, with the seconds per request the server spent in the
    garbage collector meanwhile (``gc``) when it tells them."""
    gc0 = await _gc_seconds(pool)
    r = await asyncio.to_thread(run_wrk, pool.port, path, seconds, args.connections, args.threads)
    gc1 = await _gc_seconds(pool)
    if gc0 is not None and gc1 is not None and r["requests"]:
        r["gc"] = (gc1 - gc0) / r["requests"]
    return r


def _cell(runs: list[dict[str, float]], key: str) -> float:
    return median(r[key] for r in runs)


def _gc_cell(runs: list[dict[str, float]]) -> str:
    got = [r["gc"] for r in runs if "gc" in r]
    return f"{median(got) * 1e6:.1f}" if got else "-"


#: Who runs a sampled frame, by the top folder of its file (py-spy shows
#: paths from the import root: ``fastapi/routing.py``, ``asyncio/events.py``).
GROUPS = {
    "gibbs": "gibbs",
    **{top: "web framework" for top in (
        "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "anyio", "h11", "httptools", "click", "json",
        "email", "http",
    )},
    "asyncio": "asyncio", "selectors.py": "asyncio",
    "benchmarks": "the app's endpoint",
}

#: gibbs's functions whose inclusive time the profile shows: the request
#: (argument checks, pickling, submit, the wait's set-up), the read of the
#: workers' answers and their hand-over to the callers' futures.
GIBBS_FUNCTIONS = ("Hub.request", "LoopReads._loop_read", "Bridge._hand_over")


def group_samples(samples: list[tuple[str, list[str], int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Samples by who runs the innermost frame (:data:`GROUPS`, else
    ``other``), and the samples that have each of :data:`GIBBS_FUNCTIONS`
    on their stack."""
    own: dict[str, int] = {}
    incl = dict.fromkeys(GIBBS_FUNCTIONS, 0)
    for _thread, frames, k in samples:
        leaf = frames[-1]
        path = leaf[leaf.find("(") + 1 : leaf.rfind(":")]
        group = GROUPS.get(path.split("/")[0], "other")
        own[group] = own.get(group, 0) + k
        for fn in {f.split(" (")[0] for f in frames}:
            if fn in incl:
                incl[fn] += k
    return own, incl


async def profile_web(name: str, server: Any, args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One more wrk run on /trivial, py-spy sampling the web process for its
    middle seconds: µs per request at work, by group, and gibbs's functions
    inclusive; None without py-spy or when the server cannot start."""
    seconds = max(3.0, args.duration)
    try:
        async with server as pool:
            assert pool.pid is not None
            run_wrk(pool.port, "/trivial", 2, args.connections, args.threads)  # warm-up
            wrk = asyncio.create_task(wrk_run(pool, "/trivial", seconds, args))
            await asyncio.sleep(1.0)
            spied = int(seconds) - 2
            samples = await asyncio.to_thread(py_spy_samples, pool.pid, spied)
            r = await wrk
    except Unavailable as exc:
        log(f"profile of {name}: skipped: {exc}")
        return None
    if samples is None:
        log(f"profile of {name}: skipped: py-spy is missing or may not read the server (pip install py-spy)")
        return None
    own, incl = group_samples(samples)
    per = 1e6 / (SPY_RATE * spied * r["rps"])  # µs per request of one sample
    gc = r["gc"] * 1e6 if "gc" in r else None
    log(f"profile of {name}: {r['rps']:,.0f} req/s, at work {sum(own.values()) * per:.0f} µs per request")
    return {"rps": r["rps"], "own": {g: v * per for g, v in own.items()}, "incl": {f: v * per for f, v in incl.items()},
            "gc": gc}


def profile_lines(profiles: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "Where the web process's time goes (py-spy, one more run of each on /trivial; µs per request "
             "at work, by whose code the sampled frame is in; the collector's time lands in whatever code "
             "allocated when it ran):", ""]
    for name, p in profiles.items():
        total = sum(p["own"].values())
        parts = ", ".join(f"{g} {us:.1f}" for g, us in sorted(p["own"].items(), key=lambda kv: -kv[1]) if us >= 0.5)
        gc = f"; of it in the garbage collector {p['gc']:.1f}" if p["gc"] is not None else ""
        lines.append(f"* {name} ({p['rps']:,.0f} req/s): {total:.1f} µs: {parts}{gc}.")
        inside = ", ".join(f"{fn} {us:.1f}" for fn, us in p["incl"].items() if us)
        if inside:
            lines.append(f"  gibbs, inclusive: {inside}.")
    return lines


def report(
    res: dict[str, list[dict[str, float]]], args: argparse.Namespace, skipped: list[str],
    profiles: Optional[dict[str, dict[str, Any]]] = None,
) -> str:
    info = machine_info()
    lines = [
        "## HTTP end to end",
        "",
        f"Generated by `python -m benchmarks.http` (benchmarks/http.py), {info['date']}, "
        f"{info['cores']} CPUs, {info['python']}: wrk, {args.connections} connections, {args.threads} thread(s), "
        f"{args.duration:.0f} s per run, medians of {args.repeat} runs; {args.workers} model workers per model. "
        "`POST {\"x\": 7}`; trivial: the identity model; batched: the stand-in GPU model, 2 ms + 0.05 ms per "
        "item (gibbs and LitServe batch up to 32; in process, one call at a time).",
        "",
        "| server | model | req/s | p50 | p99 | errors | GC µs/req |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, runs in res.items():
        name, path = key.rsplit(" ", 1)
        lines.append(
            f"| {name} | {path.strip('/')} | {_cell(runs, 'rps'):,.0f} | {_cell(runs, 'p50') * 1e3:.1f} ms "
            f"| {_cell(runs, 'p99') * 1e3:.1f} ms | {sum(r['errors'] for r in runs):.0f} | {_gc_cell(runs)} |"
        )
    lines.append("")
    for model in ("trivial", "batched"):
        g = res.get(f"FastAPI + gibbs /{model}")
        ip = res.get(f"FastAPI in process /{model}")
        ls = res.get(f"LitServe /{model}")
        if g and ip:
            ratio = _cell(g, "rps") / _cell(ip, "rps")
            target = " (target ≥ 0.9×: " + ("met" if ratio >= 0.9 else "missed") + ")" if model == "trivial" else ""
            lines.append(f"* {model}: FastAPI + gibbs at {ratio:.2f}× FastAPI in process{target}.")
        if g and ls:
            ratio = _cell(g, "rps") / _cell(ls, "rps")
            target = " (target ≥ 3×: " + ("met" if ratio >= 3 else "missed") + ")" if model == "trivial" else ""
            lines.append(f"* {model}: FastAPI + gibbs at {ratio:.2f}× LitServe{target}.")
    fl = res.get("FastAPI + asyncio floor /trivial")
    ipt = res.get("FastAPI in process /trivial")
    if fl and ipt:
        lines.append(
            f"* reference: FastAPI awaiting the asyncio floor (the request pickled to one echo process over a "
            f"socketpair the event loop reads itself, no thread) runs at {_cell(fl, 'rps') / _cell(ipt, 'rps'):.2f}× "
            "FastAPI in process: the cost of any request that leaves the process, without gibbs's queue, "
            "scheduling and bookkeeping."
        )
        g = res.get("FastAPI + gibbs /trivial")
        if g:
            lines.append(
                f"* trivial: FastAPI + gibbs at {_cell(g, 'rps') / _cell(fl, 'rps'):.2f}× FastAPI + asyncio floor: "
                "what is left to gain in gibbs itself (a target above the floor's ratio to in process is out of "
                "reach of any design that runs the model in another process)."
            )
    fz = res.get(f"{FROZEN} /trivial")
    g = res.get("FastAPI + gibbs /trivial")
    if fz and g:
        lines.append(
            f"* trivial: FastAPI + gibbs with gc.freeze() after startup at {_cell(fz, 'rps') / _cell(g, 'rps'):.2f}× "
            f"FastAPI + gibbs without it (the collector: {_gc_cell(fz)} against {_gc_cell(g)} µs per request)."
        )
    for why in skipped:
        lines.append(f"* {why}")
    per_run = "; ".join(f"{k}: " + ", ".join(f"{r['rps']:,.0f}" for r in v) for k, v in res.items())
    lines.append(f"* req/s per run: {per_run}.")
    if profiles:
        lines += profile_lines(profiles)
    return "\n".join(lines) + "\n"


async def amain(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("benchmarks.http: skipped: wrk is not installed (Debian: apt-get install wrk)")
        return 0
    res: dict[str, list[dict[str, float]]] = {}
    skipped = []
    why = missing("litserve")
    if why:
        skipped.append(f"LitServe: skipped ({why}; pip install litserve).")
        log(skipped[-1])
    for r in range(args.repeat):
        log(f"repetition {r + 1}/{args.repeat}")
        await measure("FastAPI in process", fastapi_server("inprocess", args.workers), args, res)
        await measure("FastAPI + gibbs", fastapi_server("gibbs", args.workers), args, res)
        if args.gc_freeze:
            await measure(FROZEN, fastapi_server("gibbs", args.workers, gc_freeze=True), args, res)
        if args.floor:
            await measure("FastAPI + asyncio floor", fastapi_server("floor", args.workers), args, res)
        if not why:
            await measure("LitServe", litserve_server(32, 0.0, args.workers, trivial=True), args, res)
    profiles: dict[str, dict[str, Any]] = {}
    g, ip = res.get("FastAPI + gibbs /trivial"), res.get("FastAPI in process /trivial")
    if args.profile and g and ip and _cell(g, "rps") / _cell(ip, "rps") < 0.9:
        for name, mode in (("FastAPI in process", "inprocess"), ("FastAPI + gibbs", "gibbs")):
            prof = await profile_web(name, fastapi_server(mode, args.workers), args)
            if prof is None:
                skipped.append("the profile of the web process: skipped (why: in the log above)")
                break
            profiles[name] = prof
    text = report(res, args, skipped, profiles)
    print(text)
    if not args.no_write:
        path = write_section("http", text)
        print(f"written to {os.path.relpath(path)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each wrk run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the server keeps a core)")
    p.add_argument("--workers", type=int, default=2, help="model workers per model (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each server (default 3)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the reference row: FastAPI awaiting the asyncio floor (one echo process, no thread)")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="skip the row of FastAPI + gibbs with gc.freeze() after startup")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="do not profile the web process when the trivial target is missed")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
