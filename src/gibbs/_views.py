"""Views of a bridge's state, read under its lock: ``statistics()``, the
connected and loading workers, and what a pool's supervisor observes.

Read-only: a view never changes the core or a peer (the statistics are a
snapshot of the core's counters and windows).
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any, Sequence

from .core import WorkerInfo

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["observe", "statistics", "workers"]


def statistics(b: "Bridge") -> dict[str, Any]:
    with b._lock:
        core = b._core
        peers = [p for p in b._peers.values() if not p.info.leaving]
        busy = sum(1 for p in peers if p.info.units)
        stats = core.stats
        models = {}
        now = time.monotonic()
        loading = collections.Counter(e["model"] for e in b._door.loading_workers.values())
        # (a model whose first worker is loading is known to the core: workers_loading)
        for name, m in core.models.items():
            models[name] = _model(core, name, m, loading, now)
        if b._client_mode:
            # The workers are the router's: what it last said of them.
            for entry in models.values():
                entry["workers"] = entry["busy"] = 0
            for name, v in b._pool_info.items():
                entry = models.setdefault(
                    name, {"class": "", "busy": 0, "queued": 0, "in_flight": 0, "batch_size": 1, "batch_sizes": {}}
                )
                entry["class"] = v.get("class", "")
                entry["workers"] = int(v.get("workers", 0))
            n_workers = sum(int(v.get("workers", 0)) for v in b._pool_info.values())
            peers = []
        else:
            n_workers = len(peers)
        return {
            "role": b.role,
            "clients": sum(1 for p in b._clients.values() if p.role == "client"),
            "workers": n_workers,
            "busy": busy,
            "idle": max(0, n_workers - busy),
            "queued": core.n_queued,
            "in_flight": sum(len(p.info.held) for p in peers),
            "completed": stats["completed"],
            "failed": stats["errors"] + stats["failed"],
            "errors": stats["errors"],
            "retried": stats["retried"],
            "resent": stats["resent"],
            "hedged": stats["hedged"],
            "cancelled": stats["cancelled"],
            "abandoned": stats["abandoned"],
            # of the cancelled and abandoned: those that their deadline ended
            "expired": {"queued": stats["expired_queued"], "running": stats["expired_running"]},
            # refused at once (OverloadedError), by reason
            "shed": {"deadline": stats["shed_deadline"], "max_queued": stats["shed_max_queued"]},
            "worker_deaths": stats["deaths"],
            "handshake_failures": b._door.n_handshake_failures,
            "init_failures": len(b._door.init_failures),
            "closing": core.closing,
            "oldest_queued_seconds": core.oldest_queued(now),
            "loading": sum(loading.values()),
            "models": models,
        }



def _model(core: Any, name: str, m: Any, loading: "collections.Counter[str]", now: float) -> dict[str, Any]:
    """One model's entry of ``statistics()["models"]``."""
    ws = [w for w in m.workers.values() if not w.leaving]
    busy_n = sum(1 for w in ws if w.units)
    ms = m.stats
    return {
        "class": m.cls,
        "workers": len(ws),
        "busy": busy_n,
        "queued": len(m.queue),
        "in_flight": sum(len(w.held) for w in ws),
        "batch_size": max((w.batch_size for w in ws), default=1),
        "batch_sizes": dict(sorted(m.batch_sizes.items())),
        "requests": ms["requests"],
        "completed": ms["completed"],
        "errors": ms["errors"],
        "failed": ms["failed"],
        "cancelled": ms["cancelled"],
        "expired": {"queued": ms["expired_queued"], "running": ms["expired_running"]},
        "shed": {"deadline": ms["shed_deadline"], "max_queued": ms["shed_max_queued"]},
        "resent": ms["resent"],
        "hedged": ms["hedged"],
        "retried": ms["retried"],
        "states": {
            "loading": loading.get(name, 0),
            "ready": len(ws) - busy_n,
            "busy": busy_n,
            "leaving": sum(1 for w in m.workers.values() if w.leaving),
        },
        "oldest_queued_seconds": core.oldest_queued(now, name),
        "versions": _versions(ws),
        "latency": m.latency.snapshot(),
        "queue_wait": m.queue_wait.snapshot(),
        "priorities": core.priority_stats(name),
    }


def workers(b: "Bridge") -> list[dict[str, Any]]:
    """Connected workers (state "ready", "busy" or "leaving") and workers
    building their model (state "loading", with ``seconds``)."""
    loading = [dict(e, state="loading") for e in b.loading()]
    with b._lock:
        return loading + [
            {
                "state": "leaving" if p.info.leaving else "busy" if p.info.units else "ready",
                "device": p.device,
                "pid": p.pid,
                "host": p.host,
                "name": p.name,
                "model": p.info.model,
                "class": p.info.cls,
                "address": p.address,
                "in_flight": len(p.info.held),
                "served": p.info.served,
                "batch_size": p.info.batch_size,
                "shared_memory": p.shm,
                "version": p.version,
                "token": p.token,
            }
            for p in b._peers.values()
        ]



def observe(b: "Bridge", model: str) -> dict[str, Any]:
    """What a pool supervising ``model`` needs: calls queued, the oldest
    one's wait, busy workers, and each worker's state and calls served
    by the token in its HELLO."""
    now = time.monotonic()
    with b._lock:
        m = b._core.models.get(model)
        if m is None:
            return {"queued": 0, "oldest": 0.0, "busy": 0, "workers": {}}
        workers = {
            token: {"served": w.served, "state": "leaving" if w.leaving else "busy" if w.units else "ready"}
            for w in m.workers.values()
            if (token := getattr(w.id, "token", None))
        }
        return {
            "queued": len(m.queue),
            "oldest": b._core.oldest_queued(now, model),
            "busy": sum(1 for w in m.workers.values() if w.units and not w.leaving),
            "workers": workers,
        }


def _versions(workers: Sequence[WorkerInfo]) -> dict[str, dict[str, Any]]:
    """Workers by version (a rolling update shows two): version -> class, count."""
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        version = getattr(w.id, "version", None) or ""
        entry = out.setdefault(version, {"class": w.cls, "workers": 0})
        entry["workers"] += 1
    return out
