"""A pool of local workers that a hub starts and supervises (``hub.serve``).

One supervisor thread per pool waits on its workers' process sentinels:

* a worker that dies is replaced at once if it had joined the hub (its calls
  are re-sent by the hub meanwhile), else after a backoff; one that keeps
  dying within ``_SERVED_WELL`` seconds of joining, after a delay that
  doubles each time; one lost before joining (its handle says ``lost``: a
  Ray actor whose node went) after a backoff, without counting as a failed
  constructor; one that a launcher with a ``join_timeout`` placed but that
  did not join in time is killed and counts as a failed start;
* a worker that fails in its constructor is not restarted in a loop: if no
  worker of the pool ever joined, the pool stops at the first failure; after
  that, after ``MAX_INIT_FAILURES`` failures in a row. The hub then fails the
  model's requests at once with ``NoWorkersError`` carrying the traceback;
* ``scale(n)`` starts workers at once, or drains some: each one leaving
  finishes what it holds (SIGTERM), nothing is re-sent;
* ``close()`` (also done by ``hub.close()`` and at exit) stops them all.

Where workers run is a :class:`Launcher`'s business: :class:`LocalLauncher`
(the default) starts processes on this machine; ``gibbs.ray.Launcher`` starts
Ray actors on a cluster. The supervisor needs only a :class:`WorkerHandle`
(start, a sentinel to wait on, is_alive, join, terminate, kill, exitcode,
pid, and a token the hub records when the worker joins).

Devices: ``devices=["cuda:0", "cuda:1"]`` (or ints, or ``"auto"``) spreads the
workers over the devices, slot ``i`` on ``devices[i % len(devices)]``; each
worker process sees only its own GPU (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import shutil
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, Union

from .worker import Worker, device_name

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Pool", "resolve_devices", "Launcher", "LocalLauncher", "WorkerHandle", "WorkerFactory"]

logger = logging.getLogger("gibbs")

#: Constructor failures in a row after which a pool that once worked gives up.
MAX_INIT_FAILURES = 3
#: A restarted worker that had not joined waits this long, doubling, up to the cap.
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 10.0
#: A worker that served this long before dying is replaced at once; one that
#: died sooner after joining, after a delay that doubles each time (0.5 s up to the cap).
_SERVED_WELL = 10.0

DeviceSpec = Union[str, int]


def resolve_devices(devices: Union[None, str, Sequence[DeviceSpec]]) -> list[str]:
    """``None`` -> no devices; ``"auto"`` -> the GPUs this process may use
    (``CUDA_VISIBLE_DEVICES`` if set, else those ``nvidia-smi -L`` lists,
    else none); a list -> each as ``"cuda:N"`` or ``"cpu"``."""
    if devices is None:
        return []
    if isinstance(devices, str):
        if devices != "auto":
            return [device_name(d) for d in devices.split(",") if d.strip()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [device_name(d) for d in visible.split(",") if d.strip() and d.strip().isdigit()]
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return []
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [f"cuda:{i}" for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return [device_name(d) for d in devices]


class WorkerHandle(Protocol):
    """What a pool's supervisor needs of one worker, wherever it runs
    (:class:`~gibbs.Worker` is one: a local process)."""

    def start(self) -> None: ...

    @property
    def sentinel(self) -> Any:
        """Something ``multiprocessing.connection.wait`` accepts, ready once
        the worker has ended."""

    def is_alive(self) -> bool: ...

    def join(self, timeout: Optional[float] = None) -> None: ...

    def terminate(self) -> None:
        """Ask it to stop gracefully: it finishes what it holds."""

    def kill(self) -> None:
        """Stop it at once (the hub re-sends what it held)."""

    @property
    def exitcode(self) -> Optional[int]: ...

    @property
    def pid(self) -> Optional[int]: ...

    @property
    def token(self) -> str:
        """The worker's identity in its HELLO (``Bridge.has_joined(token)``)."""


class WorkerFactory:
    """Builds the (unstarted) :class:`~gibbs.Worker` of one slot, for a
    launcher: ``make(device, **overrides)``, where ``overrides`` are Worker
    keywords (``gibbs_host``, ``gibbs_authkey``...) a launcher may change.
    Also says where the hub listens (``bind_host``, ``port``) and its key."""

    def __init__(
        self,
        build: Callable[..., Worker],
        *,
        bind_host: str,
        port: int,
        authkey: bytes,
        devices: Sequence[str] = (),
    ) -> None:
        self._build = build
        self.bind_host = bind_host
        self.port = port
        self.authkey = authkey
        self.devices = list(devices)

    def __call__(self, device: Optional[str], **overrides: Any) -> Worker:
        return self._build(device, **overrides)


