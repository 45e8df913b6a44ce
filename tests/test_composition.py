"""Models that call models: a plain Hub() inside a worker reaches the hub
that worker serves, and a call made while serving one inherits what is left
of its deadline, and its cancellation."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

import pytest
from conftest import InThreadServer, free_port, run, wait_until

from gibbs import DeadlineExceededError, Hub, UserCodeException


def _read(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


@pytest.mark.timeout(120)
def test_nested_calls_under_concurrency(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    from gibbs_test_models import AsyncCalls, CallsSquare, Square

    hub = make_hub()
    make_workers(hub, Square, 2, gibbs_model="square")
    make_workers(hub, CallsSquare, 2, gibbs_model="sync-caller")
    make_workers(hub, AsyncCalls, 1, gibbs_model="async-caller", gibbs_concurrency=8)
    run(hub.wait_for_workers(5, timeout=60))

    async def main() -> tuple[list[Any], list[Any]]:
        a = asyncio.gather(*(hub.request(i, gibbs_model="sync-caller") for i in range(20)))
        b = asyncio.gather(*(hub.request(i, gibbs_model="async-caller") for i in range(20)))
        return await a, await b

    sync_answers, async_answers = run(main(), timeout=100)
    assert sync_answers == [i * i + 1 for i in range(20)]
    assert async_answers == [i * i for i in range(20)]


@pytest.mark.timeout(120)
def test_the_deadline_is_carried_down(make_hub: Callable[..., Hub], make_workers: Any, tmp_path: Any) -> None:
    """The outer call has 0.5 s; the inner model would sleep 10 s: it sees
    CancelledError close to the outer deadline, not 10 s later."""
    from gibbs_test_models import AsyncCalls, AsyncSlowNotes

    log = str(tmp_path / "log")
    hub = make_hub()
    make_workers(hub, AsyncSlowNotes, 1, log, gibbs_model="slow", gibbs_concurrency=4)
    make_workers(hub, AsyncCalls, 1, "slow", gibbs_model="outer", gibbs_concurrency=4)
    run(hub.wait_for_workers(2, timeout=60))
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        run(hub.request(10.0, gibbs_model="outer", gibbs_timeout=0.5), timeout=30)
    assert time.monotonic() - started < 5
    assert wait_until(lambda: any(x.startswith("inner cancelled") for x in _read(log)), timeout=10), _read(log)
    inner_at = float(next(x for x in _read(log) if x.startswith("inner")).split()[-1])
    assert inner_at - started < 3.0, f"the inner call ran {inner_at - started:.2f} s past a 0.5 s deadline"


@pytest.mark.timeout(120)
def test_cancellation_is_carried_down(make_hub: Callable[..., Hub], make_workers: Any, tmp_path: Any) -> None:
    from gibbs_test_models import AsyncCalls, AsyncSlowNotes

    log = str(tmp_path / "log")
    hub = make_hub()
    make_workers(hub, AsyncSlowNotes, 1, log, gibbs_model="slow", gibbs_concurrency=4)
    make_workers(hub, AsyncCalls, 1, "slow", log, gibbs_model="outer", gibbs_concurrency=4)
    run(hub.wait_for_workers(2, timeout=60))

    async def main() -> float:
        task = asyncio.ensure_future(hub.request(10.0, gibbs_model="outer"))
        await asyncio.sleep(1.0)  # running, and its inner call too
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at

    cancelled_at = run(main(), timeout=60)
    assert wait_until(lambda: len(_read(log)) >= 2, timeout=10), _read(log)
    inner_at = float(next(x for x in _read(log) if x.startswith("inner")).split()[-1])
    assert inner_at - cancelled_at < 3.0
    assert any(x.startswith("outer cancelled") for x in _read(log))


@pytest.mark.timeout(120)
def test_a_model_calling_itself_with_no_worker_free_fails_saying_so(
    make_hub: Callable[..., Hub], make_workers: Any
) -> None:
    """One worker of a model that calls itself: the nested call can never be
    served. It fails at once (no deadline needed), saying why, and the
    caller gets the model's error; with a second worker it is served."""
    from gibbs_test_models import CallsItself

    hub = make_hub()
    make_workers(hub, CallsItself, 1, gibbs_model="self")
    run(hub.wait_for_workers(1, timeout=60))
    assert run(hub.request(0, gibbs_model="self"), timeout=30) == 0  # no nested call: fine
    started = time.monotonic()
    with pytest.raises(UserCodeException) as info:
        run(hub.request(1, gibbs_model="self"), timeout=30)  # no deadline: must not hang
    assert time.monotonic() - started < 10
    assert info.value.exc_type == "NoWorkersError"
    assert "waiting on a call it made to 'self' itself" in info.value.exc_message
    make_workers(hub, CallsItself, 1, gibbs_model="self")
    run(hub.wait_for_workers(2, timeout=60, model="self"))
    assert run(hub.request(1, gibbs_model="self"), timeout=30) == 1  # the other worker serves it
    with pytest.raises(UserCodeException, match="itself"):
        run(hub.request(2, gibbs_model="self"), timeout=30)  # two deep, two workers: both wait


def test_a_hub_made_outside_a_worker_is_its_own() -> None:
    import gibbs._context

    assert gibbs._context.serving is None
    hub = Hub(port=0)
    try:
        hub.start()
        assert hub.role == "router"
    finally:
        hub.close()



@pytest.fixture
def retrieval_app(monkeypatch: pytest.MonkeyPatch) -> Any:
    """examples/retrieval_app.py under a real uvicorn (its lifespan starts
    the three pools), on free ports."""
    import importlib
    import sys

    pytest.importorskip("uvicorn")
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    monkeypatch.setenv("GIBBS_PORT", str(free_port()))
    monkeypatch.syspath_prepend(examples)
    sys.modules.pop("retrieval_app", None)
    mod = importlib.import_module("retrieval_app")
    server = InThreadServer(mod.app)
    try:
        mod.hub.wait_for_workers_sync(3, timeout=60)
        yield server.url
    finally:
        server.stop()
        mod.hub.close(grace=0)
        sys.modules.pop("retrieval_app", None)


@pytest.mark.timeout(120)
def test_retrieval_pipeline_over_http(retrieval_app: str) -> None:
    import concurrent.futures

    import requests

    first = requests.get(f"{retrieval_app}/search", params={"q": "a cat on a mat"}, timeout=30)
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert len(results) == 3 and results[0]["document"] == "the cat sat on the mat"
    queries = ["bake bread", "cats sleeping", "the market on monday", "dogs in a garden"] * 4
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda q: requests.get(f"{retrieval_app}/search", params={"q": q}, timeout=30), queries))
    assert all(a.status_code == 200 for a in answers)
    top = {q: a.json()["results"][0]["document"] for q, a in zip(queries, answers)}
    assert "bread" in top["bake bread"] and "market" in top["the market on monday"]
    assert "garden" in top["dogs in a garden"]


def test_a_worker_run_in_this_process_leaves_its_hubs_alone() -> None:
    """Worker.run() here (it raises: the constructor fails) must not leave
    this process's later Hub() pointed at that worker's hub."""
    from gibbs_test_models import BadInit

    import gibbs._context
    from gibbs import Worker

    with pytest.raises(RuntimeError):
        Worker(BadInit, gibbs_port=1).run()
    assert gibbs._context.serving is None
    hub = Hub(port=0)
    try:
        hub.start()
        assert hub.role == "router"
    finally:
        hub.close()
