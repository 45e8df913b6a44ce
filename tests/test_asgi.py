"""gibbs.asgi: overload -> 503 with Retry-After, deadline -> 504, and a client
that disconnects mid-request cancels its call, down to the async model in the
worker. End to end: ``examples/http_deadlines_app.py`` under a real uvicorn,
clients on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from conftest import wait_until

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_examples_streaming import free_port, wait_group_gone  # noqa: E402

from gibbs import DeadlineExceededError, OverloadedError  # noqa: E402
from gibbs.asgi import CancelOnDisconnect, error_response  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "examples", "http_deadlines_app.py")


def test_error_response() -> None:
    status, headers, body = error_response(OverloadedError("busy", retry_after=0.2))  # type: ignore[misc]
    assert status == 503 and headers["retry-after"] == "1" and b"busy" in body
    assert error_response(OverloadedError("busy", retry_after=2.5))[1]["retry-after"] == "3"  # type: ignore[index]
    assert error_response(DeadlineExceededError("late"))[0] == 504  # type: ignore[index]
    assert error_response(ValueError("x")) is None


@pytest.mark.timeout(30)
def test_plain_asgi_app_errors_and_disconnect() -> None:
    """The middleware alone, with a fake server: a gibbs error before the
    response is mapped; a disconnect cancels the endpoint where it waits."""
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/busy":
            raise OverloadedError("busy", retry_after=3)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        def server() -> Any:
            """A server's receive: the request, then (as a server does once
            the body is read) nothing until the client disconnects."""
            messages = [{"type": "http.request", "body": b"", "more_body": False}]

            async def receive() -> Any:
                if messages:
                    return messages.pop()
                await asyncio.sleep(0.05)
                return {"type": "http.disconnect"}

            return receive

        await CancelOnDisconnect(app)({"type": "http", "path": "/busy"}, server(), send)
        assert sent[0]["status"] == 503 and (b"retry-after", b"3") in sent[0]["headers"]

        await asyncio.wait_for(CancelOnDisconnect(app)({"type": "http", "path": "/"}, server(), send), 5)
        assert cancelled.is_set()

    asyncio.run(main())


class App:
    def __init__(self, tmp: str) -> None:
        self.port = free_port()
        self.hub_port = free_port()
        self.calls = os.path.join(tmp, "calls")
        self.log_path = os.path.join(tmp, "app.log")
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PORT=str(self.port), HOST="127.0.0.1", GIBBS_PORT=str(self.hub_port),
                   CALL_LOG=self.calls, WORKERS="1")
        self.proc = subprocess.Popen([sys.executable, APP], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def noted(self) -> list[str]:
        try:
            with open(self.calls) as f:
                return f.read().split()
        except FileNotFoundError:
            return []

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/work", params={"seconds": 0}, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the app did not answer:\n{self.log()}")

    def stop(self) -> None:
        for sig in (signal.SIGINT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
            if not wait_group_gone(self.proc.pid, 10):
                break
        self._log.close()


@pytest.fixture
def http_app(tmp_path: Any) -> Iterator[App]:
    app = App(str(tmp_path))
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


@pytest.mark.timeout(180)
def test_http_deadline_overload_and_disconnect(http_app: App) -> None:
    # A passed deadline: 504, and the model's coroutine is cancelled.
    r = httpx.get(f"{http_app.base}/work", params={"seconds": 30, "timeout": 0.3}, timeout=20)
    assert r.status_code == 504 and "took too long" in r.json()["detail"], r.text
    assert wait_until(lambda: http_app.noted().count("cancelled") == 1, 10), http_app.noted()

    # A client that disconnects mid-request: its call is cancelled in the worker.
    with socket.create_connection(("127.0.0.1", http_app.port), timeout=10) as s:
        # timeout=60: only the disconnect can end it within the test's wait
        s.sendall(b"GET /work?seconds=30&timeout=60 HTTP/1.1\r\nHost: test\r\n\r\n")
        assert wait_until(lambda: http_app.noted().count("start") == 3, 10), http_app.noted()
    assert wait_until(lambda: http_app.noted().count("cancelled") == 2, 5), http_app.noted()
    assert "end" not in http_app.noted()[2:]

    # Overload: the hub measures 0.2 s calls, then sheds what cannot finish in time.
    for _ in range(3):
        assert httpx.get(f"{http_app.base}/work", params={"seconds": 0.2}, timeout=20).status_code == 200

    async def burst() -> list[Any]:
        async with httpx.AsyncClient(base_url=http_app.base, timeout=20) as client:
            return await asyncio.gather(
                *(client.get("/work", params={"seconds": 0.2, "timeout": 1.0}) for _ in range(20))
            )

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes, codes
    shed = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in shed)
    assert "overloaded" in shed[0].json()["detail"]
