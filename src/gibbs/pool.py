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
import random
import shutil
import subprocess
import threading
import time
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from . import logs
from ._wakeup import Wakeup
from .scaling import Autoscaler, Load
from .worker import Worker, device_name

__all__ = ["Pool", "UpdateError", "resolve_devices", "Launcher", "LocalLauncher", "WorkerHandle", "WorkerFactory"]

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
    Also says where the hub listens (``bind_host``, ``port``) and its key.

    ``rebuild(cls, args, kwargs)`` (optional) gives the ``build`` of another
    version of the model: a pool's rolling update uses it
    (:meth:`with_model`)."""

    def __init__(
        self,
        build: Callable[..., Worker],
        *,
        bind_host: str,
        port: int,
        authkey: bytes,
        devices: Sequence[str] = (),
        rebuild: Optional[Callable[[Any, tuple[Any, ...], dict[str, Any]], Callable[..., Worker]]] = None,
        model: Optional[tuple[Any, tuple[Any, ...], dict[str, Any]]] = None,
        version: Optional[str] = None,
    ) -> None:
        self._build = build
        self.bind_host = bind_host
        self.port = port
        self.authkey = authkey
        self.devices = list(devices)
        self._rebuild = rebuild
        self.model = model  # (cls, args, kwargs) when known
        self.version = version
        self.on_made: Optional[Callable[[Worker], None]] = None  # told of each worker made

    def __call__(self, device: Optional[str], **overrides: Any) -> Worker:
        if self.version is not None:
            overrides.setdefault("gibbs_version", self.version)
        worker = self._build(device, **overrides)
        if self.on_made is not None:
            self.on_made(worker)
        return worker

    def with_model(
        self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any], version: Optional[str]
    ) -> "WorkerFactory":
        """The factory of another version: ``cls(*args, **kwargs)``, the other options alike."""
        if self._rebuild is None:
            raise RuntimeError("this pool's workers cannot be rebuilt with another model (no rebuild given)")
        made = WorkerFactory(
            self._rebuild(cls, args, kwargs), bind_host=self.bind_host, port=self.port, authkey=self.authkey,
            devices=self.devices, rebuild=self._rebuild, model=(cls, args, kwargs), version=version,
        )
        made.on_made = self.on_made
        return made


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
                 "timed_out", "version", "replaces", "limit", "recycle_after")

    def __init__(self, device: Optional[str], version: int = 1) -> None:
        self.device = device
        self.worker: Optional[WorkerHandle] = None
        self.backoff = _BACKOFF_FIRST  # for workers that never joined
        self.quick = 0.0  # for workers that joined and died soon after: 0 (at once), then doubling
        self.not_before = 0.0
        self.draining = False
        self.started = 0.0
        self.joined_at: Optional[float] = None
        self.timed_out = False
        self.version = version  # which of the pool's model versions it runs
        self.replaces: Optional[_Slot] = None  # the slot it takes over once joined (update, recycling)
        self.limit: Optional[int] = None  # calls after which its worker is recycled
        self.recycle_after = 0.0  # a failed recycling is tried again after this


class UpdateError(RuntimeError):
    """A rolling update failed and was rolled back: the old version serves on."""


class Pool:
    """Workers of one model, started (by a :class:`Launcher`) and kept at
    size by the hub. Made by :meth:`Hub.serve`; thread-safe.

    Besides restarts it carries the model's life: :meth:`update` rolls the
    workers onto a new version, ``autoscale=(min, max)`` sizes the pool by
    its queue, ``max_requests``/``max_memory`` recycle workers (the new one
    ready before the old one drains)."""

    def __init__(
        self,
        hub: object,  # whose pool this is (for its repr only)
        make: WorkerFactory,
        n: int,
        model: str,
        devices: list[str],
        joined: Callable[[str], bool],
        on_give_up: Callable[[str], None],
        launcher: Optional[Launcher] = None,
        standby: bool = False,
        *,
        observe: Optional[Callable[[], Optional[dict[str, Any]]]] = None,
        on_rollout: Callable[[Optional[str]], None] = lambda cls: None,
        failure_of: Callable[[Optional[int]], Optional[str]] = lambda pid: None,
        autoscale: Optional[tuple[int, int]] = None,
        scale_down_after: float = 30.0,
        max_requests: Optional[int] = None,
        max_requests_jitter: Optional[int] = None,
        max_memory: Optional[int] = None,
    ) -> None:
        if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
            raise ValueError(f"gibbs_max_requests must be an int >= 1, got {max_requests!r}")
        if max_memory is not None and (not isinstance(max_memory, int) or max_memory < 1):
            raise ValueError(f"gibbs_max_memory must be a number of bytes >= 1, got {max_memory!r}")
        self._makes: dict[int, WorkerFactory] = {1: make}  # version -> its factory
        self._launcher: Launcher = launcher if launcher is not None else LocalLauncher()
        self._model = model
        self._devices = devices
        self._joined = joined  # token -> has it joined the hub (ever)
        self._on_give_up = on_give_up
        self._observe = observe  # what the hub sees of the model (queue, workers by token)
        self._on_rollout = on_rollout  # tell the hub a second class may serve the model meanwhile
        self._failure_of = failure_of  # the constructor's traceback a worker (pid) reported
        self._autoscaler = Autoscaler(*autoscale, down_after=scale_down_after) if autoscale is not None else None
        self._max_requests = max_requests
        self._jitter = max(0, max_requests_jitter if max_requests_jitter is not None else (max_requests or 0) // 10)
        self._max_memory = max_memory
        self._lock = threading.Lock()  # owns every field below
        self._slots: list[_Slot] = []
        self._draining: list[WorkerHandle] = []
        self._closed = False
        # A standby pool (made in a client hub of a family) starts no worker
        # until activate(): when its hub takes the address over.
        self._standby = standby
        self._failed: Optional[str] = None
        self._ever_joined = False
        self._init_failures = 0  # in a row
        self._version = 1  # the version the pool keeps
        self._target: Optional[int] = None  # the version a rolling update moves to
        self._surge = 1
        self._update_error: Optional[str] = None
        self.restarts = 0
        self.recycled = 0
        self.scaled = {"up": 0, "down": 0}
        self._wakeup = Wakeup()  # wakes the supervisor thread's wait
        self._hub_repr = repr(hub)
        if self._autoscaler is not None:
            n = self._autoscaler.lo
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
    def version(self) -> int:
        """The version of the model the pool runs (1, then one more per update)."""
        return self._version

    @property
    def standby(self) -> bool:
        """Whether the pool waits to start its workers (see :meth:`activate`)."""
        return self._standby

    def activate(self) -> None:
        """Start the workers of a standby pool (idempotent). A client hub's
        pool is one: the family's workers are the router's; the pool starts
        them only if its hub takes the address over."""
        with self._lock:
            if self._closed or not self._standby:
                return
            self._standby = False
            for slot in self._slots:
                slot.not_before = 0.0
        self._wake()

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
                self._drain_slot(self._slots[-1])
        self._wake()

    def update(
        self, cls: Any = None, *args: Any, gibbs_timeout: float = 300.0, gibbs_surge: int = 1, **kwargs: Any
    ) -> None:
        """Roll the workers onto a new version of the model (blocks).

        ``cls(*args, **kwargs)`` (default: the class and arguments the pool
        runs now; a new class may serve the model's name during the rollout
        only). ``gibbs_surge`` new workers at a time start beside the old
        ones, build and warm up their model, and join; then as many old
        ones drain (each finishes what it holds; nothing is re-sent) and
        leave. No caller sees an error; when ``update`` returns, every
        answer comes from the new version.

        A new version whose constructor (or warm-up) fails, or whose workers
        are not ready within ``gibbs_timeout`` seconds, is rolled back: its
        workers are stopped, the old ones serve on, and :class:`UpdateError`
        is raised with the constructor's traceback when one was reported.
        """
        if not isinstance(gibbs_surge, int) or gibbs_surge < 1:
            raise ValueError(f"gibbs_surge must be an int >= 1, got {gibbs_surge!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if self._target is not None:
                raise RuntimeError("an update of this pool is already in progress")
            current = self._makes[self._version]
            old_cls, old_args, old_kwargs = current.model or (None, (), {})
            if cls is None:
                cls = old_cls
                if not args and not kwargs:
                    args, kwargs = old_args, dict(old_kwargs)
            target = max(self._makes) + 1
            make = current.with_model(cls, tuple(args), dict(kwargs), str(target))
        make(None)  # check the options here, before any process starts
        self._launcher.prepare(make)
        from .worker import class_name

        self._on_rollout(class_name(cls))
        with self._lock:
            self._makes[target] = make
            self._target = target
            self._surge = gibbs_surge
            self._update_error = None
        logger.warning("gibbs pool %r: rolling update to version %d (%s)", self._model, target, class_name(cls), extra=logs.fields(self._model))
        self._wake()
        deadline = time.monotonic() + gibbs_timeout
        done = False
        error: Optional[str] = None
        try:
            while True:
                with self._lock:
                    error = self._update_error
                    if self._closed:
                        error = error or "the pool was closed during the update"
                    done = error is None and self._version == target and not self._draining
                if done or error is not None:
                    break
                if time.monotonic() > deadline:
                    error = f"the new version was not ready within {gibbs_timeout:g} s"
                    break
                time.sleep(0.05)
        finally:
            if not done:
                self._roll_back(target)
            self._on_rollout(None)
        if error is not None:
            raise UpdateError(f"rolling update of model {self._model!r} rolled back: {error}")
        logger.warning("gibbs pool %r: now on version %d", self._model, target, extra=logs.fields(self._model))

    async def aupdate(self, cls: Any = None, *args: Any, **kwargs: Any) -> None:
        """:meth:`update` for asyncio code (runs it in a thread)."""
        import asyncio
        import functools

        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self.update, cls, *args, **kwargs))

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
        self._wakeup.close()

    def statistics(self) -> dict[str, Any]:
        """Size, version, restarts, recycled workers, scaling decisions."""
        with self._lock:
            versions: dict[str, int] = {}
            for slot in self._slots:
                versions[str(slot.version)] = versions.get(str(slot.version), 0) + 1
            return {
                "size": len(self._slots),
                "draining": len(self._draining),
                "version": self._version,
                "updating_to": self._target,
                "versions": versions,
                "restarts": self.restarts,
                "recycled": self.recycled,
                "scaled_up": self.scaled["up"],
                "scaled_down": self.scaled["down"],
                "standby": self._standby,
                "failed": self._failed,
            }

    def __repr__(self) -> str:
        state = (
            "closed" if self._closed else f"failed: {self._failed.splitlines()[0]}" if self._failed
            else "standby" if self._standby else "running"
        )
        return f"<Pool {self._model!r} {self.size} workers, {self.restarts} restarts [{state}]>"

    # ------------------------------------------------------------ supervisor

    def _add_slots(self, k: int) -> None:
        """Under the lock."""
        self._thread_group = len(self._slots) + k  # the workers starting together share the cores
        for _ in range(k):
            i = len(self._slots)
            device = self._devices[i % len(self._devices)] if self._devices else None
            slot = _Slot(device, self._version)
            self._slots.append(slot)
            if self._failed is None and not self._standby:
                slot.worker = self._start(slot)

    def _add_replacement(self, old: _Slot, version: int) -> _Slot:
        """Under the lock: a slot that takes ``old``'s place once its worker joined."""
        slot = _Slot(old.device, version)
        slot.replaces = old
        self._slots.append(slot)
        slot.worker = self._start(slot)
        return slot

    def _drain_slot(self, slot: _Slot) -> None:
        """Under the lock: the slot goes; its worker finishes what it holds and leaves."""
        self._slots.remove(slot)
        if slot.worker is not None:
            slot.worker.terminate()
            self._draining.append(slot.worker)
            slot.worker = None

    def _start(self, slot: _Slot) -> WorkerHandle:
        w = self._launcher.launch(self._makes[slot.version], slot.device)
        if isinstance(w, Worker):
            scale_to = self._autoscaler.hi if self._autoscaler is not None else 1
            w._thread_group = max(getattr(self, "_thread_group", 1), len(self._slots), scale_to)
        w.start()
        slot.started = time.monotonic()
        slot.joined_at = None
        slot.timed_out = False
        slot.limit = None
        if self._max_requests is not None:
            slot.limit = self._max_requests + (random.randint(0, self._jitter) if self._jitter else 0)
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

    def _roll_back(self, target: int) -> None:
        """The update did not finish: the new version's workers go (killed:
        they may be half built), and the old version fills their slots."""
        with self._lock:
            if self._version == target:
                return  # it did finish meanwhile
            for slot in [s for s in self._slots if s.version == target]:
                self._slots.remove(slot)
                if slot.worker is not None:
                    slot.worker.kill()
                    self._draining.append(slot.worker)
                    slot.worker = None
                if slot.replaces is None and not self._closed:
                    self._add_slots(1)  # it had taken an old one's place
            for slot in self._slots:
                slot.replaces = None
            self._target = None
            self._makes.pop(target, None)
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                sentinels: list[Any] = [self._wakeup]
                sentinels += [s.worker.sentinel for s in self._slots if s.worker is not None]
                sentinels += [w.sentinel for w in self._draining]
                soonest = min((s.not_before for s in self._slots if s.worker is None), default=None)
                watching = self._target is not None or self._max_requests is not None or self._max_memory is not None
                watching = watching or self._autoscaler is not None
            # Rollouts, recycling and autoscaling watch the hub: look often.
            period = 0.1 if watching else 1.0
            timeout = period if soonest is None else max(0.0, min(period, soonest - time.monotonic()))
            ready = multiprocessing.connection.wait(sentinels, timeout)
            if self._wakeup in ready:
                self._wakeup.drain()
            self._step()

    def _step(self) -> None:
        now = time.monotonic()
        give_up: Optional[str] = None
        seen = self._observe() if self._observe is not None else None
        with self._lock:
            if self._closed:
                return
            for leaving in list(self._draining):
                if not leaving.is_alive():
                    leaving.join()
                    self._draining.remove(leaving)
            for slot in list(self._slots):
                give_up = self._check_slot(slot, now) or give_up
            if self._target is not None:
                self._roll(now)
            if seen is not None:
                self._recycle(now, seen)
                self._autoscale(now, seen)
        if give_up is not None:
            logger.error("gibbs: %s", give_up, extra=logs.fields(self._model))
            self._on_give_up(give_up)

    def _check_slot(self, slot: _Slot, now: float) -> Optional[str]:
        """Under the lock: one slot's worker joined, died, or is due to start."""
        give_up: Optional[str] = None
        if slot not in self._slots:
            return None  # drained meanwhile (its replacement joined)
        join_timeout: Optional[float] = getattr(self._launcher, "join_timeout", None)
        w = slot.worker
        if w is not None and slot.joined_at is None and self._joined(w.token):
            slot.joined_at = now
            self._ever_joined = True
            if slot.replaces is not None and slot.replaces in self._slots:
                # Ready: the worker it replaces drains now (nothing is re-sent).
                self._drain_slot(slot.replaces)
            slot.replaces = None
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
                    self._model, w, join_timeout, extra=logs.fields(self._model, getattr(w, "name", None)),
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
                logger.warning("gibbs pool %r: worker %s exited (%s); replacing it", self._model, w, code, extra=logs.fields(self._model, getattr(w, "name", None)))
            elif lost:
                logger.warning("gibbs pool %r: worker %s was lost before it joined (%s); replacing it",
                               self._model, w, code, extra=logs.fields(self._model, getattr(w, "name", None)))
                slot.not_before = now + slot.backoff
                slot.backoff = min(slot.backoff * 2, _BACKOFF_CAP)
            elif slot.version != self._version:
                # A new version that did not come up: the update rolls back.
                why = self._failure_of(w.pid) or f"its worker {w} exited before serving (exit code {code})"
                self._update_error = f"version {slot.version} failed to start: {why}"
                return None
            elif slot.replaces is not None:
                # A replacement (recycling) that did not come up: the old
                # worker serves on; tried again later.
                logger.error("gibbs pool %r: replacement worker %s exited before serving (%s)", self._model, w, code,
                             extra=logs.fields(self._model, getattr(w, "name", None)))
                slot.replaces.recycle_after = now + 30.0
                self._slots.remove(slot)
                return None
            else:
                why = "did not join the hub in time" if slot.timed_out else "exited before serving"
                give_up = self._failed_start(slot, now, f"{why} (last: {w}, exit code {code})")
        if slot.worker is None and self._failed is None and not self._standby and now >= slot.not_before:
            try:
                slot.worker = self._start(slot)
            except Exception as exc:  # noqa: BLE001 - e.g. the cluster is gone: retried, then given up
                logger.error("gibbs pool %r: could not start a worker: %r", self._model, exc, extra=logs.fields(self._model))
                give_up = self._failed_start(slot, now, f"could not start (last: {exc!r})") or give_up
            else:
                self.restarts += 1
        return give_up

    def _roll(self, now: float) -> None:
        """Under the lock: one step of a rolling update. At most ``surge``
        new workers starting; each old worker drains once a new one that
        replaces it has joined; done when no old one is left."""
        target = self._target
        assert target is not None
        if self._update_error is not None:
            return
        old = [s for s in self._slots if s.version != target]
        starting = [s for s in self._slots if s.version == target and s.joined_at is None]
        replaced = {id(s.replaces) for s in starting if s.replaces is not None}
        for slot in old:
            if len(starting) >= self._surge:
                break
            if id(slot) in replaced:
                continue
            starting.append(self._add_replacement(slot, target))
        if not old and not starting:
            self._version = target
            self._target = None
            for version in [v for v in self._makes if v != target]:
                del self._makes[version]

    def _recycle(self, now: float, seen: dict[str, Any]) -> None:
        """Under the lock: a worker past its calls or its memory gets a
        replacement; it drains once that one joined."""
        if self._max_requests is None and self._max_memory is None:
            return
        if self._target is not None:
            return  # a rollout replaces every worker anyway
        workers = seen.get("workers", {})
        pending = {id(s.replaces) for s in self._slots if s.replaces is not None}
        for slot in list(self._slots):
            w = slot.worker
            if w is None or slot.joined_at is None or id(slot) in pending or now < slot.recycle_after:
                continue
            served = int(workers.get(w.token, {}).get("served", 0))
            why = None
            if slot.limit is not None and served >= slot.limit:
                why = f"served {served} calls (max_requests {self._max_requests})"
            elif self._max_memory is not None:
                rss = _resident_bytes(w.pid)
                if rss is not None and rss > self._max_memory:
                    why = f"resident memory {rss >> 20} MiB over max_memory {self._max_memory >> 20} MiB"
            if why is None:
                continue
            logger.warning("gibbs pool %r: recycling worker %s: %s", self._model, w, why, extra=logs.fields(self._model, getattr(w, "name", None)))
            self.recycled += 1
            self._add_replacement(slot, slot.version)

    def _autoscale(self, now: float, seen: dict[str, Any]) -> None:
        scaler = self._autoscaler
        if scaler is None or self._target is not None or self._failed is not None or self._standby:
            return
        serving = [s for s in self._slots if s.replaces is None]
        running = sum(1 for s in serving if s.joined_at is not None)
        starting = len(serving) - running
        load = Load(int(seen.get("queued", 0)), float(seen.get("oldest", 0.0)), int(seen.get("busy", 0)))
        step, why = scaler.decide(now, load, running, starting)
        if step > 0:
            self._add_slots(1)
            self.scaled["up"] += 1
            logger.info("gibbs pool %r: scaling up to %d: %s", self._model, len(self._slots), why, extra=logs.fields(self._model))
        elif step < 0:
            busy = seen.get("workers", {})
            idle = [s for s in serving if s.worker is not None and busy.get(s.worker.token, {}).get("state") == "ready"]
            if idle:
                self._drain_slot(idle[-1])
                self.scaled["down"] += 1
                logger.info("gibbs pool %r: scaling down to %d: %s", self._model, len(self._slots), why,
                            extra=logs.fields(self._model))


def _resident_bytes(pid: Optional[int]) -> Optional[int]:
    """Resident memory of a local process (Linux: /proc), else None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
