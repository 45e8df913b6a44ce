"""CPU threads per worker: what each start path gives a worker's process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from conftest import run
from gibbs_test_models import ThreadReport
from test_cli import KEY, env_with, gibbs_cmd

from gibbs import Hub, Worker, _threads

torch = pytest.importorskip("torch", reason="torch is in the test extra: pip install -e '.[test]'")

VARS = ThreadReport.VARS
#: The tests see eight cores (the plan is made in the parent, so a worker
#: takes the parent's count); the command line and pinning see the machine's.
CORES = 8
REAL_CORES = _threads.cpu_count()


def share(n: int, cores: int = CORES) -> int:
    """One core for the starting process, the rest split among n workers."""
    return max(1, (cores - 1) // n) if cores > 1 else 1


@pytest.fixture(autouse=True)
def eight_cores(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "real_cores" not in request.keywords:
        monkeypatch.setattr(_threads, "cpu_list", lambda: list(range(CORES)))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No thread variable exported in the test process (CI may have some)."""
    for v in VARS + (_threads.ENV,):
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


async def reports(hub: Hub, n: int, calls: int = 40) -> dict[int, dict]:
    """One report per worker (by pid), asking until ``n`` workers answered."""
    await hub.wait_for_workers(n, timeout=60)
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} of {n} workers answered"
        for r in await asyncio.gather(*(hub.request() for _ in range(calls))):
            seen[r["pid"]] = r
    return seen


def test_parse_threads(clean_env: pytest.MonkeyPatch) -> None:
    assert _threads.parse_threads(None) == "auto"
    assert _threads.parse_threads("inherit") == "inherit"
    assert _threads.parse_threads("3") == 3
    assert _threads.parse_threads(2) == 2
    for bad in (0, -1, "0", "many", True, 1.5):
        with pytest.raises(ValueError):
            _threads.parse_threads(bad)  # type: ignore[arg-type]
    clean_env.setenv(_threads.ENV, "inherit")
    assert _threads.parse_threads(None) == "inherit"
    with pytest.raises(ValueError):
        Worker(ThreadReport, gibbs_threads="lots")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_started_one_by_one_split_the_cores(clean_env, make_hub, make_workers, method: str) -> None:
    hub = make_hub()
    ws = make_workers(hub, ThreadReport, 2, gibbs_start_method=method)
    seen = run(reports(hub, 2))
    for r in seen.values():
        # torch takes the share of the two, even in the worker started first
        # (it counts its sibling on its next request)
        assert r["torch"] == share(2), r
        assert r["affinity"] == list(range(REAL_CORES)) or len(r["affinity"]) == REAL_CORES, r
    # the second worker starts with its sibling alive: its share from the start
    for r in seen.values():
        assert all(v is not None and int(v) in (share(1), share(2)) for v in r["env"].values()), r
    second = seen[ws[1].pid]
    assert second["env"] == {v: str(share(2)) for v in VARS}, second


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_split_the_cores(clean_env, make_hub, method: str) -> None:
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=2, gibbs_start_method=method)
    seen = run(reports(hub, 2))
    assert len(seen) == 2
    for r in seen.values():
        assert r["env"] == {v: str(share(2)) for v in VARS}, r
        assert r["torch"] == share(2), r


def test_a_users_exported_value_is_kept(clean_env, make_hub) -> None:
    clean_env.setenv("OMP_NUM_THREADS", "3")
    clean_env.setenv("OPENBLAS_NUM_THREADS", "5")
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=2, gibbs_start_method="spawn")
    for r in run(reports(hub, 2)).values():
        assert r["env"]["OMP_NUM_THREADS"] == "3"
        assert r["env"]["MKL_NUM_THREADS"] == "3"  # torch reads it over OMP's: it follows the user's
        assert r["env"]["OPENBLAS_NUM_THREADS"] == "5"
        assert r["env"]["NUMEXPR_NUM_THREADS"] == str(share(2))
        assert r["torch"] == torch_threads_untold(OMP_NUM_THREADS="3"), r  # torch counts what the user said


def test_override_wins(clean_env, make_hub) -> None:
    clean_env.setenv("OMP_NUM_THREADS", "5")
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=2, gibbs_threads=3)
    for r in run(reports(hub, 2)).values():
        assert r["env"] == {v: "3" for v in VARS}, r
        assert r["torch"] == 3, r


def torch_threads_untold(**env: str) -> int:
    """torch's own count in a fresh process with this environment."""
    clean = {k: v for k, v in os.environ.items() if k not in VARS}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


def test_inherit_leaves_them_alone(clean_env, make_hub) -> None:
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=2, gibbs_threads="inherit", gibbs_start_method="spawn")
    default = torch_threads_untold()  # what torch makes of this machine, untold
    for r in run(reports(hub, 2)).values():
        assert r["env"] == {v: None for v in VARS}, r
        assert r["torch"] == default, r


def test_off_switch_from_the_environment(clean_env, make_hub) -> None:
    clean_env.setenv(_threads.ENV, "inherit")
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=1, gibbs_start_method="spawn")
    (r,) = run(reports(hub, 1)).values()
    assert r["env"] == {v: None for v in VARS}, r


def test_fork_with_torch_loaded_in_the_parent(clean_env, make_hub) -> None:
    """With fork the parent's torch is already initialised: the variables
    come too late for it, so the worker sets torch's count itself."""
    assert "torch" in sys.modules
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=2, gibbs_start_method="fork", gibbs_threads=1)
    for r in run(reports(hub, 2)).values():
        assert r["torch"] == 1, r


@pytest.mark.real_cores
@pytest.mark.skipif(REAL_CORES < 2, reason="pinning two workers apart needs two cores")
def test_pinning(clean_env, make_hub) -> None:
    hub = make_hub()
    hub.serve(ThreadReport, gibbs_workers=2, gibbs_pin_cpus=True)
    seen = list(run(reports(hub, 2)).values())
    a, b = (set(r["affinity"]) for r in seen)
    assert len(a) == len(b) == share(2, REAL_CORES)
    assert not a & b
    assert a | b <= set(_threads.cpu_list())


@pytest.fixture
def worker_command() -> Iterator[Any]:
    procs: list[subprocess.Popen] = []

    def start(*args: str, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            gibbs_cmd("worker", *args), env=env_with(KEY, **env),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(10)


@pytest.mark.real_cores
@pytest.mark.parametrize("extra", [[], ["--threads", "3"], ["--threads", "inherit"]])
def test_worker_command(clean_env, make_hub, worker_command, extra: list[str]) -> None:
    hub = make_hub(authkey=KEY)
    worker_command("gibbs_test_models:ThreadReport", "--hub", f"127.0.0.1:{hub.port}", "-n", "2",
                   "--heartbeat-interval", "0.2", *extra)
    want = {"": str(share(2, REAL_CORES)), "3": "3", "inherit": None}[extra[1] if extra else ""]
    for r in run(reports(hub, 2)).values():
        assert r["env"] == {v: want for v in VARS}, r


def test_worker_command_rejects_bad_threads() -> None:
    proc = subprocess.run(gibbs_cmd("worker", "gibbs_test_models:ThreadReport", "--threads", "zero"),
                          env=env_with(KEY), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--threads" in proc.stderr
