"""The worker: one model, one process, requests one at a time.

A worker builds the model once (``cls(*args, **kwargs)``), then connects to the
hub's address, retrying with a short backoff until the hub exists, and serves::

    main thread                           heartbeat thread
    ───────────────────────────────────   ────────────────────────────────
    connect + HMAC handshake              every gibbs_heartbeat_interval:
    WELCOME <- hub, HELLO -> hub            HEARTBEAT -> hub (under the
    loop:                                   send lock), and check that the
      wait for bytes (poll, with the        parent process still lives
      hub's silence bound)
      REQUEST -> model(*a, **kw)
              -> RESULT / ERROR -> hub
    end of file, silence, error:
      close, reconnect with backoff

Heartbeats come from their own thread, so a model call of minutes is not
taken for death. SIGTERM or SIGINT while a request is in hand lets it finish
and its answer go out; then the worker says GOODBYE (the hub re-queues what it
had sent ahead but this worker had not started) and exits with status 0.
A constructor that raises ends the process with the traceback and a non-zero
exit code, after telling the hub why (so ``hub.wait_for_workers`` can say).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import inspect
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (so our atexit hook runs before its joins)
import os
import pickle
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any, Callable, Optional, Sequence, Union

from . import _context, _threads, logs, protocol
from ._context import (  # noqa: F401 (gibbs.worker's names)
    _DEADLINE,
    _PRIORITY,
    _REQUEST_ID,
    Serving,
    _request_id_of_caller,
    current_priority,
    remaining,
    request_id,
)
from ._worker_async import AsyncSlots, _AsyncStreamState, _drain_agen, _identity
from ._worker_calls import Calls
from ._worker_streams import Streams
from .core import DEFAULT_MODEL
from .errors import AuthenticationError, ProtocolError, WorkerRefusedError
from .tls import TLSFiles, files_from_env
from .transport import (
    KeyLike,
    default_port,
    dial,
    is_loopback,
    resolve_authkey,
)

__all__ = ["Worker", "remaining", "request_id", "report_given_up", "INIT_FAILED_EXIT", "REFUSED_EXIT", "Serving"]




logger = logging.getLogger("gibbs")

#: Longest pause between two connection attempts to an absent hub: short on
#: this machine (a refused connect costs microseconds, and a hub bound on its
#: first request should not wait for its workers), longer across the network.
MAX_BACKOFF_LOCAL = 0.05
MAX_BACKOFF_REMOTE = 2.0
#: Pause before trying again after the hub refused our key.
AUTH_BACKOFF = 5.0
#: Answers of quick calls that arrived together are sent together, but the
#: first of them never waits longer than this for the others.
COALESCE_WINDOW = 0.0005
#: Exit status of a worker process the hub refused (EX_CONFIG): restarting
#: it would be refused alike.
REFUSED_EXIT = 78
#: How long a worker whose model failed to build tries to tell the hub.
INIT_REPORT_WINDOW = 3.0
#: Exit status of a worker process whose model's constructor raised (its
#: traceback is printed once, and reported to the hub).
INIT_FAILED_EXIT = 77


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Stop(BaseException):
    """Raised from the signal handler in the worker's main thread while it is
    idle, to leave a blocking wait at once. A BaseException so that no
    ``except Exception`` in between swallows it."""


class Worker:
    """A process serving ``cls(*args, **kwargs)`` to a :class:`~gibbs.Hub`.

    ``start()`` runs it in a new process; ``run()`` blocks in this one. Every
    keyword gibbs takes starts with ``gibbs_``; all others go to the model's
    constructor.

    Args:
        cls: the model class (any callable class); built once per worker.
        *args, **kwargs: the model constructor's arguments.
        gibbs_host, gibbs_port: the hub's address (default localhost, and
            ``GIBBS_PORT`` or 5019).
        gibbs_heartbeat_interval: seconds between heartbeats to the hub.
        gibbs_reset_after_n_miss: reconnect after the hub has been silent for
            this many of the hub's heartbeat intervals.
        gibbs_authkey: the shared key (bytes or str); default ``GIBBS_AUTHKEY``,
            else the key inherited from the parent process.
        gibbs_start_method: multiprocessing start method for ``start()``
            (default: multiprocessing's default).
        gibbs_name: a name shown in the hub's logs and errors.
        gibbs_model: the name of the model this worker serves (default
            ``"default"``); requests choose it with ``gibbs_model=``. A hub
            refuses a worker whose class differs from the class already
            serving that name.
        gibbs_batch_size: above 1, the model is called with a list of up to
            this many requests' single arguments (``model(xs)``) and returns
            a list of as many results, in order.
        gibbs_batch_wait: seconds a free worker may wait for a batch to fill
            (default 0: never; a lone request goes at once).
        gibbs_concurrency: for a model whose ``__call__`` is ``async def``:
            how many calls run at once on the worker's own event loop
            (default 1). Sync models always run one call at a time.
        gibbs_device: the device this worker may use (``"cuda:1"``, ``1``,
            ``"cpu"``): its process sees only that GPU (``CUDA_VISIBLE_DEVICES``
            is set before the model's module is imported, with the spawn and
            forkserver start methods; with fork, before the constructor runs)
            and finds its name in ``GIBBS_DEVICE``.
        gibbs_copy_args: the model gets private, writable copies of the
            requests' large arrays and torch tensors. By default (False) it gets read-only
            views on the hub's shared memory, without a copy: valid during
            the call (the hub reuses the memory after the answer), so a
            model that keeps an argument past its call, or writes into one,
            needs a copy (``np.array(x)``) or this option.
        gibbs_warmup: sample inputs run through the model before the worker
            joins (``model(x)`` for each; ``model(xs)`` at once for a
            batched model), after its own ``warmup()`` method if it has one:
            the first real request then meets a warm model, and readiness
            (``hub.health()``, ``wait_for_workers``) counts only warm workers.
            A warm-up that raises fails the worker as its constructor would.
        gibbs_version: a label of this worker's version of the model, shown
            in ``hub.workers()`` and ``statistics()`` (a pool's rolling
            update sets it).
        gibbs_threads: CPU threads of the numerical libraries in this
            worker (``OMP_NUM_THREADS`` and the like, torch's own count):
            ``"auto"`` (default, or ``$GIBBS_THREADS``) splits the cores of
            this process among its local workers, keeping a value the user
            exported; an int N sets N; ``"inherit"`` leaves them alone. Set
            in the worker before the model's module is imported.
        gibbs_pin_cpus: bind the worker to its own share of the cores
            (``os.sched_setaffinity``).
        gibbs_token: this worker's identity, sent in its HELLO (default: a
            random hex string per ``Worker``): the hub records it, so a
            pool knows its worker joined even when pids of workers on
            several machines collide (``bridge.has_joined(token)``).
        gibbs_ssl_context: a client ``ssl.SSLContext``: TCP to the hub carries
            TLS, and the hub's certificate is checked (default: built from
            ``GIBBS_TLS_CERT``, ``GIBBS_TLS_KEY``, ``GIBBS_TLS_CA`` when set).
            The key is still required off loopback.
        worker_cls: gibbs 0.2's name for ``cls``.
    """

    def __init__(
        self,
        cls: Optional[Callable[..., Any]] = None,
        *args: Any,
        gibbs_host: str = "localhost",
        gibbs_port: Optional[int] = None,
        gibbs_heartbeat_interval: float = 1.0,
        gibbs_reset_after_n_miss: int = 2,
        gibbs_authkey: KeyLike = None,
        gibbs_start_method: Optional[str] = None,
        gibbs_name: Optional[str] = None,
        gibbs_model: str = DEFAULT_MODEL,
        gibbs_batch_size: int = 1,
        gibbs_batch_wait: float = 0.0,
        gibbs_concurrency: int = 1,
        gibbs_device: Union[str, int, None] = None,
        gibbs_copy_args: bool = False,
        gibbs_token: Optional[str] = None,
        gibbs_warmup: Optional[Sequence[Any]] = None,
        gibbs_version: Optional[str] = None,
        gibbs_threads: _threads.ThreadsOption = None,
        gibbs_pin_cpus: bool = False,
        gibbs_ssl_context: Optional[ssl.SSLContext] = None,
        worker_cls: Optional[Callable[..., Any]] = None,
        **kwargs: Any,
    ) -> None:
        if worker_cls is not None:
            if cls is not None:
                raise TypeError("pass the model class once: as cls or as worker_cls, not both")
            cls = worker_cls
        if not isinstance(gibbs_model, str) or not gibbs_model:
            raise ValueError(f"gibbs_model must be a non-empty str, got {gibbs_model!r}")
        if not isinstance(gibbs_batch_size, int) or gibbs_batch_size < 1:
            raise ValueError(f"gibbs_batch_size must be an int >= 1, got {gibbs_batch_size!r}")
        if gibbs_batch_wait < 0:
            raise ValueError("gibbs_batch_wait must be >= 0")
        if not isinstance(gibbs_concurrency, int) or gibbs_concurrency < 1:
            raise ValueError(f"gibbs_concurrency must be an int >= 1, got {gibbs_concurrency!r}")
        if cls is None or not callable(cls):
            raise TypeError(f"Worker needs a class (or callable) to build the model, got {cls!r}")
        if gibbs_heartbeat_interval <= 0:
            raise ValueError("gibbs_heartbeat_interval must be > 0")
        if gibbs_reset_after_n_miss < 1:
            raise ValueError("gibbs_reset_after_n_miss must be >= 1")
        if gibbs_port is None:
            gibbs_port = default_port()  # GIBBS_PORT, else 5019
        if not isinstance(gibbs_port, int) or not 0 < gibbs_port < 65536:
            raise ValueError(f"gibbs_port must be a TCP port number, got {gibbs_port!r}")
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.host = gibbs_host
        self.port = gibbs_port
        self.heartbeat_interval = float(gibbs_heartbeat_interval)
        self.reset_after_n_miss = int(gibbs_reset_after_n_miss)
        self.start_method = gibbs_start_method
        self.name = gibbs_name or getattr(cls, "__name__", "model")
        self.model = gibbs_model
        self.batch_size = gibbs_batch_size
        self.batch_wait = float(gibbs_batch_wait)
        self.concurrency = gibbs_concurrency
        self.device = None if gibbs_device is None else device_name(gibbs_device)
        self.copy_args = bool(gibbs_copy_args)
        if gibbs_warmup is not None and (isinstance(gibbs_warmup, (str, bytes)) or not hasattr(gibbs_warmup, "__iter__")):
            raise TypeError(f"gibbs_warmup must be a list of sample inputs, got {gibbs_warmup!r}")
        self.warmup = list(gibbs_warmup) if gibbs_warmup is not None else []
        if gibbs_version is not None and not isinstance(gibbs_version, str):
            raise TypeError(f"gibbs_version must be a str, got {gibbs_version!r}")
        self.version = gibbs_version
        if gibbs_token is not None and (not isinstance(gibbs_token, str) or not gibbs_token):
            raise ValueError(f"gibbs_token must be a non-empty str, got {gibbs_token!r}")
        self.token: str = gibbs_token or secrets.token_hex(8)
        self.threads = _threads.parse_threads(gibbs_threads)
        self.pin_cpus = bool(gibbs_pin_cpus)
        self._thread_group = 1  # how many workers start with this one (a pool's or the command line's size)
        self._thread_slot = -1  # its index among them, for pinning
        self._owner_pid = os.getpid()
        # The key is resolved now, in the process that made the Worker, so a
        # worker started with spawn carries the parent's key explicitly.
        self._authkey, self._explicit_key = resolve_authkey(gibbs_authkey)
        # TLS to the hub over TCP: the context given, else the files of
        # GIBBS_TLS_CERT/KEY/CA (picklable: a spawned worker builds its own).
        self._tls: Union[ssl.SSLContext, TLSFiles, None] = (
            gibbs_ssl_context if gibbs_ssl_context is not None else files_from_env()
        )
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self.start_method_used: Optional[str] = None
        self.started_at: Optional[float] = None  # time.monotonic() at start()
        self._built: Any = None  # a shared byte once started (see built())

    # ------------------------------------------------------------ process API

    def start(self) -> None:
        """Run the worker in a new process (returns at once)."""
        if self._process is not None:
            raise RuntimeError("this Worker was already started")
        ctx = multiprocessing.get_context(self.start_method)
        self.start_method_used = ctx.get_start_method()
        _prune_local_workers()
        self._built = ctx.RawValue("b", 0)  # set by the child once the model is built
        plan = self._thread_plan()
        if self.device is not None or (plan is not None and self.start_method_used != "fork"):
            # The spec travels pickled, so that the child sets its device's
            # environment (and its threads) before unpickling it imports the
            # model's module.
            env = device_env(self.device) if self.device is not None else {}
            self._process = ctx.Process(  # type: ignore[attr-defined]
                target=_process_main_on_device,
                args=(env, pickle.dumps(self), os.getpid(), plan, self._built),
                name=f"gibbs-worker-{self.name}",
            )
        else:
            self._process = ctx.Process(  # type: ignore[attr-defined]
                target=_process_main,
                args=(self, os.getpid(), plan, self._built),
                name=f"gibbs-worker-{self.name}",
            )
        # Blocked across the fork (the child unblocks them once its handler is
        # in place), so an early terminate() is still a graceful one.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.started_at = time.monotonic()
        _local_workers.append(self)

    def _thread_plan(self) -> Optional[_threads.Plan]:
        """The threads of the worker about to start: its share among the
        live local workers of this process (this one and those started with it)."""
        pid = os.getpid()
        live = [w for w in _local_workers if w._owner_pid == pid and w is not self and w.peek_exitcode() is None]
        together = [w for w in live if w.threads == _threads.AUTO] if self.threads == _threads.AUTO else []
        workers = max([len(together) + 1, self._thread_group] + [w._thread_group for w in together])
        taken = {w._thread_slot for w in live if w.pin_cpus}
        self._thread_slot = next(i for i in range(len(taken) + 1) if i not in taken)
        return _threads.plan(self.threads, workers, self._thread_slot, self.pin_cpus)

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM): it finishes the request in hand,
        answers it, and exits with status 0."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()

    def kill(self) -> None:
        """Stop the worker at once (SIGKILL); the hub re-sends its request."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the worker process to end, at most ``timeout`` seconds
        (``None``: as long as it takes), as ``multiprocessing.Process.join``."""
        if self._process is None:
            raise RuntimeError("this Worker was not started")
        self._process.join(timeout)

    def is_alive(self) -> bool:
        """True while the process started by ``start()`` runs."""
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> Optional[int]:
        """The worker process's id; ``None`` before ``start()``."""
        return self._process.pid if self._process is not None else None

    @property
    def exitcode(self) -> Optional[int]:
        """The process's exit code once it ended (negative: the signal that
        ended it); ``None`` while it runs or before ``start()``."""
        return self._process.exitcode if self._process is not None else None

    def peek_exitcode(self) -> Optional[int]:
        """The exit code if the process has ended, without reaping it: safe
        from another thread than the one that joins it (two threads calling
        waitpid on one child race, and one may then see a dead process as
        alive)."""
        proc = self._process
        if proc is None or proc.pid is None:
            return None
        popen = getattr(proc, "_popen", None)
        code = getattr(popen, "returncode", None)
        if code is not None:
            return int(code)
        if not hasattr(os, "waitid") or self.start_method_used == "forkserver":
            return proc.exitcode  # not our child (the fork server's): read from its sentinel
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped meanwhile by its owner
            code = getattr(popen, "returncode", None)
            return None if code is None else int(code)
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    @property
    def sentinel(self) -> int:
        """A descriptor that becomes ready when the process ends (for
        ``multiprocessing.connection.wait`` or a selector)."""
        if self._process is None:
            raise RuntimeError("this Worker was not started")
        return self._process.sentinel

    def built(self) -> bool:
        """Whether the started worker's model was built (its constructor
        returned): a supervisor tells a broken model from a later crash."""
        flag = self._built
        return flag is not None and bool(flag.value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_process"] = None
        state["_built"] = None  # travels as its own argument (shared memory)
        if isinstance(self._tls, ssl.SSLContext):
            raise TypeError(
                "a Worker with gibbs_ssl_context cannot be sent to another process (an ssl.SSLContext "
                "does not pickle): start it with gibbs_start_method='fork', or name the files in "
                "GIBBS_TLS_CERT, GIBBS_TLS_KEY and GIBBS_TLS_CA instead"
            )
        return state

    def _ssl_context(self) -> Optional[ssl.SSLContext]:
        """The client context for TCP to the hub, built once per process."""
        if isinstance(self._tls, TLSFiles):
            self._tls = self._tls.client_context()
        return self._tls

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}"
        if self._process is None:
            return f"<Worker {self.name} -> {where} [not started]>"
        status = "alive" if self._process.is_alive() else f"exited {self._process.exitcode}"
        return f"<Worker {self.name} pid={self._process.pid} -> {where} [{status}]>"

    # ------------------------------------------------------------ blocking API

    def run(self) -> None:
        """Build the model and serve until SIGTERM/SIGINT (blocks).

        Raises whatever the model's constructor raises, after reporting it to
        the hub when one can be reached.
        """
        _Runtime(self).run(parent_pid=None)


