"""A model's life in a pool, under load, through the public API: rolling
updates (and their rollback), autoscaling, recycling by calls and by
memory, warm-up gating readiness. The autoscaler's decisions are tested on
their own, without processes."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import run, wait_until

from gibbs import Hub
from gibbs.pool import UpdateError
from gibbs.scaling import UP_AFTER, Autoscaler, Load


@pytest.fixture
def served() -> Iterator[Callable[..., Hub]]:
    made: list[Hub] = []

    def factory(**kwargs: Any) -> Hub:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("heartbeat_interval", 0.2)
        hub = Hub(**kwargs)
        hub.start()
        made.append(hub)
        return hub

    yield factory
    for hub in made:
        hub.close(grace=0)


async def _load(hub: Hub, stop: asyncio.Event, answers: list[tuple[float, Any]], errors: list[BaseException],
                callers: int = 32) -> None:
    async def caller(i: int) -> None:
        while not stop.is_set():
            try:
                answers.append((time.monotonic(), await hub.request(i)))
            except BaseException as exc:  # noqa: BLE001 - every error is a failure of the test
                errors.append(exc)
                return

    await asyncio.gather(*(caller(i) for i in range(callers)))


@pytest.mark.timeout(120)
def test_rolling_update_under_load_loses_nothing(served: Callable[..., Hub]) -> None:
    """32 callers throughout; no caller error; during the rollout both
    versions are visible; once update() returns every answer is new."""
    from gibbs_test_models import Versioned, VersionedOther

    hub = served()
    pool = hub.serve(Versioned, "v1", gibbs_workers=2)
    hub.wait_for_workers_sync(2, timeout=60)
    seen_versions: list[dict[str, Any]] = []

    async def main() -> float:
        stop = asyncio.Event()
        answers: list[tuple[float, Any]] = []
        errors: list[BaseException] = []
        load = asyncio.ensure_future(_load(hub, stop, answers, errors))

        async def watch() -> None:
            while not stop.is_set():
                seen_versions.append(hub.models()["default"]["versions"])
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.3)
        await pool.aupdate(VersionedOther, "v2")
        returned = time.monotonic()
        await asyncio.sleep(0.5)
        stop.set()
        await load
        await watcher
        assert not errors, errors[:3]
        after = [a for t, a in answers if t > returned]
        assert after and all(a[0] == "v2" for a in after), {a[0] for a in after}
        assert any(a[0] == "v1" for _, a in answers)
        return returned

    run(main(), timeout=110)
    assert any(len(v) == 2 for v in seen_versions), seen_versions[-5:]  # both versions at once
    assert pool.version == 2 and pool.size == 2
    assert set(hub.models()["default"]["versions"]) == {"2"}
    assert hub.models()["default"]["class"].endswith("VersionedOther")


@pytest.mark.timeout(120)
def test_a_broken_version_is_rolled_back(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import BadInit, Versioned

    hub = served()
    pool = hub.serve(Versioned, "v1", gibbs_workers=2)
    hub.wait_for_workers_sync(2, timeout=60)

    async def main() -> None:
        stop = asyncio.Event()
        answers: list[tuple[float, Any]] = []
        errors: list[BaseException] = []
        load = asyncio.ensure_future(_load(hub, stop, answers, errors, callers=8))
        with pytest.raises(UpdateError, match="cannot load weights"):
            await pool.aupdate(BadInit)
        await asyncio.sleep(0.3)
        stop.set()
        await load
        assert not errors, errors[:3]
        assert answers and all(a[0] == "v1" for _, a in answers)

    run(main(), timeout=110)
    assert pool.version == 1 and pool.size == 2 and pool.failed is None
    assert run(hub.request(5), timeout=30)[0] == "v1"
    pool.update(Versioned, "v3")  # a later, good update still works
    assert run(hub.request(5), timeout=30)[0] == "v3"


@pytest.mark.timeout(120)
def test_recycling_by_calls_loses_nothing(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Versioned

    hub = served()
    pool = hub.serve(Versioned, "v1", 0.01, gibbs_workers=2, gibbs_max_requests=10, gibbs_max_requests_jitter=0)
    hub.wait_for_workers_sync(2, timeout=60)

    async def main() -> list[Any]:
        out = []
        for _ in range(16):
            out += await asyncio.gather(*(hub.request(i) for i in range(10)))
            await asyncio.sleep(0.2)  # replacements have time to join
        return out

    answers = run(main(), timeout=110)
    assert len(answers) == 160
    assert pool.statistics()["recycled"] >= 3
    assert len({pid for _, _, pid in answers}) >= 4  # replacements served
    assert wait_until(lambda: pool.size == 2 and len(hub.workers()) == 2, timeout=30)


@pytest.mark.timeout(120)
def test_recycling_by_memory(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Leaky

    hub = served()
    pool = hub.serve(Leaky, gibbs_workers=1, gibbs_max_memory=160 << 20)
    hub.wait_for_workers_sync(1, timeout=60)

    async def main() -> list[Any]:
        out = []
        for i in range(40):
            out.append(await hub.request(i))
            await asyncio.sleep(0.02)
        return out

    answers = run(main(), timeout=110)
    assert [x for x, _ in answers] == list(range(40))
    assert pool.statistics()["recycled"] >= 1
    assert len({pid for _, pid in answers}) >= 2


@pytest.mark.timeout(120)
def test_autoscaling_up_under_load_and_down_when_idle(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Sleep

    hub = served()
    pool = hub.serve(Sleep, gibbs_workers=(1, 3), gibbs_scale_down_after=1.0)
    hub.wait_for_workers_sync(1, timeout=60)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(hub.request(0.2, i) for i in range(60)))

    assert run(burst(), timeout=110) == list(range(60))
    assert pool.statistics()["scaled_up"] >= 2
    assert pool.size == 3 or pool.statistics()["scaled_down"] >= 1
    assert wait_until(lambda: pool.size == 1, timeout=30), pool.statistics()
    assert pool.statistics()["scaled_down"] >= 2


@pytest.mark.timeout(120)
def test_scale_to_zero_starts_a_worker_on_the_first_call(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    pool = hub.serve(Square, gibbs_workers=(0, 1), gibbs_scale_down_after=1.0)
    time.sleep(0.3)
    assert pool.size == 0 and hub.workers() == []
    assert run(hub.request(7), timeout=60) == 49
    assert wait_until(lambda: pool.size == 0, timeout=30)


@pytest.mark.timeout(120)
def test_warm_up_runs_before_the_worker_joins(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Warm

    hub = served()
    hub.serve(Warm, 1.0, gibbs_workers=1, gibbs_warmup=["sample"])
    started = time.monotonic()
    # While it warms up it is loading, not ready.
    assert wait_until(lambda: hub.health()["loading"] == 1, timeout=30)
    assert hub.health()["ready"] == [] and hub.health()["status"] == "down"
    hub.wait_for_workers_sync(1, timeout=60)
    assert time.monotonic() - started >= 0.95
    assert hub.health()["ready"] == ["default"]
    answer = run(hub.request("real"), timeout=30)
    assert answer == {"warmed": True, "calls": ["sample", "real"]}


def test_serve_checks_its_options(served: Callable[..., Hub]) -> None:
    from gibbs_test_models import Square

    hub = served()
    for bad in [dict(gibbs_workers=(3, 1)), dict(gibbs_workers=(1, 2, 3)), dict(gibbs_max_requests=0),
                dict(gibbs_workers=(0, 2), gibbs_scale_down_after=0)]:
        with pytest.raises(ValueError):
            hub.serve(Square, **bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the decision alone


def test_autoscaler_decisions() -> None:
    a = Autoscaler(1, 4, down_after=10.0)
    assert a.decide(0.0, Load(0, 0.0, 0), running=0, starting=0)[0] == 1  # below the minimum
    assert a.decide(0.0, Load(5, UP_AFTER / 2, 1), running=1, starting=0)[0] == 0  # not waited long yet
    assert a.decide(0.1, Load(5, UP_AFTER, 1), running=1, starting=0)[0] == 1
    assert a.decide(0.2, Load(5, UP_AFTER, 1), running=1, starting=1)[0] == 0  # one starting is enough for 5
    assert a.decide(0.2, Load(20, UP_AFTER, 1), running=1, starting=1)[0] == 1  # not for 20
    assert a.decide(0.3, Load(50, 1.0, 4), running=4, starting=0)[0] == 0  # at the maximum
    # Needed all 4 until 0.3; shrinks 10 s after, one at a time.
    assert a.decide(5.0, Load(0, 0.0, 1), running=4, starting=0)[0] == 0
    assert a.decide(10.3, Load(0, 0.0, 1), running=4, starting=0)[0] == -1
    assert a.decide(10.4, Load(0, 0.0, 1), running=3, starting=0)[0] == 0  # the clock started again
    assert a.decide(20.5, Load(0, 0.0, 0), running=1, starting=0)[0] == 0  # never below the minimum
    zero = Autoscaler(0, 1, down_after=1.0)
    assert zero.decide(0.0, Load(1, 0.0, 0), running=0, starting=0)[0] == 1  # a call, no worker: at once
    with pytest.raises(ValueError):
        Autoscaler(2, 1, down_after=1.0)


# ---------------------------------------------------------------- the worker command


def _env(*paths: str) -> dict[str, str]:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    e = {k: v for k, v in os.environ.items() if k not in ("GIBBS_HUB", "GIBBS_AUTHKEY", "GIBBS_PORT")}
    e["PYTHONPATH"] = os.pathsep.join([*paths, os.path.join(os.path.dirname(here), "src"), here, e.get("PYTHONPATH", "")])
    return e


@pytest.fixture
def command() -> Iterator[Callable[..., Any]]:
    import subprocess
    import sys

    started: list[subprocess.Popen[str]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-m", "gibbs", "worker", *args], env=env, text=True,
                             stderr=subprocess.PIPE)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@pytest.mark.timeout(120)
def test_sighup_rolls_the_worker_command_onto_the_edited_module(
    served: Callable[..., Hub], command: Callable[..., Any], tmp_path: Any
) -> None:
    import signal

    (tmp_path / "hupmodel.py").write_text("class Model:\n    def __call__(self, x):\n        return ('v1', x)\n")
    hub = served()
    proc = command(["hupmodel:Model", "-n", "2", "--hub", f"127.0.0.1:{hub.port}"], _env(str(tmp_path)))
    hub.wait_for_workers_sync(2, timeout=60)
    assert tuple(run(hub.request(1), timeout=30)) == ("v1", 1)
    (tmp_path / "hupmodel.py").write_text("class Model:\n    def __call__(self, x):\n        return ('v2', x)\n")

    async def during() -> list[Any]:
        answers = []
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answers += await asyncio.gather(*(hub.request(i) for i in range(8)))
            if answers[-1][0] == "v2" and all(a[0] == "v2" for a in answers[-16:]):
                break
            await asyncio.sleep(0.05)
        return answers

    answers = run(during(), timeout=90)
    assert answers[-1][0] == "v2", answers[-5:]
    assert {a[0] for a in answers} <= {"v1", "v2"}
    assert wait_until(lambda: len(hub.workers()) == 2 and {w["version"] for w in hub.workers()} == {"2"}, 30), \
        hub.workers()
    assert proc.poll() is None


@pytest.mark.timeout(120)
def test_worker_command_recycles_and_autoscales(
    served: Callable[..., Hub], command: Callable[..., Any]
) -> None:
    hub = served()
    command(["gibbs_test_models:Versioned", "v1", "0.01", "--min", "0", "--max", "2", "--scale-down-after", "1",
             "--max-requests", "10", "--max-requests-jitter", "0", "--hub", f"127.0.0.1:{hub.port}"], _env())
    time.sleep(1.0)
    assert hub.workers() == []  # scaled to zero: nothing runs before a call

    async def main() -> list[Any]:
        out = []
        for _ in range(10):
            out += await asyncio.gather(*(hub.request(i) for i in range(10)))
            await asyncio.sleep(0.3)
        return out

    answers = run(main(), timeout=110)
    assert len(answers) == 100
    assert len({pid for _, _, pid in answers}) >= 3  # recycled (10 calls each) at least once
    assert wait_until(lambda: hub.workers() == [], timeout=30)  # and back to zero when idle
