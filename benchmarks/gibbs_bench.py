"""The workloads through a gibbs Hub with local Worker processes."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from gibbs import Hub, Worker

from .common import reap


@contextlib.asynccontextmanager
async def cluster(model: Any, n: int, *args: Any, **hub_options: Any) -> AsyncIterator[Hub]:
    """A hub on a free port with ``n`` workers of ``model(*args)``, all
    connected; on exit the hub is closed and every worker reaped."""
    hub = Hub(port=0, **hub_options)
    hub.start()
    workers: list[Worker] = []
    try:
        for _ in range(n):
            w = Worker(model, *args, gibbs_port=hub.port, gibbs_host="127.0.0.1")
            w.start()
            workers.append(w)
        await hub.wait_for_workers(n, timeout=60)
        yield hub
    finally:
        reap(workers)
        await hub.aclose(grace=0)
