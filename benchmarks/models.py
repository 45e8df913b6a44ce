"""Models and helpers that worker processes must be able to import."""

from __future__ import annotations

import time
from typing import Any


class Echo:
    """The trivial model: gives back its argument (identity)."""

    def __call__(self, x: Any) -> Any:
        return x


class Sleeper:
    """The walkthrough's model: sleeps, then answers."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, x: Any) -> Any:
        time.sleep(self.seconds)
        return x


class Gated:
    """Echo whose first call waits for ``gate`` (a multiprocessing.Event):
    lets a benchmark connect workers to a hub holding a long queue, and start
    the clock only when every worker is connected and the gate opens."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.opened = False

    def __call__(self, x: Any) -> Any:
        if not self.opened:
            self.gate.wait(120)
            self.opened = True
        return x


# The adaptive-batching rows: a stand-in for a GPU model whose call costs a
# fixed GPU_BASE plus GPU_PER_ITEM for each item of the batch (time.sleep).
GPU_BASE = 0.002
GPU_PER_ITEM = 0.00005


def gpu_cost(n: int) -> float:
    """Seconds one call of the stand-in GPU model takes on ``n`` items."""
    return GPU_BASE + GPU_PER_ITEM * n


class FakeGPU:
    """The stand-in GPU model. ``batched``: called as ``model(xs)`` with a list
    of inputs, sleeps ``gpu_cost(len(xs))`` and returns them; otherwise called
    as ``model(x)``, sleeps ``gpu_cost(1)`` and returns ``x``. ``counters``
    (optional, a shared ``multiprocessing.RawArray("q", 3)`` of this worker's
    alone) counts the calls, the items, and the nanoseconds spent in calls:
    the mean batch size and how busy the worker was."""

    def __init__(self, batched: bool, counters: Any = None) -> None:
        self.batched = batched
        self.counters = counters

    def __call__(self, x: Any) -> Any:
        t = time.perf_counter_ns()
        n = len(x) if self.batched else 1
        time.sleep(gpu_cost(n))
        out = list(x) if self.batched else x
        c = self.counters
        if c is not None:
            c[0] += 1
            c[1] += n
            c[2] += time.perf_counter_ns() - t
        return out


def identity(x: Any) -> Any:
    """The trivial model for ProcessPoolExecutor."""
    return x


def pipe_echo(conn: Any) -> None:
    """Child end of the raw Pipe baseline: send back whatever arrives."""
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            conn.send(msg)
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        conn.close()


def socket_echo(sock: Any) -> None:
    """Child end of the asyncio-floor baseline: echo each length-prefixed
    message back as it comes."""
    import struct

    header = struct.Struct("!I")
    buf = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            out = bytearray()
            while len(buf) >= 4:
                (n,) = header.unpack_from(buf)
                if len(buf) < 4 + n:
                    break
                out += buf[: 4 + n]
                del buf[: 4 + n]
            if out:
                sock.sendall(out)
    except (OSError, KeyboardInterrupt):
        pass
    finally:
        sock.close()


class BatchedSleeper:
    """A batched model: ``model(xs)`` sleeps ``seconds`` for the whole batch
    and answers its inputs; ``counters`` (a shared ``RawArray("q", 2)``)
    counts its batches and the items it computed."""

    def __init__(self, seconds: float, counters: Any = None) -> None:
        self.seconds = seconds
        self.counters = counters

    def __call__(self, xs: Any) -> Any:
        time.sleep(self.seconds)
        c = self.counters
        if c is not None:
            c[0] += 1
            c[1] += len(xs)
        return list(xs)


class CountingEcho:
    """Echo that counts the interpreter's work of the worker serving it:
    from its ``COUNT_FROM``-th call to its ``COUNT_FROM + COUNT_CALLS``-th,
    the bytecodes executed and Python calls made by each function of the
    serving thread (its own calls left out), written as JSON to the file
    named by ``GIBBS_BENCH_COUNT_OUT`` (``benchmarks.cpu``)."""

    COUNT_FROM = 100
    COUNT_CALLS = 500

    def __init__(self) -> None:
        import collections

        self.n = 0
        self.ops: "collections.Counter[str]" = collections.Counter()
        self.calls: "collections.Counter[str]" = collections.Counter()

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            self.calls[frame.f_code.co_qualname] += 1
        elif event == "opcode":
            self.ops[frame.f_code.co_qualname] += 1
        return self._trace

    def _frames(self, on: bool) -> None:
        import sys

        f = sys._getframe(2)  # the worker's frames that called us, running already
        while f is not None:
            f.f_trace = self._trace if on else None
            f.f_trace_opcodes = on
            f = f.f_back
        sys.settrace(self._trace if on else None)

    def __call__(self, x: Any) -> Any:
        self.n += 1
        if self.n == self.COUNT_FROM:
            self._frames(True)
        elif self.n == self.COUNT_FROM + self.COUNT_CALLS:
            self._frames(False)
            import json
            import os

            mine = [k for k in self.ops if k.startswith("CountingEcho")]
            for k in mine:
                del self.ops[k]
                self.calls.pop(k, None)
            with open(os.environ["GIBBS_BENCH_COUNT_OUT"], "w") as f:
                json.dump({"ops": self.ops, "calls": self.calls, "n": self.COUNT_CALLS}, f)
        return x
