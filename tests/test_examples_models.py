"""End to end: ``examples/multi_model_app.py`` (two named models on one hub)
and ``examples/batched_app.py`` (a batched model), each run as written under
a real uvicorn server on free ports (``APP_PORT``, ``HUB_PORT``), queried by a
real HTTP client.

Every app runs in its own process group; teardown sends SIGINT (Ctrl-C),
then SIGTERM, then SIGKILL to the group, and fails if any process of it (the
app or a worker) is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator, Optional

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_APP = os.path.join(REPO, "examples", "multi_model_app.py")
BATCHED_APP = os.path.join(REPO, "examples", "batched_app.py")


# ------------------------------------------------------------------ processes


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_stat(pid: str) -> Optional[tuple[str, int]]:
    """(state, process group) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def leftovers(pgid: int, marker: str) -> list[str]:
    """Live processes in the group ``pgid`` or whose command line names ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        st = _proc_stat(pid)
        if st is None or st[0] == "Z":
            continue
        if st[1] == pgid or marker in _cmdline(pid):
            found.append(f"{pid} (pgid {st[1]}): {_cmdline(pid)}")
    return found


def wait_gone(pgid: int, marker: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(pgid, marker)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


class AppServer:
    """``python examples/<app>.py`` in its own process group, on free ports."""

    def __init__(self, script: str, log_path: str) -> None:
        self.script = script
        self.app_port = free_port("0.0.0.0")
        self.hub_port = free_port("127.0.0.1")
        self.base = f"http://127.0.0.1:{self.app_port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, APP_PORT=str(self.app_port), HUB_PORT=str(self.hub_port))
        self.proc = subprocess.Popen(
            [sys.executable, script],
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

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.script} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/docs", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"{self.base}/docs did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> Optional[int]:
        """Ctrl-C to the group, then SIGTERM, then SIGKILL; the app's exit code."""
        try:
            for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                if self.proc.poll() is not None and not leftovers(self.proc.pid, self.script):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
                if self.proc.poll() is not None and not wait_gone(self.proc.pid, self.script, wait):
                    break
            return self.proc.poll()
        finally:
            self._log.close()


@contextlib.contextmanager
def running(script: str, tmp_dir: str) -> Iterator[AppServer]:
    server = AppServer(script, os.path.join(tmp_dir, "app.log"))
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        left = wait_gone(server.proc.pid, script, 10)
        assert not left, "processes left after stopping the app:\n" + "\n".join(left)
        assert code == 0, f"the app exited with {code} on Ctrl-C:\n{server.log()[-3000:]}"
        assert "Traceback" not in server.log(), server.log()[-3000:]


def run_bounded(coro: Any, timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# ------------------------------------------------------------------ two models on one hub


def test_multi_model_app(tmp_path) -> None:
    with running(MULTI_APP, str(tmp_path)) as app:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=app.base, timeout=30) as client:
                r = await client.get("/text", params={"q": "hello gibbs world"})
                assert r.status_code == 200, r.text
                assert r.json() == {"upper": "HELLO GIBBS WORLD", "words": 3}
                r = await client.post("/image", json={"pixels": [[0, 255], [255, 0]]})
                assert r.status_code == 200, r.text
                assert r.json() == {"height": 2, "width": 2, "mean": 127.5}

                # Many concurrent callers of both models: each gets its own model's answer.
                texts = [f"word{i} " * (i % 5 + 1) for i in range(30)]
                images = [[[i, i + 2], [i + 4, i + 6], [i + 8, i + 10]] for i in range(30)]
                responses = await asyncio.gather(
                    *(client.get("/text", params={"q": t}) for t in texts),
                    *(client.post("/image", json={"pixels": p}) for p in images),
                )
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
                for t, r in zip(texts, responses[:30]):
                    assert r.json() == {"upper": t.upper(), "words": len(t.split())}
                for i, r in enumerate(responses[30:]):
                    assert r.json() == {"height": 3, "width": 2, "mean": i + 5.0}

                # FastAPI validates the body before anything reaches gibbs.
                r = await client.post("/image", json={"pixels": "not an image"})
                assert r.status_code == 422

                models = (await client.get("/models")).json()
                assert set(models) == {"text", "image"}, models
                assert models["text"]["class"].endswith(":TextModel"), models
                assert models["image"]["class"].endswith(":ImageModel"), models
                assert models["text"]["workers"] == 2 and models["image"]["workers"] == 2, models
                assert models["text"]["queued"] == 0 and models["image"]["queued"] == 0, models

        run_bounded(main(), timeout=90)


