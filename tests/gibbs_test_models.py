"""Models used by the tests. A module of its own so that workers started
with spawn or forkserver can import them."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import threading
import time
from typing import Any


def segfault() -> None:
    """Die of SIGSEGV, quietly: a worker started with fork inherits pytest's
    faulthandler, which would print every thread's stack into the test output
    for a crash the test asked for."""
    faulthandler.disable()
    ctypes.string_at(0)


class Square:
    def __init__(self, wait_time: float = 0.0) -> None:
        self.w = wait_time

    def __call__(self, x: Any) -> Any:
        if self.w:
            time.sleep(self.w)
        return x**2


class Echo:
    """Returns its arguments (and its pid), to check what arrived where."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return {"args": args, "kwargs": kwargs, "pid": os.getpid()}


class Identity:
    def __call__(self, x: Any) -> Any:
        return x


class Pid:
    def __init__(self, wait_time: float = 0.0) -> None:
        self.w = wait_time

    def __call__(self, *args: Any) -> int:
        if self.w:
            time.sleep(self.w)
        return os.getpid()


class Raises:
    def __call__(self, x: Any) -> Any:
        if x == "boom":
            raise ValueError(f"bad input: {x}")
        if x == "custom":
            raise UnpicklableError(x)
        return x


class UnpicklableError(Exception):
    def __init__(self, x: Any) -> None:
        super().__init__("custom failure")
        self.lock = threading.Lock()  # cannot be pickled


class BadInit:
    def __init__(self, *args: Any) -> None:
        raise RuntimeError("cannot load weights from /nowhere")

    def __call__(self, x: Any) -> Any:  # pragma: no cover - never built
        return x


class BadResult:
    def __call__(self, x: Any) -> Any:
        if x == "lambda":
            return lambda: 1
        return x


class Killer:
    """Dies on request, in several ways; answers otherwise."""

    def __init__(self, wait_time: float = 0.0) -> None:
        self.w = wait_time

    def __call__(self, x: Any) -> Any:
        if x == "exit":
            os._exit(3)
        if x == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if x == "segfault":
            segfault()
        if self.w:
            time.sleep(self.w)
        return x


class Recorder:
    """Appends each argument to a file, so tests can see what really ran."""

    def __init__(self, path: str, wait_time: float = 0.0) -> None:
        self.path = path
        self.w = wait_time

    def __call__(self, x: Any) -> Any:
        with open(self.path, "a") as f:
            f.write(f"start {x}\n")
        if self.w:
            time.sleep(self.w)
        with open(self.path, "a") as f:
            f.write(f"end {x}\n")
        return x


class Sleep:
    def __call__(self, seconds: float, value: Any = None) -> Any:
        time.sleep(seconds)
        return value


class DieOnce:
    """The first worker to run a request takes the token file and dies the way
    it is told, mid-request; the worker the request is re-sent to answers."""

    def __init__(self, token: str, wait_time: float = 0.2) -> None:
        self.token = token
        self.w = wait_time

    def __call__(self, x: Any, how: str) -> Any:
        time.sleep(self.w)
        try:
            os.unlink(self.token)
        except FileNotFoundError:
            return x
        if how == "exit":
            os._exit(7)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segfault":
            segfault()
        raise AssertionError(how)


class Clock:
    """Returns the monotonic clock (shared by every process) when called."""

    def __call__(self, *args: Any) -> int:
        return time.perf_counter_ns()


