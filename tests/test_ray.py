"""Workers placed by a Ray cluster (``gibbs.ray.Launcher``), on a real local
cluster of two nodes on this machine: a head with the custom resource
``node_a`` and a second node with ``node_b``, started once for the module
(``ray start --block``, each in its own session) and reaped at the end, by
process id, even when a test fails.

Without Ray these tests are skipped with a reason, except under ``CI=true``,
where a missing Ray is an error (CI installs the ``test`` extra, which has it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import pytest
from conftest import run

from gibbs import Hub, NoWorkersError

try:
    import ray
except ImportError:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("Ray is not installed (pip install 'gibbs[ray]'): the Ray tests did not run", allow_module_level=True)

import gibbs.ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

# The models below travel to the actors by value (this test module is not
# importable on Ray's workers).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class NodeModel:
    """Answers ``x * k`` and the Ray node it runs on."""

    def __init__(self, k: int = 2, delay: float = 0.0) -> None:
        self.k = k
        self.delay = delay

    def __call__(self, x: int) -> tuple[int, str]:
        if self.delay:
            time.sleep(self.delay)
        return x * self.k, ray.get_runtime_context().get_node_id()


class SlowStart:
    """A constructor that takes a while (a model loading its weights)."""

    def __init__(self, seconds: float) -> None:
        time.sleep(seconds)

    def __call__(self, x: int) -> int:
        return x + 1


class BrokenModel:
    def __init__(self) -> None:
        raise RuntimeError("no weights here (constructor failure on purpose)")

    def __call__(self, x: Any) -> Any:
        return x


# ---------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(roots: list[int]) -> set[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found = {r for r in roots if r in parent}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Cluster:
    """Two Ray nodes on this machine; every process is ours (by pid)."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="gibbs-ray-")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.known: set[int] = set()  # every process seen under ours, for the final reaping
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Our own cluster, whatever ~/.ray holds (a token there, left by a
        # local ray.init, would turn token authentication on for some of
        # its processes only).
        env["RAY_AUTH_MODE"] = "disabled"
        # A lost node is noticed in about a second rather than thirty.
        env["RAY_health_check_initial_delay_ms"] = "0"
        env["RAY_health_check_period_ms"] = "300"
        env["RAY_health_check_timeout_ms"] = "300"
        env["RAY_health_check_failure_threshold"] = "3"
        self.env = env
        self._saved_auth_mode: Optional[str] = None

    def _start(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.temp, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=2", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        log.close()

    def log(self, name: str) -> str:
        with open(os.path.join(self.temp, f"{name}.log"), errors="replace") as f:
            return f.read()[-3000:]

    def start(self, deadline: float) -> None:
        self._start("head", [
            "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", '--resources={"node_a": 4}',
            f"--temp-dir={self.temp}", "--include-dashboard=false",
        ])
        self._wait_log("head", "block forever", deadline)
        self._start("node_b", [
            f"--address={self.address}", "--node-ip-address=127.0.0.1", '--resources={"node_b": 4}',
        ])
        self._wait_log("node_b", "block forever", deadline)
        self._saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second Ray node did not join:\n{self.log('node_b')}")
            time.sleep(0.2)
        self.remember()

    def _wait_log(self, name: str, text: str, deadline: float) -> None:
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n{self.log(name)}")
            time.sleep(0.2)

    def node_id(self, resource: str) -> str:
        ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
        assert len(ids) == 1, ray.nodes()
        return str(ids[0])

    def remember(self) -> None:
        self.known |= _descendants([p.pid for p in self.procs.values()])

    def kill_node(self, name: str) -> set[int]:
        """SIGKILL a node's ``ray start``, its raylet and its workers: a lost machine."""
        pids = _descendants([self.procs[name].pid])
        self.known |= pids
        _kill(pids)
        self.procs[name].wait(10)
        return pids

    def stop(self) -> None:
        try:
            ray.shutdown()
        finally:
            if self._saved_auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._saved_auth_mode
            self.remember()
            for p in self.procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)  # ray start --block stops its processes
            end = time.monotonic() + 5
            for p in self.procs.values():
                try:
                    p.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self.remember()
            _kill(self.known)
            for p in self.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start(deadline=time.monotonic() + 90)
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_hub(make_hub: Callable[..., Hub]) -> Iterator[Callable[..., Hub]]:
    """conftest's hubs; closing each must close its pools (its actors)."""
    hubs: list[Hub] = []

    def factory(**kwargs: Any) -> Hub:
        hub = make_hub(**kwargs)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        hub.close(grace=0)
        assert not hub.pools()


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def serving(hub: Hub) -> int:
    return sum(1 for w in hub.workers() if w["state"] in ("ready", "busy"))


def launcher(resource: Optional[str] = None, **kw: Any) -> gibbs.ray.Launcher:
    return gibbs.ray.Launcher(num_cpus=kw.pop("num_cpus", 0.5), resources={resource: 1} if resource else None, **kw)


# ---------------------------------------------------------------- tests


@pytest.mark.timeout(60)
def test_import_gibbs_does_not_import_ray() -> None:
    code = (
        "import sys, gibbs, gibbs.pool, gibbs.hub, gibbs.cli\n"
        "assert 'ray' not in sys.modules, 'import gibbs imported ray'\n"
        "import gibbs.ray\n"
        "l = gibbs.ray.Launcher(num_cpus=1, resources={'x': 1})\n"
        "assert 'ray' not in sys.modules, 'import gibbs.ray (or making a Launcher) imported ray'\n"
        "print('ok', repr(l))\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok gibbs.ray.Launcher(")


@pytest.mark.timeout(90)
def test_workers_land_on_the_nodes_asked_and_serve(cluster: Cluster, make_hub: Callable[..., Hub]) -> None:
    a, b = cluster.node_id("node_a"), cluster.node_id("node_b")
    hub = make_hub()
    pool_a = hub.serve(NodeModel, 3, gibbs_workers=1, gibbs_launcher=launcher("node_a"))
    pool_b = hub.serve(NodeModel, 3, gibbs_workers=1, gibbs_launcher=launcher("node_b"))
    wait_for(lambda: serving(hub) == 2, 40, "two Ray workers to join")
    (wa,), (wb,) = pool_a.workers(), pool_b.workers()
    assert isinstance(wa, gibbs.ray.ActorHandle) and isinstance(wb, gibbs.ray.ActorHandle)
    assert (wa.node_id, wb.node_id) == (a, b)
    assert wa.token != wb.token
    assert {w["pid"] for w in hub.workers()} == {wa.pid, wb.pid}
    assert pool_a.launcher.hub_address == "127.0.0.1"  # loopback hub, every node on this machine

    async def go() -> list[tuple[int, str]]:
        return await asyncio.gather(*(hub.request(i) for i in range(200)))

    answers = run(go())
    assert [x for x, _ in answers] == [3 * i for i in range(200)]
    assert {node for _, node in answers} == {a, b}


@pytest.mark.timeout(90)
def test_scale_up_and_down(cluster: Cluster, make_hub: Callable[..., Hub]) -> None:
    hub = make_hub()
    pool = hub.serve(NodeModel, 5, 0.2, gibbs_workers=1, gibbs_launcher=launcher())
    wait_for(lambda: serving(hub) == 1, 40, "the first worker")
    pool.scale(3)
    assert pool.size == 3
    wait_for(lambda: serving(hub) == 3, 40, "3 workers after scale(3)")
    tokens = {w.token for w in pool.workers()}
    assert len(tokens) == 3

    async def go() -> list[tuple[int, str]]:
        calls = [asyncio.ensure_future(hub.request(i)) for i in range(9)]
        await asyncio.sleep(0.1)  # three calls are in hand, six queued
        pool.scale(1)  # two drain: they finish what they hold
        return await asyncio.gather(*calls)

    answers = run(go())
    assert [x for x, _ in answers] == [5 * i for i in range(9)]
    wait_for(lambda: serving(hub) == 1 and not pool.statistics()["draining"], 30, "scale(1) to drain two workers")
    assert pool.size == 1 and len(pool.workers()) == 1
    stats = hub.statistics()
    assert stats["retried"] == 0 and stats["resent"] == 0, f"a drained worker finishes what it holds: {stats}"
    assert stats["worker_deaths"] == 0, f"a drained worker says goodbye: {stats}"
    assert pool.restarts == 0, "a drained worker is not replaced"
    assert run(hub.request(7))[0] == 35


@pytest.mark.timeout(60)
def test_constructor_failure_is_no_workers_error_not_a_restart_loop(
    cluster: Cluster, make_hub: Callable[..., Hub]
) -> None:
    hub = make_hub()
    pool = hub.serve(BrokenModel, gibbs_workers=2, gibbs_launcher=launcher(), gibbs_model="broken")
    with pytest.raises(NoWorkersError) as info:
        run(hub.request(1, gibbs_model="broken"), timeout=40)
    assert "no weights here" in str(info.value)
    assert pool.failed is not None
    restarts = pool.restarts
    time.sleep(2.0)
    assert pool.restarts == restarts <= 1, "the pool must not restart a failing constructor in a loop"
    assert all(not w.is_alive() for w in pool.workers())
    assert all(w.exitcode == gibbs.ray.EXIT_RAISED for w in pool.workers())


@pytest.mark.timeout(60)
def test_an_actor_lost_while_loading_is_replaced_not_a_failed_model(
    cluster: Cluster, make_hub: Callable[..., Hub]
) -> None:
    """The actor is killed (its node lost) while the model loads, before it
    joined: no sign of a broken model; the pool starts another."""
    hub = make_hub()
    pool = hub.serve(SlowStart, 3.0, gibbs_workers=1, gibbs_launcher=launcher(), gibbs_model="slow")
    first = pool.workers()[0]
    wait_for(lambda: first.placed_at is not None, 30, "the actor to be placed")
    ray.kill(first.actor, no_restart=True)
    wait_for(lambda: not first.is_alive(), 20, "the actor to die")
    assert first.lost
    assert run(hub.request(1, gibbs_model="slow"), timeout=40) == 2
    assert pool.failed is None and pool.restarts >= 1


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_reach_the_hub_is_stopped_and_reported(
    cluster: Cluster, make_hub: Callable[..., Hub]
) -> None:
    """A wrong address to dial (the hub listens on loopback only; the workers
    dial this machine's other address): the actor is killed after
    ``join_timeout`` and the model's requests fail, saying why."""
    hub = make_hub()
    ip = ray.util.get_node_ip_address()
    assert not ip.startswith("127."), f"this test needs a non-loopback address, Ray gave {ip}"
    pool = hub.serve(
        SlowStart, 0.0, gibbs_workers=1, gibbs_model="astray",
        gibbs_launcher=launcher(hub_host=ip, join_timeout=2.0),
    )
    with pytest.raises(NoWorkersError) as info:
        run(hub.request(1, gibbs_model="astray"), timeout=40)
    assert "did not join the hub in time" in str(info.value)
    assert pool.failed is not None
    assert all(not w.is_alive() for w in pool.workers())


@pytest.mark.timeout(60)
def test_a_loopback_hub_is_refused_when_nodes_are_elsewhere(
    cluster: Cluster, make_hub: Callable[..., Hub], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ray.nodes()
    far = [dict(real[0], NodeManagerAddress="203.0.113.9", Alive=True)]
    monkeypatch.setattr(ray, "nodes", lambda: real + far)
    hub = make_hub()
    with pytest.raises(ValueError, match="loopback.*203.0.113.9"):
        hub.serve(NodeModel, gibbs_workers=1, gibbs_launcher=launcher())
    assert not hub.pools()
    pool = hub.serve(NodeModel, gibbs_workers=0, gibbs_launcher=launcher(hub_host="127.0.0.1"))
    assert pool.launcher.hub_address == "127.0.0.1"  # told where to dial: no refusal
    with pytest.raises(ValueError, match="gibbs_devices"):
        hub.serve(NodeModel, gibbs_devices=["cuda:0"], gibbs_launcher=launcher())
    with pytest.raises(ValueError, match="max_restarts"):
        gibbs.ray.Launcher(max_restarts=3)
    with pytest.raises(ValueError, match="detached"):
        gibbs.ray.Launcher(lifetime="detached")
    with pytest.raises(ValueError, match="join_timeout"):
        gibbs.ray.Launcher(join_timeout=0)


def test_one_launcher_for_two_hubs_dials_each_its_own(cluster: Cluster, make_hub: Callable[..., Hub]) -> None:
    shared = launcher()
    a = make_hub()
    b = make_hub(host="0.0.0.0", authkey="a key for the nodes")
    pa = a.serve(NodeModel, gibbs_workers=1, gibbs_launcher=shared)
    pb = b.serve(NodeModel, gibbs_workers=1, gibbs_launcher=shared)
    pa.scale(2)  # a's second worker starts after b's serve: it must still dial a
    ka, kb = pa.workers()[1], pb.workers()[0]
    assert ka._worker.host == "127.0.0.1" and ka._worker.port == a.port
    assert kb._worker.host == ray.util.get_node_ip_address() and kb._worker.port == b.port
    assert run(a.request(3), timeout=40)[0] == 6 and run(b.request(4), timeout=40)[0] == 8


_AFTER_SHUTDOWN = """
import time, ray, gibbs, gibbs.ray

class Plus:
    def __call__(self, x):
        return x + 1

ray.init(address="auto")
hub = gibbs.Hub(port=0, heartbeat_interval=0.2)
pool = hub.serve(Plus, gibbs_workers=1, gibbs_launcher=gibbs.ray.Launcher(num_cpus=0.5))
hub.wait_for_workers_sync(1, timeout=40)
ray.shutdown()  # the user's, or Ray's own at exit
time.sleep(5)   # the actor's end is seen; the pool tries to replace it
print("initialized:", ray.is_initialized(), "failed:", pool.failed is not None, flush=True)
hub.close(grace=0)
print("closed", flush=True)
"""


@pytest.mark.timeout(90)
def test_no_new_ray_instance_after_ray_shuts_down(cluster: Cluster) -> None:
    """Ray shut down under a pool: its actor is seen lost, and the pool's
    attempts to replace it start no local Ray instance (Ray's calls would),
    nor kill the supervisor; the hub closes cleanly."""
    env = dict(cluster.env, RAY_ADDRESS=cluster.address)
    out = subprocess.run([sys.executable, "-c", _AFTER_SHUTDOWN], capture_output=True, text=True, timeout=80, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "initialized: False failed: True" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "closed" in out.stdout


@pytest.mark.timeout(90)
def test_the_example_runs_on_the_cluster(cluster: Cluster) -> None:
    env = dict(cluster.env, RAY_ADDRESS=cluster.address)
    example = os.path.join(os.path.dirname(HERE), "examples", "ray_app.py")
    out = subprocess.run(
        [sys.executable, example, "--workers", "2", "--requests", "20"],
        capture_output=True, text=True, timeout=80, env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "20 requests in" in out.stdout and "scaled to 1 worker; (144," in out.stdout, out.stdout


# Last: it takes the second node away from the module's cluster.
@pytest.mark.timeout(90)
def test_losing_a_node_loses_no_request(cluster: Cluster, make_hub: Callable[..., Hub]) -> None:
    b = cluster.node_id("node_b")
    hub = make_hub()
    pool_a = hub.serve(NodeModel, 7, 0.01, gibbs_workers=2, gibbs_launcher=launcher("node_a"))
    pool_b = hub.serve(NodeModel, 7, 0.01, gibbs_workers=2, gibbs_launcher=launcher("node_b"))
    wait_for(lambda: serving(hub) == 4, 40, "four Ray workers to join")
    n = 600
    killed: list[set[int]] = []

    async def go() -> list[tuple[int, str]]:
        calls = [asyncio.ensure_future(hub.request(i)) for i in range(n)]
        # Once node b has served some, take it away with calls in its hands.
        while sum(1 for c in calls if c.done()) < n // 5:
            await asyncio.sleep(0.005)
        killed.append(await asyncio.get_running_loop().run_in_executor(None, cluster.kill_node, "node_b"))
        return await asyncio.gather(*calls)

    answers = run(go(), timeout=60)
    assert [x for x, _ in answers] == [7 * i for i in range(n)]
    assert b in {node for _, node in answers}, "node b served before it was lost"
    stats = hub.statistics()
    assert stats["worker_deaths"] == 2, stats
    assert stats["retried"] >= 1, f"the lost node held calls, re-sent to the survivors: {stats}"
    assert killed and killed[0]
    # The pool sees its two actors dead and starts replacements (which Ray
    # cannot place: no node has node_b any more), the other pool is whole.
    wait_for(lambda: pool_b.restarts >= 2, 40, "the pool to replace the lost actors")
    assert serving(hub) == 2 and pool_a.restarts == 0
    assert len(pool_b.workers()) == 2 and all(w.node_id is None for w in pool_b.workers())
