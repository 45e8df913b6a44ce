"""The walkthrough's app with the operations a production service needs: a
pool of workers the hub supervises (``hub.serve``), ``/healthz`` and
``/readyz`` for the orchestrator, ``/metrics`` for Prometheus.

    python examples/operations_app.py          # http://localhost:8000/docs
    python -m gibbs status                     # in another terminal: a live view
"""

import contextlib
import os
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from gibbs import Hub


class MyAwesomeModel:
    def __init__(self, wait_time=0.25):
        super().__init__()
        self.w = wait_time

    def __call__(self, x):
        time.sleep(self.w)
        return x**2


APP_PORT = int(os.environ.get("APP_PORT", 8000))
HUB_PORT = int(os.environ.get("HUB_PORT", 5019))
hub = Hub(port=HUB_PORT)


@contextlib.asynccontextmanager
async def lifespan(app):
    # 4 workers, replaced if they die; on a GPU machine add gibbs_devices="auto"
    pool = hub.serve(MyAwesomeModel, 0.25, gibbs_workers=4)
    yield
    pool.close()
    await hub.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/request")
async def simple_request(x: int):
    return {"result": await hub.request(x)}


@app.get("/healthz")
async def healthz():
    # Alive: the hub runs (a worker may still be loading).
    health = hub.health()
    return JSONResponse(health, status_code=503 if hub.closed else 200)


@app.get("/readyz")
async def readyz():
    # Ready: every model has a worker that can serve now.
    health = hub.health()
    return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)


@app.get("/metrics")
async def metrics():
    return PlainTextResponse(hub.prometheus(), media_type=Hub.PROMETHEUS_CONTENT_TYPE)


if __name__ == "__main__":
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=APP_PORT)
