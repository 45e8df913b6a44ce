"""Throughput across a veth link (two network namespaces) vs on loopback.

Run as root (it makes two network namespaces and always deletes them)::

    python benchmarks/two_hosts.py [--seconds 5] [--callers 32] [--workers 2] [--repeat 3]

Setup, for both modes: the hub runs in namespace A with ``--callers``
concurrent asyncio callers in its own process, sending a trivial model's
request in a loop; ``python -m gibbs worker -n WORKERS`` serves it.

* veth:     hub bound to 10.213.0.1 in A, workers in namespace B (10.213.0.2)
* loopback: hub bound to 127.0.0.1 in A, workers in A too

Each mode runs a 1 s warm-up, then ``--seconds`` measured; the figure is
answers per second (best and median of ``--repeat`` runs), with the
per-request latency percentiles of the median run. Note that all
processes share this machine's CPUs in both modes: the veth figure measures
the kernel's network path (veth + TCP without loopback shortcuts), not a
real network's latency.

The module is also the hub side (``two_hosts.py _hub ...``, run inside
namespace A) and holds the model (``two_hosts:Trivial``) that the worker
command imports.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_IP = "10.213.0.1"
REMOTE_IP = "10.213.0.2"


class Trivial:
    def __call__(self, x: Any) -> Any:
        return x


# ---------------------------------------------------------------- hub side (in namespace A)


async def _hub_side(host: str, callers: int, workers: int, seconds: float) -> dict[str, Any]:
    from gibbs import Hub

    hub = Hub(port=0, host=host)  # key: GIBBS_AUTHKEY
    hub.start()
    print(json.dumps({"port": hub.port}), flush=True)
    await hub.wait_for_workers(workers, timeout=60)
    phase = {"measuring": False, "stop": False}
    latencies: list[float] = []
    count = 0

    async def caller() -> None:
        nonlocal count
        while not phase["stop"]:
            t0 = time.perf_counter()
            await hub.request(1)
            if phase["measuring"]:
                latencies.append(time.perf_counter() - t0)
                count += 1

    tasks = [asyncio.ensure_future(caller()) for _ in range(callers)]
    await asyncio.sleep(1.0)  # warm-up
    phase["measuring"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    phase["measuring"] = False
    elapsed = time.perf_counter() - t0
    n = count
    phase["stop"] = True
    await asyncio.gather(*tasks)
    workers_info = hub.workers()
    await hub.aclose(grace=1)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3 if latencies else float("nan")

    return {
        "rps": n / elapsed,
        "requests": n,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "workers": [w["address"] for w in workers_info],
    }


# ---------------------------------------------------------------- orchestration


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _one_run(ns_hub: str, ns_workers: str, host: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    hub = subprocess.Popen(
        ["ip", "netns", "exec", ns_hub, sys.executable, os.path.abspath(__file__), "_hub", "--host", host,
         "--callers", str(args.callers), "--workers", str(args.workers), "--seconds", str(args.seconds)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=HERE, preexec_fn=_die_with_parent,
    )
    workers = None
    try:
        assert hub.stdout is not None
        port = json.loads(hub.stdout.readline())["port"]
        workers = subprocess.Popen(
            ["ip", "netns", "exec", ns_workers, sys.executable, "-m", "gibbs", "worker", "two_hosts:Trivial",
             "--hub", f"{host}:{port}", "-n", str(args.workers)],
            stderr=subprocess.DEVNULL, env=env, cwd=HERE, preexec_fn=_die_with_parent,
        )
        out, _ = hub.communicate(timeout=args.seconds + 90)
        if hub.returncode != 0:
            raise RuntimeError(f"hub side failed with status {hub.returncode}")
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for p in (workers, hub):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (workers, hub):
            if p is not None:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    if shutil.which("ip") is None or os.geteuid() != 0:
        print("two_hosts: needs root and the `ip` command (iproute2)", file=sys.stderr)
        return 2
    token = secrets.token_hex(3)
    ns_a, ns_b = f"gibbs2hb-{os.getpid()}-{token}-a", f"gibbs2hb-{os.getpid()}-{token}-b"
    veth_a, veth_b = f"g2b{token}a", f"g2b{token}b"
    env = dict(os.environ, GIBBS_AUTHKEY=secrets.token_hex(16))
    results: dict[str, list[dict[str, Any]]] = {"veth": [], "loopback": []}
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("-n", ns_a, "link", "add", veth_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", f"{HUB_IP}/24", "dev", veth_a)
        _ip("-n", ns_b, "addr", "add", f"{REMOTE_IP}/24", "dev", veth_b)
        for ns, veth in ((ns_a, veth_a), (ns_b, veth_b)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", veth, "up")
        for _ in range(args.repeat):
            results["veth"].append(_one_run(ns_a, ns_b, HUB_IP, args, env))
            results["loopback"].append(_one_run(ns_a, ns_a, "127.0.0.1", args, env))
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    print(f"{args.callers} concurrent callers, {args.workers} workers, trivial model, "
          f"{args.seconds:g} s measured x {args.repeat} runs, {os.cpu_count()} CPUs")
    for mode, runs in results.items():
        rps = [r["rps"] for r in runs]
        med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        print(f"  {mode:9s} best {max(rps):8.0f} req/s  median {statistics.median(rps):8.0f} req/s  "
              f"runs {[round(x) for x in rps]} (median run: p50 {med['p50_ms']:.2f} ms, p99 {med['p99_ms']:.2f} ms; workers {med['workers']})")
    if args.json:
        print(json.dumps(results))
    return 0


def _hub_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--callers", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    ns = parser.parse_args(argv)
    result = asyncio.run(_hub_side(ns.host, ns.callers, ns.workers, ns.seconds))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_hub"]:
        sys.exit(_hub_main(sys.argv[2:]))
    sys.exit(main())
