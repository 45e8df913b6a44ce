"""Rows 7: adaptive batching. A stand-in for a GPU model that costs 2 ms plus
0.05 ms per item (``time.sleep``, benchmarks.models.FakeGPU), served by two
workers with ``gibbs_batch_size=32`` and, side by side on the same hub, by two
workers of the same model unbatched (``model(x)`` sleeps 2.05 ms).

* 7a: throughput with 64 concurrent callers, batched vs unbatched (≥ 8×).
* 7b: one sequential caller, median latency batched vs unbatched (≤ 1.05×):
  a lone request goes at once, as a batch of one.

Where they install (optional, not dependencies of gibbs: ``pip install
litserve 'ray[serve]'``), the same model and the same two workloads run under
LitServe (``max_batch_size``, ``batch_timeout``; over HTTP) and Ray Serve
(``@serve.batch``; through a DeploymentHandle) as information rows; when one
does not import, one line says so and its rows are left out.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import multiprocessing
import sys
import time
from typing import Any

from .baselines import drive_alternating, drive_concurrent
from .common import fmt_rate, fmt_time, median, percentile, perf
from .gibbs_bench import cluster_of
from .models import GPU_BASE, GPU_PER_ITEM, FakeGPU, gpu_cost
from .report import Row
from .serving import Unavailable, litserve_server, missing, run_ray

CONCURRENCY = 64
WORKERS = 2
BATCH_SIZE = 32
# LitServe's batch_timeout: 0 would be work-conserving, but then each idle
# inference worker polls its queue without pause (a core each on this 2-core
# machine); 1 ms lets a lone request wait up to 1 ms for company.
LITSERVE_BATCH_TIMEOUT = 0.001
MODEL = f"model {GPU_BASE * 1e3:g} ms + {GPU_PER_ITEM * 1e3:g} ms/item"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sleep_overshoot(n: int = 200) -> float:
    """Median time ``time.sleep(gpu_cost(1))`` really takes here."""
    out = []
    for _ in range(n):
        t = perf()
        time.sleep(gpu_cost(1))
        out.append(perf() - t)
    return median(out)


# ---------------------------------------------------------------- gibbs


async def section_batching(cfg: Any, res: dict[str, Any]) -> None:
    """7a, 7b: the same model batched and unbatched, on one hub."""
    counters = [multiprocessing.RawArray("q", 3) for _ in range(WORKERS)]
    groups = [
        (1, FakeGPU, (True, c), {"gibbs_model": "batched", "gibbs_batch_size": BATCH_SIZE}) for c in counters
    ] + [(WORKERS, FakeGPU, (False,), {"gibbs_model": "unbatched"})]

    def snapshot() -> tuple[int, int, int]:
        """(calls, items, ns in calls) of the batched workers so far."""
        return (sum(c[0] for c in counters), sum(c[1] for c in counters), sum(c[2] for c in counters))

    res["gpu_sleep"] = sleep_overshoot()
    async with cluster_of(groups) as hub:
        b = functools.partial(hub.request, gibbs_model="batched")
        u = functools.partial(hub.request, gibbs_model="unbatched")
        log("batching: warming up")
        assert await b(3) == 3 and await u(4) == 4
        await drive_alternating([u, b], 50)
        await drive_concurrent(u, 300, CONCURRENCY)
        await drive_concurrent(b, 2000, CONCURRENCY)
        assert sorted(await asyncio.gather(*(b(i) for i in range(100)))) == list(range(100))
        for r in range(cfg.repeat):
            log(f"batching: repetition {r + 1}/{cfg.repeat}")
            lat_u, lat_b = await drive_alternating([u, b], cfg.batch_seq)
            res["b_rtt_u"].append(median(lat_u))
            res["b_rtt_b"].append(median(lat_b))
            tp, _ = await drive_concurrent(u, cfg.batch_tp_u, CONCURRENCY)
            res["b_tp_u"].append(tp)
            n0, k0, ns0 = snapshot()
            t = perf()
            tp, lat = await drive_concurrent(b, cfg.batch_tp_b, CONCURRENCY)
            wall = perf() - t
            n1, k1, ns1 = snapshot()
            res["b_tp_b"].append(tp)
            res["b_p50"].append(percentile(lat, 50))
            res["b_p99"].append(percentile(lat, 99))
            res["b_mean_batch"].append((k1 - k0) / max(1, n1 - n0))
            res["b_busy"].append((ns1 - ns0) * 1e-9 / (WORKERS * wall))


# ---------------------------------------------------------------- LitServe, Ray Serve


async def section_litserve(cfg: Any, res: dict[str, Any]) -> None:
    t0 = perf()
    try:
        async with litserve_server(BATCH_SIZE, LITSERVE_BATCH_TIMEOUT, WORKERS, api_servers=WORKERS) as pool:
            res["ls_startup"] = perf() - t0

            def b(x: Any) -> Any:
                return pool.post("/batched", {"x": x})

            def u(x: Any) -> Any:
                return pool.post("/unbatched", {"x": x})

            log(f"LitServe: up in {res['ls_startup']:.1f} s; warming up")
            assert await b(3) == {"y": 3} and await u(4) == {"y": 4}
            await drive_alternating([u, b], 20)
            await drive_concurrent(u, 200, CONCURRENCY)
            await drive_concurrent(b, 300, CONCURRENCY)
            for r in range(cfg.fw_repeat):
                log(f"LitServe: repetition {r + 1}/{cfg.fw_repeat}")
                lat_u, lat_b = await drive_alternating([u, b], cfg.fw_seq)
                res["ls_rtt_u"].append(median(lat_u))
                res["ls_rtt_b"].append(median(lat_b))
                tp, _ = await drive_concurrent(u, cfg.fw_tp_u, CONCURRENCY)
                res["ls_tp_u"].append(tp)
                tp, lat = await drive_concurrent(b, cfg.fw_tp_b, CONCURRENCY)
                res["ls_tp_b"].append(tp)
                res["ls_p50"].append(percentile(lat, 50))
                res["ls_p99"].append(percentile(lat, 99))
        res["ls_version"] = importlib.metadata.version("litserve")
    except Unavailable as exc:
        log(f"LitServe rows skipped: {_one_line(exc)}")
    except Exception as exc:  # noqa: BLE001 - information rows must not stop the suite
        log(f"LitServe rows skipped: it failed during the run: {_one_line(exc)!s} ({type(exc).__name__})")
        for k in [k for k in res if k.startswith("ls_")]:
            del res[k]


def section_ray(cfg: Any, res: dict[str, Any]) -> None:
    if not cfg.ray:
        log("Ray Serve rows skipped in --quick mode (Ray's start-up alone takes ~15 s here)")
        return
    why = missing("ray")
    if why:
        log(f"Ray Serve rows skipped: {why} (pip install 'ray[serve]')")
        return
    log("Ray Serve: starting (a fresh interpreter; Ray's start-up takes ~15 s here)")
    try:
        out = run_ray([
            "--seq", str(cfg.fw_seq), "--tp-unbatched", str(cfg.fw_tp_u), "--tp-batched", str(cfg.fw_tp_b),
            "--repeat", str(cfg.fw_repeat),
        ])
    except Exception as exc:  # noqa: BLE001 - Unavailable, or a bad answer: information rows only
        log(f"Ray Serve rows skipped: {_one_line(exc)}")
        return
    for k in ("rtt_u", "rtt_b", "tp_u", "tp_b", "p50_b", "p99_b"):
        res["ray_" + k] = out[k]
    res["ray_startup"] = out["startup"]
    res["ray_version"] = out["version"]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:300] + " …"


# ---------------------------------------------------------------- rows


def _per_rep(xs: list[float], ys: list[float], fmt: str) -> str:
    return ", ".join(f"{format(x, fmt)}/{format(y, fmt)}" for x, y in zip(xs, ys))


def batching_rows(cfg: Any, res: dict[str, Any]) -> list[Row]:
    m = {k: median(v) if isinstance(v, list) else v for k, v in res.items()}
    rows: list[Row] = []
    ideal = WORKERS * BATCH_SIZE / gpu_cost(BATCH_SIZE)
    ratio = m["b_tp_b"] / m["b_tp_u"]
    rows.append(Row(
        "7a", f"Adaptive batching: throughput, {CONCURRENCY} concurrent callers, {MODEL}, {WORKERS} workers, "
        f"gibbs_batch_size={BATCH_SIZE}",
        fmt_rate(m["b_tp_b"]), f"unbatched {fmt_rate(m['b_tp_u'])}", f"{ratio:.1f}×", "≥ 8× unbatched",
        ratio >= 8.0,
        note=f"per repetition, batched / unbatched: {_per_rep(res['b_tp_b'], res['b_tp_u'], ',.0f')} req/s; "
        f"mean batch {m['b_mean_batch']:.1f} requests; the batched workers spent {m['b_busy']:.0%} of the time "
        f"in the model; p50 / p99 latency batched "
        f"{fmt_time(m['b_p50'])} / {fmt_time(m['b_p99'])}. Ideal (model time only): unbatched "
        f"{WORKERS / gpu_cost(1):,.0f} req/s, batched {ideal:,.0f} req/s ({ideal * gpu_cost(1) / WORKERS:.1f}×).",
    ))
    ratio = m["b_rtt_b"] / m["b_rtt_u"]
    rows.append(Row(
        "7b", "Adaptive batching: latency, 1 caller, sequential, same model (median round trip)",
        fmt_time(m["b_rtt_b"]), f"unbatched {fmt_time(m['b_rtt_u'])}", f"{ratio:.3f}×", "≤ 1.05× unbatched",
        ratio <= 1.05,
        note="per repetition, batched / unbatched: "
        + ", ".join(f"{b * 1e3:.3f}/{u * 1e3:.3f} ms" for b, u in zip(res["b_rtt_b"], res["b_rtt_u"]))
        + f" (calls alternate); time.sleep({gpu_cost(1) * 1e3:.2f} ms) alone takes {fmt_time(m['gpu_sleep'])} here.",
    ))
    for tp_key, lat_key, name, prefix, how in (
        ("7i", "7j", "LitServe", "ls", f"max_batch_size={BATCH_SIZE}, batch_timeout={LITSERVE_BATCH_TIMEOUT:g} s, "
         f"{WORKERS} inference workers, {WORKERS} API servers, fast_queue; over HTTP"),
        ("7k", "7l", "Ray Serve", "ray", f"@serve.batch(max_batch_size={BATCH_SIZE}, batch_wait_timeout_s=0), "
         f"{WORKERS} replicas; through a DeploymentHandle"),
    ):
        if prefix + "_tp_b" not in m:
            continue
        version = m.get(prefix + "_version", "")
        tp_b, tp_u = m[prefix + "_tp_b"], m[prefix + "_tp_u"]
        rtt_b, rtt_u = m[prefix + "_rtt_b"], m[prefix + "_rtt_u"]
        p50 = m.get(prefix + "_p50", m.get(prefix + "_p50_b"))
        p99 = m.get(prefix + "_p99", m.get(prefix + "_p99_b"))
        rows.append(Row(
            tp_key, f"  (info) {name} {version}, same model, same throughput workload, batched",
            fmt_rate(m["b_tp_b"]), f"{name} {fmt_rate(tp_b)}", f"{m['b_tp_b'] / tp_b:.1f}×", "", None,
            note=f"{name}: {how}. Batched / unbatched throughput {fmt_rate(tp_b)} / {fmt_rate(tp_u)} "
            f"({tp_b / tp_u:.1f}×); p50 / p99 latency batched {fmt_time(p50)} / {fmt_time(p99)}; per repetition "
            f"{_per_rep(res[prefix + '_tp_b'], res[prefix + '_tp_u'], ',.0f')} req/s.",
        ))
        rows.append(Row(
            lat_key,
            f"  (info) {name}, same sequential latency workload, batched",
            fmt_time(m["b_rtt_b"]), f"{name} {fmt_time(rtt_b)}", f"{rtt_b / m['b_rtt_b']:.2f}× faster", "", None,
            note=f"{name} batched / unbatched: {fmt_time(rtt_b)} / {fmt_time(rtt_u)} ({rtt_b / rtt_u:.3f}×).",
        ))
    return rows
