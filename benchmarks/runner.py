"""Command line and orchestration: runs every workload, checks the targets,
prints the table and writes benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

from .baselines import PPE, AsyncioFloor, PipeEcho, ShmCopies, drive_concurrent, drive_sequential
from .batching_bench import batching_rows, section_batching, section_litserve, section_ray
from .common import fmt_bytes, fmt_rate, fmt_time, machine_info, median, percentile, perf
from .gibbs_bench import cluster
from .models import Echo, Sleeper
from .overload import overload_rows, section_overload
from .overload_batched import overload_batched_rows, section_overload_batched
from .overload_frameworks import overload_frameworks_rows, section_overload_frameworks
from .queue_bench import run_child
from .ray_bench import ray_rows, section_ray_actors
from .report import RESULTS_PATH, Row, results_markdown, summary, table, write_results

CONCURRENCY = 64
BIG_BYTES = 16 << 20
#: CPU each caller burns in the event loop per request in rows 5c-5d (an
#: endpoint's JSON and validation work).
CPU_PER_REQUEST = 200e-6


@dataclass
class Config:
    quick: bool
    repeat: int
    lat_n: int  # sequential calls per repetition (Pipe, gibbs)
    ppe_lat_n: int  # sequential calls per repetition (PPE)
    pipe_tp_n: int  # pipelined Pipe messages per repetition
    tp_total: int  # calls shared by the 64 callers per repetition
    big_iters: int  # 16 MiB round trips per repetition and contender
    mem_n: int  # queued requests for the memory figure
    drain_small: int
    drain_big: int
    drain_big_repeat: int
    batch_seq: int = 600  # sequential calls per repetition, batched and unbatched alternating
    batch_tp_u: int = 2000  # calls shared by the 64 callers, unbatched model
    batch_tp_b: int = 16_000  # the same, batched model
    fw_repeat: int = 2  # LitServe, Ray Serve: repetitions
    fw_seq: int = 300  # LitServe, Ray Serve: sequential calls (each)
    fw_tp_u: int = 1000  # LitServe, Ray Serve: calls of the unbatched throughput
    fw_tp_b: int = 4000  # LitServe, Ray Serve: calls of the batched throughput
    ray: bool = True  # Ray Serve rows (not in --quick: Ray's start-up takes ~15 s)
    walk_workers: int = 4
    walk_requests: int = 10
    walk_sleep: float = 0.25

    @classmethod
    def make(cls, quick: bool, repeat: Optional[int]) -> "Config":
        if quick:
            r = repeat or 2
            return cls(True, r, 300, 150, 3000, 1500, 2, 5_000, 1000, 5_000, 1,
                       batch_seq=150, batch_tp_u=500, batch_tp_b=4000,
                       fw_repeat=1, fw_seq=100, fw_tp_u=300, fw_tp_b=1000, ray=False)
        r = repeat or 5
        return cls(False, r, 3000, 600, 20_000, 10_000, 3, 100_000, 1000, 100_000, max(1, min(r, 3)),
                   fw_repeat=max(1, min(r, 2)))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _forget_closed_hubs() -> None:
    """Closed hubs must be garbage before the next fork: gibbs's after-fork hook
    closes a closed hub's old descriptor numbers in the child, which by then
    may belong to something else (see the report). Here we only check."""
    gc.collect()
    from gibbs import hub as hub_module

    stale = [h for h in list(hub_module._live_hubs) if h.closed]
    if stale:
        log(f"warning: {len(stale)} closed hub(s) still referenced; forks may lose descriptors")


# ---------------------------------------------------------------- sections


async def section_trivial(cfg: Config, res: dict[str, list[float]]) -> None:
    """Targets 2, 3, 4, 5: Pipe, PPE and gibbs side by side, interleaved."""
    import numpy as np

    with PipeEcho() as pipe:
        async with AsyncioFloor() as floor, PPE(2) as ppe:
            async with cluster(Echo, 2) as hub:
                log("trivial model: warming up")
                pipe.ping_pong(300)
                pipe.pipelined(2000)
                await drive_sequential(floor.call, 300)
                await drive_sequential(hub.request, 300)
                await drive_sequential(ppe.call, 100)
                await drive_concurrent(hub.request, 1000, CONCURRENCY)
                await drive_concurrent(ppe.call, 500, CONCURRENCY)
                for r in range(cfg.repeat):
                    log(f"trivial model: repetition {r + 1}/{cfg.repeat}")
                    res["pipe_rtt"].append(median(pipe.ping_pong(cfg.lat_n)))
                    res["floor_rtt"].append(median(await drive_sequential(floor.call, cfg.lat_n)))
                    res["gibbs_rtt"].append(median(await drive_sequential(hub.request, cfg.lat_n)))
                    res["ppe_rtt"].append(median(await drive_sequential(ppe.call, cfg.ppe_lat_n)))
                    res["pipe_tp"].append(pipe.pipelined(cfg.pipe_tp_n))
                    tp, lat = await drive_concurrent(hub.request, cfg.tp_total, CONCURRENCY)
                    res["gibbs_tp"].append(tp)
                    res["gibbs_p50"].append(percentile(lat, 50))
                    res["gibbs_p99"].append(percentile(lat, 99))
                    tp, lat = await drive_concurrent(ppe.call, cfg.tp_total, CONCURRENCY)
                    res["ppe_tp"].append(tp)
                    res["ppe_p50"].append(percentile(lat, 50))
                    res["ppe_p99"].append(percentile(lat, 99))
                    n_cpu = max(640, cfg.tp_total // 8)
                    _, lat = await drive_concurrent(hub.request, n_cpu, CONCURRENCY, cpu=CPU_PER_REQUEST)
                    res["gibbs_cpu_p50"].append(percentile(lat, 50))
                    res["gibbs_cpu_p99"].append(percentile(lat, 99))
                    _, lat = await drive_concurrent(floor.call, n_cpu, CONCURRENCY, cpu=CPU_PER_REQUEST)
                    res["floor_cpu_p50"].append(percentile(lat, 50))
                    res["floor_cpu_p99"].append(percentile(lat, 99))

                log("16 MiB array: warming up")
                arr = np.random.default_rng(0).random(BIG_BYTES // 8)
                shm = ShmCopies(arr.nbytes)
                try:
                    assert np.array_equal(shm.two_copies(arr), arr)
                    assert np.array_equal(shm.round_trip(arr, fresh=False), arr)
                    assert np.array_equal(shm.round_trip(arr, fresh=True), arr)
                    out = await hub.request(arr)
                    assert np.array_equal(out, arr), "gibbs returned a different array"
                    del out
                    out = await ppe.call(arr)
                    assert np.array_equal(out, arr), "PPE returned a different array"
                    del out
                    for r in range(cfg.repeat):
                        log(f"16 MiB array: repetition {r + 1}/{cfg.repeat}")
                        for _ in range(cfg.big_iters):
                            t = perf()
                            shm.two_copies(arr)
                            res["shm_two"].append(perf() - t)
                            t = perf()
                            shm.round_trip(arr, fresh=False)
                            res["shm_warm"].append(perf() - t)
                            t = perf()
                            shm.round_trip(arr, fresh=True)
                            res["shm_fresh"].append(perf() - t)
                            t = perf()
                            out = await hub.request(arr)
                            res["gibbs_big"].append(perf() - t)
                            del out
                            t = perf()
                            out = await ppe.call(arr)
                            res["ppe_big"].append(perf() - t)
                            del out
                finally:
                    shm.close()


async def section_uvloop_body(cfg: Config, res: dict[str, Any]) -> None:
    async with AsyncioFloor() as floor:
        async with cluster(Echo, 2) as hub:
            await drive_sequential(floor.call, 300)
            await drive_sequential(hub.request, 300)
            await drive_concurrent(hub.request, 1000, CONCURRENCY)
            for r in range(cfg.repeat):
                log(f"uvloop: repetition {r + 1}/{cfg.repeat}")
                res["uv_floor_rtt"].append(median(await drive_sequential(floor.call, cfg.lat_n)))
                res["uv_gibbs_rtt"].append(median(await drive_sequential(hub.request, cfg.lat_n)))
                tp, _ = await drive_concurrent(hub.request, cfg.tp_total, CONCURRENCY)
                res["uv_gibbs_tp"].append(tp)


def section_uvloop(cfg: Config, res: dict[str, Any]) -> None:
    """The trivial-model rows again under uvloop, when it is installed."""
    try:
        import uvloop
    except ImportError:
        res["uv_missing"] = "uvloop is not installed (pip install uvloop)"
        log(f"uvloop rows skipped: {res['uv_missing']}")
        return
    uvloop.run(section_uvloop_body(cfg, res))


async def section_walkthrough(cfg: Config, res: dict[str, list[float]]) -> None:
    """Target 1: 10 concurrent requests, 0.25 s model, 4 workers."""
    async with cluster(Sleeper, cfg.walk_workers, cfg.walk_sleep) as hub:
        log("walkthrough: warming up")
        await asyncio.gather(*(hub.request(i) for i in range(cfg.walk_workers)))
        rounds = max(cfg.repeat, 3)
        for r in range(rounds):
            log(f"walkthrough: repetition {r + 1}/{rounds}")
            t = perf()
            out = await asyncio.gather(*(hub.request(i) for i in range(cfg.walk_requests)))
            res["walk"].append(perf() - t)
            assert out == list(range(cfg.walk_requests))


def section_queue(cfg: Config, res: dict[str, Any]) -> None:
    """Target 6: memory per queued request, and drain throughput."""
    n = cfg.mem_n
    log(f"queue: memory with {n} queued (tracemalloc)")
    res["mem_submit"] = run_child("mem-sync", n, "submit", "--traced")["per_request"]
    res["mem_future"] = run_child("mem-sync", n, "future", "--traced")["per_request"]
    res["mem_bare_future"] = run_child("mem-sync", n, "bare", "--traced")["per_request"]
    log(f"queue: memory with {n} queued (RSS)")
    res["rss_submit"] = run_child("mem-sync", n, "submit")["per_request"]
    log(f"queue: memory with {n} queued through asyncio tasks (tracemalloc)")
    res["mem_async_hub"] = run_child("mem-async", n, "hub", "--traced")["per_request"]
    res["mem_async_bare"] = run_child("mem-async", n, "bare", "--traced")["per_request"]
    small, big = [], []
    for r in range(max(cfg.repeat, 3)):
        log(f"queue: drain of {cfg.drain_small} ({r + 1})")
        out = run_child("drain", cfg.drain_small)
        assert out["correct"] == cfg.drain_small and out["errors"] == 0, out
        small.append(out["throughput"])
    for r in range(cfg.drain_big_repeat):
        log(f"queue: drain of {cfg.drain_big} ({r + 1}/{cfg.drain_big_repeat})")
        out = run_child("drain", cfg.drain_big, timeout=600)
        assert out["correct"] == cfg.drain_big and out["errors"] == 0, out
        big.append(out["throughput"])
    res["drain_small"] = small
    res["drain_big"] = big


# ---------------------------------------------------------------- targets


def build_rows(cfg: Config, res: dict[str, Any]) -> list[Row]:
    m = {k: median(v) if isinstance(v, list) else v for k, v in res.items()}
    rows: list[Row] = []

    # 1. walkthrough
    ideal = -(-cfg.walk_requests // cfg.walk_workers) * cfg.walk_sleep
    ratio = m["walk"] / ideal
    rows.append(Row(
        "1", f"Walkthrough: {cfg.walk_requests} concurrent requests, {cfg.walk_sleep} s model, "
        f"{cfg.walk_workers} workers (wall time)",
        fmt_time(m["walk"]), f"ideal {fmt_time(ideal)}", f"{ratio:.4f}×", "≤ 1.01× ideal", ratio <= 1.01,
        note=f"per repetition: {', '.join(f'{x:.4f} s' for x in res['walk'])}.",
    ))

    # 2. sequential latency
    ratio = m["gibbs_rtt"] / m["pipe_rtt"]
    rows.append(Row(
        "2", "Latency, 1 caller, sequential, trivial model (median round trip)",
        fmt_time(m["gibbs_rtt"]), f"Pipe {fmt_time(m['pipe_rtt'])}", f"{ratio:.2f}×", "≤ 1.5× Pipe",
        ratio <= 1.5,
        note="per repetition, gibbs / Pipe: "
        + ", ".join(f"{g * 1e6:.0f}/{p * 1e6:.0f} µs" for g, p in zip(res["gibbs_rtt"], res["pipe_rtt"]))
        + ".",
    ))
    ratio = m["gibbs_rtt"] / m["floor_rtt"]
    rows.append(Row(
        "2f", "Latency, 1 caller, sequential, trivial model, vs the asyncio floor",
        fmt_time(m["gibbs_rtt"]), f"floor {fmt_time(m['floor_rtt'])}", f"{ratio:.2f}×", "≤ 1.2× floor",
        ratio <= 1.2,
        note="the floor: one event loop, a socketpair to an echo process, loop.add_reader whose callback "
        "reads and resolves the waiting future (what any asyncio API over a local socket pays). "
        "Per repetition, gibbs / floor: "
        + ", ".join(f"{g * 1e6:.0f}/{p * 1e6:.0f} µs" for g, p in zip(res["gibbs_rtt"], res["floor_rtt"]))
        + ".",
    ))
    rows.append(Row(
        "2i", "  (info) ProcessPoolExecutor latency, same workload",
        fmt_time(m["gibbs_rtt"]), f"PPE {fmt_time(m['ppe_rtt'])}",
        f"{m['ppe_rtt'] / m['gibbs_rtt']:.2f}× faster", "", None,
    ))

    # 3. throughput
    ratio = m["gibbs_tp"] / m["ppe_tp"]
    rows.append(Row(
        "3", f"Throughput, {CONCURRENCY} concurrent callers, trivial model, 2 workers",
        fmt_rate(m["gibbs_tp"]), f"PPE {fmt_rate(m['ppe_tp'])}", f"{ratio:.2f}×", "≥ 8× PPE",
        ratio >= 8.0,
        note="per repetition, gibbs / PPE: "
        + ", ".join(f"{g:,.0f}/{p:,.0f}" for g, p in zip(res["gibbs_tp"], res["ppe_tp"]))
        + " req/s.",
    ))
    rows.append(Row(
        "3i", "  (info) Raw Pipe pipelined throughput (1 echo process, 64 in flight): the limit",
        fmt_rate(m["gibbs_tp"]), f"Pipe {fmt_rate(m['pipe_tp'])}",
        f"{m['gibbs_tp'] / m['pipe_tp']:.2f}×", "", None,
    ))

    if res.get("uv_gibbs_rtt"):
        rows.append(Row(
            "2u", "  (info) the same latency under uvloop, vs the asyncio floor under uvloop",
            fmt_time(median(res["uv_gibbs_rtt"])), f"floor {fmt_time(median(res['uv_floor_rtt']))}",
            f"{median(res['uv_gibbs_rtt']) / median(res['uv_floor_rtt']):.2f}×", "", None,
        ))
        rows.append(Row(
            "3u", f"  (info) throughput, {CONCURRENCY} callers, 2 workers, under uvloop",
            fmt_rate(median(res["uv_gibbs_tp"])), f"PPE (asyncio) {fmt_rate(m['ppe_tp'])}",
            f"{median(res['uv_gibbs_tp']) / m['ppe_tp']:.2f}×", "", None,
        ))

    # 4. 16 MiB
    ratio = m["gibbs_big"] / m["shm_two"]
    rows.append(Row(
        "4a", "16 MiB NumPy array there and back, identity model",
        fmt_time(m["gibbs_big"]), f"two copies {fmt_time(m['shm_two'])}", f"{ratio:.2f}×",
        "≤ 1.3× two copies", ratio <= 1.3,
    ))
    rows.append(Row(
        "4c", "  (info) same, against four copies (in and out, both ways)",
        fmt_time(m["gibbs_big"]), f"shm copies {fmt_time(m['shm_warm'])}",
        f"{m['gibbs_big'] / m['shm_warm']:.2f}×", "", None,
    ))
    rows.append(Row(
        "4i", "  (info) same, baseline with a fresh shm segment each way",
        fmt_time(m["gibbs_big"]), f"shm fresh {fmt_time(m['shm_fresh'])}",
        f"{m['gibbs_big'] / m['shm_fresh']:.2f}×", "", None,
    ))
    speedup = m["ppe_big"] / m["gibbs_big"]
    rows.append(Row(
        "4b", "16 MiB NumPy array there and back vs ProcessPoolExecutor",
        fmt_time(m["gibbs_big"]), f"PPE {fmt_time(m['ppe_big'])}", f"{speedup:.1f}× faster",
        "≥ 10× faster than PPE", speedup >= 10.0,
    ))

    # 5. tail latency
    rows.append(Row(
        "5a", f"p50 latency at {CONCURRENCY} concurrent callers",
        fmt_time(m["gibbs_p50"]), f"PPE {fmt_time(m['ppe_p50'])}",
        f"{m['gibbs_p50'] / m['ppe_p50']:.2f}×", "reported", None,
    ))
    rows.append(Row(
        "5b", f"p99 latency at {CONCURRENCY} concurrent callers",
        fmt_time(m["gibbs_p99"]), f"PPE {fmt_time(m['ppe_p99'])}",
        f"{m['gibbs_p99'] / m['ppe_p99']:.2f}×", "reported", None,
    ))
    ratio = m["gibbs_p99"] / m["gibbs_p50"]
    rows.append(Row(
        "5t", f"p99 / p50 latency at {CONCURRENCY} concurrent callers",
        f"{ratio:.2f}×", "", "", "≤ 3×", ratio <= 3.0,
    ))
    ratio = m["gibbs_cpu_p99"] / m["gibbs_cpu_p50"]
    floor_ratio = m["floor_cpu_p99"] / m["floor_cpu_p50"]
    rows.append(Row(
        "5c", f"p99 / p50 latency at {CONCURRENCY} callers each burning {CPU_PER_REQUEST * 1e6:.0f} µs "
        "of CPU in the event loop per request",
        f"{fmt_time(m['gibbs_cpu_p99'])} / {fmt_time(m['gibbs_cpu_p50'])} = {ratio:.2f}×",
        f"floor {fmt_time(m['floor_cpu_p99'])} / {fmt_time(m['floor_cpu_p50'])} = {floor_ratio:.2f}×",
        "", "≤ 3×", ratio <= 3.0,
        note="per repetition, gibbs p50/p99: "
        + ", ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f} ms" for a, b in zip(res["gibbs_cpu_p50"], res["gibbs_cpu_p99"]))
        + "; floor p50/p99: "
        + ", ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f} ms" for a, b in zip(res["floor_cpu_p50"], res["floor_cpu_p99"]))
        + ".",
    ))

    # 6. queue
    n = cfg.mem_n
    rows.append(Row(
        "6a", f"Hub memory per queued request, {n:,} queued via hub.submit (tracemalloc)",
        fmt_bytes(m["mem_submit"]), "", "", "≤ 2 KiB", m["mem_submit"] <= 2048,
        note=f"of which the future submit returns (a concurrent.futures.Future whose Condition is made "
        f"on first use), measured alone: {fmt_bytes(m['mem_future'])} (a plain concurrent.futures.Future: "
        f"{fmt_bytes(m['mem_bare_future'])}); the hub's own structures: "
        f"{fmt_bytes(m['mem_submit'] - m['mem_future'])}.",
    ))
    rows.append(Row(
        "6i", f"  (info) same, RSS growth / {n:,}", fmt_bytes(m["rss_submit"]), "", "", "", None,
    ))
    hub_part = m["mem_async_hub"] - m["mem_async_bare"]
    rows.append(Row(
        "6j", "  (info) per queued `await hub.request()`, excluding its asyncio Task (tracemalloc)",
        fmt_bytes(hub_part), f"Task alone {fmt_bytes(m['mem_async_bare'])}", "", "", None,
    ))
    ratio = m["drain_big"] / m["drain_small"]
    rows.append(Row(
        "6b", f"Drain throughput with {cfg.drain_big:,} queued vs {cfg.drain_small:,}",
        fmt_rate(m["drain_big"]), f"{cfg.drain_small:,}: {fmt_rate(m['drain_small'])}",
        f"{ratio:.2f}×", "≥ 0.8× (within 20 %)", ratio >= 0.8,
        note=f"per repetition: {cfg.drain_small:,} queued "
        + ", ".join(f"{x:,.0f}" for x in res["drain_small"])
        + f"; {cfg.drain_big:,} queued " + ", ".join(f"{x:,.0f}" for x in res["drain_big"]) + " req/s.",
    ))

    # 7. adaptive batching (and LitServe, Ray Serve where installed)
    rows += batching_rows(cfg, res)
    # 8. gibbs over Ray actors beside Ray Serve (where Ray is installed)
    rows += ray_rows(res)
    # 9. overload with deadlines
    rows += overload_rows(res)
    rows += overload_batched_rows(res)
    rows += overload_frameworks_rows(res)
    if cfg.quick:
        for r in rows:
            r.note = (r.note + " " if r.note else "") + "(quick run: reduced sizes)"
    return rows


# ---------------------------------------------------------------- main


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, 2 repetitions (< 60 s)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="repetitions; medians are reported (default 5, quick 2)")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/RESULTS.md")
    p.add_argument("--output", default=None, help="write the results there instead of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = Config.make(args.quick, args.repeat)
    info = machine_info()
    load_before = _load()
    t0 = perf()
    res: dict[str, Any] = defaultdict(list)
    log(f"gibbs benchmarks ({'quick' if cfg.quick else 'full'}, {cfg.repeat} repetitions)")

    asyncio.run(section_trivial(cfg, res))
    _forget_closed_hubs()
    section_uvloop(cfg, res)
    _forget_closed_hubs()
    asyncio.run(section_walkthrough(cfg, res))
    _forget_closed_hubs()
    asyncio.run(section_batching(cfg, res))
    _forget_closed_hubs()
    section_queue(cfg, res)
    asyncio.run(section_overload(cfg.quick, res))
    asyncio.run(section_overload_batched(cfg.quick, res))
    _forget_closed_hubs()
    # Last: other frameworks' processes must not load the machine while
    # gibbs is measured.
    asyncio.run(section_litserve(cfg, res))
    section_ray(cfg, res)
    section_ray_actors(cfg, res)
    section_overload_frameworks(cfg, res)

    info["load"] = f"{load_before} / {_load()}"
    info["elapsed"] = f"{perf() - t0:.0f} s"
    info["mode"] = f"{'quick' if cfg.quick else 'full'}, {cfg.repeat} repetitions"
    rows = build_rows(cfg, res)

    print()
    print(f"gibbs benchmarks — {info['cpu']}, {info['cores']} CPUs, {info['python']}, {info['date']}")
    print(f"load average before / after: {info['load']}; wall time {info['elapsed']}")
    print()
    print(table(rows))
    print()
    print(summary(rows))
    if not args.no_write:
        cmd = "python -m benchmarks" + (" --quick" if cfg.quick else "") + (
            f" --repeat {args.repeat}" if args.repeat else "")
        path = write_results(results_markdown(rows, info, cmd), args.output or RESULTS_PATH)
        print(f"\nwritten to {os.path.relpath(path)}")
    return 0
