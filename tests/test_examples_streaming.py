"""End to end: ``examples/streaming_app.py`` (tokens as server-sent events)
under a real uvicorn server, read by a real streaming HTTP client.

The app takes its ports from the environment (``PORT``, ``GIBBS_PORT``):
each server here gets two free ports, so these tests never collide with the
walkthrough app's fixed 8000/5019 or with each other. ``STREAM_LOG`` is a
file the model's generator writes to in its ``finally`` (in the worker
process): ``done <n>``, or ``closed after <n>`` when gibbs closed it early.

The server runs in its own process group; teardown sends SIGINT (Ctrl-C),
then SIGTERM, then SIGKILL to the group, and fails if any process of it (the
app or a worker) is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator, Optional

import pytest
from conftest import wait_until

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "examples", "streaming_app.py")
TOKEN_DELAY = 0.08  # seconds per token in the served model
WORKERS = 2


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("streaming_app_under_test", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds a Hub object: it binds nothing until used
    return module


REPLY = _load_example().REPLY


def expected_reply(prompt: str, repeat: int = 1) -> str:
    return f"You said: {prompt}. {REPLY} " * repeat


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of the process group ``pgid``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{pid}: {cmd}")
    return found


def wait_group_gone(pgid: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


class StreamingApp:
    """``python examples/streaming_app.py`` on free ports, in its own process group."""

    def __init__(self, tmp_dir: str) -> None:
        self.port = free_port()
        self.hub_port = free_port()
        while self.hub_port == self.port:
            self.hub_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stream_log = os.path.join(tmp_dir, "streams.log")
        self.log_path = os.path.join(tmp_dir, "app.log")
        self._log = open(self.log_path, "wb")
        env = dict(
            os.environ,
            PORT=str(self.port),
            HOST="127.0.0.1",
            GIBBS_PORT=str(self.hub_port),
            WORKERS=str(WORKERS),
            TOKEN_DELAY=str(TOKEN_DELAY),
            STREAM_LOG=self.stream_log,
            PYTHONUNBUFFERED="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, APP],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def streams(self) -> list[str]:
        try:
            with open(self.stream_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/stats", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/docs", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"{self.base}/docs did not answer within {timeout} s:\n{self.log()}")
        # The hub starts on the first request; then the workers connect to it.
        events = read_events(self.base, "warm up")[0]
        assert events[-1] == "[DONE]", events
        assert wait_until(lambda: self.stats()["workers"] == WORKERS, 30), self.stats()

    def stop(self) -> None:
        try:
            for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                if self.proc.poll() is not None and not group_members(self.proc.pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
                if self.proc.poll() is not None and not wait_group_gone(self.proc.pid, wait):
                    break
        finally:
            self._log.close()


def read_events(
    base: str, prompt: str, repeat: int = 1, stop_after: Optional[int] = None
) -> tuple[list[Any], list[float], httpx.Response]:
    """Read ``/stream`` with a streaming client: the events' data (tokens
    decoded from JSON, and the final ``"[DONE]"``), the second each arrived at
    (from the request), and the response. ``stop_after``: leave (close the
    connection) after that many events."""
    events: list[Any] = []
    times: list[float] = []
    with httpx.Client(base_url=base, timeout=httpx.Timeout(30.0)) as client:
        t0 = time.monotonic()
        with client.stream("GET", "/stream", params={"prompt": prompt, "repeat": repeat}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line:
                    continue  # the blank line that ends an event
                assert line.startswith("data: "), line
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data)["token"])
                times.append(time.monotonic() - t0)
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events, times, response


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[StreamingApp]:
    server = StreamingApp(str(tmp_path_factory.mktemp("streaming_app")))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        left = wait_group_gone(server.proc.pid, 10)
        assert not left, "processes left after stopping the app:\n" + "\n".join(left) + "\n" + server.log()[-3000:]
        assert "Traceback" not in server.log(), server.log()


# ------------------------------------------------------------------ tests


def test_tokens_arrive_one_by_one_as_server_sent_events(app: StreamingApp) -> None:
    before = len(app.streams())
    events, times, response = read_events(app.base, "stream me")
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    assert events[-1] == "[DONE]"
    tokens = events[:-1]
    assert "".join(tokens) == expected_reply("stream me")
    assert tokens == [w + " " for w in expected_reply("stream me").split()]  # one event per token
    n = len(tokens)
    whole = n * TOKEN_DELAY
    # The first token after about one token's latency; the rest one by one.
    assert times[0] < whole / 2, f"the first token came after {times[0]:.2f} s of a {whole:.2f} s reply"
    assert times[n - 1] - times[0] >= whole / 2, f"tokens came in a burst: {times}"
    gaps = [b - a for a, b in zip(times, times[1:n])]
    assert sum(1 for g in gaps if g >= TOKEN_DELAY / 4) >= n // 2, f"most tokens arrived together: {gaps}"
    assert wait_until(lambda: len(app.streams()) > before, 10)
    assert app.streams()[before:] == [f"done {n}"]


def test_two_clients_stream_at_once(app: StreamingApp) -> None:
    async def one(client: Any, prompt: str) -> tuple[list[Any], float, float]:
        events: list[Any] = []
        first = last = 0.0
        async with client.stream("GET", "/stream", params={"prompt": prompt}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data)["token"])
                    now = time.monotonic()
                    first = first or now
                    last = now
        return events, first, last

    async def main() -> list[tuple[list[Any], float, float]]:
        async with httpx.AsyncClient(base_url=app.base, timeout=30) as client:
            return await asyncio.gather(one(client, "alpha"), one(client, "beta"))

    async def bounded() -> list[tuple[list[Any], float, float]]:
        return await asyncio.wait_for(main(), 60)

    (ev_a, first_a, last_a), (ev_b, first_b, last_b) = asyncio.run(bounded())
    assert "".join(ev_a[:-1]) == expected_reply("alpha") and ev_a[-1] == "[DONE]"
    assert "".join(ev_b[:-1]) == expected_reply("beta") and ev_b[-1] == "[DONE]"
    # Two workers: the replies overlap in time rather than one after the other.
    assert first_b < last_a and first_a < last_b, (first_a, last_a, first_b, last_b)


def test_a_client_that_leaves_early_closes_the_generator_on_the_worker(app: StreamingApp) -> None:
    before = len(app.streams())
    # A long reply (100 times the sentence: minutes of tokens), left after 3 of them.
    events, _, _ = read_events(app.base, "long", repeat=100, stop_after=3)
    assert events == ["You ", "said: ", "long. "]
    left_at = time.monotonic()
    assert wait_until(lambda: len(app.streams()) > before, 15), (
        f"the model's generator was not closed after the client left:\n{app.log()[-2000:]}"
    )
    closed_in = time.monotonic() - left_at
    (line,) = app.streams()[before:]
    assert line.startswith("closed after "), line
    assert int(line.split()[-1]) < 60, line  # stopped near where the client left, not run to the end
    assert closed_in < 10, closed_in
    # The hub saw the caller go and the worker is free again.
    assert wait_until(lambda: app.stats()["in_flight"] == 0, 10), app.stats()
    assert app.stats()["abandoned"] >= 1, app.stats()
    events, _, _ = read_events(app.base, "again")
    assert "".join(events[:-1]) == expected_reply("again")


def test_every_worker_freed_after_many_clients_leave(app: StreamingApp) -> None:
    before = len(app.streams())
    for i in range(2 * WORKERS):
        events, _, _ = read_events(app.base, f"bye {i}", repeat=100, stop_after=2)
        assert events[:1] == ["You "]
    assert wait_until(lambda: len(app.streams()) >= before + 2 * WORKERS, 20), app.streams()[before:]
    assert all(line.startswith("closed after ") for line in app.streams()[before:]), app.streams()[before:]
    assert wait_until(lambda: app.stats()["in_flight"] == 0, 10), app.stats()
    stats = app.stats()
    assert stats["workers"] == WORKERS and stats["worker_deaths"] == 0, stats
