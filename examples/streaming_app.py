"""Stream a model's tokens to HTTP clients as server-sent events.

The model's ``__call__`` is a generator: gibbs sends each token to the app as
the worker yields it, and the app forwards it to the client at once, so the
first words show up after one token's latency, not after the whole reply.
A client that goes away stops the stream: the worker closes the generator
(its ``finally`` runs) and is free for the next request.

Run it with ``python examples/streaming_app.py``, then::

    curl -N 'http://localhost:8000/stream?prompt=hello'

Settings (environment): ``PORT`` (default 8000), ``HOST`` (default 127.0.0.1),
``GIBBS_PORT`` (the hub's port, default 5019), ``WORKERS`` (default 2),
``TOKEN_DELAY`` (seconds per token, default 0.05), and ``STREAM_LOG``: a file
where each stream's end is logged, one line per stream (``done <n>`` or
``closed after <n>`` when its client left early).
"""

import json
import os
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from gibbs import Hub, Worker

REPLY = (
    "Gibbs streams every token to the caller as soon as the worker yields it, "
    "so a chat client can show the first words right away."
)


class TokenModel:
    """A toy language model: yields the words of its reply one at a time."""

    def __init__(self, delay=0.05):
        self.delay = delay
        self.log = os.environ.get("STREAM_LOG")

    def __call__(self, prompt, repeat=1):
        sent = 0
        finished = False
        try:
            for _ in range(repeat):
                for word in f"You said: {prompt}. {REPLY}".split():
                    time.sleep(self.delay)  # the "inference" of one token
                    yield word + " "
                    sent += 1
            finished = True
        finally:
            # Runs when the reply is complete, and also when the client left
            # early: gibbs closes the generator on the worker.
            if self.log:
                with open(self.log, "a") as f:
                    f.write(f"done {sent}\n" if finished else f"closed after {sent}\n")


app = FastAPI()
hub = Hub(port=int(os.environ.get("GIBBS_PORT", "5019")))


async def server_sent_events(prompt, repeat):
    tokens = hub.stream(prompt, repeat)
    try:
        async for token in tokens:
            yield f"data: {json.dumps({'token': token})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # The client may have left: stop the stream (the worker closes the generator).
        await tokens.aclose()


@app.get("/stream")
async def stream(prompt: str, repeat: int = 1):
    return StreamingResponse(
        server_sent_events(prompt, repeat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get("/stats")
async def stats():
    return hub.statistics()


if __name__ == "__main__":
    # Start the workers (in other processes), then serve the app.
    delay = float(os.environ.get("TOKEN_DELAY", "0.05"))
    workers = [Worker(TokenModel, delay, gibbs_port=hub.port) for _ in range(int(os.environ.get("WORKERS", "2")))]
    for w in workers:
        w.start()

    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")))