def class_name(cls: Any) -> str:
    """``module:QualifiedName`` of a model class (what a hub compares)."""
    return f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', getattr(cls, '__name__', repr(cls)))}"


def device_name(device: Union[str, int]) -> str:
    """``1`` / ``"1"`` / ``"cuda:1"`` -> ``"cuda:1"``; ``"cpu"`` stays."""
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"a device is a str or an int, got {device!r}")
    text = str(device).strip()
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text == "cpu":
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    raise ValueError(f"unknown device {device!r}: use 'cuda:N', N, or 'cpu'")


def device_env(device: str) -> dict[str, str]:
    """The environment a worker on ``device`` runs with."""
    visible = device[5:] if device.startswith("cuda:") else ""
    return {"CUDA_VISIBLE_DEVICES": visible, "GIBBS_DEVICE": device}


def report_given_up(spec: Worker, why: str) -> None:
    """Tell the hub at ``spec``'s address that no more workers of its model
    will come from this supervisor (they kept failing in the constructor):
    the hub then fails the model's requests at once with ``NoWorkersError``
    (carrying the constructor's traceback it was sent) until a worker of the
    model joins. Best effort, for a few seconds."""
    _Runtime(spec)._report_init_failure(None, why, final=True)


def _process_main_on_device(
    env: dict[str, str], spec: bytes, parent_pid: int, plan: Optional[_threads.Plan] = None, built: Any = None
) -> None:
    os.environ.update(env)
    _threads.apply_in_child(plan)
    _process_main(pickle.loads(spec), parent_pid, None, built)


