import os
import time

import uvicorn
from fastapi import FastAPI

from gibbs import Hub, Worker


class BatchedModel:
    """A toy batched model: one call takes a list of inputs and returns a list
    of as many results. A call costs 2 ms plus 0.05 ms per input, so one call
    of 32 inputs is far cheaper than 32 calls of one (like a GPU model)."""

    def __call__(self, xs):
        time.sleep(0.002 + 0.00005 * len(xs))
        return [{"result": x**2, "batch_size": len(xs)} for x in xs]


# Instanciate FastAPI app and instanciate the Hub
APP_PORT = int(os.environ.get("APP_PORT", 8000))
HUB_PORT = int(os.environ.get("HUB_PORT", 5019))
app = FastAPI()
hub = Hub(port=HUB_PORT)


# Each request still sends one input: the hub groups the requests that wait
# while a worker computes, and the worker calls the model once per group
@app.get("/request")
async def simple_request(x: int):
    return await hub.request(x)


@app.get("/models")
async def models():
    return hub.models()


if __name__ == "__main__":
    # Start the workers (in other processes): batches of up to 32 requests
    workers = [Worker(BatchedModel, gibbs_batch_size=32, gibbs_port=HUB_PORT) for _ in range(2)]
    for w in workers:
        w.start()

    # Run the app
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=APP_PORT)
