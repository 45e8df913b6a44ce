"""Several named models on one hub, and adaptive batching, through the public
API: ``Worker(..., gibbs_model=..., gibbs_batch_size=..., gibbs_batch_wait=...)``,
``hub.request(..., gibbs_model=...)``, ``hub.submit(..., gibbs_model=...)``,
``hub.models()``, ``hub.statistics()["models"]``, and the worker command's
``--model``/``--batch-size``.

Timing bounds here are deliberately loose (2-core, noisy machines): a test
asserts that something happens, or a lower bound on a wait it asked for, never
a tight upper bound.
"""

from __future__ import annotations

import ast
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Iterator

import pytest
from conftest import run, wait_until
from gibbs_test_models import (
    BatchDieOnce,
    BatchModel,
    Echo,
    Identity,
    ImageTag,
    Sleep,
    Square,
    TextTag,
)

from gibbs import Hub, UserCodeException, WorkerDiedError, WorkerRefusedError
from gibbs.transport import AUTHKEY_ENV
from gibbs.worker import REFUSED_EXIT

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
KEY = "models-batching-test-key"


# ------------------------------------------------------------------ helpers


def pids_of(hub: Hub, model: str) -> set[int]:
    return {w["pid"] for w in hub.workers() if w["model"] == model}


def read_batches(path: Any) -> list[tuple[int, list]]:
    """The batches a BatchModel logged: (pid, xs) per call, in order."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        pid, _, xs = line.partition(" ")
        out.append((int(pid), ast.literal_eval(xs)))
    return out


async def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def start_blocked(hub: Hub, model: str, seconds: float) -> "asyncio.Future[Any]":
    """Occupy the model's only worker with a lone ("sleep", seconds) batch, and
    return once it runs: requests sent meanwhile accumulate in the queue."""
    blocker = asyncio.ensure_future(hub.request(("sleep", seconds), gibbs_model=model))
    await wait_for(lambda: hub.models().get(model, {}).get("busy", 0) >= 1, what=f"model {model!r} busy")
    return blocker


def gibbs_env(key: str) -> dict[str, str]:
    env = dict(os.environ)
    env[AUTHKEY_ENV] = key
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    return env


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@pytest.fixture
def worker_command() -> Iterator[Any]:
    """``python -m gibbs worker ...`` in its own process group (key: KEY);
    the whole group is killed and reaped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gibbs", "worker", *args],
            env=gibbs_env(KEY),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(proc.pid), "processes of the worker command were left running"


# ------------------------------------------------------------------ several models: routing


def test_routing_never_mixes_two_models(hub, make_workers) -> None:
    make_workers(hub, TextTag, 2, 0.002, gibbs_model="text")
    make_workers(hub, ImageTag, 2, 0.002, gibbs_model="image")
    hub.wait_for_workers_sync(2, timeout=60, model="text")
    hub.wait_for_workers_sync(2, timeout=60, model="image")
    text_pids, image_pids = pids_of(hub, "text"), pids_of(hub, "image")
    assert len(text_pids) == 2 and len(image_pids) == 2 and not text_pids & image_pids
    rng = random.Random(1234)
    plan = [(i, rng.choice(["text", "image"])) for i in range(300)]

    async def main() -> list[Any]:
        return await asyncio.gather(*(hub.request(i, gibbs_model=m) for i, m in plan))

    answers = run(main(), timeout=90)
    for (i, model), (tag, pid, x) in zip(plan, answers):
        assert (tag, x) == (model, i), f"request {i} for {model!r} was answered by {tag!r} with {x!r}"
        assert pid in (text_pids if model == "text" else image_pids), (i, model, pid)

    # The same from plain threads, with submit(), at the same time as asyncio callers.
    futures: list[tuple[int, str, Any]] = []

    def submitter(offset: int) -> None:
        for i in range(offset, offset + 50):
            model = "text" if i % 3 else "image"
            futures.append((i, model, hub.submit(i, gibbs_model=model)))

    threads = [threading.Thread(target=submitter, args=(k * 1000,)) for k in range(3)]
    for t in threads:
        t.start()

    async def more() -> list[Any]:
        return await asyncio.gather(*(hub.request(-i, gibbs_model="image") for i in range(1, 60)))

    image_answers = run(more(), timeout=90)
    for t in threads:
        t.join(30)
    assert [a[0] for a in image_answers] == ["image"] * 59
    assert [a[2] for a in image_answers] == [-i for i in range(1, 60)]
    assert {a[1] for a in image_answers} <= image_pids
    assert len(futures) == 150
    for i, model, fut in futures:
        tag, pid, x = fut.result(timeout=60)
        assert (tag, x) == (model, i)
        assert pid in (text_pids if model == "text" else image_pids)
    # Nothing was sent to the default model, which nobody serves.
    assert hub.statistics()["queued"] == 0
    assert hub.models().get("default", {}).get("workers", 0) == 0


