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
device runs it).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, AsyncIterator

from fastapi import FastAPI
from pydantic import BaseModel

from gibbs import Hub

from .models import Echo, FakeGPU

MODE = os.environ.get("GIBBS_BENCH_MODE", "gibbs")
WORKERS = int(os.environ.get("GIBBS_BENCH_WORKERS", "2"))
BATCH = int(os.environ.get("GIBBS_BENCH_BATCH", "32"))


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

elif MODE == "inprocess":
    app = FastAPI()
    echo = Echo()
    gpu = FakeGPU(False)
    gpu_lock = threading.Lock()

    @app.post("/trivial")
    async def trivial(req: Req) -> dict[str, Any]:
        return {"y": echo(req.x)}

    @app.post("/batched")
    def batched(req: Req) -> dict[str, Any]:  # a plain def: FastAPI runs it in its thread pool
        with gpu_lock:
            return {"y": gpu(req.x)}

else:  # pragma: no cover - a typo in the benchmark's environment
    raise SystemExit(f"GIBBS_BENCH_MODE must be gibbs or inprocess, not {MODE!r}")
