"""Models that call models: a retrieval pipeline behind one FastAPI endpoint.

Three models, each with its own workers, all served by one hub:

* ``tokenize``: text -> tokens (a plain model);
* ``embed``: a batch of texts -> vectors (batched, ``gibbs_batch_size=16``);
  it tokenizes each text of its batch through the hub (a sub-call from a
  batched model);
* ``rerank``: query -> the best documents (an async model, 8 calls at once);
  it embeds the query and, once, the documents, through the hub.

Inside a worker a plain ``Hub()`` is a client of the hub that worker
serves: the models name no address. A call made while serving one inherits
what is left of its deadline, and its cancellation: the endpoint's
``gibbs_timeout=2`` bounds the whole chain.

Run: ``python examples/retrieval_app.py`` (``HOST``, ``PORT``, ``GIBBS_PORT``),
then ``curl 'localhost:8000/search?q=a+cat+on+a+mat'``.
"""

import asyncio
import contextlib
import hashlib
import math
import os

import uvicorn
from fastapi import FastAPI

from gibbs import Hub

APP_PORT = int(os.environ.get("PORT", "8000"))
DIM = 64
DOCUMENTS = [
    "the cat sat on the mat",
    "dogs chase cats in the garden",
    "a recipe for bread with flour water and salt",
    "the stock market fell on monday",
    "cats sleep most of the day",
    "how to bake sourdough bread at home",
]


class Tokenize:
    def __call__(self, text: str) -> list:
        return [t for t in "".join(c if c.isalnum() else " " for c in text.lower()).split() if t]


class Embed:
    """Batched: a list of texts in, a list of unit vectors out (hashed bag of words)."""

    def __init__(self) -> None:
        self.hub = Hub()  # inside the worker: a client of the hub it serves

    def __call__(self, texts: list) -> list:
        pending = [self.hub.submit(t, gibbs_model="tokenize") for t in texts]  # one batch, its sub-calls at once
        return [self._vector(p.result()) for p in pending]

    @staticmethod
    def _vector(tokens: list) -> list:
        v = [0.0] * DIM
        for t in tokens:
            stem = t[:-1] if t.endswith("s") and len(t) > 3 else t
            v[int(hashlib.md5(stem.encode()).hexdigest(), 16) % DIM] += 1.0
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        return [x / norm for x in v]


class Rerank:
    """Async: the query's vector against the documents', best first."""

    def __init__(self, top: int = 3) -> None:
        self.hub = Hub()
        self.top = top
        self.docs: list = []

    async def __call__(self, query: str) -> list:
        if not self.docs:
            self.docs = await asyncio.gather(*(self.hub.request(d, gibbs_model="embed") for d in DOCUMENTS))
        q = await self.hub.request(query, gibbs_model="embed")
        scored = sorted(((sum(a * b for a, b in zip(q, d)), text) for d, text in zip(self.docs, DOCUMENTS)), reverse=True)
        return [{"document": text, "score": round(score, 4)} for score, text in scored[: self.top]]


hub = Hub()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    pools = [
        hub.serve(Tokenize, gibbs_workers=1, gibbs_model="tokenize"),
        hub.serve(Embed, gibbs_workers=1, gibbs_model="embed", gibbs_batch_size=16),
        hub.serve(Rerank, gibbs_workers=1, gibbs_model="rerank", gibbs_concurrency=8),
    ]
    yield
    for pool in pools:
        pool.close()
    await hub.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/search")
async def search(q: str) -> dict:
    return {"query": q, "results": await hub.request(q, gibbs_model="rerank", gibbs_timeout=2.0)}


if __name__ == "__main__":
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=APP_PORT)
