"""Baselines: a raw multiprocessing Pipe (the limit), ProcessPoolExecutor
behind ``loop.run_in_executor`` (the stdlib alternative), and the bare
shared-memory copies of a big array."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import multiprocessing
from multiprocessing import shared_memory
from typing import Any, Awaitable, Callable, Sequence

from .common import perf, reap
from .models import identity, pipe_echo, socket_echo

# ---------------------------------------------------------------- raw Pipe


class PipeEcho:
    """One echo child process behind a duplex multiprocessing.Pipe."""

    def __enter__(self) -> "PipeEcho":
        self.conn, child = multiprocessing.Pipe(duplex=True)
        self.proc = multiprocessing.Process(target=pipe_echo, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.conn.close()
        reap([self.proc])

    def ping_pong(self, n: int) -> list[float]:
        """n sequential round trips of a small object; one latency each."""
        send, recv = self.conn.send, self.conn.recv
        lat = []
        for i in range(n):
            t = perf()
            send(i)
            recv()
            lat.append(perf() - t)
        return lat

    def pipelined(self, n: int, window: int = 64) -> float:
        """Messages per second with ``window`` messages outstanding (the
        pipe's buffer holds them all, so one thread cannot deadlock)."""
        send, recv = self.conn.send, self.conn.recv
        t0 = perf()
        for i in range(min(window, n)):
            send(i)
        for i in range(window, n):
            recv()
            send(i)
        for _ in range(min(window, n)):
            recv()
        return n / (perf() - t0)


# ---------------------------------------------------------------- the asyncio floor


class AsyncioFloor:
    """What any asyncio API over a local socket must pay: one event loop, a
    socketpair to an echo process, ``loop.add_reader`` on it whose callback
    reads and resolves the waiting future; each call pickles its argument,
    creates the future, sends, awaits and unpickles. No thread, no lock, no
    copy beyond the kernel's and pickle's."""

    async def __aenter__(self) -> "AsyncioFloor":
        import pickle
        import socket
        import struct

        self._dumps, self._loads = pickle.dumps, pickle.loads
        self._header = struct.Struct("!I")
        self.sock, child = socket.socketpair()
        self.proc = multiprocessing.get_context("fork").Process(target=socket_echo, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.waiting: "collections.deque[asyncio.Future[Any]]" = collections.deque()
        self.buf = bytearray()
        self.loop.add_reader(self.sock.fileno(), self._readable)
        return self

    def _readable(self) -> None:
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        buf = self.buf
        buf += data
        header = self._header
        while len(buf) >= 4:
            (n,) = header.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            body = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(self._loads(body))

    async def call(self, x: Any) -> Any:
        body = self._dumps(x, 5)
        fut = self.loop.create_future()
        self.waiting.append(fut)
        self.sock.send(self._header.pack(len(body)) + body)
        return await fut

    async def __aexit__(self, *exc: Any) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        reap([self.proc])


# ---------------------------------------------------------------- concurrency driver


def burn(seconds: float) -> None:
    """Spin the CPU (holding the GIL) for ``seconds``: an endpoint's JSON
    parsing and validation, in the event loop."""
    end = perf() + seconds
    while perf() < end:
        pass


async def drive_concurrent(
    call: Callable[[int], Awaitable[Any]], total: int, concurrency: int, cpu: float = 0.0
) -> tuple[float, list[float]]:
    """``concurrency`` asyncio tasks issue ``total`` calls between them, each
    waiting for its answer before its next call. With ``cpu``, each caller
    burns that many seconds of CPU in the event loop before each call (not
    counted in the call's latency). Returns (calls per second, per-call
    latencies)."""
    lat: list[float] = []
    left = [total]

    async def caller() -> None:
        while left[0] > 0:
            left[0] -= 1
            if cpu:
                burn(cpu)
            t = perf()
            await call(left[0])
            lat.append(perf() - t)

    t0 = perf()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return total / (perf() - t0), lat


async def drive_sequential(call: Callable[[Any], Awaitable[Any]], n: int, arg: Any = None) -> list[float]:
    lat = []
    for i in range(n):
        x = i if arg is None else arg
        t = perf()
        await call(x)
        lat.append(perf() - t)
    return lat


async def drive_alternating(calls: Sequence[Callable[[Any], Awaitable[Any]]], n: int) -> list[list[float]]:
    """One sequential caller: n rounds, each making one call with each of
    ``calls`` in turn (so that a change of machine load affects them alike).
    Returns the latencies of each."""
    lat: list[list[float]] = [[] for _ in calls]
    for i in range(n):
        for call, out in zip(calls, lat):
            t = perf()
            await call(i)
            out.append(perf() - t)
    return lat


# ---------------------------------------------------------------- ProcessPoolExecutor


class PPE:
    """ProcessPoolExecutor(n) used through loop.run_in_executor."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    async def __aenter__(self) -> "PPE":
        self.pool = concurrent.futures.ProcessPoolExecutor(self.workers)
        self.loop = asyncio.get_running_loop()
        # Start every process before timing anything.
        await asyncio.gather(*(self.call(i) for i in range(self.workers * 4)))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        procs = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=True, cancel_futures=True)
        reap(procs)

    def call(self, x: Any) -> "asyncio.Future[Any]":
        return self.loop.run_in_executor(self.pool, identity, x)


# ---------------------------------------------------------------- shared-memory copies


class ShmCopies:
    """The copies of a shared-memory transport, alone. ``two_copies``: what
    one that reads in place on both sides cannot avoid (the request written
    in, the answer written out). ``round_trip``: the array written into a
    shared-memory segment and read back out, there and back (four copies). ``fresh=False``: one segment made before timing (its pages
    already faulted in): memcpy only. ``fresh=True``: a new segment for each
    direction (create, fault in, copy, copy out, unlink), as a transport that
    does not recycle segments must."""

    def __init__(self, nbytes: int) -> None:
        self.seg = shared_memory.SharedMemory(create=True, size=nbytes)
        self.seg.buf[:] = b"\0" * nbytes  # fault the pages in

    def close(self) -> None:
        self.seg.close()
        self.seg.unlink()

    def two_copies(self, arr: Any) -> Any:
        """The floor of a round trip whose receivers read in place: the array
        written into the segment, and copied out once (the answer's write)."""
        import numpy as np

        view = np.ndarray(arr.shape, arr.dtype, buffer=self.seg.buf)
        view[...] = arr  # the request, written in
        out = view.copy()  # the answer, written out of it
        del view
        return out

    def round_trip(self, arr: Any, fresh: bool) -> Any:
        import numpy as np

        out = arr
        for _ in range(2):  # there, and back
            seg = shared_memory.SharedMemory(create=True, size=arr.nbytes) if fresh else self.seg
            try:
                view = np.ndarray(arr.shape, arr.dtype, buffer=seg.buf)
                view[...] = out  # write it in
                out = view.copy()  # read it back out
                del view
            finally:
                if fresh:
                    seg.close()
                    seg.unlink()
        return out
