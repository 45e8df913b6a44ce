"""Shared fixtures. Every process a test starts is reaped here, even when the
test fails; every test has a hard deadline (pytest-timeout, pyproject.toml)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from gibbs import Hub, Worker  # noqa: E402

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run a coroutine in a fresh event loop with a hard deadline."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def make_hub() -> Iterator[Callable[..., Hub]]:
    """Hubs on free ports with short heartbeats; all closed at teardown."""
    hubs: list[Hub] = []

    def factory(**kwargs: Any) -> Hub:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("heartbeat_interval", 0.2)
        hub = Hub(**kwargs)
        hub.start()
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        hub.close(grace=0)


@pytest.fixture
def hub(make_hub: Callable[..., Hub]) -> Hub:
    return make_hub()


@pytest.fixture
def make_workers() -> Iterator[Callable[..., list[Worker]]]:
    """Start worker processes for a hub; every one is killed and joined at teardown."""
    started: list[Worker] = []

    def factory(hub: Hub, cls: Any, n: int = 1, *args: Any, **kwargs: Any) -> list[Worker]:
        kwargs.setdefault("gibbs_port", hub.port)
        kwargs.setdefault("gibbs_host", "127.0.0.1")
        kwargs.setdefault("gibbs_heartbeat_interval", 0.2)
        ws = [Worker(cls, *args, **kwargs) for _ in range(n)]
        for w in ws:
            w.start()
            started.append(w)
        return ws

    yield factory
    for w in started:
        w.kill()
    for w in started:
        w.join(10)
        assert not w.is_alive(), f"worker {w.pid} could not be reaped"


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """Whatever a test left running is killed, so one failure cannot hang the next."""
    yield
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def shm_files(prefix: str = "gibbs-") -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix) and "probe" not in n)
    except OSError:
        return []




def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InThreadServer:
    """An ASGI app under a real uvicorn server, in a thread of this process
    (its lifespan runs); ``url`` once started; ``stop()`` waits for it."""

    def __init__(self, app: Any, timeout: float = 60.0) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        if not wait_until(lambda: self._server.started or not self._thread.is_alive(), timeout=timeout):
            self.stop()
            raise RuntimeError(f"uvicorn did not start within {timeout} s")
        if not self._server.started:
            raise RuntimeError("uvicorn stopped while starting (see its log)")

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