class LeakThenDie:
    """Leaves a file in /dev/shm under this worker's own prefix, as if it died
    while holding an answer's segment, then dies."""

    def __call__(self, x: Any) -> Any:
        with open(f"/dev/shm/gibbs-w{os.getpid()}-unsent", "wb") as f:
            f.write(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- named models and batching


class TextTag:
    """Answers ("text", its pid, x): which model's worker ran a request."""

    def __init__(self, wait_time: float = 0.0) -> None:
        self.w = wait_time

    def __call__(self, x: Any) -> Any:
        if self.w:
            time.sleep(self.w)
        return ("text", os.getpid(), x)


class ImageTag:
    """Answers ("image", its pid, x): a second class, for a second model name."""

    def __init__(self, wait_time: float = 0.0) -> None:
        self.w = wait_time

    def __call__(self, x: Any) -> Any:
        if self.w:
            time.sleep(self.w)
        return ("image", os.getpid(), x)


class BatchModel:
    """A batched model (``gibbs_batch_size`` > 1): called with a list of inputs.

    A plain input ``x`` answers ``(x, len(xs), position in the batch, batch
    number in this worker, pid)``. Special inputs:

    * ``("sleep", s)``: the batch takes ``s`` seconds (instead of ``wait_time``);
    * ``"boom"``: the whole call raises ValueError;
    * ``"short"``: the call returns one result too few;
    * ``"none"``: the call returns None (not a list);
    * ``("err", msg)``: that item's result is a ``ValueError(msg)`` instance.

    With ``path``, each batch is appended to that file (one line: its pid and
    ``repr(xs)``) before it runs, so tests can see what really reached it.
    """

    def __init__(self, wait_time: float = 0.0, path: Any = None) -> None:
        self.w = wait_time
        self.path = path
        self.batches = 0

    def __call__(self, xs: list) -> Any:
        assert isinstance(xs, list), type(xs)
        self.batches += 1
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"{os.getpid()} {xs!r}\n")
        sleeps = [x[1] for x in xs if isinstance(x, tuple) and len(x) == 2 and x[0] == "sleep"]
        delay = max(sleeps) if sleeps else self.w
        if delay:
            time.sleep(delay)
        if "boom" in xs:
            raise ValueError(f"the batch of {len(xs)} failed")
        if "none" in xs:
            return None
        out: list = []
        for i, x in enumerate(xs):
            if isinstance(x, tuple) and len(x) == 2 and x[0] == "err":
                out.append(ValueError(x[1]))
            else:
                out.append((x, len(xs), i, self.batches, os.getpid()))
        if "short" in xs:
            out.pop()
        return out


class BatchDieOnce:
    """A batched model: the first worker to get a batch of more than one
    input takes the token file and SIGKILLs itself mid-batch (after logging
    the batch to ``path``); others answer ``(x, pid)`` for each input."""

    def __init__(self, token: str, path: str, wait_time: float = 0.3) -> None:
        self.token = token
        self.path = path
        self.w = wait_time

    def __call__(self, xs: list) -> list:
        time.sleep(self.w)
        if len(xs) > 1:
            try:
                os.unlink(self.token)
            except FileNotFoundError:
                pass
            else:
                with open(self.path, "a") as f:
                    f.write(f"die {os.getpid()} {xs!r}\n")
                faulthandler.disable()
                os.kill(os.getpid(), signal.SIGKILL)
        with open(self.path, "a") as f:
            f.write(f"run {os.getpid()} {xs!r}\n")
        return [(x, os.getpid()) for x in xs]


# ---------------------------------------------------------------- streaming and async models


def _note(path: Any, text: str, mode: str = "a") -> None:
    if path:
        with open(path, mode) as f:
            f.write(text)


class Streamer:
    """A generator model: yields ``0 .. n-1``, sleeping ``delay`` before each.

    * ``progress``: a file rewritten with how many items the generator has
      produced so far (before each is yielded): how far ahead it ran.
    * ``marker``: a file the generator's ``finally`` appends to
      (``"closed <pid> <produced>"`` when stopped early, ``"done ..."`` at the end).
    * ``fail_at``: raise ValueError instead of producing that item.
    * ``die_at``: SIGKILL this worker instead of producing that item (with
      ``token``: only the first worker to take that file dies).
    """

    def __call__(
        self,
        n: int,
        delay: float = 0.0,
        progress: Any = None,
        marker: Any = None,
        fail_at: Any = None,
        die_at: Any = None,
        token: Any = None,
    ) -> Any:
        produced = 0
        finished = False
        try:
            for i in range(n):
                if delay:
                    time.sleep(delay)
                if die_at == i:
                    take = True
                    if token is not None:
                        try:
                            os.unlink(token)
                        except FileNotFoundError:
                            take = False
                    if take:
                        faulthandler.disable()
                        os.kill(os.getpid(), signal.SIGKILL)
                if fail_at == i:
                    raise ValueError(f"item {i} is cursed")
                produced += 1
                _note(progress, str(produced), "w")
                yield i
            finished = True
        finally:
            _note(marker, f"{'done' if finished else 'closed'} {os.getpid()} {produced}\n")