class Launcher(Protocol):
    """Starts a pool's workers somewhere. ``prepare`` runs once, in
    ``hub.serve``, before any worker starts (a place to fail early);
    ``launch`` returns an unstarted handle (the pool calls ``start()``)."""

    def prepare(self, make: WorkerFactory) -> None: ...

    def launch(self, make: WorkerFactory, device: Optional[str]) -> WorkerHandle: ...


class LocalLauncher:
    """Worker processes on this machine (``Worker.start()``): the default."""

    def prepare(self, make: WorkerFactory) -> None:
        pass

    def launch(self, make: WorkerFactory, device: Optional[str]) -> WorkerHandle:
        return make(device)

    def __repr__(self) -> str:
        return "LocalLauncher()"


class _Slot:
    __slots__ = ("device", "worker", "backoff", "not_before", "draining", "started", "joined_at", "quick",
                 "timed_out")

    def __init__(self, device: Optional[str]) -> None:
        self.device = device
        self.worker: Optional[WorkerHandle] = None
        self.backoff = _BACKOFF_FIRST  # for workers that never joined
        self.quick = 0.0  # for workers that joined and died soon after: 0 (at once), then doubling
        self.not_before = 0.0
        self.draining = False
        self.started = 0.0
        self.joined_at: Optional[float] = None
        self.timed_out = False


