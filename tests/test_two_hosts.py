"""Workers on another machine: two network namespaces joined by a veth pair.

Namespace A holds the hub (bound to 10.213.0.1, explicit key) and one local
worker; namespace B runs ``python -m gibbs worker -n 2`` against it. The link
is cut under load (the hub must notice within its heartbeat bound and re-send
to the local worker: no caller sees an error), then restored (the remote
workers come back on their own). Needs root and the ``ip`` command
(iproute2): without them the test fails, it does not skip.

Also here, without namespaces: a worker command with the wrong key, and bad
command lines.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

TESTS = Path(__file__).resolve().parent
HUB_SCRIPT = TESTS / "_two_hosts_hub.py"
HUB_IP = "10.213.0.1"
REMOTE_IP = "10.213.0.2"
HEARTBEAT = 0.2  # hub's and workers' heartbeat interval
MISSES = 3  # the hub drops a worker silent for HEARTBEAT * MISSES
NS_PREFIX = "gibbs2h"


# ---------------------------------------------------------------- helpers


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child if the test process dies (a hard timeout).
    Survives the exec of ``ip netns exec`` and of python."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def netns_pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split()]


def _remove_stale_namespaces() -> None:
    """Namespaces left by a run of this file that was killed before teardown."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split(" ", 1)[0]
        m = re.fullmatch(rf"{NS_PREFIX}-(\d+)-[0-9a-f]+-[ab]", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            ip("netns", "del", name, check=False)


class NetnsPair:
    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.a = f"{NS_PREFIX}-{os.getpid()}-{token}-a"
        self.b = f"{NS_PREFIX}-{os.getpid()}-{token}-b"
        self.veth_a = f"g2h{token}a"  # interface names: at most 15 characters
        self.veth_b = f"g2h{token}b"

    def create(self) -> None:
        ip("netns", "add", self.a)
        ip("netns", "add", self.b)
        ip("-n", self.a, "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b, "netns", self.b)
        ip("-n", self.a, "addr", "add", f"{HUB_IP}/24", "dev", self.veth_a)
        ip("-n", self.b, "addr", "add", f"{REMOTE_IP}/24", "dev", self.veth_b)
        for ns, veth in ((self.a, self.veth_a), (self.b, self.veth_b)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", veth, "up")

    def destroy(self) -> None:
        for ns in (self.a, self.b):
            for pid in netns_pids(ns):  # only processes this test started live there
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", ns, check=False)

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def cut(self) -> None:
        ip("-n", self.b, "link", "set", self.veth_b, "down")

    def restore(self) -> None:
        ip("-n", self.b, "link", "set", self.veth_b, "up")


@pytest.fixture
def netns() -> Iterator[NetnsPair]:
    if shutil.which("ip") is None:
        pytest.fail("cannot create network namespaces: the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.fail(f"cannot create network namespaces: this test needs root (euid is {os.geteuid()})")
    _remove_stale_namespaces()
    pair = NetnsPair()
    try:
        try:
            pair.create()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.fail(f"cannot create network namespaces: {exc}")
        yield pair
    finally:
        pair.destroy()
    left = [line for line in ip("netns", "list", check=False).stdout.splitlines() if pair.a in line or pair.b in line]
    assert not left, f"namespaces not deleted: {left}"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Every process a test starts goes here; whatever is still running at
    teardown is killed and reaped."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
    for p in started:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
    still = [p.pid for p in started if p.poll() is None]
    assert not still, f"processes could not be reaped: {still}"


class JsonLines:
    """Reads a process's JSON-lines stdout in a thread."""

    def __init__(self, proc: subprocess.Popen[str], stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "raw", "line": line}
            with self.lock:
                self.events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def last(self, kind: str = "tick") -> Optional[dict[str, Any]]:
        with self.lock:
            for event in reversed(self.events):
                if event.get("event") == kind:
                    return event
        return None

    def problems(self) -> list[dict[str, Any]]:
        return [e for e in self.snapshot() if e.get("event") in ("error", "wrong", "crash", "raw")]

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str, since: Optional[int] = None
    ) -> dict[str, Any]:
        """The first event from now on (or from index ``since``) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self.lock:
            seen = len(self.events) if since is None else since
        while True:
            events = self.snapshot()
            for event in events[seen:]:
                if predicate(event):
                    return event
            seen = len(events)
            if time.monotonic() > deadline or self.proc.poll() is not None:
                time.sleep(0.1)
                pytest.fail(
                    f"hub script: no {what} within {timeout} s (exit status {self.proc.poll()});\n"
                    f"last tick: {self.last()}\nproblems: {self.problems()[:5]}\n"
                    f"stderr tail:\n{tail(self.stderr_path)}"
                )
            time.sleep(0.01)


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def remote(tick: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in tick["workers"] if w["address"].startswith(REMOTE_IP + ":")]


def served(tick: dict[str, Any], pids: set[int]) -> int:
    return sum(n for pid, n in tick["by_pid"].items() if int(pid) in pids)


def ppid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def env_with_key(key: Optional[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GIBBS_AUTHKEY"}
    if key is not None:
        env["GIBBS_AUTHKEY"] = key
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def assert_no_traceback(path: Path) -> None:
    text = path.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


# ---------------------------------------------------------------- the two-host test


# Read by the capture on the link: in clear, the WELCOME and HELLO show them.
CLEAR_MARKERS = (b"heartbeat_interval", b"SquarePid", b"#GIBBS-CHALLENGE#")
CAPTURE = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # every frame on the interface
s.bind((sys.argv[2], 0))
with open(sys.argv[1], "ab", buffering=0) as f:
    while True:
        f.write(s.recv(1 << 17))
"""


def make_link_certificates(d: Path) -> dict[str, dict[str, str]]:
    """An authority, the hub's certificate (for HUB_IP; also a client one,
    which the hub script's own workers show) and a remote worker's."""
    from test_tls import _authority, _leaf

    _authority(d, "ca")
    _leaf(d, "hub", "ca", f"subjectAltName=IP:{HUB_IP}\nextendedKeyUsage=serverAuth,clientAuth")
    _leaf(d, "remote", "ca", "extendedKeyUsage=clientAuth")
    return {
        who: {"GIBBS_TLS_CERT": str(d / f"{who}.pem"), "GIBBS_TLS_KEY": str(d / f"{who}.key"), "GIBBS_TLS_CA": str(d / "ca.pem")}
        for who in ("hub", "remote")
    }


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_remote_workers_link_cut_and_restore(netns: NetnsPair, procs: list, tmp_path: Path, tls: bool) -> None:
    """Also with TLS on the link (certificates from GIBBS_TLS_* for the hub
    script's plain Hub() and Worker(), --tls-* for the worker command): a
    capture of the link shows the handshake's and HELLO's markers in clear
    without TLS, and none of them with it."""
    env = env_with_key(secrets.token_hex(16))
    hub_env, worker_env, worker_tls = dict(env), dict(env), []
    if tls:
        files = make_link_certificates(tmp_path)
        hub_env.update(files["hub"])
        r = files["remote"]
        worker_tls = ["--tls-cert", r["GIBBS_TLS_CERT"], "--tls-key", r["GIBBS_TLS_KEY"], "--tls-ca", r["GIBBS_TLS_CA"]]
    hub_err = tmp_path / "hub.stderr"
    worker_err = tmp_path / "worker.stderr"
    capture_path = tmp_path / "link.capture"
    capture = subprocess.Popen(
        netns.exec_argv(netns.a, sys.executable, "-c", CAPTURE, str(capture_path), netns.veth_a),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
    )
    procs.append(capture)

    # Namespace A: the hub (explicit key, short heartbeats), one local worker, 16 callers.
    with open(hub_err, "w") as err:
        hub_proc = subprocess.Popen(
            netns.exec_argv(
                netns.a, sys.executable, str(HUB_SCRIPT), "--host", HUB_IP, "--callers", "16",
                "--local-workers", "1", "--wait-time", "0.005",
                "--heartbeat-interval", str(HEARTBEAT), "--heartbeat-misses", str(MISSES),
            ),
            stdout=subprocess.PIPE, stderr=err, text=True, env=hub_env, cwd=TESTS,
            preexec_fn=_die_with_parent,
        )
    procs.append(hub_proc)
    hub = JsonLines(hub_proc, hub_err)
    ready = hub.wait_for(lambda e: e["event"] == "ready", 30, "ready line", since=0)
    local_pids = set(ready["local_pids"])

    # Namespace B: the worker command, two workers, over the veth link.
    with open(worker_err, "w") as err:
        worker_cmd = subprocess.Popen(
            netns.exec_argv(
                netns.b, sys.executable, "-m", "gibbs", "worker", "_two_hosts_hub:SquarePid",
                "--hub", f"{HUB_IP}:{ready['port']}", "-n", "2",
                "--heartbeat-interval", str(HEARTBEAT), *worker_tls, "0.005",
            ),
            stdout=subprocess.DEVNULL, stderr=err, env=worker_env, cwd=TESTS,
            preexec_fn=_die_with_parent,
        )
    procs.append(worker_cmd)

    try:
        # 1. Requests flow; the remote workers serve some.
        t = hub.wait_for(lambda e: e["event"] == "tick" and len(remote(e)) == 2, 30, "two remote workers")
        remote_pids = {w["pid"] for w in remote(t)}
        for pid in remote_pids:  # they are the worker command's children, in namespace B
            assert ppid(pid) == worker_cmd.pid, (pid, ppid(pid), worker_cmd.pid)
            assert pid in netns_pids(netns.b)
        assert local_pids & {w["pid"] for w in t["workers"]}, t["workers"]
        hub.wait_for(
            lambda e: e["event"] == "tick" and served(e, remote_pids) >= 200 and served(e, local_pids) >= 50,
            20, "answers from both the remote and the local workers",
        )
        assert not hub.problems(), hub.problems()[:5]
        # What crossed the link: some hundreds of answers, in clear or not.
        seen = capture_path.read_bytes()
        assert len(seen) > 20_000 and capture.poll() is None, (len(seen), capture.poll())
        in_clear = [m for m in CLEAR_MARKERS if m in seen]
        assert in_clear == ([] if tls else list(CLEAR_MARKERS)), in_clear

        # 2. Cut the link under load: the hub notices within its heartbeat
        #    bound and re-sends to the local worker; no caller sees an error.
        t_cut = time.time()
        netns.cut()
        gone = hub.wait_for(lambda e: e["event"] == "tick" and not remote(e), 10, "remote workers dropped")
        detection = gone["t"] - t_cut
        # bound: silence of HEARTBEAT * MISSES, checked every HEARTBEAT / 2, plus slack for a busy machine
        assert detection < HEARTBEAT * MISSES + 1.4, detection
        # Keep the load on for a while on the local worker alone.
        during = hub.wait_for(
            lambda e: e["event"] == "tick" and e["t"] > gone["t"] + 1.0, 10, "a second of load on the local worker"
        )
        assert served(during, local_pids) - served(gone, local_pids) >= 30, (during, gone)
        assert served(during, remote_pids) == served(gone, remote_pids)
        stats = during["stats"]
        assert stats["worker_deaths"] >= 2 and stats["retried"] >= 1, stats
        assert not hub.problems(), hub.problems()[:5]
        lost = [line for line in hub_err.read_text().splitlines() if "lost worker" in line]
        assert len(lost) >= 2 and all("silent for" in line for line in lost), lost

        # 3. Restore the link: the same worker processes reconnect and serve again.
        t_restore = time.time()
        netns.restore()
        back = hub.wait_for(lambda e: e["event"] == "tick" and len(remote(e)) == 2, 15, "remote workers back")
        reconnect = back["t"] - t_restore
        assert {w["pid"] for w in remote(back)} == remote_pids  # reconnected, not restarted
        hub.wait_for(
            lambda e: e["event"] == "tick" and served(e, remote_pids) >= served(back, remote_pids) + 50,
            10, "remote workers serving again",
        )
        assert worker_cmd.poll() is None
        assert not hub.problems(), hub.problems()[:5]

        # 4. Stop: SIGTERM the worker command (exit 0) under load, then the hub script.
        worker_cmd.send_signal(signal.SIGTERM)
        assert worker_cmd.wait(20) == 0, tail(worker_err)
        assert not any(Path(f"/proc/{pid}").exists() for pid in remote_pids)
        hub_proc.send_signal(signal.SIGTERM)
        assert hub_proc.wait(30) == 0, tail(hub_err)
        hub.thread.join(5)
        done = hub.last("done")
        assert done is not None, (hub.snapshot()[-3:], tail(hub_err))
        assert done["errors"] == 0 and done["wrong"] == 0 and done["stuck_callers"] == 0, done
        assert done["local_exitcodes"] == [0], done
        assert not hub.problems(), hub.problems()[:5]
        capture.kill()
        capture.wait(10)
        for ns in (netns.a, netns.b):
            assert netns_pids(ns) == [], (ns, netns_pids(ns))
        assert not any(Path(f"/proc/{pid}").exists() for pid in local_pids | remote_pids)
        assert_no_traceback(worker_err)
        assert_no_traceback(hub_err)
        print(
            f"\ntwo hosts: link cut noticed after {detection:.2f} s "
            f"(bound {HEARTBEAT * MISSES:.1f} s of silence); remote workers back {reconnect:.2f} s "
            f"after the link; {done['ok']} answers, 0 errors; by pid {done['by_pid']}"
        )
    finally:
        for p in (worker_cmd, hub_proc):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------- keys and command lines (loopback)


@pytest.mark.timeout(40)
def test_worker_with_wrong_key_keeps_retrying_and_hub_keeps_serving(make_hub, make_workers, procs, tmp_path) -> None:
    from conftest import run
    from gibbs_test_models import Pid

    key = secrets.token_hex(16)
    hub = make_hub(authkey=key)
    make_workers(hub, Pid, 1, gibbs_authkey=key)
    err_path = tmp_path / "worker.stderr"
    with open(err_path, "w") as err:
        bad = subprocess.Popen(
            [sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:Pid", "--hub", f"127.0.0.1:{hub.port}",
             "-n", "1", "--heartbeat-interval", "0.2"],
            stdout=subprocess.DEVNULL, stderr=err, env=env_with_key("not-" + key), cwd=TESTS,
            preexec_fn=_die_with_parent,
        )
    procs.append(bad)

    def auth_errors() -> int:
        return err_path.read_text(errors="replace").count("do not share the same authkey")

    async def serve_for(seconds: float) -> set[int]:
        await hub.wait_for_workers(1, timeout=30)
        pids: set[int] = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pids.add(await hub.request())
        return pids

    # The first refusal; the hub serves meanwhile, with its one good worker only.
    deadline = time.monotonic() + 20
    while auth_errors() < 1:
        assert time.monotonic() < deadline, tail(err_path)
        assert bad.poll() is None, tail(err_path)
        time.sleep(0.05)
    assert len(run(serve_for(0.5))) == 1
    # It retries (after its back-off) rather than exiting, and no worker process is restarted.
    deadline = time.monotonic() + 15
    while auth_errors() < 2:
        assert time.monotonic() < deadline, tail(err_path)
        assert bad.poll() is None, tail(err_path)
        run(serve_for(0.2))
    assert len(hub.workers()) == 1
    assert hub.statistics()["failed"] == 0
    text = err_path.read_text(errors="replace")
    assert "exited" not in text and "Traceback" not in text, text
    bad.send_signal(signal.SIGTERM)
    assert bad.wait(15) == 0, tail(err_path)


@pytest.mark.parametrize(
    "args, key, message",
    [
        (["no_such_module_xyz:Model", "--hub", "127.0.0.1:5019"], "k", "cannot import module 'no_such_module_xyz'"),
        (["gibbs_test_models:NoSuchClass", "--hub", "127.0.0.1:5019"], "k", "has no attribute 'NoSuchClass'"),
        (["gibbs_test_models:Pid", "--hub", "127.0.0.1:notaport"], "k", "is not a number"),
        (["gibbs_test_models:Pid", "--hub", "127.0.0.1:70000"], "k", "out of range"),
        (["gibbs_test_models:Pid", "--hub", ":5019"], "k", "no host"),
        (["gibbs_test_models:Pid", "--hub", "192.0.2.1:5019"], None, "no key"),
        (["gibbs_test_models", "--hub", "127.0.0.1:5019"], "k", "bad target"),
        (["gibbs_test_models:Pid", "--hub", "127.0.0.1:5019", "-n", "0"], "k", "-n must be at least 1"),
    ],
)
def test_bad_command_line_is_one_line_error_without_traceback(args, key, message) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gibbs", "worker", *args],
        capture_output=True, text=True, timeout=30, env=env_with_key(key), cwd=TESTS,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gibbs: error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------- a standalone hub, web processes elsewhere

CLIENT_SCRIPT = """
import asyncio, json, os
from gibbs import Hub

async def main():
    hub = Hub()  # GIBBS_HUB names the hub in the other namespace
    await hub.wait_for_workers(2, timeout=30)
    results = await asyncio.gather(*(hub.request(i) for i in range(40)))
    print(json.dumps({"role": hub.role, "ok": results == [i * i for i in range(40)],
                      "workers": hub.statistics()["workers"]}), flush=True)
    await hub.aclose()

asyncio.run(main())
"""


@pytest.mark.timeout(75)
def test_standalone_hub_with_clients_and_workers_on_another_host(netns: NetnsPair, procs: list, tmp_path: Path) -> None:
    """Namespace A runs only ``python -m gibbs hub``; namespace B runs the
    workers and two web processes (client hubs, by GIBBS_HUB)."""
    env = env_with_key(secrets.token_hex(16))
    port = "5019"
    hub_err = tmp_path / "hub.stderr"
    with open(hub_err, "w") as err:
        hub_proc = subprocess.Popen(
            netns.exec_argv(netns.a, sys.executable, "-m", "gibbs", "hub", "--bind", f"{HUB_IP}:{port}",
                            "--heartbeat-interval", str(HEARTBEAT)),
            stderr=err, env=env, cwd=TESTS, preexec_fn=_die_with_parent,
        )
    procs.append(hub_proc)
    worker_err = tmp_path / "worker.stderr"
    with open(worker_err, "w") as err:
        procs.append(subprocess.Popen(
            netns.exec_argv(netns.b, sys.executable, "-m", "gibbs", "worker", "gibbs_test_models:Square",
                            "-n", "2", "--hub", f"{HUB_IP}:{port}"),
            stderr=err, env=env, cwd=TESTS, preexec_fn=_die_with_parent,
        ))
    client_env = dict(env, GIBBS_HUB=f"{HUB_IP}:{port}")
    clients = [
        subprocess.Popen(
            netns.exec_argv(netns.b, sys.executable, "-c", CLIENT_SCRIPT),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env, cwd=TESTS,
            preexec_fn=_die_with_parent,
        )
        for _ in range(2)
    ]
    procs.extend(clients)
    for c in clients:
        out, errtext = c.communicate(timeout=60)
        assert c.returncode == 0, errtext[-3000:] + "\nhub:\n" + tail(hub_err)
        report = json.loads(out.strip().splitlines()[-1])
        assert report == {"role": "client", "ok": True, "workers": 2}, report
    assert hub_proc.poll() is None, tail(hub_err)
    hub_proc.send_signal(signal.SIGTERM)
    assert hub_proc.wait(15) == 0, tail(hub_err)


NESTED_CLIENT_SCRIPT = """
import asyncio, json
from gibbs import Hub

async def main():
    hub = Hub()  # GIBBS_HUB names the standalone hub
    await hub.wait_for_workers(2, timeout=30)
    results = await asyncio.gather(*(hub.request(i, gibbs_model="sync-caller") for i in range(20)))
    print(json.dumps({"ok": results == [i * i + 1 for i in range(20)]}), flush=True)
    await hub.aclose()

asyncio.run(main())
"""


@pytest.mark.timeout(75)
def test_a_model_on_another_host_calls_another_model(netns: NetnsPair, procs: list, tmp_path: Path) -> None:
    """The hub in namespace A; in B, a worker of ``square`` and one of a model
    that calls it through a plain Hub() (over TCP, with the explicit key):
    the nested calls cross the link twice and every answer is right."""
    env = env_with_key(secrets.token_hex(16))
    port = "5019"
    hub_err = tmp_path / "hub.stderr"
    with open(hub_err, "w") as err:
        procs.append(subprocess.Popen(
            netns.exec_argv(netns.a, sys.executable, "-m", "gibbs", "hub", "--bind", f"{HUB_IP}:{port}",
                            "--heartbeat-interval", str(HEARTBEAT)),
            stderr=err, env=env, cwd=TESTS, preexec_fn=_die_with_parent,
        ))
    for target, model in (("gibbs_test_models:Square", "square"), ("gibbs_test_models:CallsSquare", "sync-caller")):
        with open(tmp_path / f"{model}.stderr", "w") as err:
            procs.append(subprocess.Popen(
                netns.exec_argv(netns.b, sys.executable, "-m", "gibbs", "worker", target, "--model", model,
                                "--hub", f"{HUB_IP}:{port}"),
                stderr=err, env=env, cwd=TESTS, preexec_fn=_die_with_parent,
            ))
    client = subprocess.Popen(
        netns.exec_argv(netns.a, sys.executable, "-c", NESTED_CLIENT_SCRIPT),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(env, GIBBS_HUB=f"{HUB_IP}:{port}"),
        cwd=TESTS, preexec_fn=_die_with_parent,
    )
    procs.append(client)
    out, errtext = client.communicate(timeout=60)
    assert client.returncode == 0, errtext[-3000:] + "\nhub:\n" + tail(hub_err) + tail(tmp_path / "sync-caller.stderr")
    assert json.loads(out.strip().splitlines()[-1]) == {"ok": True}
