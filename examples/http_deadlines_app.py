"""Deadlines over HTTP: overload is a 503 with Retry-After, a passed
deadline a 504, and a client that disconnects cancels its call.

``gibbs.asgi.install(app)`` does all three for a FastAPI (or Starlette) app;
``gibbs.asgi.CancelOnDisconnect`` is the plain ASGI middleware for others.

Run it with ``python examples/http_deadlines_app.py``, then::

    curl -i 'http://localhost:8000/work?seconds=0.1'               # 200
    curl -i 'http://localhost:8000/work?seconds=5&timeout=0.5'     # 504: the model took too long
    curl -m 1 'http://localhost:8000/work?seconds=30'              # curl gives up: the call is cancelled

Settings (environment): ``PORT`` (default 8000), ``HOST`` (default
0.0.0.0), ``GIBBS_PORT`` (the hub's port, default 5019), ``WORKERS``
(default 1), and ``CALL_LOG``: a file where the model notes each call's
``start``, ``end`` or ``cancelled``.
"""

import asyncio
import os

import uvicorn
from fastapi import FastAPI

import gibbs.asgi
from gibbs import Hub, Worker


class SlowModel:
    """An async model (a call to another service, say): a caller that goes
    away cancels it here, at its current ``await``."""

    def __init__(self):
        self.log = os.environ.get("CALL_LOG")

    def note(self, what):
        if self.log:
            with open(self.log, "a") as f:
                f.write(what + "\n")

    async def __call__(self, seconds):
        self.note("start")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.note("cancelled")
            raise
        self.note("end")
        return {"slept": seconds}


app = FastAPI()
gibbs.asgi.install(app)  # 503 + Retry-After, 504, cancel on disconnect
hub = Hub(port=int(os.environ.get("GIBBS_PORT", "5019")))


@app.get("/work")
async def work(seconds: float, timeout: float = 10.0):
    return await hub.request(seconds, gibbs_timeout=timeout)


@app.get("/stats")
async def stats():
    return hub.statistics()


if __name__ == "__main__":
    for _ in range(int(os.environ.get("WORKERS", "1"))):
        Worker(SlowModel, gibbs_port=hub.port).start()
    uvicorn.run(app, host=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "8000")))