class Pool:
    """Workers of one model, started (by a :class:`Launcher`) and kept at
    size by the hub. Made by :meth:`Hub.serve`; thread-safe."""

    def __init__(
        self,
        hub: "Hub",
        make: WorkerFactory,
        n: int,
        model: str,
        devices: list[str],
        joined: Callable[[str], bool],
        on_give_up: Callable[[str], None],
        launcher: Optional[Launcher] = None,
    ) -> None:
        self._make = make
        self._launcher: Launcher = launcher if launcher is not None else LocalLauncher()
        self._model = model
        self._devices = devices
        self._joined = joined  # token -> has it joined the hub (ever)
        self._on_give_up = on_give_up
        self._lock = threading.Lock()  # owns every field below
        self._slots: list[_Slot] = []
        self._draining: list[WorkerHandle] = []
        self._closed = False
        self._failed: Optional[str] = None
        self._ever_joined = False
        self._init_failures = 0  # in a row
        self.restarts = 0
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._hub_repr = repr(hub)
        self._add_slots(n)
        self._thread = threading.Thread(target=self._supervise, name=f"gibbs-pool-{model}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public

    @property
    def model(self) -> str:
        return self._model

    @property
    def size(self) -> int:
        """Workers the pool keeps running (not counting those draining)."""
        with self._lock:
            return len(self._slots)

    @property
    def failed(self) -> Optional[str]:
        """Why the pool stopped restarting workers, if it did."""
        return self._failed

    @property
    def launcher(self) -> Launcher:
        return self._launcher

    def workers(self) -> list[WorkerHandle]:
        with self._lock:
            return [s.worker for s in self._slots if s.worker is not None]

    def devices(self) -> list[Optional[str]]:
        with self._lock:
            return [s.device for s in self._slots]

    def scale(self, n: int) -> None:
        """Run ``n`` workers: more start at once; fewer are drained (each
        finishes what it holds, nothing is re-sent)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"a pool's size is an int >= 0, got {n!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if n > len(self._slots):
                self._add_slots(n - len(self._slots))
            while len(self._slots) > n:
                slot = self._slots.pop()
                if slot.worker is not None:
                    slot.worker.terminate()
                    self._draining.append(slot.worker)
        self._wake()

    def close(self, grace: float = 30.0) -> None:
        """Stop every worker (SIGTERM: each finishes the call in hand), and
        kill those still running after ``grace`` seconds. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = [s.worker for s in self._slots if s.worker is not None] + self._draining
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join()
        from .worker import stop_workers

        stop_workers(workers, grace=grace)
        self._wake_r.close()
        self._wake_w.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"failed: {self._failed.splitlines()[0]}" if self._failed else "running"
        return f"<Pool {self._model!r} {self.size} workers, {self.restarts} restarts [{state}]>"

    # ------------------------------------------------------------ supervisor

    def _add_slots(self, k: int) -> None:
        """Under the lock."""
        self._thread_group = len(self._slots) + k  # the workers starting together share the cores
        for _ in range(k):
            i = len(self._slots)
            device = self._devices[i % len(self._devices)] if self._devices else None
            slot = _Slot(device)
            self._slots.append(slot)
            if self._failed is None:
                slot.worker = self._start(slot)

    def _start(self, slot: _Slot) -> WorkerHandle:
        w = self._launcher.launch(self._make, slot.device)
        if isinstance(w, Worker):
            w._thread_group = max(getattr(self, "_thread_group", 1), len(self._slots))
        w.start()
        slot.started = time.monotonic()
        slot.joined_at = None
        slot.timed_out = False
        return w

    def _failed_start(self, slot: _Slot, now: float, what: str) -> Optional[str]:
        """Under the lock: one more worker in a row that did not come up; the
        slot retries after its backoff. Returns why the pool gives up, when
        this failure is the one too many."""
        self._init_failures += 1
        slot.not_before = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, _BACKOFF_CAP)
        limit = MAX_INIT_FAILURES if self._ever_joined else 1
        if self._init_failures < limit or self._failed is not None:
            return None
        self._failed = f"the pool of model {self._model!r} stopped: {self._init_failures} worker(s) in a row {what}"
        return self._failed

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"\0")
        except OSError:
            pass

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                sentinels: list[Any] = [self._wake_r]
                sentinels += [s.worker.sentinel for s in self._slots if s.worker is not None]
                sentinels += [w.sentinel for w in self._draining]
                soonest = min((s.not_before for s in self._slots if s.worker is None), default=None)
            timeout = 1.0 if soonest is None else max(0.0, min(1.0, soonest - time.monotonic()))
            ready = multiprocessing.connection.wait(sentinels, timeout)
            if self._wake_r in ready:
                try:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                except (OSError, EOFError):
                    return
            self._step()

    def _step(self) -> None:
        now = time.monotonic()
        give_up: Optional[str] = None
        with self._lock:
            if self._closed:
                return
            for leaving in list(self._draining):
                if not leaving.is_alive():
                    leaving.join()
                    self._draining.remove(leaving)
            join_timeout: Optional[float] = getattr(self._launcher, "join_timeout", None)
            for slot in self._slots:
                w = slot.worker
                if w is not None and slot.joined_at is None and self._joined(w.token):
                    slot.joined_at = now
                    self._ever_joined = True
                if (
                    w is not None and join_timeout is not None and slot.joined_at is None and not slot.timed_out
                    and w.is_alive()
                ):
                    # Placed (a Ray actor may wait for resources: that is no
                    # failure) but not joined in time: it cannot reach the hub.
                    placed: Optional[float] = getattr(w, "placed_at", slot.started)
                    if placed is not None and now - placed > join_timeout:
                        logger.error(
                            "gibbs pool %r: worker %s did not join the hub within %.0f s of starting "
                            "(can it reach the hub's address, with its key?); stopping it",
                            self._model, w, join_timeout,
                        )
                        slot.timed_out = True
                        w.kill()
                if w is not None and not w.is_alive():
                    w.join()
                    code = w.exitcode
                    joined = slot.joined_at is not None or self._joined(w.token)
                    # Lost (its node or process killed from outside) before
                    # joining: no sign of a broken model; retried after a backoff.
                    lost = bool(getattr(w, "lost", False)) and not slot.timed_out
                    slot.worker = None
                    if joined:
                        self._ever_joined = True
                        self._init_failures = 0
                        slot.backoff = _BACKOFF_FIRST
                        lived = now - (slot.joined_at if slot.joined_at is not None else now)
                        if lived >= _SERVED_WELL:
                            slot.quick = 0.0
                        # It served: replaced at once, unless it keeps dying
                        # soon after joining (then after a growing delay).
                        slot.not_before = now + slot.quick
                        slot.quick = min(max(_BACKOFF_FIRST, slot.quick * 2), _BACKOFF_CAP)
                        logger.warning("gibbs pool %r: worker %s exited (%s); replacing it", self._model, w, code)
                    elif lost:
                        logger.warning("gibbs pool %r: worker %s was lost before it joined (%s); replacing it",
                                       self._model, w, code)
                        slot.not_before = now + slot.backoff
                        slot.backoff = min(slot.backoff * 2, _BACKOFF_CAP)
                    else:
                        why = "did not join the hub in time" if slot.timed_out else "exited before serving"
                        give_up = self._failed_start(slot, now, f"{why} (last: {w}, exit code {code})") or give_up
                if slot.worker is None and self._failed is None and now >= slot.not_before:
                    try:
                        slot.worker = self._start(slot)
                    except Exception as exc:  # noqa: BLE001 - e.g. the cluster is gone: retried, then given up
                        logger.error("gibbs pool %r: could not start a worker: %r", self._model, exc)
                        give_up = self._failed_start(slot, now, f"could not start (last: {exc!r})") or give_up
                    else:
                        self.restarts += 1
        if give_up is not None:
            logger.error("gibbs: %s", give_up)
            self._on_give_up(give_up)