def test_routing_between_a_batched_and_an_unbatched_model(hub, make_workers) -> None:
    make_workers(hub, TextTag, 1, gibbs_model="text")
    make_workers(hub, BatchModel, 2, 0.01, gibbs_model="batch", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="text")
    hub.wait_for_workers_sync(2, timeout=60, model="batch")
    text_pids, batch_pids = pids_of(hub, "text"), pids_of(hub, "batch")

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(hub.request(i, gibbs_model="batch" if i % 2 else "text") for i in range(200))
        )

    for i, answer in enumerate(run(main(), timeout=90)):
        if i % 2:
            x, n, pos, _, pid = answer
            assert x == i and 1 <= n <= 8 and 0 <= pos < n and pid in batch_pids, answer
        else:
            assert answer[0] == "text" and answer[2] == i and answer[1] in text_pids, answer


# ------------------------------------------------------------------ several models: refusal


def test_a_worker_of_another_class_under_a_taken_name_is_refused(hub, make_workers) -> None:
    make_workers(hub, Square, 1, gibbs_model="text")
    hub.wait_for_workers_sync(1, timeout=60, model="text")
    before = hub.statistics()["handshake_failures"]
    (intruder,) = make_workers(hub, Echo, 1, gibbs_model="text")
    assert wait_until(lambda: intruder.exitcode is not None, timeout=60), "the refused worker kept running"
    assert intruder.exitcode == REFUSED_EXIT == 78
    stats = hub.statistics()
    assert stats["handshake_failures"] >= before + 1
    models = hub.models()
    assert models["text"]["class"] == "gibbs_test_models:Square"
    assert models["text"]["workers"] == 1
    assert stats["models"]["text"]["workers"] == 1
    # The first model is still served, by its own class.
    assert run(hub.request(7, gibbs_model="text")) == 49
    # The same class is welcome under the name, and another class under another name.
    make_workers(hub, Square, 1, gibbs_model="text")
    make_workers(hub, Echo, 1, gibbs_model="echo")
    hub.wait_for_workers_sync(2, timeout=60, model="text")
    hub.wait_for_workers_sync(1, timeout=60, model="echo")
    assert run(hub.request(3, gibbs_model="echo"))["args"] == (3,)
    assert run(hub.request(3, gibbs_model="text")) == 9


def test_a_refused_worker_run_in_process_raises_worker_refused_error(make_hub, make_workers, tmp_path) -> None:
    hub = make_hub(authkey=KEY)
    make_workers(hub, Square, 1, gibbs_model="text", gibbs_authkey=KEY)
    hub.wait_for_workers_sync(1, timeout=60, model="text")
    script = tmp_path / "refused.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {TESTS_DIR!r})
            from gibbs import Worker, WorkerRefusedError
            from gibbs_test_models import Echo
            try:
                Worker(Echo, gibbs_port={hub.port}, gibbs_host="127.0.0.1", gibbs_heartbeat_interval=0.2,
                       gibbs_authkey={KEY!r}, gibbs_model="text").run()
            except WorkerRefusedError as exc:
                print("REFUSED", exc, flush=True)
                sys.exit(5)
            print("run returned", flush=True)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, (proc.returncode, proc.stdout, proc.stderr)
    assert "REFUSED" in proc.stdout
    assert "text" in proc.stdout and "Square" in proc.stdout, proc.stdout
    assert issubclass(WorkerRefusedError, Exception)
    assert run(hub.request(5, gibbs_model="text")) == 25