def _process_main(worker: Worker, parent_pid: int, plan: Optional[_threads.Plan] = None, built: Any = None) -> None:
    if plan is not None:  # the fork start method (the model's module is imported already)
        _threads.apply_in_child(plan)
    # A worker started by an app does not stop on the terminal's Ctrl-C on
    # its own (the whole process group gets it): it keeps serving until the
    # app that started it stops it (close, exit or death), so that the app's
    # graceful shutdown can finish its in-flight and queued requests.
    runtime = _Runtime(worker, stop_signals={signal.SIGTERM}, serves_process=True)
    runtime.built_flag = built
    try:
        runtime.run(parent_pid=parent_pid)
    except WorkerRefusedError as exc:
        print(f"gibbs worker (pid {os.getpid()}): {exc}", file=sys.stderr, flush=True)
        sys.exit(REFUSED_EXIT)
    except Exception:
        if runtime.model is not None:
            raise
        # The constructor raised: say it once (not a log line and
        # multiprocessing's traceback both), and exit with a status that
        # tells a supervisor not to expect a restart to do better.
        print(
            f"gibbs worker {worker.name} (pid {os.getpid()}): the model's constructor raised:\n"
            + traceback.format_exc(),
            file=sys.stderr,
            end="",
            flush=True,
        )
        sys.exit(INIT_FAILED_EXIT)


