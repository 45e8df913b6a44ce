"""The workloads through a gibbs Hub with local Worker processes."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Sequence

from gibbs import Hub, Worker

from .common import reap


@contextlib.asynccontextmanager
async def cluster(model: Any, n: int, *args: Any, **hub_options: Any) -> AsyncIterator[Hub]:
    """A hub on a free port with ``n`` workers of ``model(*args)``, all
    connected; on exit the hub is closed and every worker reaped."""
    async with cluster_of([(n, model, args, {})], **hub_options) as hub:
        yield hub


@contextlib.asynccontextmanager
async def cluster_of(
    groups: Sequence[tuple[int, Any, tuple[Any, ...], dict[str, Any]]], **hub_options: Any
) -> AsyncIterator[Hub]:
    """A hub on a free port with, for each ``(n, model, args, options)`` of
    ``groups``, ``n`` workers ``Worker(model, *args, **options)`` (options:
    gibbs_model, gibbs_batch_size, ...), all connected; on exit the hub is
    closed and every worker reaped."""
    hub = Hub(port=0, **hub_options)
    hub.start()
    workers: list[Worker] = []
    try:
        for n, model, args, options in groups:
            for _ in range(n):
                w = Worker(model, *args, gibbs_port=hub.port, gibbs_host="127.0.0.1", **options)
                w.start()
                workers.append(w)
        for n, _model, _args, options in groups:
            name = options.get("gibbs_model")
            if name is not None:
                await hub.wait_for_workers(n, timeout=60, model=name)
        await hub.wait_for_workers(len(workers), timeout=60)
        yield hub
    finally:
        reap(workers)
        await hub.aclose(grace=0)
