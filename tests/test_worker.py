"""Worker: constructor arguments, start methods, run() in the current
process, signals, and the watch on the parent process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import run, wait_until
from gibbs_test_models import DieOnce, Echo, Raises, Square

from gibbs import UserCodeException, Worker

HERE = os.path.dirname(__file__)


def test_constructor_positional_and_keyword_arguments(hub, make_workers) -> None:
    class_args = make_workers(hub, Square, 1, wait_time=0.01)
    assert class_args[0].kwargs == {"wait_time": 0.01}
    hub.wait_for_workers_sync(1, timeout=30)
    assert run(hub.request(4)) == 16


def test_bad_worker_arguments_fail_at_once() -> None:
    with pytest.raises(TypeError):
        Worker(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Worker(Square, gibbs_port=70000)
    with pytest.raises(ValueError):
        Worker(Square, gibbs_heartbeat_interval=0)
    w = Worker(Square)
    assert "not started" in repr(w)
    with pytest.raises(RuntimeError):
        w.join()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_core_behaviour_under_every_start_method(hub, make_workers, tmp_path, method) -> None:
    make_workers(hub, Raises, 2, gibbs_start_method=method, gibbs_model="raises")
    token = tmp_path / "token"
    token.write_text("")
    dies = make_workers(hub, DieOnce, 2, str(token), 0.1, gibbs_start_method=method, gibbs_model="dies")
    hub.wait_for_workers_sync(4, timeout=60)

    async def main() -> None:
        # parallel requests, a user error, and a death with re-send
        out = await asyncio.gather(*(hub.request(i, gibbs_model="raises") for i in range(8)))
        assert out == list(range(8))
        with pytest.raises(UserCodeException):
            await hub.request("boom", gibbs_model="raises")
        # the first DieOnce worker to run it dies; the request is re-sent
        assert await hub.request("x", "sigkill", gibbs_model="dies") == "x"
        assert not token.exists()
        stats = hub.statistics()
        assert stats["retried"] == 1 and stats["worker_deaths"] == 1, stats

    run(main(), timeout=90)
    # exactly one of them died, and of the SIGKILL it sent itself
    assert wait_until(lambda: sum(w.is_alive() for w in dies) == 1, 10), dies
    dead = next(w for w in dies if not w.is_alive())
    dead.join(10)
    assert dead.exitcode == -signal.SIGKILL, dead


def test_run_in_this_process_with_explicit_key(make_hub, tmp_path) -> None:
    hub = make_hub(authkey="s3cret")
    script = tmp_path / "w.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {HERE!r})
            from gibbs import Worker
            from gibbs_test_models import Sleep
            Worker(Sleep, gibbs_port={hub.port}, gibbs_host="127.0.0.1",
                   gibbs_heartbeat_interval=0.2, gibbs_authkey="s3cret").run()
            print("run returned", flush=True)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        hub.wait_for_workers_sync(1, timeout=30)

        async def main() -> None:
            task = asyncio.ensure_future(hub.request(0.5, "in hand"))
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert await task == "in hand"

        run(main())
        assert proc.wait(10) == 0
        assert proc.stdout is not None and "run returned" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(10)


def test_started_worker_ignores_ctrl_c_and_keeps_serving(hub, make_workers) -> None:
    """The terminal's Ctrl-C reaches the whole process group: a worker the
    app started keeps serving, so the app's graceful shutdown can finish its
    requests; the app stops it (SIGTERM, close, exit)."""
    ws = make_workers(hub, Echo, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    os.kill(ws[0].pid, signal.SIGINT)  # type: ignore[arg-type]
    assert run(hub.request("still here"))["args"] == ("still here",)
    assert ws[0].is_alive()
    assert hub.statistics()["workers"] == 1


def test_sigterm_idle_worker_exits_zero_at_once(hub, make_workers) -> None:
    ws = make_workers(hub, Echo, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    os.kill(ws[0].pid, signal.SIGTERM)  # type: ignore[arg-type]
    ws[0].join(5)
    assert ws[0].exitcode == 0
    assert wait_until(lambda: hub.statistics()["workers"] == 0, 5)
    assert hub.statistics()["worker_deaths"] == 0  # it said goodbye


def test_worker_stops_when_its_parent_dies(tmp_path) -> None:
    pidfile = tmp_path / "pids"
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            sys.path.insert(0, {HERE!r})
            from gibbs import Worker
            from gibbs_test_models import Echo
            if __name__ == "__main__":
                w = Worker(Echo, gibbs_port=1, gibbs_host="127.0.0.1", gibbs_heartbeat_interval=0.1)
                w.start()
                open({str(pidfile)!r}, "w").write(str(w.pid))
                time.sleep(0.3)
                os._exit(0)  # the parent vanishes without stopping its worker
            """
        )
    )
    subprocess.run([sys.executable, str(script)], timeout=30, check=True)
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/status") as f:
                return "zombie" in f.read().lower()
        except FileNotFoundError:
            return True

    try:
        assert wait_until(gone, 10)
    finally:
        if not gone():
            os.kill(child, signal.SIGKILL)


def test_worker_repr_and_process_api(hub, make_workers) -> None:
    ws = make_workers(hub, Echo, 1)
    assert "alive" in repr(ws[0]) and str(ws[0].pid) in repr(ws[0])
    ws[0].terminate()
    ws[0].join(10)
    assert "exited 0" in repr(ws[0])
