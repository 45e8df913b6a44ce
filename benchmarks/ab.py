"""Two commits side by side, in one run: sequential latency (one caller)
throughput (64 callers) and the hub process's CPU per request at 64
callers, of a trivial model on 2 workers, each commit
measured in turn, several rounds, medians of the rounds.

    python -m benchmarks.ab BASE [HEAD] [--rounds 3] [--calls 2000] [--seconds 3]

Each commit is checked out in a temporary git worktree and measured in a
fresh process with that worktree's ``src`` first on the path. Alternating
the two in each round is what makes the ratio fair on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

_PROBE = r"""
import asyncio, json, sys, time
from gibbs import Hub, Worker

class Echo:
    def __call__(self, x):
        return x

async def main(calls, seconds):
    hub = Hub(port=0)
    hub.start()
    workers = [Worker(Echo, gibbs_port=hub.port) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        await hub.wait_for_workers(2, timeout=60)
        for _ in range(200):
            await hub.request(0)
        lat = []
        for i in range(calls):
            t0 = time.perf_counter()
            await hub.request(i)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        done = 0
        stop = time.perf_counter() + seconds

        async def caller():
            nonlocal done
            while time.perf_counter() < stop:
                await hub.request(1)
                done += 1

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(64)))
        rate = done / (time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / done
        return {"latency_us": lat[len(lat) // 2] * 1e6, "throughput": rate, "hub_cpu_us": cpu * 1e6}
    finally:
        await hub.aclose(grace=0)
        for w in workers:
            w.kill()
            w.join(10)

print(json.dumps(asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))))
"""


def _worktree(repo: str, rev: str, where: str) -> str:
    path = os.path.join(where, rev.replace("/", "_"))
    subprocess.run(["git", "-C", repo, "worktree", "add", "-q", "--detach", path, rev], check=True)
    return path


def _measure(tree: str, calls: int, seconds: float) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.join(tree, "src"))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(calls), str(seconds)], env=env, check=True, capture_output=True, text=True,
        timeout=600,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("head", nargs="?", default="HEAD")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=3.0)
    ns = p.parse_args(argv)
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: _worktree(repo, rev, tmp) for rev in (ns.base, ns.head)}
        try:
            got: dict[str, list[dict[str, float]]] = {rev: [] for rev in trees}
            for _ in range(ns.rounds):
                for rev, tree in trees.items():
                    got[rev].append(_measure(tree, ns.calls, ns.seconds))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], check=False)
    keys = ("latency_us", "throughput", "hub_cpu_us")
    med = {rev: {k: statistics.median(r[k] for r in rs if k in r) for k in keys if any(k in r for r in rs)}
           for rev, rs in got.items()}
    print(f"{'commit':<14}{'latency us (1 caller)':>24}{'req/s (64 callers)':>22}{'hub CPU us/req (64)':>22}")
    for rev, m in med.items():
        cpu = f"{m['hub_cpu_us']:.1f}" if "hub_cpu_us" in m else "-"
        print(f"{rev:<14}{m['latency_us']:>24.0f}{m['throughput']:>22.0f}{cpu:>22}")
    b, h = med[ns.base], med[ns.head]
    line = f"head / base: latency {h['latency_us'] / b['latency_us']:.2f}x, throughput {h['throughput'] / b['throughput']:.2f}x"
    if "hub_cpu_us" in b and "hub_cpu_us" in h:
        line += f", hub CPU {h['hub_cpu_us'] / b['hub_cpu_us']:.2f}x"
    print(line + f" (medians of {ns.rounds} rounds, alternating)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