# Workers started from this process, stopped at interpreter exit (before
# multiprocessing's own exit hook joins them, which would wait forever).
# Pruned of reaped workers on each start; emptied in a forked child (they
# are its parent's children, not its own).
_local_workers: list[Worker] = []
#: Exited workers are kept this long for the hub's error messages.
_KEEP_EXITED = 64


def _prune_local_workers() -> None:
    exited = [w for w in _local_workers if w.exitcode is not None]
    for w in exited[: max(0, len(exited) - _KEEP_EXITED)]:
        _local_workers.remove(w)


def local_workers() -> list[Worker]:
    """Worker processes started by this process (alive or recently exited)."""
    pid = os.getpid()
    return [w for w in _local_workers if w._owner_pid == pid]


def stop_workers(workers: Sequence[Any], grace: float) -> None:
    """SIGTERM every live worker (each finishes the request in hand), wait up
    to ``grace`` seconds in all, then SIGKILL what is left."""
    workers = [w for w in workers if w.is_alive()]
    for w in workers:
        w.terminate()
    deadline = time.monotonic() + grace
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(1.0)


def _stop_local_workers(grace: float = 5.0) -> None:
    stop_workers(local_workers(), grace)
    _local_workers.clear()


def _forget_local_workers() -> None:
    # In a child forked by other means than multiprocessing (a pre-fork web
    # server): our workers are its parent's children. multiprocessing's own
    # exit hook would try to join them there ("can only join a child process").
    children = getattr(multiprocessing.process, "_children", None)
    for w in _local_workers:
        if children is not None and w._process is not None:
            children.discard(w._process)
    _local_workers.clear()


