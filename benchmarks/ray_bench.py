"""gibbs over Ray actors beside a Ray Serve deployment handle, on the same
trivial model (identity, ``benchmarks.models.Echo``) and the same local Ray
instance. Optional: needs ``pip install 'ray[serve]'``. Run in a fresh
interpreter (the suite does, when Ray is installed)::

    python -m benchmarks.ray_bench --seq 2000 --total 5000 --repeat 3

* gibbs: a hub in this process (loopback), ``hub.serve(Echo, gibbs_workers=2,
  gibbs_launcher=gibbs.ray.Launcher(num_cpus=0))``: two Ray actors, each
  running a gibbs worker that dials the hub; callers ``await hub.request(x)``.
* Ray Serve: a deployment of two replicas (``num_cpus=0``), Serve without its
  HTTP proxy, in its throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
  as ``benchmarks.ray_app``); callers ``await handle.remote(x)``.

Measured, per repetition: one sequential caller alternating the two call by
call (p50, p99), then 64 concurrent callers (asyncio tasks in this process)
for each: requests per second, p50, p99. One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from .baselines import drive_alternating, drive_concurrent
from .common import fmt_rate, fmt_time, median, percentile
from .models import Echo
from .report import Row
from .serving import ray_unavailable, start_ray_serve

REPLICAS = 2
CONCURRENCY = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] ray_bench: {msg}", file=sys.stderr, flush=True)


async def measure(args: argparse.Namespace, hub: Any, handle: Any) -> dict[str, list[float]]:
    def g(x: Any) -> Any:
        return hub.request(x)

    def s(x: Any) -> Any:
        return handle.remote(x)

    assert await g(7) == 7 and await s(8) == 8
    log("warming up")
    await drive_alternating([g, s], 200)
    await drive_concurrent(g, 1000, CONCURRENCY)
    await drive_concurrent(s, 500, CONCURRENCY)
    res: dict[str, list[float]] = {
        k: [] for k in (
            "g_p50", "g_p99", "s_p50", "s_p99",
            "g_tp", "g_tp_p50", "g_tp_p99", "s_tp", "s_tp_p50", "s_tp_p99",
        )
    }
    for r in range(args.repeat):
        log(f"repetition {r + 1}/{args.repeat}")
        lat_g, lat_s = await drive_alternating([g, s], args.seq)
        res["g_p50"].append(percentile(lat_g, 50))
        res["g_p99"].append(percentile(lat_g, 99))
        res["s_p50"].append(percentile(lat_s, 50))
        res["s_p99"].append(percentile(lat_s, 99))
        for key, call, total in (("g", g, args.total), ("s", s, args.total_serve)):
            tp, lat = await drive_concurrent(call, total, CONCURRENCY)
            res[f"{key}_tp"].append(tp)
            res[f"{key}_tp_p50"].append(percentile(lat, 50))
            res[f"{key}_tp_p99"].append(percentile(lat, 99))
    return res


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_bench")
    p.add_argument("--seq", type=int, default=2000, help="sequential calls of each, per repetition")
    p.add_argument("--total", type=int, default=5000, help="calls by the 64 callers to gibbs, per repetition")
    p.add_argument("--total-serve", type=int, default=2000, help="calls by the 64 callers to Serve, per repetition")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    log("starting Ray, Serve and the gibbs actors")
    try:
        ray, serve = start_ray_serve()
    except ImportError as exc:
        return ray_unavailable(exc)
    import gibbs
    import gibbs.ray

    hub = gibbs.Hub(port=0)
    try:
        hub.start()
        hub.serve(Echo, gibbs_workers=REPLICAS, gibbs_launcher=gibbs.ray.Launcher(num_cpus=0))
        deployment = serve.deployment(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0})(EchoDeployment)
        handle = serve.run(deployment.bind(), name="echo", route_prefix=None)
        hub.wait_for_workers_sync(REPLICAS, timeout=120)
        started = time.perf_counter() - t0
        log(f"started in {started:.1f} s")
        res: dict[str, Any] = asyncio.run(measure(args, hub, handle))
        res["startup"] = started
        res["version"] = ray.__version__
        res["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
    finally:
        hub.close(grace=1)
        ray.shutdown()
    print(json.dumps(res), flush=True)
    return 0


class EchoDeployment:
    """Ray Serve's replica of the trivial model."""

    def __init__(self) -> None:
        self.model = Echo()

    async def __call__(self, x: Any) -> Any:
        return self.model(x)


# ---------------------------------------------------------------- in the suite

KEYS = ("g_p50", "g_p99", "s_p50", "s_p99", "g_tp", "g_tp_p50", "g_tp_p99", "s_tp", "s_tp_p50", "s_tp_p99")


def section_ray_actors(cfg: Any, res: dict[str, Any]) -> None:
    """Rows 8a/8b when Ray (with Serve) is installed; else a printed line."""
    from .serving import Unavailable, missing, run_ray

    if not cfg.ray:
        log("gibbs-over-Ray rows skipped in --quick mode (Ray's start-up alone takes ~15 s here)")
        return
    why = missing("ray")
    if why:
        log(f"gibbs-over-Ray rows skipped: {why} (pip install 'ray[serve]')")
        return
    log("gibbs over Ray actors vs Ray Serve: starting (a fresh interpreter)")
    try:
        out = run_ray(["--repeat", str(cfg.fw_repeat)], module="benchmarks.ray_bench")
    except Unavailable as exc:
        log(f"gibbs-over-Ray rows skipped: {exc}")
        return
    if "unavailable" in out:
        log(f"gibbs-over-Ray rows skipped: {out['unavailable']}")
        return
    for k in KEYS:
        res["rb_" + k] = out[k]


def ray_rows(res: dict[str, Any]) -> list[Row]:
    if "rb_g_p50" not in res:
        return []
    m = {k: median(res["rb_" + k]) for k in KEYS}
    setup = (
        f"identity model, {REPLICAS} workers / replicas on one local Ray instance; gibbs: "
        "hub.serve(Echo, gibbs_workers=2, gibbs_launcher=gibbs.ray.Launcher(num_cpus=0)); Serve: a deployment "
        "handle, throughput mode, no HTTP proxy (benchmarks.ray_bench)"
    )
    return [
        Row(
            "8a", "  (info) gibbs over Ray actors vs Ray Serve handle: sequential round trip p50 (p99)",
            f"{fmt_time(m['g_p50'])} ({fmt_time(m['g_p99'])})", f"Serve {fmt_time(m['s_p50'])} ({fmt_time(m['s_p99'])})",
            f"{m['s_p50'] / m['g_p50']:.1f}×", "", None, note=setup,
        ),
        Row(
            "8b", f"  (info) same, {CONCURRENCY} concurrent callers: throughput, p50 / p99",
            f"{fmt_rate(m['g_tp'])} ({fmt_time(m['g_tp_p50'])} / {fmt_time(m['g_tp_p99'])})",
            f"Serve {fmt_rate(m['s_tp'])} ({fmt_time(m['s_tp_p50'])} / {fmt_time(m['s_tp_p99'])})",
            f"{m['g_tp'] / m['s_tp']:.1f}×", "", None,
        ),
    ]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
