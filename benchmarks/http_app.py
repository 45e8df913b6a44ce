"""The FastAPI app of the HTTP benchmark (``python -m benchmarks.http``),
served by uvicorn in its own process::

    GIBBS_BENCH_MODE=gibbs uvicorn benchmarks.http_app:app --port P

Two endpoints, each ``POST`` with ``{"x": <int>}`` and answering
``{"y": ...}`` (the same requests LitServe's app takes, so that one wrk
script drives all three servers):

* ``/trivial``: the model returns its input;
* ``/batched``: the stand-in GPU model (2 ms + 0.05 ms per item,
  :class:`benchmarks.models.FakeGPU`).

``GIBBS_BENCH_MODE=gibbs``: the walkthrough's app, ``hub = Hub()`` at import
and ``await hub.request(x)`` in the endpoint, with ``GIBBS_BENCH_WORKERS``
workers of each model started by ``hub.serve`` (the batched model with
``gibbs_batch_size=32``). ``inprocess``: plain FastAPI calling one copy of
each model in the web process (the GPU model one call at a time, as one
device runs it). ``floor``: the endpoints await the asyncio floor
(:class:`benchmarks.baselines.AsyncioFloor`), for reference. ``suspend``: in
process, but the trivial endpoint first awaits ``asyncio.sleep(0)`` (to show
that suspending the endpoint costs FastAPI nothing measurable).

In every mode, ``GET /gc`` answers what Python's cyclic garbage collector
has done in this process so far (collections per generation, seconds in
them), which the benchmark reads before and after a run; and
``GIBBS_BENCH_GC_FREEZE=1`` calls ``gc.freeze()`` once the app has started
(what the docs advise for a web process that awaits remote results).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI
from pydantic import BaseModel

from gibbs import Hub

from .models import Echo, FakeGPU

MODE = os.environ.get("GIBBS_BENCH_MODE", "gibbs")
WORKERS = int(os.environ.get("GIBBS_BENCH_WORKERS", "2"))
BATCH = int(os.environ.get("GIBBS_BENCH_BATCH", "32"))
GC_FREEZE = os.environ.get("GIBBS_BENCH_GC_FREEZE") == "1"


class GcClock:
    """Collections per generation and seconds spent in them, from
    ``gc.callbacks`` (called at the start and the end of each collection)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1


gc_clock = GcClock()


class Req(BaseModel):
    x: int


if MODE == "gibbs":
    hub = Hub(port=int(os.environ.get("GIBBS_BENCH_HUB_PORT", "0")))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.serve(Echo, gibbs_workers=WORKERS, gibbs_model="trivial")
        hub.serve(FakeGPU, True, gibbs_workers=WORKERS, gibbs_model="batched", gibbs_batch_size=BATCH)
        await hub.wait_for_workers(WORKERS, timeout=60, model="trivial")
        await hub.wait_for_workers(WORKERS, timeout=60, model="batched")
        yield
        await hub.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/trivial")
    async def trivial(req: Req) -> dict[str, Any]:
        return {"y": await hub.request(req.x, gibbs_model="trivial")}

    @app.post("/batched")
    async def batched(req: Req) -> dict[str, Any]:
        return {"y": await hub.request(req.x, gibbs_model="batched")}

elif MODE == "floor":
    from .baselines import AsyncioFloor

    floor = AsyncioFloor()

    @contextlib.asynccontextmanager
    async def floor_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with floor:
            yield

    app = FastAPI(lifespan=floor_lifespan)

    @app.post("/trivial")
    async def trivial(req: Req) -> dict[str, Any]:
        # The asyncio floor: the request pickled to an echo process over a
        # socketpair the event loop reads itself (add_reader), no thread.
        return {"y": await floor.call(req.x)}

    @app.post("/batched")
    async def batched(req: Req) -> dict[str, Any]:
        return {"y": await floor.call(req.x)}

elif MODE in ("inprocess", "suspend"):
    app = FastAPI()
    echo = Echo()
    gpu = FakeGPU(False)
    gpu_lock = threading.Lock()
    suspend = MODE == "suspend"

    @app.post("/trivial")
    async def trivial(req: Req) -> dict[str, Any]:
        if suspend:
            # What any endpoint that awaits I/O pays beside the I/O: the
            # coroutine stack of every middleware suspends and resumes.
            await asyncio.sleep(0)
        return {"y": echo(req.x)}

    @app.post("/batched")
    def batched(req: Req) -> dict[str, Any]:  # a plain def: FastAPI runs it in its thread pool
        with gpu_lock:
            return {"y": gpu(req.x)}

else:  # pragma: no cover - a typo in the benchmark's environment
    raise SystemExit(f"GIBBS_BENCH_MODE must be gibbs, floor, inprocess or suspend, not {MODE!r}")


@app.get("/gc")
def gc_done() -> dict[str, Any]:
    return {"collections": gc_clock.collections, "seconds": gc_clock.seconds, "frozen": gc.get_freeze_count()}


if GC_FREEZE:
    _started = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def _frozen(app: FastAPI) -> AsyncIterator[Any]:
        async with _started(app) as state:
            # Everything made at startup (modules, the app, the hub) moves
            # to the permanent generation: a full collection no longer
            # walks it.
            gc.collect()
            gc.freeze()
            yield state

    app.router.lifespan_context = _frozen
