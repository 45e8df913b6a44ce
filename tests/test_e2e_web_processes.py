"""End to end: several web processes, one pool of workers.

The walkthrough's FastAPI app (written into a temporary folder, with a hub
port of its own) runs under a real ``uvicorn --workers 2`` or ``gunicorn -w
2``; the model's workers are started once, apart, with ``python -m gibbs
worker app:MyAwesomeModel -n 4 --hub 127.0.0.1:PORT`` (no key: the hub lets
in processes of the same user). Each web process makes ``Hub(PORT)`` at
import: the first to start routes, the other joins it as a client hub.

* 20 parallel requests through the 2 web processes: all right, both
  processes (the router and the client) answer, in well under the 5 s one
  model would need (uvicorn; gunicorn lazy, ``--preload``, and with
  ``hub.start()`` at import, which under ``--preload`` makes the master
  the router and both web processes its clients);
* the router's web process SIGKILLed under load: no HTTP error from the
  survivor, every answer right, service back within a few seconds, the
  survivor routing and the server's replacement process its client.

The app adds to the walkthrough's, off the request path: each response names
the web process that answered and its hub's role (headers ``x-pid`` and
``x-role``); ``/whoami`` reports that process's hub (role, workers in view)
without starting it; the ``gibbs`` logger writes to the server's log, shown
when a test fails.

Every server runs in its own session; teardown sends SIGTERM then SIGKILL to
each process group and fails if any of their processes is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")

#: The model's time per call; 4 workers, 20 requests: 5 rounds, 1.25 s (one model: 5 s).
WAIT = 0.25
N_WORKERS = 4
N_REQUESTS = 20
#: 20 requests through 2 web processes and 4 workers: 1.25 s ideal, 5 s serial.
LIMIT = 3.5

APP = '''\
import logging
import os
import time

from fastapi import FastAPI, Request

from gibbs import Hub

# gibbs's own account, in the server's log (shown when a test fails).
_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] gibbs %(levelname)s %(message)s"))
logging.getLogger("gibbs").addHandler(_handler)
logging.getLogger("gibbs").setLevel(logging.INFO)


class MyAwesomeModel:
    def __init__(self, wait_time={wait}):
        super().__init__()
        self.w = wait_time

    def __call__(self, x):
        time.sleep(self.w)
        return x**2


# Instanciate FastAPI app and instanciate the Hub
app = FastAPI()
hub = Hub({hub_port})
{start}

@app.middleware("http")
async def who_answered(request: Request, call_next):
    response = await call_next(request)
    response.headers["x-pid"] = str(os.getpid())
    response.headers["x-role"] = str(hub.role)
    return response


# Define a route that will call our model and return the result
@app.get("/request")
async def simple_request(x: int):
    return {{"result": await hub.request(x)}}


@app.get("/whoami")
async def whoami():
    stats = hub.statistics()
    return {{"pid": os.getpid(), "role": hub.role, "workers": stats["workers"], "stats_role": stats.get("role")}}
'''

#: The same model in a module that starts no hub, for the worker command when
#: the app starts its hub at import (importing the app there would start one).
MODEL = '''\
import time


class MyAwesomeModel:
    def __init__(self, wait_time={wait}):
        super().__init__()
        self.w = wait_time

    def __call__(self, x):
        time.sleep(self.w)
        return x**2
'''


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, parent pid, process group) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    out = []
    for pid in _pids():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and st[2] == pgid:
            out.append(pid)
    return out


def web_processes(master: int) -> list[int]:
    """The server's web processes: the live children of its master
    (multiprocessing's resource tracker aside)."""
    out = []
    for pid in _pids():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and st[1] == master and "resource_tracker" not in _cmdline(pid):
            out.append(pid)
    return sorted(out)


def listening_pids(port: int, candidates: list[int]) -> set[int]:
    """Which of ``candidates`` hold a listening TCP socket on 127.0.0.1:``port``."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    holders = set()
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    holders.add(pid)
                    break
            except OSError:
                pass
    return holders


class Group:
    """A command in a session (process group) of its own, its output in a file."""

    def __init__(self, argv: list[str], cwd: str, log_path: str, env: dict[str, str]) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.proc.pid

    def log(self, tail: int = 6000) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-tail:]

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def _wait_gone(groups: list[Group], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        for g in groups:
            g.proc.poll()  # reap the leader as soon as it exits
        left = [pid for g in groups for pid in group_members(g.pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., Group]]:
    """Start commands in their own process groups; at teardown every group
    gets SIGTERM, then SIGKILL, and none of their processes may be left."""
    groups: list[Group] = []
    env = {k: v for k, v in os.environ.items() if k not in ("GIBBS_HUB", "GIBBS_AUTHKEY")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"

    def factory(name: str, *argv: str) -> Group:
        group = Group(list(argv), str(tmp_path), str(tmp_path / f"{name}.log"), env)
        groups.append(group)
        return group

    yield factory
    for g in groups:
        g.signal(signal.SIGTERM)
    if _wait_gone(groups, 10):
        for g in groups:
            g.signal(signal.SIGKILL)
    left = _wait_gone(groups, 10)
    for g in groups:
        with contextlib.suppress(subprocess.TimeoutExpired):
            g.proc.wait(5)
        g._log.close()
    assert not left, "processes left even after SIGKILL:\n" + "\n".join(f"{pid}: {_cmdline(pid)}" for pid in left)


# ------------------------------------------------------------------ the stack


@dataclass
class Stack:
    base: str
    hub_port: int
    server: Group
    workers: Group

    def logs(self) -> str:
        return f"--- server log:\n{self.server.log()}\n--- workers log:\n{self.workers.log()}"


_gunicorn_flags: Optional[list[str]] = None


def gunicorn_flags() -> list[str]:
    """Flags for a gunicorn run beside others: no shared control socket
    (gunicorn >= 24 makes one in ~/.gunicorn unless told not to)."""
    global _gunicorn_flags
    if _gunicorn_flags is None:
        out = subprocess.run(
            [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
        _gunicorn_flags = ["--no-control-socket"] if "--no-control-socket" in out else []
    return _gunicorn_flags


def start_stack(
    spawn: Callable[..., Group],
    tmp_path,
    server: str,
    *,
    preload: bool = False,
    start_at_import: bool = False,
) -> Stack:
    hub_port = free_port()
    http_port = free_port()
    while http_port == hub_port:
        http_port = free_port()
    start = "hub.start()  # at import: under gunicorn --preload, in the master\n" if start_at_import else ""
    (tmp_path / "app.py").write_text(APP.format(wait=WAIT, hub_port=hub_port, start=start))
    (tmp_path / "model.py").write_text(MODEL.format(wait=WAIT))
    if server == "uvicorn":
        argv = [sys.executable, "-m", "uvicorn", "app:app", "--workers", "2", "--host", "127.0.0.1",
                "--port", str(http_port), "--no-access-log"]
    else:
        pytest.importorskip("gunicorn")
        argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
                "-b", f"127.0.0.1:{http_port}", "--graceful-timeout", "5", *gunicorn_flags()]
        if preload:
            argv.append("--preload")
        argv.append("app:app")
    web = spawn("server", *argv)
    target = "model:MyAwesomeModel" if start_at_import else "app:MyAwesomeModel"
    workers = spawn(
        "workers", sys.executable, "-m", "gibbs", "worker", target, "-n", str(N_WORKERS),
        "--hub", f"127.0.0.1:{hub_port}", "-v",
    )
    stack = Stack(f"http://127.0.0.1:{http_port}", hub_port, web, workers)
    wait_ready(stack)
    return stack


def wait_ready(stack: Stack, timeout: float = 60.0) -> None:
    """Until the server answers HTTP (on /whoami, which starts no hub), has
    its 2 web processes, and the worker command says it started."""
    deadline = time.monotonic() + timeout
    http_ok = False
    while time.monotonic() < deadline:
        for g in (stack.server, stack.workers):
            if g.proc.poll() is not None:
                pytest.fail(f"{g.argv} exited with {g.proc.returncode}\n{stack.logs()}")
        if not http_ok:
            try:
                http_ok = httpx.get(f"{stack.base}/whoami", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
        if http_ok and "worker(s) for the hub" in stack.workers.log() and len(web_processes(stack.server.pid)) == 2:
            return
        time.sleep(0.1)
    pytest.fail(f"not ready within {timeout} s\n{stack.logs()}")


@dataclass
class Answer:
    x: int
    started: float
    ended: float
    status: Optional[int] = None  # None: no HTTP answer (see error)
    result: object = None
    pid: Optional[int] = None
    role: Optional[str] = None
    error: Optional[str] = None


def get(client, base: str, x: int) -> Answer:
    t0 = time.monotonic()
    try:
        r = client.get(f"{base}/request", params={"x": x})
    except httpx.HTTPError as exc:
        return Answer(x, t0, time.monotonic(), error=f"{type(exc).__name__}: {exc}")
    ans = Answer(x, t0, time.monotonic(), status=r.status_code)
    ans.pid = int(r.headers["x-pid"]) if "x-pid" in r.headers else None
    ans.role = r.headers.get("x-role")
    ans.result = r.json().get("result") if r.status_code == 200 else r.text
    return ans


def parallel(base: str, xs: list[int], timeout: float = 30.0) -> tuple[list[Answer], float]:
    """``/request?x=`` for each x at once, one thread and one connection each."""
    limits = httpx.Limits(max_connections=len(xs), max_keepalive_connections=0)
    with httpx.Client(timeout=timeout, limits=limits) as client:
        with ThreadPoolExecutor(len(xs)) as pool:
            t0 = time.perf_counter()
            answers = list(pool.map(lambda x: get(client, base, x), xs))
            elapsed = time.perf_counter() - t0
    return answers, elapsed


def assert_all_right(answers: list[Answer], stack: Stack) -> None:
    bad = [a for a in answers if a.status != 200 or a.result != a.x * a.x]
    assert not bad, f"{len(bad)} wrong answers: {bad[:5]}\n{stack.logs()}"


def whoami(client, base: str) -> Optional[dict]:
    try:
        return client.get(f"{base}/whoami").json()
    except httpx.HTTPError:
        return None


def hubs_seen(base: str, pids: set[int], timeout: float = 20.0, want_workers: int = N_WORKERS) -> dict[int, dict]:
    """/whoami, 8 at a time (so that both processes accept some), until each
    of ``pids`` answered with its hub started and ``want_workers`` workers in
    view (a client hub's view is what the router last told it)."""
    last: dict[int, dict] = {}
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=5, limits=limits) as client, ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline:
            for me in pool.map(lambda _: whoami(client, base), range(8)):
                if me is None:
                    continue
                last[me["pid"]] = me
                if me["pid"] in pids and me["role"] is not None and me["workers"] >= want_workers:
                    seen[me["pid"]] = me
            if set(seen) >= pids:
                return seen
            time.sleep(0.02)
    pytest.fail(f"/whoami within {timeout} s: ready {sorted(seen)} of {sorted(pids)}; last answers {last}")


def until_each_served(stack: Stack, pids: set[int], timeout: float = 20.0) -> None:
    """``/request`` batches until each of ``pids`` has answered one (and so
    started its hub): connections land on either process, unevenly."""
    answered: set[Optional[int]] = set()
    deadline = time.monotonic() + timeout
    while not pids <= answered and time.monotonic() < deadline:
        batch, _ = parallel(stack.base, list(range(8)))
        assert_all_right(batch, stack)
        answered |= {a.pid for a in batch}
    assert pids <= answered, f"within {timeout} s, only {answered} of {pids} answered"


# ------------------------------------------------------------------ 1, 2: twenty requests through two web processes


def check_twenty_requests(stack: Stack, *, master_routes: bool = False) -> float:
    web = web_processes(stack.server.pid)
    assert len(web) == 2, f"expected 2 web processes under {stack.server.pid}, found {web}\n{stack.logs()}"

    # Cold: the first requests, sent at once as soon as the server is up. Each
    # web process starts its hub on its first request: the first takes the
    # address, the other joins it (its first calls go out right behind its
    # HELLO), and the workers connect to whichever holds it.
    cold, cold_elapsed = parallel(stack.base, list(range(N_REQUESTS)), timeout=60)
    assert_all_right(cold, stack)

    # Warm: both hubs up, 4 workers in view of each (the client's from the router).
    until_each_served(stack, set(web))
    hubs = hubs_seen(stack.base, set(web))
    roles = {pid: h["role"] for pid, h in hubs.items()}
    assert all(h["stats_role"] == h["role"] for h in hubs.values()), hubs
    holders = listening_pids(stack.hub_port, [stack.server.pid, *web])
    if master_routes:
        assert sorted(roles.values()) == ["client", "client"], roles
        assert holders == {stack.server.pid}, f"the hub port is held by {holders}, not the master {stack.server.pid}"
    else:
        assert sorted(roles.values()) == ["client", "router"], roles
        router = next(pid for pid, role in roles.items() if role == "router")
        assert holders == {router}, f"the hub port is held by {holders}, the router is {router}"

    xs = list(range(100, 100 + N_REQUESTS))
    warm, elapsed = parallel(stack.base, xs)
    assert_all_right(warm, stack)
    by_pid = {pid: sum(a.pid == pid for a in warm) for pid in web}
    cold_by_pid = {pid: sum(a.pid == pid for a in cold) for pid in web}
    print(
        f"\n{N_REQUESTS} parallel requests through 2 web processes: {elapsed:.3f} s warm, {cold_elapsed:.3f} s cold "
        f"(ideal {N_REQUESTS // N_WORKERS * WAIT:.2f} s, serial {N_REQUESTS * WAIT:.2f} s); "
        f"answers per process: warm {by_pid}, cold {cold_by_pid}; roles {roles}"
    )
    assert sum(by_pid.values()) == N_REQUESTS, f"answers from outside the web processes {web}: {warm}"
    # Both processes served (so the router's hub and a client's), each with its role.
    assert all(by_pid.values()), f"all {N_REQUESTS} answers came from one web process: {by_pid}"
    assert {(a.pid, a.role) for a in warm} == set(roles.items()), ({(a.pid, a.role) for a in warm}, roles)
    assert elapsed < LIMIT, f"{N_REQUESTS} parallel requests took {elapsed:.3f} s (serial: {N_REQUESTS * WAIT} s)"
    assert cold_elapsed < LIMIT + 5, f"the first {N_REQUESTS} requests took {cold_elapsed:.3f} s\n{stack.logs()}"
    return elapsed


def test_uvicorn_two_web_processes_share_the_pool(spawn, tmp_path) -> None:
    stack = start_stack(spawn, tmp_path, "uvicorn")
    check_twenty_requests(stack)


@pytest.mark.parametrize(
    "preload,start_at_import",
    [(False, False), (True, False), (True, True), (False, True)],
    ids=["lazy", "preload", "preload-start-at-import", "start-at-import"],
)
def test_gunicorn_two_web_processes_share_the_pool(spawn, tmp_path, preload: bool, start_at_import: bool) -> None:
    stack = start_stack(spawn, tmp_path, "gunicorn", preload=preload, start_at_import=start_at_import)
    # --preload with hub.start() at import: the master (which imported the
    # app) routes, and both forked web processes are its clients.
    check_twenty_requests(stack, master_routes=preload and start_at_import)


# ------------------------------------------------------------------ 3: the router's web process is killed under load


@dataclass
class Load:
    """Threads sending ``/request`` back to back, each on a new connection."""

    base: str
    threads: int
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, k: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        x = 10_000 * (k + 1)
        with httpx.Client(timeout=30, limits=limits) as client:
            while not self.stop.is_set():
                x += 1
                a = get(client, self.base, x)
                self.answers.append(a)  # list.append: atomic
                if a.error is not None:
                    time.sleep(0.01)  # no busy loop while nothing answers

    @contextlib.contextmanager
    def running(self) -> Iterator["Load"]:
        ts = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(self.threads)]
        for t in ts:
            t.start()
        try:
            yield self
        finally:
            self.stop.set()
            for t in ts:
                t.join(40)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_killing_the_router_s_web_process_under_load(spawn, tmp_path, server: str) -> None:
    stack = start_stack(spawn, tmp_path, server)
    web = web_processes(stack.server.pid)
    assert len(web) == 2, web
    # Both hubs started, then the router found.
    until_each_served(stack, set(web))
    hubs = hubs_seen(stack.base, set(web))
    router = next(pid for pid, h in hubs.items() if h["role"] == "router")
    survivor = next(pid for pid in web if pid != router)
    assert hubs[survivor]["role"] == "client", hubs
    assert listening_pids(stack.hub_port, web) == {router}

    load = Load(stack.base, threads=6)
    with load.running():
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(router, signal.SIGKILL)
        takeover = None  # when the survivor was first seen holding the hub's address
        while time.monotonic() < t_kill + 2.5:
            if takeover is None and listening_pids(stack.hub_port, [survivor]):
                takeover = time.monotonic() - t_kill
            time.sleep(0.01)
    answers = sorted(load.answers, key=lambda a: a.started)
    ok = [a for a in answers if a.status == 200]
    http_errors = [a for a in answers if a.status is not None and a.status != 200]
    conn_errors = [a for a in answers if a.status is None]
    wrong = [a for a in ok if a.result != a.x * a.x]
    assert not wrong, f"wrong answers: {wrong[:5]}"
    assert not http_errors, f"HTTP errors (from pids {sorted({a.pid for a in http_errors})}): {http_errors[:5]}\n{stack.logs()}"
    # Only requests the killed process had in hand may have lost their connection.
    late = [a for a in conn_errors if a.started > t_kill + 0.25]
    assert not late, f"connection errors for requests sent after the kill: {late[:5]}"

    after = [a for a in ok if a.started >= t_kill]
    assert after, f"no request sent after the kill succeeded ({len(answers)} sent)\n{stack.logs()}"
    recovery = min(a.ended for a in after) - t_kill
    # Requests the survivor had forwarded to the router when it died: sent again, answered.
    resent = [a for a in ok if a.started < t_kill < a.ended and a.pid == survivor]
    ends = sorted([t_kill] + [a.ended for a in ok if a.ended >= t_kill])
    longest_gap = max(b - a for a, b in zip(ends, ends[1:])) if len(ends) > 1 else float("inf")
    tail = [a for a in answers if a.started >= t_kill + 1.0]
    print(
        f"\n{server}: killed the router's web process {router}; {len(ok)} answers 200 "
        f"({len(after)} of requests sent after the kill), {len(conn_errors)} connection errors "
        f"(in flight in the killed process), {len(resent)} in flight via the survivor {survivor} answered; "
        f"recovery {recovery:.3f} s (kill -> first answer to a request sent after it), "
        f"longest gap between answers after the kill {longest_gap:.3f} s, "
        f"survivor held the hub address {takeover if takeover is None else round(takeover, 3)} s after the kill"
    )
    assert takeover is not None, "the survivor did not take the hub's address over within 2.5 s"
    assert recovery < 5.0, f"service took {recovery:.3f} s to come back"
    assert tail and all(a.status == 200 for a in tail), [a for a in tail if a.status != 200][:5]
    assert router not in {a.pid for a in after}

    # The survivor took the address over; the server starts a new web process,
    # which joins it as a client once it serves.
    deadline = time.monotonic() + 20
    while len(web_processes(stack.server.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    now = web_processes(stack.server.pid)
    assert len(now) == 2 and router not in now and survivor in now, (now, router, survivor)
    fresh = next(pid for pid in now if pid != survivor)
    until_each_served(stack, {fresh})
    hubs = hubs_seen(stack.base, {survivor, fresh})
    assert hubs[survivor]["role"] == "router" and hubs[fresh]["role"] == "client", hubs
    assert listening_pids(stack.hub_port, now) == {survivor}