class AsyncSleep:
    """``async def __call__``: sleeps ``seconds`` on the worker's loop, returns
    ``(value, pid)``. ``value == "boom"`` raises ValueError after the sleep.
    With ``path``, appends ``start <value>`` / ``end <value>`` lines."""

    def __init__(self, path: Any = None) -> None:
        self.path = path

    async def __call__(self, seconds: float, value: Any = None) -> Any:
        import asyncio

        _note(self.path, f"start {value}\n")
        await asyncio.sleep(seconds)
        if value == "boom":
            raise ValueError("async boom")
        _note(self.path, f"end {value}\n")
        return (value, os.getpid())


class AsyncStreamer:
    """An async generator model: yields ``0 .. n-1``, awaiting
    ``asyncio.sleep(delay)`` before each; ``marker``/``progress``/``fail_at``
    as in :class:`Streamer`."""

    async def __call__(
        self, n: int, delay: float = 0.0, progress: Any = None, marker: Any = None, fail_at: Any = None
    ) -> Any:
        import asyncio

        produced = 0
        finished = False
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                if fail_at == i:
                    raise ValueError(f"async item {i} is cursed")
                produced += 1
                _note(progress, str(produced), "w")
                yield i
            finished = True
        finally:
            _note(marker, f"{'done' if finished else 'closed'} {os.getpid()} {produced}\n")


#: What this module saw of its device when it was imported (in a spawned
#: worker: after the worker set its device's environment, or not).
IMPORT_ENV = (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("GIBBS_DEVICE"))


class DeviceEnv:
    """Answers what the worker's process sees of its device: at the import of
    this module, and now."""

    def __call__(self, x: Any = None) -> Any:
        if x:
            time.sleep(x)  # hold this worker, so concurrent calls reach the others
        return {
            "import": list(IMPORT_ENV),
            "now": [os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("GIBBS_DEVICE")],
            "pid": os.getpid(),
        }


class SlowInit:
    """Takes ``seconds`` to build (a model loading its weights)."""

    def __init__(self, seconds: float = 1.0) -> None:
        time.sleep(seconds)

    def __call__(self, x: Any) -> Any:
        return x


class ArrayInfo:
    """What the model saw of its array argument: writable or not, whether it
    is a view on memory it does not own (shared memory, not a copy), and its
    checksum."""

    def __call__(self, x: Any) -> Any:
        return {"writeable": bool(x.flags.writeable), "owns": bool(x.flags.owndata), "sum": float(x.sum())}


class Doubled:
    """A new array: ``x * 2``."""

    def __call__(self, x: Any) -> Any:
        return x * 2


class DoubleInPlace:
    """Writes into its argument (needs ``gibbs_copy_args=True``)."""

    def __call__(self, x: Any) -> Any:
        x *= 2
        return x


def _only_where_made(pid: int) -> Any:
    if os.getpid() != pid:
        raise ValueError("this object unpickles only in the process that made it")
    return None


class _UnpicklableElsewhere:
    def __reduce__(self) -> Any:
        return (_only_where_made, (os.getpid(),))


