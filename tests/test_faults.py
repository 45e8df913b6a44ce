"""No request lost: worker deaths, hangs, hub restarts, cancellation,
backpressure and shutdown under load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import run, wait_until
from gibbs_test_models import DieOnce, Killer, Pid, Recorder, Sleep, Square

from gibbs import Hub, HubClosedError, QueueFullError, WorkerDiedError


def busy_pid(hub: Hub) -> int:
    assert wait_until(lambda: any(w["in_flight"] for w in hub.workers()), 10)
    return next(w["pid"] for w in hub.workers() if w["in_flight"])


@pytest.mark.parametrize("how", ["sigkill", "exit", "segfault"])
def test_worker_death_mid_request_resends_to_another(hub, make_workers, tmp_path, how) -> None:
    token = tmp_path / "token"
    token.write_text("")
    ws = make_workers(hub, DieOnce, 2, str(token))
    hub.wait_for_workers_sync(2, timeout=30)

    async def main() -> None:
        assert await hub.request("survivor", how) == "survivor"
        stats = hub.statistics()
        assert stats["retried"] == 1 and stats["worker_deaths"] == 1, stats

    run(main())
    assert not token.exists()
    assert sum(w.is_alive() for w in ws) == 1


@pytest.mark.parametrize("how", ["exit", "sigkill", "segfault"])
def test_request_that_kills_every_worker_fails_after_the_bound(make_hub, make_workers, how) -> None:
    hub = make_hub(max_attempts=2)
    ws = make_workers(hub, Killer, 4)
    hub.wait_for_workers_sync(4, timeout=30)

    async def main() -> None:
        with pytest.raises(WorkerDiedError) as info:
            await hub.request(how)
        msg = str(info.value)
        assert "2 times" in msg
        dead = [w for w in ws if not w.is_alive()]
        assert len(dead) == 2  # the bound: the rest of the pool is untouched
        for w in dead:
            assert f"pid {w.pid}" in msg
        expected = {"exit": "exit code 3", "sigkill": "SIGKILL", "segfault": "SIGSEGV"}[how]
        assert expected in msg, msg
        # the pool still serves
        assert await asyncio.gather(*(hub.request(i) for i in range(6))) == list(range(6))

    run(main())


def test_hung_worker_is_dropped_after_missed_heartbeats_and_request_resent(make_hub, make_workers) -> None:
    hub = make_hub(heartbeat_interval=0.2, heartbeat_misses=3)
    make_workers(hub, Pid, 2, 0.5)
    hub.wait_for_workers_sync(2, timeout=30)

    async def main() -> None:
        task = asyncio.ensure_future(hub.request())
        victim = await asyncio.get_running_loop().run_in_executor(None, busy_pid, hub)
        os.kill(victim, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            served_by = await task
            assert served_by != victim
            # dropped within its heartbeat bound (0.6 s) plus the re-run (0.5 s), generously
            assert time.monotonic() - t0 < 5
            assert hub.statistics()["worker_deaths"] == 1
            assert victim not in [w["pid"] for w in hub.workers()]
        finally:
            os.kill(victim, signal.SIGCONT)

    run(main())


def test_long_model_call_is_not_mistaken_for_death(make_hub, make_workers) -> None:
    hub = make_hub(heartbeat_interval=0.1, heartbeat_misses=2)
    make_workers(hub, Sleep, 1, gibbs_heartbeat_interval=0.1)
    hub.wait_for_workers_sync(1, timeout=30)
    assert run(hub.request(1.5, "done")) == "done"  # 15 heartbeat intervals
    assert hub.statistics()["worker_deaths"] == 0


def test_hub_restart_workers_reconnect_and_old_answers_never_reach_new_callers(make_hub, make_workers) -> None:
    hub1 = make_hub()
    port = hub1.port
    make_workers(hub1, Sleep, 1)
    hub1.wait_for_workers_sync(1, timeout=30)

    async def first() -> None:
        task = asyncio.ensure_future(hub1.request(1.0, "old"))
        await asyncio.sleep(0.2)
        await hub1.aclose(grace=0)  # the worker is still running "old"
        with pytest.raises(HubClosedError):
            await task

    run(first())
    hub2 = make_hub(port=port)
    hub2.wait_for_workers_sync(1, timeout=30)
    # the worker came back to the new hub on its own; its old answer went nowhere
    assert run(hub2.request(0.0, "new")) == "new"
    assert hub2.statistics()["completed"] == 1


def test_no_worker_timeout_removes_the_queued_request(hub) -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await hub.request(1, gibbs_timeout=0.2)
        assert hub.statistics()["queued"] == 0
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await hub.request(1, gibbs_timeout=0.1, gibbs_retries=2)
        assert time.monotonic() - t0 >= 0.29

    run(main())


def test_retries_wait_for_late_workers(hub, make_workers) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(hub.request(3, gibbs_timeout=0.2, gibbs_retries=-1))
        await asyncio.sleep(0.5)
        assert not task.done()
        make_workers(hub, Square, 1)
        assert await task == 9

    run(main())


def test_cancelled_queued_request_never_runs(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "calls.log"
    make_workers(hub, Recorder, 1, str(log), 0.3)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        running = asyncio.ensure_future(hub.request("a"))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(hub.request("b"))
        timed_out = asyncio.ensure_future(hub.request("c", gibbs_timeout=0.1))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(asyncio.TimeoutError):
            await timed_out
        assert await running == "a"
        assert await hub.request("d") == "d"

    run(main())
    assert log.read_text().split() == ["start", "a", "end", "a", "start", "d", "end", "d"]
    assert hub.statistics()["cancelled"] == 2


def test_cancelled_running_request_does_not_disturb_the_worker(hub, make_workers) -> None:
    ws = make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        task = asyncio.ensure_future(hub.request(0.4, "dropped"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await hub.request(0.0, "next") == "next"

    run(main())
    assert ws[0].is_alive()
    assert hub.statistics()["worker_deaths"] == 0


def test_cancelled_thread_future_is_removed(hub, make_workers, tmp_path) -> None:
    log = tmp_path / "calls.log"
    make_workers(hub, Recorder, 1, str(log), 0.3)
    hub.wait_for_workers_sync(1, timeout=30)
    first = hub.submit("a")
    time.sleep(0.1)
    second = hub.submit("b")
    assert second.cancel()
    assert first.result(timeout=10) == "a"
    assert hub.submit("c").result(timeout=10) == "c"
    assert "b" not in log.read_text().split()


def test_backpressure_max_queued(make_hub) -> None:
    hub = make_hub(max_queued=2)

    async def main() -> None:
        queued = [asyncio.ensure_future(hub.request(i)) for i in range(2)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match="max_queued=2"):
            await hub.request(99)
        assert time.monotonic() - t0 < 0.5
        for q in queued:
            q.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        # room again once they are gone
        extra = asyncio.ensure_future(hub.request(1))
        await asyncio.sleep(0.05)
        assert not extra.done()
        extra.cancel()

    run(main())


def test_close_under_load_finishes_running_fails_queued(hub, make_workers) -> None:
    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        running = asyncio.ensure_future(hub.request(0.5, "finished"))
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(hub.request(0.5, i)) for i in range(3)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await hub.aclose(grace=5)
        assert time.monotonic() - t0 < 2
        assert await running == "finished"
        for q in queued:
            with pytest.raises(HubClosedError):
                await q
        with pytest.raises(HubClosedError):
            await hub.request(0, 1)

    run(main())


def test_close_grace_bounds_the_wait(hub, make_workers) -> None:
    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        running = asyncio.ensure_future(hub.request(30, "never"))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await hub.aclose(grace=0.3)
        assert time.monotonic() - t0 < 3
        with pytest.raises(HubClosedError, match="grace"):
            await running

    run(main())


def test_sigterm_lets_busy_worker_answer_then_exit_zero(hub, make_workers) -> None:
    ws = make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)

    async def main() -> None:
        task = asyncio.ensure_future(hub.request(0.6, "answered"))
        await asyncio.sleep(0.2)
        ws[0].terminate()
        assert await task == "answered"

    run(main())
    ws[0].join(10)
    assert ws[0].exitcode == 0


def test_sigterm_requeues_requests_sent_ahead_without_loss(make_hub, make_workers) -> None:
    hub = make_hub(pipeline_depth=4)
    ws = make_workers(hub, Square, 2, 0.001)
    hub.wait_for_workers_sync(2, timeout=30)

    async def main() -> None:
        tasks = [asyncio.ensure_future(hub.request(i)) for i in range(400)]
        await asyncio.sleep(0.05)
        ws[0].terminate()
        assert await asyncio.gather(*tasks) == [i * i for i in range(400)]

    run(main())
    ws[0].join(10)
    assert ws[0].exitcode == 0


def test_program_that_simply_ends_exits_promptly_leaving_nothing(tmp_path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from gibbs import Hub, Worker
            from gibbs_test_models import Square
            hub = Hub(port=0)
            if __name__ == "__main__":
                hub.start()
                ws = [Worker(Square, gibbs_port=hub.port) for _ in range(2)]
                for w in ws:
                    w.start()
                print(" ".join(str(w.pid) for w in ws), flush=True)
                async def main():
                    await hub.wait_for_workers(2, 30)
                    return await hub.request(5)
                assert asyncio.run(main()) == 25
                # no close(), no terminate(): the program just ends
            """
        )
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 20
    pids = [int(p) for p in proc.stdout.split()]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