def test_a_name_left_by_every_worker_may_be_taken_by_another_class(hub, make_workers) -> None:
    (first,) = make_workers(hub, Square, 1, gibbs_model="m")
    hub.wait_for_workers_sync(1, timeout=60, model="m")
    first.kill()
    first.join(10)
    assert wait_until(lambda: hub.models()["m"]["workers"] == 0, timeout=30)
    make_workers(hub, Identity, 1, gibbs_model="m")
    hub.wait_for_workers_sync(1, timeout=60, model="m")
    assert hub.models()["m"]["class"] == "gibbs_test_models:Identity"
    assert run(hub.request(6, gibbs_model="m")) == 6


def test_worker_command_refused_for_a_taken_name_exits_with_a_clear_message(make_hub, make_workers) -> None:
    hub = make_hub(authkey=KEY)
    make_workers(hub, Square, 1, gibbs_model="text", gibbs_authkey=KEY)
    hub.wait_for_workers_sync(1, timeout=60, model="text")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:Echo", "--hub", f"127.0.0.1:{hub.port}",
         "--model", "text", "--heartbeat-interval", "0.2"],
        env=gibbs_env(KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"the refused worker command did not stop within 60 s:\n{err}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, (proc.returncode, err)
    assert elapsed < 60
    assert "Traceback" not in err, err
    assert "refused" in err, err
    assert "'text'" in err, err
    assert "gibbs_test_models:Square" in err and "gibbs_test_models:Echo" in err, err
    assert "restarting" not in err, err  # a refusal is not retried
    assert hub.statistics()["handshake_failures"] >= 1
    assert hub.models()["text"]["workers"] == 1
    assert run(hub.request(4, gibbs_model="text")) == 16
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(proc.pid), "a worker process outlived the refused command"


def test_worker_command_serves_a_named_batched_model(make_hub, worker_command) -> None:
    hub = make_hub(authkey=KEY)
    proc = worker_command("gibbs_test_models:BatchModel", "--hub", f"127.0.0.1:{hub.port}", "--model", "vec",
                          "--batch-size", "4", "--heartbeat-interval", "0.2", "0.05")

    async def main() -> None:
        await hub.wait_for_workers(1, timeout=60, model="vec")
        info = hub.models()["vec"]
        assert info["batch_size"] == 4 and info["class"] == "gibbs_test_models:BatchModel"
        assert hub.workers()[0]["model"] == "vec" and hub.workers()[0]["batch_size"] == 4
        answers = await asyncio.gather(*(hub.request(i, gibbs_model="vec") for i in range(13)))
        assert [a[0] for a in answers] == list(range(13))
        assert all(1 <= a[1] <= 4 for a in answers)
        assert max(a[1] for a in answers) > 1
        with pytest.raises(TypeError):
            await hub.request(1, 2, gibbs_model="vec")

    run(main(), timeout=90)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


# ------------------------------------------------------------------ several models: waiting, views


def test_a_request_for_a_model_nobody_serves_waits_for_its_first_worker(hub, make_workers) -> None:
    make_workers(hub, Square, 1)  # "default" only
    hub.wait_for_workers_sync(1, timeout=60)

    async def main() -> None:
        late = asyncio.ensure_future(hub.request(5, gibbs_model="late"))
        await asyncio.sleep(0.5)
        assert not late.done()
        models = hub.models()
        assert models["late"]["queued"] == 1 and models["late"]["workers"] == 0
        assert hub.statistics()["models"]["late"]["queued"] == 1
        assert await hub.request(3) == 9  # the default model is not held up
        # A bounded wait gives up, and leaves nothing queued.
        with pytest.raises(asyncio.TimeoutError):
            await hub.request(6, gibbs_model="late", gibbs_timeout=0.3)
        assert hub.models()["late"]["queued"] == 1
        make_workers(hub, TextTag, 1, gibbs_model="late")
        tag, pid, x = await asyncio.wait_for(late, 60)
        assert (tag, x) == ("text", 5) and pid in pids_of(hub, "late")
        assert hub.models()["late"]["queued"] == 0

    run(main(), timeout=90)


def test_models_statistics_and_repr(hub, make_workers) -> None:
    assert "default:" not in repr(hub)
    make_workers(hub, Square, 1)
    hub.wait_for_workers_sync(1, timeout=60)
    assert "text:" not in repr(hub) and "default:" not in repr(hub)  # only "default": no per-model list
    make_workers(hub, Sleep, 1, gibbs_model="text")
    make_workers(hub, BatchModel, 2, 0.01, gibbs_model="image", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="text")
    hub.wait_for_workers_sync(2, timeout=60, model="image")
    models = hub.models()
    assert set(models) >= {"default", "text", "image"}, models
    for name in ("default", "text", "image"):
        assert {"class", "workers", "busy", "queued", "in_flight", "batch_size"} <= set(models[name]), models[name]
    assert models["default"]["class"] == "gibbs_test_models:Square", models
    assert models["text"]["class"] == "gibbs_test_models:Sleep", models
    assert models["image"]["class"] == "gibbs_test_models:BatchModel", models
    assert (models["default"]["workers"], models["text"]["workers"], models["image"]["workers"]) == (1, 1, 2), models
    assert (models["text"]["batch_size"], models["image"]["batch_size"]) == (1, 8), models
    assert all(models[n]["queued"] == 0 and models[n]["busy"] == 0 for n in models), models
    stats_models = hub.statistics()["models"]
    assert stats_models == models, (stats_models, models)
    workers = hub.workers()
    assert {w["model"] for w in workers} == {"default", "text", "image"}, workers
    assert sorted(w["batch_size"] for w in workers) == [1, 1, 8, 8], workers

    async def main() -> None:
        # The first call holds the only "text" worker long enough (3 s) for
        # the checks below to see the other two queued behind it.
        calls = [asyncio.ensure_future(hub.request(3.0 if i == 0 else 0.01, i, gibbs_model="text")) for i in range(3)]
        await wait_for(lambda: hub.models()["text"]["queued"] == 2, what="two queued")
        m = hub.models()["text"]
        assert (m["busy"], m["in_flight"], m["queued"]) == (1, 1, 2), m
        assert hub.statistics()["queued"] == 2, hub.statistics()
        text = repr(hub)
        assert "text: 1 workers, 2 queued" in text, text
        assert "image: 2 workers, 0 queued" in text and "default: 1 workers, 0 queued" in text, text
        assert await asyncio.gather(*calls) == [0, 1, 2]
        assert hub.models()["text"]["queued"] == 0, hub.models()

    run(main(), timeout=90)


# ------------------------------------------------------------------ batching: formation


def test_a_lone_request_to_a_batched_model_is_not_delayed(hub, make_workers) -> None:
    make_workers(hub, Identity, 1, gibbs_model="plain")
    make_workers(hub, BatchModel, 1, gibbs_model="batched", gibbs_batch_size=32)
    hub.wait_for_workers_sync(1, timeout=60, model="plain")
    hub.wait_for_workers_sync(1, timeout=60, model="batched")

    async def latency(model: str, n: int = 30) -> float:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            answer = await hub.request(i, gibbs_model=model)
            times.append(time.perf_counter() - t0)
            if model == "batched":
                assert answer[:3] == (i, 1, 0), answer  # a batch of one, sent at once
            else:
                assert answer == i
        return statistics.median(times)

    async def main() -> tuple[float, float]:
        await latency("plain", 5)  # warm up both paths
        await latency("batched", 5)
        return await latency("plain"), await latency("batched")

    plain, batched = run(main(), timeout=90)
    # A lone request goes at once: no waiting to fill the batch. Generous: the
    # same order as an unbatched call, far from any wait.
    assert batched < plain + 0.05, (plain, batched)
    assert batched < 0.1, (plain, batched)


def test_a_burst_forms_batches_and_answers_reach_the_right_callers(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "batches.log"
    make_workers(hub, BatchModel, 1, 0.05, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")
    (pid,) = pids_of(hub, "b")

    async def main() -> list[Any]:
        return await asyncio.gather(*(hub.request(1000 + i, gibbs_model="b") for i in range(40)))

    answers = run(main(), timeout=90)
    # Each caller got its own input back.
    assert [a[0] for a in answers] == [1000 + i for i in range(40)]
    assert {a[4] for a in answers} == {pid}
    sizes = [a[1] for a in answers]
    assert all(1 <= n <= 8 for n in sizes), sizes
    assert max(sizes) > 1, f"no batch formed: {sizes}"
    # Group the answers by batch: every batch is complete, its positions are
    # 0..n-1, and inside it the inputs are in the order they were sent.
    by_batch: dict[int, list[tuple]] = {}
    for a in answers:
        by_batch.setdefault(a[3], []).append(a)
    for number, items in by_batch.items():
        n = items[0][1]
        assert len(items) == n and {a[1] for a in items} == {n}, (number, items)
        assert sorted(a[2] for a in items) == list(range(n)), (number, items)
        assert [a[0] for a in sorted(items, key=lambda a: a[2])] == sorted(a[0] for a in items)
    assert len(by_batch) < 40
    # What the model saw agrees: the same batches, nothing twice, nothing else.
    logged = read_batches(log)
    assert sorted(x for _, xs in logged for x in xs) == [1000 + i for i in range(40)]
    assert [len(xs) for _, xs in logged] == [len(by_batch[k]) for k in sorted(by_batch)]
    # Work-conserving: the first request went alone, at once, and the next
    # batch took everything that had queued meanwhile (up to 8).
    assert len(logged[0][1]) == 1, [len(xs) for _, xs in logged]
    assert len(logged[1][1]) == 8, [len(xs) for _, xs in logged]


def test_batch_wait_holds_a_lone_request_to_fill_a_batch(hub, make_workers) -> None:
    make_workers(hub, BatchModel, 1, gibbs_model="w", gibbs_batch_size=8, gibbs_batch_wait=0.4)
    hub.wait_for_workers_sync(1, timeout=60, model="w")

    async def main() -> None:
        t0 = time.perf_counter()
        x, n, _, _, _ = await hub.request("alone", gibbs_model="w")
        waited = time.perf_counter() - t0
        assert (x, n) == ("alone", 1)
        assert waited >= 0.3, waited  # it waited for company
        # Requests that arrive within the wait share one batch.
        answers = await asyncio.gather(*(hub.request(i, gibbs_model="w") for i in range(5)))
        assert [a[0] for a in answers] == list(range(5))
        assert {a[1] for a in answers} == {5} and len({a[3] for a in answers}) == 1, answers
        # A full batch does not wait.
        answers = await asyncio.gather(*(hub.request(i, gibbs_model="w") for i in range(8)))
        assert [a[0] for a in answers] == list(range(8)) and {a[1] for a in answers} == {8}

    run(main(), timeout=90)


# ------------------------------------------------------------------ batching: errors


def test_an_exception_from_the_batch_call_fails_every_request_in_it(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "batches.log"
    make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")

    async def main() -> None:
        blocker = await start_blocked(hub, "b", 0.5)
        group = ["a", "boom", "c"]
        results = await asyncio.gather(*(hub.request(x, gibbs_model="b") for x in group), return_exceptions=True)
        assert (await blocker)[1] == 1
        batches = [xs for _, xs in read_batches(log)]
        assert batches[-1] == group, batches  # the three shared one batch
        for r in results:
            assert isinstance(r, UserCodeException), results
            assert r.exc_type == "ValueError" and "the batch of 3 failed" in str(r)
            assert isinstance(r.original, ValueError)
        # The worker serves on.
        assert (await hub.request("after", gibbs_model="b"))[:2] == ("after", 1)

    run(main(), timeout=90)
    assert hub.statistics()["models"]["b"]["workers"] == 1


@pytest.mark.parametrize("bad", ["short", "none"])
def test_a_result_list_of_the_wrong_length_fails_the_whole_batch(hub, make_workers, tmp_path, bad: str) -> None:
    log = tmp_path / "batches.log"
    make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")

    async def main() -> None:
        blocker = await start_blocked(hub, "b", 0.5)
        group = [1, bad, 3, 4]
        results = await asyncio.gather(*(hub.request(x, gibbs_model="b") for x in group), return_exceptions=True)
        await blocker
        assert [xs for _, xs in read_batches(log)][-1] == group
        for r in results:
            assert isinstance(r, UserCodeException), results
            assert "as many results as inputs" in str(r), str(r)
            assert ("3 results for 4 inputs" if bad == "short" else "NoneType") in str(r), str(r)
        assert (await hub.request(9, gibbs_model="b"))[:2] == (9, 1)

    run(main(), timeout=90)


def test_an_exception_instance_in_the_result_list_fails_only_its_request(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "batches.log"
    make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")

    async def main() -> None:
        blocker = await start_blocked(hub, "b", 0.5)
        group: list[Any] = [10, ("err", "item 1 is bad"), 12, ("err", "item 3 is bad"), 14]
        results = await asyncio.gather(*(hub.request(x, gibbs_model="b") for x in group), return_exceptions=True)
        await blocker
        assert [xs for _, xs in read_batches(log)][-1] == group
        for x, r in zip(group, results):
            if isinstance(x, tuple):
                assert isinstance(r, UserCodeException), r
                assert r.exc_type == "ValueError" and r.exc_message == x[1]
                assert isinstance(r.original, ValueError) and str(r.original) == x[1]
            else:
                assert not isinstance(r, BaseException), r
                assert r[0] == x and r[1] == 5 and r[2] == group.index(x)

    run(main(), timeout=90)


def test_two_arguments_or_keywords_to_a_batched_model_raise_type_error_at_the_call_site(
    hub, make_workers, tmp_path
) -> None:
    log = tmp_path / "batches.log"
    make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=4)
    make_workers(hub, Echo, 1, gibbs_model="echo")
    hub.wait_for_workers_sync(1, timeout=60, model="b")
    hub.wait_for_workers_sync(1, timeout=60, model="echo")

    async def main() -> None:
        with pytest.raises(TypeError, match="batched"):
            await hub.request(1, 2, gibbs_model="b")
        with pytest.raises(TypeError, match="batched"):
            await hub.request(1, key=2, gibbs_model="b")
        with pytest.raises(TypeError, match="batched"):
            await hub.request(x=1, gibbs_model="b")
        with pytest.raises(TypeError, match="batched"):
            await hub.request(gibbs_model="b")
        # An unbatched model takes any arguments.
        assert (await hub.request(1, 2, k=3, gibbs_model="echo"))["args"] == (1, 2)
        assert (await hub.request(5, gibbs_model="b"))[:2] == (5, 1)

    run(main(), timeout=60)
    with pytest.raises(TypeError, match="batched"):
        hub.submit(1, 2, gibbs_model="b")
    with pytest.raises(TypeError, match="batched"):
        hub.submit(1, k=2, gibbs_model="b")
    assert hub.submit(6, gibbs_model="b").result(timeout=30)[:2] == (6, 1)
    # Nothing of the refused calls was queued or reached the model.
    assert hub.statistics()["queued"] == 0
    assert [xs for _, xs in read_batches(log)] == [[5], [6]]


def test_bad_arguments_queued_before_a_batched_worker_joined_fail_alone(hub, make_workers, tmp_path) -> None:
    # Before any worker of the model has joined, the hub cannot know it is
    # batched: the worker rejects such requests one by one (TypeError from the
    # worker), and the good requests of the same batch are answered.
    log = tmp_path / "batches.log"

    async def main() -> None:
        calls = [
            asyncio.ensure_future(hub.request(1, 2, gibbs_model="late")),
            asyncio.ensure_future(hub.request(5, gibbs_model="late")),
            asyncio.ensure_future(hub.request(x=3, gibbs_model="late")),
            asyncio.ensure_future(hub.request(7, gibbs_model="late")),
        ]
        await wait_for(lambda: hub.models().get("late", {}).get("queued") == 4, what="four queued")
        make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="late", gibbs_batch_size=8)
        results = await asyncio.gather(*calls, return_exceptions=True)
        for bad in (results[0], results[2]):
            assert isinstance(bad, UserCodeException), results
            assert bad.exc_type == "TypeError" and "batched" in str(bad)
        assert results[1][0] == 5 and results[3][0] == 7, results
        assert [xs for _, xs in read_batches(log)] == [[5, 7]]
        with pytest.raises(TypeError):  # now the hub knows
            await hub.request(1, 2, gibbs_model="late")

    run(main(), timeout=90)


# ------------------------------------------------------------------ batching: cancellation, deaths


def test_a_cancelled_or_timed_out_queued_request_never_enters_a_batch(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "batches.log"
    make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")

    async def main() -> None:
        blocker = await start_blocked(hub, "b", 1.5)
        kept_before = asyncio.ensure_future(hub.request("kept-1", gibbs_model="b"))
        cancelled = asyncio.ensure_future(hub.request("cancelled-task", gibbs_model="b"))
        with_timeout = asyncio.ensure_future(hub.request("timed-out", gibbs_model="b", gibbs_timeout=0.2))
        submitted = hub.submit("cancelled-future", gibbs_model="b")
        kept_after = asyncio.ensure_future(hub.request("kept-2", gibbs_model="b"))
        await wait_for(lambda: hub.models()["b"]["queued"] == 5, what="five queued")
        cancelled.cancel()
        assert submitted.cancel()
        with pytest.raises(asyncio.TimeoutError):
            await with_timeout
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert hub.models()["b"]["queued"] == 2
        assert not blocker.done(), "the blocker finished before the test could cancel (machine too slow?)"
        await blocker
        a, b = await asyncio.gather(kept_before, kept_after)
        assert (a[0], b[0]) == ("kept-1", "kept-2")
        assert a[1] == b[1] == 2 and a[3] == b[3]  # one batch of the two that stayed

    run(main(), timeout=90)
    batches = [xs for _, xs in read_batches(log)]
    assert batches == [[("sleep", 1.5)], ["kept-1", "kept-2"]], batches
    assert hub.statistics()["cancelled"] == 3


def test_a_worker_killed_mid_batch_has_its_whole_batch_answered_by_another(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "batches.log"
    # The first worker's batches take 30 s (its lone blocker, 0.5 s): it is
    # killed in the middle of one. The second worker's take no time.
    (first,) = make_workers(hub, BatchModel, 1, 30.0, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")

    async def main() -> None:
        blocker = await start_blocked(hub, "b", 0.5)
        group = [f"x{i}" for i in range(6)]
        calls = [asyncio.ensure_future(hub.request(x, gibbs_model="b")) for x in group]
        await blocker
        # The six queued meanwhile go out together as one batch.
        await wait_for(lambda: hub.models()["b"]["in_flight"] == 6, what="the batch of six running")
        await wait_for(lambda: len(read_batches(log)) == 2, what="the batch to reach the model")
        assert read_batches(log)[1] == (first.pid, group)
        (second,) = make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=8)
        await hub.wait_for_workers(2, timeout=60, model="b")
        # Only the first worker holds anything; the second sits idle.
        assert hub.models()["b"]["in_flight"] == 6 and hub.models()["b"]["queued"] == 0
        assert not any(c.done() for c in calls)
        first.kill()
        results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        assert [r[0] for r in results] == group
        assert {r[4] for r in results} == {second.pid}
        assert {r[1] for r in results} == {6}
        stats = hub.statistics()
        assert stats["worker_deaths"] == 1
        assert stats["retried"] == 6  # each request of the batch counted one attempt

    run(main(), timeout=100)
    assert first.exitcode == -signal.SIGKILL
    assert [pid for pid, _ in read_batches(log)][-1] != first.pid


def test_a_worker_dying_during_a_batch_while_another_serves(hub, make_workers, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("")
    log = tmp_path / "die.log"
    make_workers(hub, BatchDieOnce, 2, str(token), str(log), 0.3, gibbs_model="d", gibbs_batch_size=8)
    hub.wait_for_workers_sync(2, timeout=60, model="d")

    async def main() -> list[Any]:
        return await asyncio.gather(*(hub.request(i, gibbs_model="d") for i in range(12)))

    results = run(main(), timeout=90)
    assert [r[0] for r in results] == list(range(12))
    assert not token.exists(), "no batch of more than one was formed"
    lines = log.read_text().splitlines()
    died = [line for line in lines if line.startswith("die ")]
    assert len(died) == 1, lines
    _, dead_pid, xs = died[0].split(" ", 2)
    lost = ast.literal_eval(xs)
    assert len(lost) > 1
    for x in lost:
        assert results[x][1] != int(dead_pid), (x, results[x])  # answered by the survivor
    stats = hub.statistics()
    assert stats["worker_deaths"] == 1 and stats["retried"] == len(lost)


def test_every_request_of_a_lost_batch_counts_one_attempt(make_hub, make_workers, tmp_path) -> None:
    hub = make_hub(max_attempts=1)
    token = tmp_path / "token"
    token.write_text("")
    log = tmp_path / "die.log"
    make_workers(hub, BatchDieOnce, 1, str(token), str(log), 0.3, gibbs_model="d", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="d")

    async def main() -> None:
        alone = asyncio.ensure_future(hub.request("alone", gibbs_model="d"))
        await wait_for(lambda: hub.models()["d"]["busy"] == 1, what="the lone request running")
        group = [asyncio.ensure_future(hub.request(i, gibbs_model="d")) for i in range(4)]
        assert (await alone)[0] == "alone"
        results = await asyncio.gather(*group, return_exceptions=True)
        for r in results:
            assert isinstance(r, WorkerDiedError), results
            assert "max_attempts=1" in str(r)

    run(main(), timeout=90)
    assert "die " in log.read_text()
    assert hub.statistics()["failed"] >= 4


def test_a_worker_stopped_gracefully_mid_batch_answers_the_whole_batch(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "batches.log"
    (worker,) = make_workers(hub, BatchModel, 1, 0.0, str(log), gibbs_model="b", gibbs_batch_size=8)
    hub.wait_for_workers_sync(1, timeout=60, model="b")

    async def main() -> None:
        blocker = await start_blocked(hub, "b", 0.3)
        group: list[Any] = [("sleep", 1.0)] + list(range(4))
        calls = [asyncio.ensure_future(hub.request(x, gibbs_model="b")) for x in group]
        await blocker
        await wait_for(lambda: len(read_batches(log)) == 2, what="the batch to reach the model")
        worker.terminate()  # SIGTERM: finish the batch in hand, answer it, exit 0
        results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        assert [r[0] for r in results] == group and {r[1] for r in results} == {5}
        assert {r[4] for r in results} == {worker.pid}

    run(main(), timeout=90)
    worker.join(30)
    assert worker.exitcode == 0
    assert hub.statistics()["worker_deaths"] == 0 and hub.statistics()["retried"] == 0


def test_a_name_once_batched_then_served_by_an_unbatched_class_takes_any_arguments(hub, make_workers) -> None:
    # The call-site TypeError is for a model that *is* batched: once every
    # batched worker has left and an unbatched class serves the name (which
    # the hub accepts), requests with several arguments must go through.
    (batched,) = make_workers(hub, BatchModel, 1, gibbs_model="m", gibbs_batch_size=4)
    hub.wait_for_workers_sync(1, timeout=60, model="m")
    with pytest.raises(TypeError):
        hub.submit(1, 2, gibbs_model="m")
    batched.kill()
    batched.join(10)
    assert wait_until(lambda: hub.models()["m"]["workers"] == 0, timeout=30)
    make_workers(hub, Echo, 1, gibbs_model="m")
    hub.wait_for_workers_sync(1, timeout=60, model="m")
    assert hub.models()["m"]["batch_size"] == 1
    assert hub.models()["m"]["class"] == "gibbs_test_models:Echo"
    out = run(hub.request(1, 2, k=3, gibbs_model="m"))
    assert out["args"] == (1, 2) and out["kwargs"] == {"k": 3}
