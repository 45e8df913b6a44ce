"""gibbs errors as HTTP statuses, in a FastAPI app.

Without handlers, every exception that ``await hub.request(...)`` raises
becomes a bare 500. A client (or a load balancer) can act on more: retry
elsewhere on 503, give up on 504, report a bug on 500. This app maps each
gibbs error to the status that says what happened:

=============================  ======  =========================================
exception                      status  why
=============================  ======  =========================================
``QueueFullError``             503     overloaded: ``Retry-After`` says when to retry
``NoWorkersError``             503     no worker of the model is there (the body says why)
``HubClosedError``             503     the service is shutting down
``asyncio.TimeoutError``       504     no answer within ``gibbs_timeout``
``WorkerDiedError``            502     the workers running it died (``max_attempts`` times)
``UserCodeException``          500     the model raised (its type in the body)
``SerializationError``         500     an argument or result could not be pickled
=============================  ======  =========================================

Run: ``python examples/errors_app.py`` (``HOST``, ``PORT``, ``GIBBS_PORT``),
then ``curl 'localhost:8000/square?x=3'`` (200), ``?x=-1`` (500, the model
raised), ``/slow?seconds=5`` (504 after 1 s).
"""

import asyncio
import os
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gibbs import (
    Hub,
    HubClosedError,
    NoWorkersError,
    QueueFullError,
    SerializationError,
    UserCodeException,
    Worker,
    WorkerDiedError,
)

APP_PORT = int(os.environ.get("PORT", "8000"))


class Model:
    def __call__(self, x: float, sleep: float = 0.0) -> float:
        if sleep:
            time.sleep(sleep)
        if x < 0:
            raise ValueError(f"x must be >= 0, got {x}")
        return x * x


app = FastAPI()
hub = Hub(max_queued=int(os.environ.get("MAX_QUEUED", "64")))


def _error(status: int, exc: BaseException, **headers: str) -> JSONResponse:
    return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers)


@app.exception_handler(QueueFullError)
async def overloaded(request: Request, exc: QueueFullError) -> JSONResponse:
    return _error(503, exc, **{"Retry-After": "1"})


@app.exception_handler(NoWorkersError)
async def no_workers(request: Request, exc: NoWorkersError) -> JSONResponse:
    return _error(503, exc, **{"Retry-After": "5"})


@app.exception_handler(HubClosedError)
async def closing(request: Request, exc: HubClosedError) -> JSONResponse:
    return _error(503, exc)


@app.exception_handler(asyncio.TimeoutError)
async def timed_out(request: Request, exc: asyncio.TimeoutError) -> JSONResponse:
    return _error(504, exc)


@app.exception_handler(WorkerDiedError)
async def worker_died(request: Request, exc: WorkerDiedError) -> JSONResponse:
    return _error(502, exc)


@app.exception_handler(UserCodeException)
async def model_raised(request: Request, exc: UserCodeException) -> JSONResponse:
    return JSONResponse({"error": exc.exc_type, "detail": exc.exc_message}, status_code=500)


@app.exception_handler(SerializationError)
async def not_picklable(request: Request, exc: SerializationError) -> JSONResponse:
    return _error(500, exc)


@app.get("/square")
async def square(x: float) -> dict:
    return {"result": await hub.request(x, gibbs_timeout=10)}


@app.get("/slow")
async def slow(seconds: float) -> dict:
    return {"result": await hub.request(1.0, sleep=seconds, gibbs_timeout=1)}


if __name__ == "__main__":
    for _ in range(int(os.environ.get("WORKERS", "2"))):
        Worker(Model, gibbs_port=hub.port).start()
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=APP_PORT)