atexit.register(_stop_local_workers)
os.register_at_fork(after_in_child=_forget_local_workers)


class _Runtime:
    """The state of one serving worker, in its own process (or thread): the
    connection to its hub, the frames read, their dispatch by kind, the
    answers sent. How a call runs is its mode's: ``_calls`` (one at a time,
    batches), ``_streams`` (a sync generator), ``_async`` (async slots).

    ``Runtime(spec, serves_process=True).run(None)`` serves in the calling
    thread until :meth:`stop` (what the Ray launcher does in an actor);
    ``serves_process``: the whole process serves this model, so that a
    ``Hub()`` made there reaches the hub it serves."""

    def __init__(
        self, spec: Worker, stop_signals: Optional[set[signal.Signals]] = None, serves_process: bool = False
    ) -> None:
        self.spec = spec
        self.stop_signals = _STOP_SIGNALS if stop_signals is None else stop_signals
        self.model: Any = None
        self.stopping = False
        self._stop_raised = False
        self.busy = False
        self.sock: Optional[socket.socket] = None
        self.send_lock = threading.Lock()  # owns: sends on self.sock
        self.hub_interval = 1.0
        self.pool: Optional[protocol.SegmentPool] = None  # answers' shared memory (when the hub shares /dev/shm)
        self.shm_ok = False
        self.maps = protocol.MappingCache(readonly=True)  # the hub's request segments (read, never written)
        # Every read lands in this one buffer (allocated here, once: a fresh
        # 1 MiB object per read would be an mmap and munmap each time).
        self.rbuf = bytearray(1 << 20)
        self.parent_pid: Optional[int] = None
        self.is_async = False  # the model's __call__ is a coroutine (or async generator) function
        self.aloop: Optional[asyncio.AbstractEventLoop] = None  # runs async calls, in its own thread
        self.aloop_thread: Optional[threading.Thread] = None
        self.async_calls: set[concurrent.futures.Future[Any]] = set()  # async calls in progress
        # Plain (not streamed) async calls by request id, and those the hub
        # asked to stop (their caller is gone): main thread and loop thread.
        self.async_by_id: dict[int, concurrent.futures.Future[Any]] = {}
        self.stopped_ids: set[int] = set()
        self.deadlines: dict[int, float] = {}  # request id -> its deadline (DEADLINE frames), until it runs
        self.priorities: dict[int, int] = {}  # request id -> its class (PRIORITY frames), until it runs
        self._log_fields = logs.fields(spec.model, spec.name)  # the extra= of its log lines
        self.traces: dict[int, tuple[str, float]] = {}  # call id -> (traceparent, seconds queued) (TRACE frames)
        self._span: Any = None  # the worker's span of the traced call being started (gibbs.tracing)
        self.rids: dict[int, str] = {}  # call id -> the request id its caller gave (REQUEST_ID frames), until it runs
        self.async_streams: dict[int, _AsyncStreamState] = {}  # streams running on the loop, by request id
        self.pending: collections.deque[tuple[int, int, bytes]] = collections.deque()  # frames read, not handled
        self.reader = protocol.FrameReader()
        self.silence = 1.0
        self.last_heard = 0.0
        self._hb_stop = threading.Event()
        self._in_main_thread = threading.current_thread() is threading.main_thread()
        self._initial_ppid = os.getppid()
        self.built_flag: Any = None  # the parent's shared byte (Worker.built), when started by one
        self.serves_process = serves_process  # the whole process serves this model (started workers, Ray actors)
        self._said_refused_key = False
        # How it runs calls, by mode: one at a time or batches, sync streams, async slots.
        self._calls = Calls(self)
        self._streams = Streams(self)
        self._async = AsyncSlots(self)

    def stop(self) -> None:
        """The graceful stop, from any thread (what SIGTERM does to a worker
        process): the call in hand is finished and answered, then the
        worker says goodbye to its hub and :meth:`run` returns."""
        self.stopping = True

    # -------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Runs in the main thread between two bytecodes. While a request is in
        # hand we only note the wish; while idle we leave the wait at once.
        self.stopping = True
        if not self.busy and not self._stop_raised:
            self._stop_raised = True  # once: a second signal must not break the cleanup
            raise _Stop()

    def run(self, parent_pid: Optional[int]) -> None:
        self.parent_pid = parent_pid
        old: dict[signal.Signals, Any] = {}
        if self._in_main_thread:
            for sig in _STOP_SIGNALS:
                handler = self._on_signal if sig in self.stop_signals else signal.SIG_IGN
                old[sig] = signal.signal(sig, handler)
        heartbeat: Optional[threading.Thread] = None
        before = _context.serving
        if self._in_main_thread or self.serves_process:
            # This process serves the model (not a Worker.run() in a thread of
            # an app that makes its own hubs): Hub() here reaches this hub.
            _context.serving = Serving(
                self.spec.host, self.spec.port, self.spec._authkey, self.spec._explicit_key, self.spec.model,
                self.spec.token, str(self.spec.name or ""),
            )
        try:
            # start() blocked these signals across the fork, so that a terminate()
            # right after start() reaches our handler rather than the default one.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            built = threading.Event()
            loading = threading.Thread(target=self._announce_loading, args=(built,), name="gibbs-loading", daemon=True)
            loading.start()
            try:
                _threads.refresh()  # torch, when the model's module (or the parent, with fork) loaded it
                model = self.spec.cls(*self.spec.args, **self.spec.kwargs)
                self._warm_up(model)
                self.model = model
            except Exception as exc:
                built.set()
                tb = traceback.format_exc()
                logger.debug("worker %s: the model's constructor raised:\n%s", self.spec.name, tb, extra=self._log_fields)
                self._report_init_failure(exc, tb)
                raise
            finally:
                built.set()
                loading.join(2.0)
            if self.built_flag is not None:
                self.built_flag.value = 1
            call = self.model if inspect.isfunction(self.model) else type(self.model).__call__
            self.is_async = inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
            if self.is_async:
                self._async.start_loop()
            heartbeat = threading.Thread(
                target=self._heartbeat_loop, name="gibbs-worker-heartbeat", daemon=True
            )
            heartbeat.start()
            self._serve_forever()
        except _Stop:
            pass
        finally:
            self._hb_stop.set()
            if heartbeat is not None:
                heartbeat.join(5.0)
            self._async.stop_loop()
            if self.pool is not None:
                self.pool.close()
            self.maps.clear()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            _context.serving = before

    def _warm_up(self, model: Any) -> None:
        """The model's own ``warmup()``, then the sample inputs, before the
        worker joins (it is still announced as loading meanwhile)."""
        own = getattr(model, "warmup", None)
        if callable(own) and not inspect.isclass(model):
            result = own()
            if inspect.isawaitable(result):
                asyncio.run(_identity(result))
        if not self.spec.warmup:
            return
        samples = [list(self.spec.warmup)] if self.spec.batch_size > 1 else list(self.spec.warmup)
        for sample in samples:
            result = model(sample)
            if inspect.isawaitable(result):
                asyncio.run(_identity(result))
            elif inspect.isgenerator(result):
                for _ in result:
                    pass
            elif inspect.isasyncgen(result):
                asyncio.run(_drain_agen(result))

    # -------------------------------------------------------------- connecting

    def _connect(self, timeout: float) -> socket.socket:
        spec = self.spec
        sock, welcome, _, _ = dial(spec.host, spec.port, spec._authkey, spec._explicit_key, timeout, spec._ssl_context())
        try:
            return self._apply_welcome(sock, welcome)
        except BaseException:
            sock.close()
            raise

    def _apply_welcome(self, sock: socket.socket, welcome: dict[str, Any]) -> socket.socket:
        self.hub_interval = float(welcome.get("heartbeat_interval", 1.0))
        _context.request_ids = str(welcome.get("request_ids", ""))
        probe = welcome.get("shm_probe")
        self.shm_ok = False
        if isinstance(probe, dict) and protocol.shm_available():
            try:
                path = str(probe["path"])
                if os.path.dirname(path) == protocol.SHM_DIR:
                    with open(path, "rb") as f:
                        if f.read(64).decode() == str(probe["token"]):
                            self.shm_ok = True
                            if self.pool is None:
                                self.pool = protocol.SegmentPool(f"{protocol.SHM_PREFIX}w{os.getpid()}-")
            except (OSError, KeyError, UnicodeDecodeError):
                pass
        return sock

    def _hello(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "name": self.spec.name,
            "heartbeat_interval": self.spec.heartbeat_interval,
            "shm": self.shm_ok,
            "model": self.spec.model,
            "cls": class_name(self.spec.cls),
            "batch_size": self.spec.batch_size,
            "batch_wait": self.spec.batch_wait,
            "concurrency": self.spec.concurrency if self.is_async else 1,
            "device": self.spec.device,
            "token": self.spec.token,
            "version": self.spec.version,
            "deadlines": True,  # send me DEADLINE frames
        }

    def _serve_forever(self) -> None:
        backoff = 0.02
        max_backoff = MAX_BACKOFF_LOCAL if is_loopback(self.spec.host) else MAX_BACKOFF_REMOTE
        where = f"{self.spec.host}:{self.spec.port}"
        while not self.stopping:
            try:
                sock = self._connect(timeout=max(5.0, self.spec.heartbeat_interval * 2))
            except AuthenticationError as exc:
                logger.warning("worker %s: %s; retrying in %.0f s", self.spec.name, exc, AUTH_BACKOFF, extra=self._log_fields)
                if not self._said_refused_key:
                    # Said on this side too, once, whatever the logging setup:
                    # this worker serves nothing until the keys agree.
                    self._said_refused_key = True
                    print(
                        f"gibbs worker {self.spec.name} (pid {os.getpid()}): the hub at {where} refused this "
                        f"worker's key ({exc}); not serving, retrying every {AUTH_BACKOFF:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                time.sleep(AUTH_BACKOFF)
                continue
            except (OSError, ProtocolError) as exc:
                logger.debug("worker %s: no hub at %s (%s); retrying in %.2f s", self.spec.name, where, exc, backoff, extra=self._log_fields)
                time.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            backoff = 0.02
            logger.info("worker %s (pid %d): connected to hub at %s", self.spec.name, os.getpid(), where, extra=self._log_fields)
            try:
                self._serve(sock)
            except (OSError, ProtocolError) as exc:
                logger.warning("worker %s: connection to hub lost (%s); reconnecting", self.spec.name, exc, extra=self._log_fields)
            finally:
                with self.send_lock:
                    self.sock = None
                sock.close()
                # Nobody will read or release what this connection leased; and
                # with no hub to clean up after us, keep no file while away.
                if self.pool is not None:
                    self.pool.close()
                self.maps.clear()

    # -------------------------------------------------------------- serving

    def _send(self, sock: socket.socket, buffers: list[protocol.Buffer]) -> None:
        with self.send_lock:
            if len(buffers) == 1:
                sock.sendall(buffers[0])
            elif sum(map(len, buffers)) < 65536:
                sock.sendall(b"".join(buffers))
            else:
                for b in buffers:
                    sock.sendall(b)

    def _serve(self, sock: socket.socket) -> None:
        self._set_timeouts(sock)
        self.reader = protocol.FrameReader()
        self.silence = self.hub_interval * self.spec.reset_after_n_miss
        # A kernel receive timeout rather than poll() before each recv: one
        # system call per message, and still a bound on the hub's silence.
        wait = min(self.silence, self.hub_interval)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(wait), int((wait % 1) * 1e6))
        )
        self.last_heard = time.monotonic()
        self.pending.clear()
        try:
            # HELLO inside the try: a stop signal from here on says GOODBYE.
            self._send(sock, [protocol.pack_json(protocol.HELLO, self._hello())])
            with self.send_lock:
                self.sock = sock
            while True:
                if self.stopping:
                    self._stop_raised = True
                    raise _Stop()
                frames = self._read_frames(sock)
                if frames is None:
                    logger.info("worker %s: hub closed the connection", self.spec.name, extra=self._log_fields)
                    return
                if frames:
                    _threads.refresh()
                    self._serve_batch(sock, frames)
                    self.last_heard = time.monotonic()
        except _Stop:
            self._async.drain()  # calls in progress answer before the goodbye
            self._goodbye(sock)
            raise

    def _read_frames(self, sock: socket.socket) -> Optional[list[tuple[int, int, bytes]]]:
        """One read: the whole frames it completed ([] after a quiet wait),
        or None at end of file. Raises when the hub has been silent too long."""
        rview = memoryview(self.rbuf)
        try:
            n = sock.recv_into(rview)
        except (BlockingIOError, TimeoutError):
            if time.monotonic() - self.last_heard > self.silence:
                raise ConnectionAbortedError(f"hub silent for more than {self.silence:.1f} s") from None
            return []
        if not n:
            return None
        self.last_heard = time.monotonic()
        return self.reader.feed(rview[:n])

    def _goodbye(self, sock: socket.socket) -> None:
        try:
            self._send(sock, protocol.pack_frame(protocol.GOODBYE, 0))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _set_timeouts(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        bound = max(30.0, self.hub_interval * self.spec.reset_after_n_miss * 4)
        timeval = struct.pack("ll", int(bound), 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except OSError:
            pass

    def _serve_batch(self, sock: socket.socket, frames: list[tuple[int, int, bytes]]) -> None:
        """Run the requests that arrived together, in order. Answers of quick
        calls go out together (one send), but none waits more than
        COALESCE_WINDOW behind the others. ``busy`` stays set until every
        answer computed is sent, so a stop signal never strands one."""
        out: list[protocol.Buffer] = []
        files: list[protocol.Payload] = []
        first_ready = 0.0
        pending = self.pending
        pending.extend(frames)
        self.busy = True
        try:
            while pending:
                kind, req_id, body = pending.popleft()
                if self.stopping:
                    pending.clear()
                    break  # what is left was not started: the hub re-queues it
                if kind == protocol.RELEASE:
                    if self.pool is not None:
                        self.pool.release(body.decode(errors="replace"))
                    continue
                if kind == protocol.REQUEST:
                    buffers, payloads = self._calls.handle(req_id, body)
                elif kind == protocol.BATCH:
                    self._streams.poll_controls(sock)  # a STOP for one of its items may have come meanwhile
                    buffers, payloads = self._calls.handle_batch(body)
                elif kind == protocol.DEADLINE:
                    self._calls.note_deadline(req_id, body)
                    continue
                elif kind == protocol.PRIORITY:
                    self.priorities[req_id] = protocol.unpack_priority(body)
                    continue
                elif kind == protocol.REQUEST_ID:
                    self.rids[req_id] = protocol.unpack_request_id(body)
                    continue
                elif kind == protocol.TRACE:
                    self.traces[req_id] = protocol.unpack_trace(body)
                    continue
                elif kind == protocol.STREAM:
                    if out:  # answers computed before the stream go out first
                        self._send_answers(sock, out, files)
                        out, files = [], []
                    _REQUEST_ID.set(self.rids.pop(req_id, req_id) if self.rids else req_id)
                    if self.traces:
                        self.traces.pop(req_id, None)  # a stream has its caller's span only
                    token = _DEADLINE.set(self.deadlines.pop(req_id, None))
                    ptoken = _PRIORITY.set(self.priorities.pop(req_id, None)) if self.priorities else None
                    try:
                        if self.is_async:
                            self._async.start_stream(sock, req_id, body)
                        else:
                            self._streams.stream(sock, req_id, body)
                    finally:
                        _DEADLINE.reset(token)
                        if ptoken is not None:
                            _PRIORITY.reset(ptoken)
                    continue
                elif kind == protocol.CREDIT or kind == protocol.STOP:
                    state = self.async_streams.get(req_id)
                    if state is not None:
                        n = protocol.unpack_credit(body) if kind == protocol.CREDIT else -1
                        assert self.aloop is not None
                        self.aloop.call_soon_threadsafe(state.control, n)
                    elif kind == protocol.STOP:
                        running = self.async_by_id.get(req_id)
                        if running is not None:
                            # The caller is gone (cancelled, deadline): CancelledError in the model.
                            self.stopped_ids.add(req_id)
                            running.cancel()
                    continue
                elif kind == protocol.REFUSED:
                    reason = protocol.unpack_json(body).get("reason", "?")
                    raise WorkerRefusedError(f"the hub refused worker {self.spec.name}: {reason}")
                else:
                    continue
                if not out:
                    first_ready = time.monotonic()
                out.extend(buffers)
                for p in payloads:
                    if p.shm_path is not None:
                        files.append(p)
                if time.monotonic() - first_ready > COALESCE_WINDOW:
                    self._send_answers(sock, out, files)
                    out, files = [], []
            if out:
                self._send_answers(sock, out, files)
        finally:
            self.busy = False
        if self.stopping:
            self._stop_raised = True
            raise _Stop()

    def _send_answers(
        self, sock: socket.socket, out: list[protocol.Buffer], files: list[protocol.Payload]
    ) -> None:
        try:
            self._send(sock, out)
        except BaseException:
            for payload in files:
                payload.release()  # the hub never saw them: the files are still ours
            raise


    # -------------------------------------------------------------- async models


    # -------------------------------------------------------------- heartbeats

    def _heartbeat_loop(self) -> None:
        frame = b"".join(protocol.pack_frame(protocol.HEARTBEAT, 0))
        while not self._hb_stop.wait(self.spec.heartbeat_interval):
            if self.parent_pid is not None and not self._parent_alive():
                # The process that started us is gone: nobody else will stop us.
                logger.warning("worker %s: parent process exited; stopping", self.spec.name, extra=self._log_fields)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            with self.send_lock:
                sock = self.sock
                if sock is None:
                    continue
                try:
                    sock.sendall(frame)
                except OSError:
                    pass

    def _parent_alive(self) -> bool:
        # Under forkserver our parent is the fork server, not the process that
        # called start(): watch both for a change of parent and for that process.
        if os.getppid() != self._initial_ppid:
            return False
        try:
            os.kill(self.parent_pid, 0)  # type: ignore[arg-type]
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    # -------------------------------------------------------------- loading

    def _announce_loading(self, built: threading.Event) -> None:
        """While the constructor runs (its own thread): tell the hub this
        worker is building its model, on a connection held open until the
        model is built, so the hub can say "2 workers loading for 12 s"."""
        while not built.is_set():
            try:
                sock = self._connect(timeout=1.0)
            except (OSError, ProtocolError, AuthenticationError):
                built.wait(0.2)
                continue
            try:
                report = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "name": self.spec.name,
                    "model": self.spec.model,
                    "device": self.spec.device,
                }
                sock.sendall(protocol.pack_json(protocol.LOADING, report))
                built.wait()
            except OSError:
                pass
            finally:
                sock.close()
            return

    # -------------------------------------------------------------- init failure

    def _report_init_failure(self, exc: Optional[BaseException], tb: str, final: bool = False) -> None:
        report = {
            "model": self.spec.model,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "name": self.spec.name,
            "exc_type": type(exc).__qualname__ if exc is not None else "",
            "message": str(exc) if exc is not None else tb,
            "traceback": tb if exc is not None else "",
            "final": final,  # a supervisor gave up: no worker of the model comes from there
        }
        deadline = time.monotonic() + INIT_REPORT_WINDOW
        while time.monotonic() < deadline:
            try:
                sock = self._connect(timeout=1.0)
            except (OSError, ProtocolError, AuthenticationError):
                time.sleep(0.1)
                continue
            try:
                sock.sendall(protocol.pack_json(protocol.INIT_FAILED, report))
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(1.0)
                sock.recv(1)  # wait for the hub to read it and close
            except OSError:
                pass
            finally:
                sock.close()
            return


#: The serving loop of one worker, for launchers that run it in a thread of
#: their own (``gibbs.ray``): ``Runtime(spec, serves_process=True).run(None)``
#: serves until ``stop()``.
Runtime = _Runtime