class ArrayThenUnpicklable:
    """Answers a large array followed by an object that cannot be unpickled
    in the hub: the array is read (lent) before unpickling fails."""

    def __call__(self, nbytes: int) -> Any:
        import numpy as np

        return (np.ones(nbytes // 8), _UnpicklableElsewhere())


class DiesSoon:
    """Joins, then its process exits ``after`` seconds later (a model that
    crashes on its first batch, a node that keeps failing)."""

    def __init__(self, after: float) -> None:
        def die() -> None:
            time.sleep(after)
            os._exit(3)

        threading.Thread(target=die, daemon=True).start()

    def __call__(self, x: Any) -> Any:
        return x


class Versioned:
    """Answers (its version, x, its pid): which version answered is visible."""

    def __init__(self, version: str = "v1", delay: float = 0.005) -> None:
        self.version = version
        self.delay = delay

    def __call__(self, x: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        return (self.version, x, os.getpid())


class VersionedOther(Versioned):
    """Another class for the same model name (allowed during a rollout only)."""


class Warm:
    """warmup() takes a while; calls before it would see a cold model."""

    def __init__(self, warm_seconds: float = 0.5) -> None:
        self.warm_seconds = warm_seconds
        self.warmed = False
        self.calls: list[Any] = []

    def warmup(self) -> None:
        time.sleep(self.warm_seconds)
        self.warmed = True

    def __call__(self, x: Any) -> Any:
        self.calls.append(x)
        return {"warmed": self.warmed, "calls": list(self.calls)}


class Leaky:
    """Keeps 8 MiB per call: its resident memory grows until recycled."""

    def __init__(self) -> None:
        self.kept: list[bytearray] = []

    def __call__(self, x: Any) -> Any:
        self.kept.append(bytearray(8 << 20))
        for i in range(0, 8 << 20, 4096):
            self.kept[-1][i] = 1  # touched: resident
        return (x, os.getpid())


class ThreadReport:
    """What a worker sees of its CPU threads: the thread variables, its
    affinity, and torch's count when torch is installed (imported here, as a
    model's module would)."""

    VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS", "RAYON_NUM_THREADS")

    def __init__(self, with_torch: bool = True) -> None:
        self.torch: Any = None
        if with_torch:
            try:
                import torch
            except ImportError:
                pass
            else:
                self.torch = torch

    def __call__(self, x: Any = None) -> dict:
        return {
            "pid": os.getpid(),
            "env": {v: os.environ.get(v) for v in self.VARS},
            "torch": None if self.torch is None else self.torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)),
        }


def shm_mapping_of(address: int) -> str:
    """The file mapped at ``address`` in this process ('' if none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else ""
    return ""


class TensorWhere:
    """Where a model's tensor argument lies (a shared-memory file or private
    memory), its checksum, and whether it could be written (with
    ``gibbs_copy_args`` only: in place, the write would fault)."""

    def __init__(self, write: bool = False) -> None:
        self.write = write

    def __call__(self, x: Any) -> Any:
        where = shm_mapping_of(x.data_ptr())
        total = float(x.double().sum())
        if self.write:
            x.mul_(2)
        return {"where": where, "sum": total, "dtype": str(x.dtype), "shape": tuple(x.shape)}


class TensorDoubled:
    def __call__(self, x: Any) -> Any:
        return x * 2


class BatchIdentity:
    """A batched model: its answers are its inputs."""

    def __call__(self, xs: list) -> list:
        return list(xs)


class AsyncCancellable:
    """``async def __call__``: sleeps ``seconds``; appends ``start <value>``,
    then ``end <value>`` or, when the hub stops it, ``cancelled <value>``."""

    def __init__(self, path: Any) -> None:
        self.path = path

    async def __call__(self, seconds: float, value: Any = None) -> Any:
        import asyncio

        _note(self.path, f"start {value}\n")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            _note(self.path, f"cancelled {value}\n")
            raise
        _note(self.path, f"end {value}\n")
        return value


class Remaining:
    """Returns ``gibbs.remaining()`` as the model sees it (after ``sleep``)."""

    def __call__(self, sleep: float = 0.0) -> Any:
        import gibbs

        if sleep:
            time.sleep(sleep)
        return gibbs.remaining()


class AsyncRemaining:
    async def __call__(self, sleep: float = 0.0) -> Any:
        import asyncio

        import gibbs

        await asyncio.sleep(sleep)
        return gibbs.remaining()


class CallsSquare:
    """A sync model that calls another model through a plain Hub() made in
    its constructor: inside a worker, that hub is a client of this worker's."""

    def __init__(self) -> None:
        from gibbs import Hub

        self.hub = Hub()

    def __call__(self, x: Any) -> Any:
        return self.hub.submit(x, gibbs_model="square").result(timeout=30) + 1


class AsyncCalls:
    """An async model awaiting another model's answer; notes its own cancellation."""

    def __init__(self, inner: str = "square", log: str = "") -> None:
        from gibbs import Hub

        self.hub = Hub()
        self.inner = inner
        self.log = log

    async def __call__(self, x: Any) -> Any:
        import asyncio

        try:
            return await self.hub.request(x, gibbs_model=self.inner)
        except asyncio.CancelledError:
            if self.log:
                with open(self.log, "a") as f:
                    f.write(f"outer cancelled {time.monotonic()}\n")
            raise


