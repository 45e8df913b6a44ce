"""Workers placed by a Ray cluster: ``hub.serve(Model, gibbs_launcher=gibbs.ray.Launcher())``.

Each worker is a Ray actor that runs the ordinary gibbs worker loop
(``Worker``'s runtime, in a thread of the actor) and dials the hub's address
with the hub's key. Ray places the actors (on any node with the resources
asked for); the hub's pool supervises them as it does local processes:

* an actor that ends (its node lost, ``ray.kill``, a crash) is a worker lost
  to the hub, whose calls the hub re-sends; the pool starts a replacement,
  which Ray places where resources allow. Ray's own ``max_restarts`` is left
  at 0: the pool restarts, so that a constructor that fails is not restarted
  in a loop (the pool gives up and the model's requests fail with
  ``NoWorkersError`` carrying the traceback);
* ``pool.scale(n)`` drains an actor gracefully (it finishes what it holds and
  says goodbye), then the actor is killed (``ray.kill``) after the grace.

Importing this module does not import Ray; the first ``serve`` does (and
``ray.init(address=...)`` if Ray is not initialised yet).
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
import weakref
from typing import Any, Optional

from . import logs
from .pool import WorkerFactory
from .transport import is_loopback
from .worker import Worker

__all__ = ["Launcher", "ActorHandle"]

logger = logging.getLogger("gibbs")

#: Exit codes a Ray worker handle reports (a process would report these).
EXIT_OK = 0
EXIT_RAISED = 1  # the worker's run raised (e.g. its model's constructor)
EXIT_LOST = -9  # the actor died: killed, its process or node lost


#: Set at interpreter exit, before Ray's own exit hook shuts it down: from
#: then on no actor is started (``ray.remote`` would start a new Ray instance).
_exiting = False


def _mark_exiting() -> None:
    global _exiting
    _exiting = True


def _ray_ready() -> Any:
    """Ray, if this process is connected to it (and not exiting), else None:
    Ray's calls start a new local instance when it is not initialised,
    which a hub that lost its cluster must not do."""
    if _exiting:
        return None
    ray = _import_ray()
    return ray if ray.is_initialized() else None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("gibbs.ray needs Ray: pip install 'gibbs[ray]' (ray>=2.9)") from exc
    return ray


class _GibbsActor:
    """The body of one worker actor (made a Ray actor class lazily, so that
    importing gibbs.ray does not import Ray)."""

    def __init__(self) -> None:
        self._runtime: Any = None
        self._lock = threading.Lock()
        self._stop_asked = False

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
        }

    def run(self, worker: Worker) -> None:
        """Serve until asked to stop (blocks the calling actor thread);
        raises what the model's constructor raises."""
        from .worker import Runtime

        # The actor's process serves this model: a Hub() made there reaches its hub.
        runtime = Runtime(worker, serves_process=True)
        with self._lock:
            self._runtime = runtime
            if self._stop_asked:
                runtime.stop()
        runtime.run(parent_pid=None)

    def stop(self) -> None:
        """The graceful stop (what SIGTERM does to a worker process): the
        call in hand is finished and answered, then the worker says goodbye
        to the hub and ``run`` returns."""
        with self._lock:
            self._stop_asked = True
            if self._runtime is not None:
                self._runtime.stop()


_actor_class: Any = None
_actor_class_lock = threading.Lock()


def _remote_actor_class() -> Any:
    global _actor_class
    with _actor_class_lock:
        if _actor_class is None:
            ray = _import_ray()
            # Two calls at once: run (blocks) and stop / info.
            _actor_class = ray.remote(max_concurrency=4)(_GibbsActor)
        return _actor_class