# ------------------------------------------------------------------ a batched model


async def raw_burst(port: int, xs: list[int]) -> list[dict]:
    """GET /request?x=... for every x at once: one connection each, all opened
    first, then every request written in one tight loop, so they reach the
    server together however slow the client is (an HTTP client library costs
    about a millisecond of CPU per request, as much as the model)."""
    import json

    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in xs))
    for (_, writer), x in zip(conns, xs):
        writer.write(f"GET /request?x={x} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
        try:
            data = await reader.read()  # until the server closes
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), data[:500]
        return json.loads(body)

    return await asyncio.gather(*(answer(r, w) for r, w in conns))


def test_batched_app(tmp_path) -> None:
    with running(BATCHED_APP, str(tmp_path)) as app:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=app.base, timeout=30) as client:
                r = await client.get("/request", params={"x": 7})
                assert r.status_code == 200, r.text
                assert r.json() == {"result": 49, "batch_size": 1}  # a lone request: a batch of one

                # Concurrent callers through an ordinary client: right answers, right callers.
                responses = await asyncio.gather(*(client.get("/request", params={"x": i}) for i in range(100)))
                assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
                answers = [r.json() for r in responses]
                assert [a["result"] for a in answers] == [i * i for i in range(100)]
                assert all(1 <= a["batch_size"] <= 32 for a in answers), answers

                # Requests that arrive together are batched.
                sizes: list[int] = []
                for attempt in range(5):
                    xs = [1000 * attempt + i for i in range(100)]
                    answers = await raw_burst(app.app_port, xs)
                    assert [a["result"] for a in answers] == [x * x for x in xs]
                    sizes += [a["batch_size"] for a in answers]
                    if max(sizes) > 1:
                        break
                assert all(1 <= s <= 32 for s in sizes), sizes
                assert max(sizes) > 1, f"no batch formed in five bursts of 100: {sorted(set(sizes))}"

                assert (await client.get("/request", params={"x": "nope"})).status_code == 422
                models = (await client.get("/models")).json()
                assert set(models) == {"default"}, models
                m = models["default"]
                assert m["class"].endswith(":BatchedModel") and m["workers"] == 2 and m["batch_size"] == 32, m

        run_bounded(main(), timeout=100)


# ------------------------------------------------------------------ operations: health, readiness, metrics

OPS_APP = os.path.join(REPO, "examples", "operations_app.py")


def test_operations_app(tmp_path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with running(OPS_APP, str(tmp_path)) as app:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=app.base, timeout=30) as client:
                assert (await client.get("/healthz")).status_code == 200
                deadline = time.monotonic() + 30
                while (r := await client.get("/readyz")).status_code != 200:
                    assert time.monotonic() < deadline, r.text
                    await asyncio.sleep(0.1)
                assert r.json()["ready"] == ["default"]
                t0 = time.monotonic()
                responses = await asyncio.gather(*(client.get("/request", params={"x": i}) for i in range(8)))
                assert [r.json()["result"] for r in responses] == [i * i for i in range(8)]
                assert time.monotonic() - t0 < 1.5  # 4 workers: two rounds of 0.25 s, not eight
                r = await client.get("/metrics")
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(r.text)
                    for s in f.samples
                }
                assert samples[("gibbs_requests_total", (("model", "default"),))] == 8
                assert samples[("gibbs_workers", (("model", "default"), ("state", "ready")))] == 4

        run_bounded(main())