class AsyncSlowNotes:
    """An async model that sleeps, and notes when it was cancelled."""

    def __init__(self, log: str) -> None:
        self.log = log

    async def __call__(self, seconds: float) -> Any:
        import asyncio

        try:
            await asyncio.sleep(seconds)
            return "slept"
        except asyncio.CancelledError:
            with open(self.log, "a") as f:
                f.write(f"inner cancelled {time.monotonic()}\n")
            raise


class CallsItself:
    """A model that calls its own model (which can wait on itself)."""

    def __init__(self) -> None:
        from gibbs import Hub

        self.hub = Hub()

    def __call__(self, depth: int) -> Any:
        if depth <= 0:
            return 0
        return self.hub.submit(depth - 1, gibbs_model="self").result() + 1


class Scaled:
    """Sleeps ``base * multiplier`` (a worker's own multiplier: one slow
    worker among fast ones); answers its pid."""

    def __init__(self, multiplier: float = 1.0) -> None:
        self.multiplier = multiplier

    def __call__(self, base: float) -> Any:
        time.sleep(base * self.multiplier)
        return os.getpid()


class PriorityOf:
    """Returns the priority class the worker got with the call (None: 0)."""

    def __call__(self, x: Any = None) -> Any:
        from gibbs import worker

        return worker.current_priority()


class CallsPriorityOf:
    """A sync model that calls model ``"prio"`` (its own class inherited, or ``priority``)."""

    def __init__(self) -> None:
        from gibbs import Hub

        self.hub = Hub()

    def __call__(self, priority: Any = None) -> Any:
        return (self.hub.submit(gibbs_model="prio", gibbs_priority=priority).result(timeout=30), self_priority())


def self_priority() -> Any:
    from gibbs import worker

    return worker.current_priority()


class RequestIds:
    """Returns its request id (and, with ``inner``, the ids its own calls of
    that model saw: a sync and an async nested call)."""

    def __init__(self, inner: str = "") -> None:
        from gibbs import Hub

        self.inner = inner
        self.hub = Hub() if inner else None

    def __call__(self, x: Any = None) -> Any:
        import gibbs

        mine = gibbs.request_id()
        if self.hub is None:
            return mine
        return [mine, self.hub.submit(gibbs_model=self.inner).result(timeout=30)]


class AsyncRequestIds:
    """An async model: its request id, and the id its nested call saw."""

    def __init__(self, inner: str = "") -> None:
        from gibbs import Hub

        self.inner = inner
        self.hub = Hub() if inner else None

    async def __call__(self, x: Any = None) -> Any:
        import asyncio

        import gibbs

        await asyncio.sleep(0.001)
        mine = gibbs.request_id()
        if self.hub is None:
            return mine
        return [mine, await self.hub.request(gibbs_model=self.inner)]


class BatchedRequestIds:
    def __call__(self, xs: list[Any]) -> list[Any]:
        import gibbs

        return [gibbs.request_id()] * len(xs)


class Traced:
    """Records its worker's OpenTelemetry spans (an in-memory exporter of its
    own); ``"spans"`` returns them, ``"boom"`` raises; with ``inner`` it
    calls that model first (a nested call, in the same trace)."""

    def __init__(self, inner: str = "") -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from gibbs import Hub

        self.exporter = InMemorySpanExporter()
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):  # forked: the parent's is inherited
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.inner = inner
        self.hub = Hub() if inner else None

    def __call__(self, x: Any) -> Any:
        if x == "spans":
            return [
                {
                    "name": s.name,
                    "trace_id": s.context.trace_id,
                    "span_id": s.context.span_id,
                    "parent": s.parent.span_id if s.parent is not None else None,
                    "attributes": dict(s.attributes or {}),
                    "error": not s.status.is_ok,
                }
                for s in self.exporter.get_finished_spans()
            ]
        if x == "boom":
            raise ValueError("boom")
        if self.hub is not None:
            return self.hub.submit(x, gibbs_model=self.inner).result(timeout=30)
        return x


class OtelImported:
    """Whether this worker's process has imported any of opentelemetry."""

    def __call__(self, x: Any) -> Any:
        import sys

        return [x, sorted(m for m in sys.modules if m.startswith("opentelemetry"))]