class ActorHandle:
    """One worker as a Ray actor, as the pool sees it (a
    :class:`~gibbs.pool.WorkerHandle`). A thread waits on the actor's ``run``
    call: it returns (stopped), raises a task error (the worker raised, e.g.
    in its constructor: exit code 1) or an actor error (the actor died:
    exit code -9); then the thread closes a pipe whose other end is the
    ``sentinel``."""

    def __init__(self, worker: Worker, options: dict[str, Any]) -> None:
        self._worker = worker
        self._options = options
        self._actor: Any = None
        self._done = threading.Event()
        self._exitcode: Optional[int] = None
        self._info: dict[str, Any] = {}
        self._error: Optional[str] = None
        self._sentinel_r, self._sentinel_w = multiprocessing.Pipe(duplex=False)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._placed_at: Optional[float] = None
        self._killed = False  # by us: its end is no news

    # ---------------------------------------------------------- WorkerHandle

    @property
    def token(self) -> str:
        return self._worker.token

    @property
    def name(self) -> str:
        return str(self._worker.name)

    def start(self) -> None:
        with self._lock:
            if self._actor is not None:
                raise RuntimeError("this actor was already started")
            if _ray_ready() is None:
                raise RuntimeError("Ray is not initialised (shut down, or the process is exiting): no actor started")
            cls = _remote_actor_class()
            self._actor = cls.options(**self._options).remote()
        self._thread = threading.Thread(target=self._watch, name=f"gibbs-ray-{self._worker.name}", daemon=True)
        self._thread.start()

    @property
    def sentinel(self) -> Any:
        return self._sentinel_r

    def is_alive(self) -> bool:
        return self._actor is not None and not self._done.is_set()

    @property
    def lost(self) -> bool:
        """The actor died (killed, its process or node lost), as opposed to
        a worker that stopped or raised."""
        return self._done.is_set() and self._exitcode == EXIT_LOST

    @property
    def placed_at(self) -> Optional[float]:
        """When Ray placed the actor and it began (monotonic clock), or None
        while it waits for resources."""
        return self._placed_at

    def join(self, timeout: Optional[float] = None) -> None:
        if self._actor is None:
            raise RuntimeError("this actor was not started")
        self._done.wait(timeout)

    def terminate(self) -> None:
        """Ask the worker to stop gracefully (it finishes what it holds); an
        actor Ray has not placed yet holds nothing: it is killed."""
        if self.is_alive() and not self._info:
            self.kill()
        elif self.is_alive() and _ray_ready() is not None:
            try:
                self._actor.stop.remote()
            except Exception as exc:  # noqa: BLE001 - a dead actor: the watcher will see it
                logger.debug("gibbs ray: stop of %s failed: %s", self, exc, extra=logs.fields(self._worker.model, self.name))

    def kill(self) -> None:
        """``ray.kill`` the actor (the hub re-sends what it held)."""
        if self._actor is not None and not self._done.is_set():
            ray = _ray_ready()
            if ray is None:  # Ray shut down: its actors went with it (or with this driver)
                return
            self._killed = True
            try:
                ray.kill(self._actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001
                logger.debug("gibbs ray: kill of %s failed: %s", self, exc, extra=logs.fields(self._worker.model, self.name))

    @property
    def exitcode(self) -> Optional[int]:
        return self._exitcode if self._done.is_set() else None

    @property
    def pid(self) -> Optional[int]:
        """The actor's process id (on its node: not unique in a cluster)."""
        pid = self._info.get("pid")
        return int(pid) if pid is not None else None

    # ---------------------------------------------------------- Ray details

    @property
    def node_id(self) -> Optional[str]:
        """The Ray node the actor runs on (once it started)."""
        return self._info.get("node_id")

    @property
    def node_ip(self) -> Optional[str]:
        return self._info.get("ip")

    @property
    def actor(self) -> Any:
        """The Ray actor handle (None before ``start``)."""
        return self._actor

    @property
    def error(self) -> Optional[str]:
        """Why the actor ended, if it did not stop cleanly."""
        return self._error

    def _watch(self) -> None:
        ray = _import_ray()
        from ray.exceptions import RayActorError, RayTaskError

        code = EXIT_OK
        try:
            run = self._actor.run.remote(self._worker)
            try:
                self._info = dict(ray.get(self._actor.info.remote()))
                self._placed_at = time.monotonic()
            except RayActorError:
                pass  # run's outcome says more
            ray.get(run)
        except RayActorError as exc:
            code, self._error = EXIT_LOST, f"{type(exc).__name__}: {exc}"
        except RayTaskError as exc:
            code, self._error = EXIT_RAISED, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. Ray shut down under us
            code, self._error = EXIT_LOST, f"{type(exc).__name__}: {exc}"
        finally:
            if code != EXIT_LOST and _ray_ready() is not None:
                # run returned (or raised): the actor is idle; free its resources.
                try:
                    ray.kill(self._actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            self._exitcode = code
            self._done.set()
            self._sentinel_w.close()  # the read end becomes ready
            if code != EXIT_OK:
                level = logging.INFO if self._killed else logging.WARNING
                logger.log(level, "gibbs ray: worker %s (token %s) ended: %s", self.name, self.token, self._error,
                           extra=logs.fields(self._worker.model, self.name))

    def __repr__(self) -> str:
        where = f"node {self.node_id[:8]}" if self.node_id else "not placed yet"
        state = "not started" if self._actor is None else "alive" if self.is_alive() else f"exited {self._exitcode}"
        return f"<gibbs.ray.ActorHandle {self.name} token={self.token} {where} [{state}]>"


class Launcher:
    """Start a pool's workers as Ray actors (``hub.serve(..., gibbs_launcher=...)``).

    Args:
        num_cpus, num_gpus, resources: what each actor asks Ray for (Ray
            places it on a node that has them; with ``num_gpus`` Ray sets the
            actor's ``CUDA_VISIBLE_DEVICES``).
        address: given to ``ray.init`` if Ray is not initialised yet
            (default None: Ray's own default, a running local cluster or
            ``RAY_ADDRESS``, else a new local instance).
        runtime_env: the actors' Ray runtime environment.
        hub_host: the address the workers dial. Default: if the hub listens
            on every interface (``Hub(host="0.0.0.0")``), this node's address
            as Ray sees it (``ray.util.get_node_ip_address()``); if it listens
            on one address, that one; if it listens on loopback only,
            ``127.0.0.1`` when every node of the cluster is this machine,
            else ``serve`` raises (the other nodes could not reach it).
        init_kwargs: more keywords for ``ray.init``.
        join_timeout: seconds an actor, once placed, has to join the hub
            (its model built and the hub reached); past them the pool kills
            it and counts a failed start (default 300; None: no limit). An
            actor waiting for resources is not counted.
        **actor_options: more ``.options()`` for each actor
            (``scheduling_strategy``, ``memory``, ...). ``max_restarts`` is
            refused: the pool restarts workers.
    """

    def __init__(
        self,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: Optional[dict[str, float]] = None,
        *,
        address: Optional[str] = None,
        runtime_env: Optional[dict[str, Any]] = None,
        hub_host: Optional[str] = None,
        init_kwargs: Optional[dict[str, Any]] = None,
        join_timeout: Optional[float] = 300.0,
        **actor_options: Any,
    ) -> None:
        if num_cpus < 0 or num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if join_timeout is not None and not join_timeout > 0:
            raise ValueError(f"join_timeout must be > 0 or None, got {join_timeout!r}")
        if actor_options.get("lifetime") == "detached":
            raise ValueError(
                "gibbs.ray.Launcher: detached actors are not supported: a worker lives and dies with its "
                "hub's pool (a detached one would outlive the hub, dialling it forever)"
            )
        if "max_restarts" in actor_options or "max_task_retries" in actor_options:
            raise ValueError(
                "gibbs.ray.Launcher: max_restarts/max_task_retries are not supported: the hub's pool "
                "replaces lost workers itself (and gives up on a failing constructor)"
            )
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources) if resources else None
        self.address = address
        self.runtime_env = runtime_env
        self.hub_host = hub_host
        self.init_kwargs = dict(init_kwargs or {})
        self.actor_options = actor_options
        self.join_timeout = join_timeout
        self._dial: Optional[str] = None  # the last pool's
        # One launcher may serve several pools (hubs): each its own address.
        self._dials: "weakref.WeakKeyDictionary[WorkerFactory, str]" = weakref.WeakKeyDictionary()

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_restarts": 0}
        if self.resources:
            options["resources"] = self.resources
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        options.update(self.actor_options)
        return options

    def _resolve_host(self, bind_host: str) -> str:
        ray = _import_ray()
        if self.hub_host is not None:
            return self.hub_host
        if bind_host in ("0.0.0.0", "::", ""):
            return str(ray.util.get_node_ip_address())
        if not is_loopback(bind_host):
            return bind_host
        here = str(ray.util.get_node_ip_address())
        others = sorted({str(n.get("NodeManagerAddress")) for n in ray.nodes() if n.get("Alive")} - {here})
        if others and not all(_is_loopback_ip(a) for a in others):
            raise ValueError(
                f"the hub listens on {bind_host} (loopback) but the Ray cluster has nodes on other "
                f"machines ({', '.join(others)}), whose workers could not reach it: start the hub on an "
                "address they reach, e.g. Hub(host=\"0.0.0.0\", authkey=...), or pass "
                "gibbs.ray.Launcher(hub_host=...) if you know better"
            )
        return "127.0.0.1"

    def prepare(self, make: WorkerFactory) -> None:
        """Connect to Ray (``ray.init``) if needed and choose the address
        the workers dial; raises if the hub cannot be reached from the
        cluster."""
        if make.devices:
            raise ValueError(
                "gibbs_devices does not apply to Ray workers: ask Ray for GPUs with "
                "gibbs.ray.Launcher(num_gpus=...) (Ray sets each actor's CUDA_VISIBLE_DEVICES)"
            )
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs = dict(self.init_kwargs)
            kwargs.setdefault("address", self.address)
            ray.init(**kwargs)
        _register_exit_hook()
        self._dial = self._dials[make] = self._resolve_host(make.bind_host)

    def launch(self, make: WorkerFactory, device: Optional[str]) -> ActorHandle:
        dial = self._dials.get(make)
        if dial is None:
            raise RuntimeError("gibbs.ray.Launcher.launch before prepare (hub.serve calls prepare)")
        # The hub's key goes with the worker, explicitly: on another node no
        # key is inherited. (Ray carries it to the actor: trust the cluster.)
        worker = make(None, gibbs_host=dial, gibbs_authkey=make.authkey, gibbs_start_method=None)
        return ActorHandle(worker, self._options())

    @property
    def hub_address(self) -> Optional[str]:
        """The host the workers dial (known after ``serve``)."""
        return self._dial

    def __repr__(self) -> str:
        return (
            f"gibbs.ray.Launcher(num_cpus={self.num_cpus}, num_gpus={self.num_gpus}, "
            f"resources={self.resources}, address={self.address!r}, hub_host={self.hub_host!r})"
        )


_exit_hook_registered = False


def _register_exit_hook() -> None:
    """After ``ray.init``: hooks run last-registered first, so this one runs
    before Ray's own shutdown, and pools stop starting actors from then on."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        import atexit

        atexit.register(_mark_exiting)
        _exit_hook_registered = True


def _is_loopback_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
