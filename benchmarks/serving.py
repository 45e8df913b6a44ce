"""Other serving frameworks with adaptive batching, for the information rows
of the batching benchmark: LitServe (an HTTP server, driven by a minimal
keep-alive HTTP/1.1 client from this process) and Ray Serve (driven through a
DeploymentHandle in a fresh interpreter, ``python -m benchmarks.ray_app``).
Both are optional: when one does not import, its rows are skipped."""

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
import tempfile
import time
from typing import Any, AsyncIterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(Exception):
    """The framework is not installed, or its server did not come up."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def missing(module: str) -> Optional[str]:
    """None when ``module`` can be imported here, else why not (one line)."""
    try:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    except (ImportError, ValueError) as exc:
        return f"{module}: {exc}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _tail(path: str) -> str:
    """The last line of a log file (for an exception: its message)."""
    try:
        with open(path, errors="replace") as f:
            return _last_line(f.read()[-5000:])
    except OSError:
        return ""


def stop_group(proc: "subprocess.Popen[Any]", grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL to the process group of ``proc``, which was
    started by us in a new session (it and every process it started)."""
    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - not ours any more
            return False
        return True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None or group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive():
                return
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# ---------------------------------------------------------------- HTTP client


class HttpConn:
    """One keep-alive HTTP/1.1 connection: POST a JSON body (or GET), read the JSON
    answer (Content-Length framed, as uvicorn sends it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> "HttpConn":
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, host)

    async def post(self, path: str, obj: Any) -> Any:
        return await self.call("POST", path, obj)

    async def call(self, method: str, path: str, obj: Any = None) -> Any:
        body = b"" if obj is None else json.dumps(obj).encode()
        kind = "" if obj is None else "Content-Type: application/json\r\n"
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{kind}"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == "content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length) if length else b""
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Keep-alive connections to one server, one per concurrent caller."""

    def __init__(self, host: str, port: int, pid: Optional[int] = None) -> None:
        self.host, self.port = host, port
        self.pid = pid  # the server's process, when it is one of ours (to profile it)
        self.idle: list[HttpConn] = []

    async def post(self, path: str, obj: Any) -> Any:
        return await self.call("POST", path, obj)

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def call(self, method: str, path: str, obj: Any = None) -> Any:
        conn = self.idle.pop() if self.idle else await HttpConn.open(self.host, self.port)
        try:
            out = await conn.call(method, path, obj)
        except BaseException:
            conn.close()
            raise
        self.idle.append(conn)
        return out

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


# ---------------------------------------------------------------- LitServe


@contextlib.asynccontextmanager
async def litserve_server(
    batch_size: int, batch_timeout: float, workers: int, api_servers: Optional[int] = None,
    start_timeout: float = 60.0, trivial: bool = False, extra: Sequence[str] = (),
) -> AsyncIterator[HttpPool]:
    """A LitServe server (benchmarks.litserve_app) in its own process group,
    ready; yields a connection pool to it. Raises Unavailable."""
    why = missing("litserve")
    if why:
        raise Unavailable(f"{why} (pip install litserve)")
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="gibbs-bench-litserve-", suffix=".log", delete=False)
    cmd = [
        sys.executable, "-m", "benchmarks.litserve_app", "--port", str(port),
        "--batch-size", str(batch_size), "--batch-timeout", str(batch_timeout), "--workers", str(workers),
    ]
    if api_servers:
        cmd += ["--api-servers", str(api_servers)]
    if trivial:
        cmd.append("--trivial")
    cmd += list(extra)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pool = HttpPool("127.0.0.1", port)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise Unavailable(f"the LitServe server exited ({proc.returncode}): {_tail(log.name)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"the LitServe server was not ready within {start_timeout:.0f} s: {_tail(log.name)}")
            try:
                await pool.post("/unbatched", {"x": -1})
                await pool.post("/batched", {"x": -1})
                break
            except (OSError, asyncio.IncompleteReadError, RuntimeError):
                pool.close()
                await asyncio.sleep(0.1)
        yield pool
    finally:
        pool.close()
        stop_group(proc)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


# ---------------------------------------------------------------- Ray Serve


def start_ray_serve() -> tuple[Any, Any]:
    """In a Ray benchmark's own interpreter: a quiet local Ray instance and
    Serve without its HTTP proxy; returns ``(ray, serve)``. Raises
    ImportError without ``ray[serve]``.

    Serve runs in its documented throughput mode (user code on the replica's
    main loop, router in the caller's loop, gRPC between them): without it,
    on this 2-core machine, even an identity deployment answers 64
    concurrent callers at < 100 req/s (queue-length probes time out); with
    it, ~500. Set before Ray starts, so that the replicas inherit it."""
    import logging

    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    return ray, serve


def ray_unavailable(exc: ImportError) -> int:
    """A Ray benchmark's answer without ``ray[serve]``: one JSON line."""
    print(json.dumps({"unavailable": f"ray[serve] does not import: {exc} (pip install 'ray[serve]')"}), flush=True)
    return 0


def run_ray(args: list[str], timeout: float = 600.0, module: str = "benchmarks.ray_app") -> dict[str, Any]:
    """Run ``python -m MODULE ARGS`` (``benchmarks.ray_app`` by default; in
    its own process group, reaped whatever happens); returns its JSON
    result. Raises Unavailable."""
    why = missing("ray")
    if why:
        raise Unavailable(f"{why} (pip install 'ray[serve]')")
    cmd = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None
        finally:
            stop_group(proc)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise Unavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {_last_line(err.read()[-5000:])}")
        result: dict[str, Any] = json.loads(lines[-1])
        if "unavailable" in result:
            raise Unavailable(result["unavailable"])
        return result
