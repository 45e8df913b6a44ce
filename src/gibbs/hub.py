"""The hub: where callers' requests meet idle workers.

Data flow (keep this true when the code changes)::

    callers: asyncio tasks on any loop, or threads            hub process
    ─────────────────────────────────────────────────────────────────────────
    hub.request / hub.stream              hub.submit / hub.submit_stream
      pickle (protocol 5) here: a bad       -> concurrent.futures.Future
      argument raises at the call site;        or a blocking iterator
      big buffers -> a pooled /dev/shm segment
      under the bridge lock: core.submit(call) -> actions (core.py, no I/O);
      a Send to an idle worker is written at once (non-blocking)
                                   │
                                   ▼
                          bridge thread (bridge.py): the driver
                          selectors: listeners, worker sockets, wake-up
                          pipe, sentinels of lost local workers
                          - RESULT/ERROR/CHUNK -> core.answered/chunk
                          - GOODBYE -> core.worker_leaving
                          - EOF / silence -> core.worker_lost
                          - handshake threads vet new connections (HMAC)
                                   │
      outcomes handed over outside the lock: one call_soon_threadsafe
      per loop per pass (the result is unpickled by the caller); submit()
      futures resolved on a delivery thread (their callbacks run there)
    ─────────────────────────────────────────────────────────────────────────
                 one stream per worker: TCP (TCP_NODELAY), or on Linux an
                 abstract unix socket for workers on this machine; framed:
                 kind | request id | length | body   (protocol.py)
    ─────────────────────────────────────────────────────────────────────────
    worker process (worker.py): model = cls(*args, **kwargs) once, then
      recv -> model(*a, **kw) -> send (a batch: model(xs); a stream: CHUNKs
      within a credit window; async models on the worker's own loop);
      a heartbeat thread; SIGTERM finishes what it holds, then GOODBYE

Who may call what:

* ``Hub()`` binds nothing and starts no thread: create it at import time, in
  a parent that then forks. The first ``request``/``submit``/
  ``wait_for_workers``/``start`` binds the address and starts the bridge, in
  the process that makes it. After a fork the child's copy forgets the
  parent's sockets and starts afresh if used.
* A family of hubs (the web processes of ``gunicorn -w N``): the first to
  start takes the address and routes (``role == "router"``); the others join
  it as client hubs (``role == "client"``): their bridge sends calls to the
  router as FORWARD frames (the router is a "relay" worker per model in their
  core) and re-sends them if it goes, while one of them takes the address
  over. ``address=``/``GIBBS_HUB``: always a client of the hub there.
* ``request`` must be awaited on a running event loop; the future resolves on
  that loop, so one hub serves several loops, in turn or at once.
* ``close``/``aclose`` may be called from anywhere, any number of times.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import ssl
import threading
import time
import uuid
import warnings
import weakref
from sys import modules as _modules
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

from . import _context, protocol
from . import tracing as _tracing
from ._context import _DEADLINE, _PRIORITY
from ._delivery import (
    _CREDIT_EVERY,
    StreamIterator,
    _AsyncStream,
    _deliver_async,
    _deliver_sync,
    _offer_sync,
    _set_if_pending,
    _SubmitFuture,
    _unwrap,
    _unwrap_chunk,
)
from ._options import HubOptions
from ._peers import LocalWorker, describe_exit
from ._rendezvous import _Place
from .bridge import Bridge
from .core import DEFAULT_MODEL, Outcome, OutcomeKind, check_priority
from .errors import (
    DeadlineExceededError,
    HubClosedError,
    NoWorkersError,
    SerializationError,
)
from .metrics import CONTENT_TYPE, prometheus_text
from .pool import DeviceSpec, Launcher, LocalLauncher, Pool, WorkerFactory, resolve_devices
from .scaling import Autoscaler
from .tls import files_from_env
from .transport import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    KeyLike,
    default_app,
    default_port,
    is_loopback,
    limited_keys,
    parse_address,
    resolve_authkey,
)
from .worker import _REQUEST_ID, Worker, local_workers

__all__ = ["Hub"]

logger = logging.getLogger("gibbs")
_OTEL = _tracing._OTEL  # imported by an application that traces (gibbs never imports it)

_live_hubs: "weakref.WeakSet[Hub]" = weakref.WeakSet()

#: The address of a hub to route through, for web processes on other machines.
HUB_ENV = "GIBBS_HUB"


class Hub:
    """Sends each request to an idle worker and gives back its answer.

    Args:
        port: TCP port to listen on (0: any free port; see :attr:`port`).
            Default: ``GIBBS_PORT``, else 5019.
        heartbeat_interval: seconds between the hub's heartbeats to workers.
        host: address to bind. The default is loopback; binding any other
            address needs an explicit key (``authkey`` or ``GIBBS_AUTHKEY``).
        authkey: the key workers must prove they hold (bytes or str). Default:
            ``GIBBS_AUTHKEY``, else the key that processes descended from this
            one inherit (no configuration for workers started from here).
        heartbeat_misses: a worker silent for this many of its heartbeat
            intervals is dropped and its request re-sent.
        max_attempts: how many workers may die running one request before it
            fails with :class:`~gibbs.WorkerDiedError`.
        max_queued: requests allowed to wait for a worker; beyond it
            ``request`` raises :class:`~gibbs.QueueFullError` at once.
            ``None`` (default): unbounded.
        max_frame_bytes: largest message accepted from a worker; a bigger one
            closes that connection.
        handshake_timeout: seconds a new connection has to authenticate.
        observer_key: a key that lets a peer only read statistics
            (``gibbs status``); default ``GIBBS_OBSERVER_KEY``, else none.
        worker_key: a key that lets a peer only serve as a worker (not
            submit work as a client hub, nor observe); default
            ``GIBBS_WORKER_KEY``, else none. ``authkey`` gives every role.
        pipeline_depth: most calls a worker may hold at once. A busy worker
            gets another only while the work committed to it stays under 1 ms
            (by its measured service time): fast models do not wait a round
            trip between calls; a model of 1 ms or more never gets a second
            call while busy. 1 disables pipelining.
        shm_threshold: out-of-band buffers (NumPy arrays, ``pickle.PickleBuffer``)
            of at least this many bytes travel through shared memory to workers
            on this machine (plain ``bytes`` always go inline).
            ``None`` disables shared memory.
            Both ways, nothing is copied on the receiving side: a worker's
            model reads request arrays in place (read-only views, valid
            during its call), and a caller gets answer arrays on the
            worker's memory, which goes back to the worker when the caller
            frees them (whatever thread drops the last reference).
        max_lent_bytes: most bytes of workers' shared memory that answers the
            callers still hold may take (default 512 MiB); answers beyond it
            are copied out instead. ``statistics()["shared_memory"]`` shows
            what is lent and the request segments' pool.
        close_grace: default seconds ``close()`` lets running requests finish.
        address: ``"host:port"`` of a hub that routes for this one (default
            ``GIBBS_HUB``, else none): a hub started with ``python -m gibbs
            hub``, maybe on another machine. This hub then never listens: it
            sends its calls there, and re-sends them if that hub restarts.
            Without it, the first hub of a family of processes (the web
            processes of ``uvicorn --workers N`` or ``gunicorn -w N``) to
            start takes ``host:port`` and routes; the others find it there
            and send their calls through it, and one of them takes the
            address over if it goes.
        app: the application this hub serves (default ``GIBBS_APP``, else
            the program: its command line and working directory). A hub
            finding its address held by the hub of another application
            never joins it (its calls would be answered by another
            application's models): it raises :class:`~gibbs.AddressInUseError`.
            The web processes of one ``gunicorn``/``uvicorn --workers`` share
            their program, so they need nothing; ``"*"`` routes for client
            hubs of any application (as ``python -m gibbs hub`` does).
        no_worker_timeout: seconds a request may wait while no worker of its
            model is connected or loading (none started, all gone, or every
            handshake refused); then it fails with
            :class:`~gibbs.NoWorkersError` saying what the hub saw. The hub
            also logs a warning, once per model and interval, while requests
            wait with no worker. ``None``: wait for workers forever.
        resp_buffer_size: accepted for gibbs 0.2 code and unused: gibbs keeps
            every pending request's answer (0.2 dropped the oldest ones).
        ssl_context: a server ``ssl.SSLContext``: TCP connections carry TLS
            and a peer without it is refused (the local socket stays
            plaintext). Default: built from ``GIBBS_TLS_CERT``,
            ``GIBBS_TLS_KEY`` and ``GIBBS_TLS_CA`` when set (with a CA,
            clients must show a certificate it signed). The key is still
            required off loopback.
        client_ssl_context: a client ``ssl.SSLContext`` for joining another
            hub over TCP (``address=``). Default: from the same variables.
    """

    def __init__(
        self,
        port: Optional[int] = None,
        heartbeat_interval: float = 1.0,
        resp_buffer_size: Optional[int] = None,
        *,
        host: str = DEFAULT_HOST,
        authkey: KeyLike = None,
        heartbeat_misses: int = 3,
        max_attempts: int = 3,
        max_queued: Optional[int] = None,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME,
        handshake_timeout: float = 5.0,
        pipeline_depth: int = 8,
        shm_threshold: Optional[int] = protocol.DEFAULT_SHM_THRESHOLD,
        close_grace: float = 10.0,
        address: Optional[str] = None,
        max_lent_bytes: int = 512 << 20,
        app: Optional[str] = None,
        no_worker_timeout: Optional[float] = 30.0,
        observer_key: KeyLike = None,
        worker_key: KeyLike = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        client_ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        # resp_buffer_size: accepted for gibbs 0.2 code, unused: gibbs never
        # drops a pending request's answer, so there is no buffer to size.
        del resp_buffer_size
        if port is None:
            port = default_port()
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port must be a TCP port number (0 for any), got {port!r}")
        if app is not None and (not isinstance(app, str) or not app):
            raise ValueError(f"app must be a non-empty str, got {app!r}")
        # Every option checked once, then handed down as one record.
        self._options = options = HubOptions(
            heartbeat_interval=heartbeat_interval,
            heartbeat_misses=heartbeat_misses,
            max_attempts=max_attempts,
            max_queued=max_queued,
            max_frame_bytes=max_frame_bytes,
            handshake_timeout=handshake_timeout,
            pipeline_depth=pipeline_depth,
            shm_threshold=shm_threshold,
            max_lent_bytes=max_lent_bytes,
            close_grace=close_grace,
            no_worker_timeout=no_worker_timeout,
            app=app if app is not None else default_app(),
        )
        host, port, self._router, key, explicit = _where_to(host, port, address, authkey)
        self._host = host
        self._port = port
        self._app = options.app
        self._limited_keys = limited_keys(observer_key, worker_key, key)
        self._authkey = key
        self._explicit = explicit
        tls_files = files_from_env()  # GIBBS_TLS_CERT, GIBBS_TLS_KEY, GIBBS_TLS_CA
        if ssl_context is None and tls_files is not None and tls_files.cert and self._router is None:
            ssl_context = tls_files.server_context()
        if client_ssl_context is None and tls_files is not None:
            client_ssl_context = tls_files.client_context()
        self._ssl_context = ssl_context  # set: the TCP listener speaks TLS
        self._place = _Place(host, port, self._router, key, explicit, options.handshake_timeout, options.heartbeat_interval)
        self._place.ssl_context = client_ssl_context
        self._place.max_frame = options.max_frame_bytes
        self._place.app = self._app
        self._state_lock = threading.Lock()  # owns: _bridge, _closed, _probe_path
        self._bridge: Optional[Bridge] = None
        self._closed = False
        self._probe_path: Optional[str] = None
        self._pool: Optional[protocol.SegmentPool] = None  # shared memory for requests
        self._pid = os.getpid()
        self._created_at = time.monotonic()  # local workers started since then are this hub's
        self._finalizer: Optional[weakref.finalize] = None
        self._pools: list[Pool] = []  # started by serve(); closed with the hub
        self._default_timeouts: dict[str, Optional[float]] = {}  # model -> gibbs_timeout (set_default_timeout)
        self._default_priorities: dict[str, int] = {}  # model -> gibbs_priority (set_default_priority)
        _live_hubs.add(self)

    # ------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        """The address the hub binds (or, for a client hub, dials)."""
        return self._host

    @property
    def port(self) -> int:
        """The port listened on: the bound one once started (useful with port=0)."""
        bound = self._place.bound
        return bound[1] if bound else self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``; the port is the bound one once the hub started."""
        return (self._host, self.port)

    @property
    def closed(self) -> bool:
        """True once ``close()`` (or ``aclose()``) was called."""
        return self._closed

    @property
    def role(self) -> Optional[str]:
        """``"router"``: this hub holds the address; workers, and the hubs of
        other processes of the family, connect to it. ``"client"``: it sends
        its calls through the router (another process's hub, or ``python -m
        gibbs hub``). None before it starts."""
        bridge = self._bridge
        return bridge.role if bridge is not None and self._pid == os.getpid() else None

    def start(self) -> "Hub":
        """Bind the address and start the bridge thread (done lazily by the
        first request; call it to fail early, or to learn the port)."""
        self._ensure_started()
        return self

    def _ensure_started(self) -> Bridge:
        bridge = self._bridge
        if bridge is not None:
            return bridge
        with self._state_lock:
            if self._closed:
                raise HubClosedError("the hub is closed")
            if self._bridge is not None:
                return self._bridge
            listeners, upstream = self._place.find()
            if listeners:
                self._place.bound = listeners[0].getsockname()[:2]
            probe = self._make_probe()
            port = self.port
            created = self._created_at
            family = self._router is not None or self._port != 0
            bridge = Bridge(
                listeners,
                authkey=self._authkey,
                authkey_explicit=self._explicit,
                upstream=upstream,
                rendezvous=self._place if family else None,
                on_role=self._place.took_over,
                options=self._options,
                shm_probe=probe,
                deliver_async=_deliver_async,
                deliver_sync=_deliver_sync,
                offer_sync=_offer_sync,
                local_workers=lambda: _local_workers_of(port, created),
                request_pool=self._pool,
                limited_keys=self._limited_keys,
                ssl_context=self._ssl_context,
            )
            bridge.stats_source = weakref.WeakMethod(self.statistics)
            bridge.explain_source = weakref.WeakMethod(self._explain_absence)
            for name, seconds in self._default_timeouts.items():
                bridge.set_default_timeout(name, seconds)
            for name, priority in self._default_priorities.items():
                bridge.set_default_priority(name, priority)
            bridge.start()
            self._bridge = bridge
            # A hub dropped without close() still releases its port, threads
            # and files when it is collected (with a ResourceWarning, as
            # subprocess does); the finalizer holds no reference to the hub.
            self._finalizer = weakref.finalize(
                self, _finalize_unclosed, bridge, self._probe_path, self._pool, f"{self._host}:{port}"
            )
            self._finalizer.atexit = False  # _close_all_at_exit closes it quietly
            if listeners:
                logger.info("gibbs hub listening on %s:%d", self._host, self.port)
            else:
                logger.info("gibbs hub routing through the hub at %s:%d", self._host, self.port)
            return bridge

    def _make_probe(self) -> Optional[dict[str, str]]:
        """A file in /dev/shm whose content only a worker on this machine (and
        in the same /dev/shm) can read: such workers get shared memory."""
        if self._options.shm_threshold is None or not protocol.shm_available():
            return None
        _remove_stale_segments()
        token = uuid.uuid4().hex
        path = os.path.join(protocol.SHM_DIR, f"{protocol.SHM_PREFIX}probe{os.getpid()}-{token[:8]}")
        try:
            with open(path, "w") as f:
                f.write(token)
        except OSError:
            return None
        self._probe_path = path
        self._pool = protocol.SegmentPool(f"{protocol.SHM_PREFIX}h{os.getpid()}-")
        return {"path": path, "token": token}

    def close(self, grace: Optional[float] = None) -> None:
        """Stop taking requests; fail the queued ones with HubClosedError; let
        the running ones finish within ``grace`` seconds (default
        ``close_grace``); close every connection. Idempotent, and safe from
        any thread. Workers go back to waiting for a hub."""
        bridge = self._begin_close(grace, lambda: None)
        if bridge is not None:
            bridge.join()
        self._close_pools()
        self._remove_probe()

    def _close_pools(self) -> None:
        pools, self._pools = self._pools, []
        for pool in pools:
            pool.close(grace=self._options.close_grace)

    def __del__(self) -> None:
        # gibbs 0.2 code calls hub.__del__() to close a hub. Collection runs
        # the same finalizer (see _ensure_started); close() detaches it.
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None and finalizer.alive:
            self._closed = True
            finalizer()

    async def aclose(self, grace: Optional[float] = None) -> None:
        """``close()`` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def closed() -> None:
            try:
                loop.call_soon_threadsafe(_set_if_pending, done, None)
            except RuntimeError:
                pass

        bridge = self._begin_close(grace, closed)
        if bridge is not None:
            await done
            bridge.join()
        if self._pools:
            await loop.run_in_executor(None, self._close_pools)
        self._remove_probe()

    def _begin_close(self, grace: Optional[float], on_closed: Any) -> Optional[Bridge]:
        with self._state_lock:
            self._closed = True
            bridge = self._bridge
            if self._finalizer is not None:
                self._finalizer.detach()
        if bridge is not None:
            bridge.begin_close(self._options.close_grace if grace is None else grace, on_closed)
        return bridge

    def _remove_probe(self) -> None:
        if self._pool is not None:
            self._pool.close()
        path, self._probe_path = self._probe_path, None
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def __aenter__(self) -> "Hub":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()  # the parent's bridge: not ours to close
            self._finalizer = None
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.forget_after_fork()  # a no-op for a bridge already closed
        self._state_lock = threading.Lock()
        self._place.bound = None
        self._probe_path = None  # the parent's file: not ours to remove
        if self._pool is not None:
            self._pool.forget()  # the parent's segments, likewise
            self._pool = None
        self._pid = os.getpid()

    # ------------------------------------------------------------ requests

    def _encode(self, args: tuple[Any, ...], kwargs: dict[str, Any], shm: bool = True) -> protocol.Payload:
        try:
            if shm and self._pool is not None and self._options.shm_threshold is not None:
                return protocol.encode((args, kwargs), self._pool, self._options.shm_threshold)
            return protocol.encode((args, kwargs))
        except Exception as exc:
            raise SerializationError(f"the request's arguments cannot be pickled: {exc!r}") from exc

    def _prepare(
        self,
        model: Optional[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stream: bool = False,
        request_id: Optional[str] = None,
    ) -> tuple[Bridge, str, protocol.Payload]:
        # No pid check: in a forked child _after_fork_in_child has already let
        # go of the parent's bridge (None here), so the child starts its own.
        bridge = self._bridge or self._ensure_started()
        if model is None:
            model = DEFAULT_MODEL
        elif not isinstance(model, str) or not model:
            raise TypeError(f"gibbs_model must be a non-empty str, got {model!r}")
        # (whether the call fits a batched model is the core's to say, at submit)
        payload = self._encode(args, kwargs, bridge.role == "router")
        if len(args) == 1 and not kwargs:
            payload.flags = protocol.FWD_SINGLE
        if request_id is not None or _REQUEST_ID.get() is not None:  # given, or the one being served here
            payload.rid = _context._request_id_of_caller(request_id)
        return bridge, model, payload

    async def request(
        self,
        *args: Any,
        gibbs_timeout: Optional[float] = None,
        gibbs_retries: int = 0,
        gibbs_model: Optional[str] = None,
        gibbs_hedge: bool = False,
        gibbs_priority: Optional[int] = None,
        gibbs_request_id: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``model(*args, **kwargs)`` on an idle worker and return its result.

        Args:
            gibbs_timeout: seconds to wait for an answer (None: the model's
                default, see :meth:`set_default_timeout`, else no limit): the
                call's deadline, kept by the hub itself. When it passes,
                :class:`~gibbs.DeadlineExceededError` (an
                ``asyncio.TimeoutError``) is raised, saying whether it expired
                in the queue or the model took too long. A request that cannot
                finish in the time it has left, by the model's measured
                service time, is never sent: it fails at once. Inside the
                model, :func:`gibbs.remaining` gives the time left.
            gibbs_retries: how many more times to wait ``gibbs_timeout`` after
                the first; a request already running is then sent again to the
                next free worker, and the first answer of any attempt wins.
                -1: forever.
            gibbs_model: the name of the model to run (default ``"default"``):
                only workers serving that model get the request.
            gibbs_hedge: when the call has run past the model's recent p95
                service time and another worker of the model is idle, a
                second attempt goes to it; the first answer wins, the other
                attempt is stopped (an async model's coroutine cancelled) or
                its answer dropped. Off by default (a model's default:
                ``serve(gibbs_hedge=True)``). Decided by the hub whose workers
                run the call: from a client hub, set it on the router's
                ``serve``.
            gibbs_priority: the call's class, an int from 0 to 9 (None: the
                model's default, see :meth:`set_default_priority`, else 0):
                a free worker takes the highest class queued first; a queued
                call is passed by at most ``gibbs.core.STARVATION_BOUND``
                units of higher classes. A call a model makes while it serves
                one inherits that call's class.
            gibbs_request_id: the call's request id (a str of at most 200
                bytes, e.g. a web request's ``X-Request-ID``), which the model
                reads with :func:`gibbs.request_id` and gibbs's log lines
                name. None: the id of the request being served here (a model
                calling a model, an endpoint behind
                :class:`gibbs.asgi.CancelOnDisconnect`), else one the hub
                makes (a per-hub prefix and a counter).

        Raises:
            UserCodeException: the model raised (type, message, traceback kept).
            WorkerDiedError: workers died running it ``max_attempts`` times.
            SerializationError: an argument (at once) or the result cannot be pickled.
            QueueFullError: ``max_queued`` requests are already waiting.
            DeadlineExceededError: the deadline passed (see ``gibbs_timeout``).
            NoWorkersError: no worker of the model can come (every worker
                started here failed to build the model).
            HubClosedError: the hub was closed.
        """
        if gibbs_timeout is not None or gibbs_retries:
            _check_deadline_args(gibbs_timeout, gibbs_retries)
        if _DEADLINE.get() is not None:  # (a model calling a model: see _within_caller)
            gibbs_timeout = _within_caller(gibbs_timeout)
        if gibbs_priority is not None or _PRIORITY.get() is not None:
            gibbs_priority = _priority_within_caller(gibbs_priority)
        loop = asyncio.get_running_loop()
        bridge, model, payload = self._prepare(gibbs_model, args, kwargs, request_id=gibbs_request_id)
        span = _tracing.begin(model, payload) if _OTEL in _modules else None  # gibbs.tracing
        fut: asyncio.Future[Outcome] = loop.create_future()
        bridge.home(loop)
        try:
            call = bridge.submit(
                payload, fut, model, timeout=gibbs_timeout, retries=gibbs_retries, hedge=gibbs_hedge,
                priority=gibbs_priority,
            )
        except BaseException:
            payload.release()
            if span is not None:
                span.end()
            raise
        try:
            outcome = await fut
        except BaseException as exc:
            bridge.cancel(call)
            if not loop.is_closed():  # cleaned up after its loop closed: nothing to cancel
                fut.cancel()
            if span is not None:
                _tracing.end(span, bridge.request_id(call), call, exc)
            raise
        if span is None:
            return _unwrap(outcome)
        try:
            value = _unwrap(outcome)
        except BaseException as exc:
            _tracing.end(span, bridge.request_id(call), call, exc)
            raise
        _tracing.end(span, bridge.request_id(call), call, None)
        return value

    def submit(
        self,
        *args: Any,
        gibbs_timeout: Optional[float] = None,
        gibbs_retries: int = 0,
        gibbs_model: Optional[str] = None,
        gibbs_hedge: bool = False,
        gibbs_priority: Optional[int] = None,
        gibbs_request_id: Optional[str] = None,
        **kwargs: Any,
    ) -> "concurrent.futures.Future[Any]":
        """Like ``request`` for plain threads: returns a
        ``concurrent.futures.Future``. Cancelling it while queued removes the
        request (it never runs). ``gibbs_timeout``, ``gibbs_retries``,
        ``gibbs_priority`` and ``gibbs_request_id`` as for ``request``: the
        future fails with :class:`~gibbs.DeadlineExceededError`. Its
        done-callbacks run on a gibbs delivery thread, never under a lock of
        the hub."""
        _check_deadline_args(gibbs_timeout, gibbs_retries)
        gibbs_timeout = _within_caller(gibbs_timeout)
        gibbs_priority = _priority_within_caller(gibbs_priority)
        bridge, model, payload = self._prepare(gibbs_model, args, kwargs, request_id=gibbs_request_id)
        span = _tracing.begin(model, payload) if _OTEL in _modules else None  # gibbs.tracing
        fut = _SubmitFuture()
        try:
            call = bridge.submit(
                payload, fut, model, timeout=gibbs_timeout, retries=gibbs_retries, hedge=gibbs_hedge,
                priority=gibbs_priority,
            )
        except BaseException:
            payload.release()
            if span is not None:
                span.end()
            raise
        fut._gibbs_bridge = bridge
        fut._gibbs_call = call
        if span is not None:
            rid = bridge.request_id(call)
            fut.add_done_callback(lambda f: _tracing.end_future(span, rid, call, f))
        return fut

    async def stream(
        self,
        *args: Any,
        gibbs_timeout: Optional[float] = None,
        gibbs_model: Optional[str] = None,
        gibbs_priority: Optional[int] = None,
        gibbs_request_id: Optional[str] = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """Stream ``model(*args, **kwargs)``: yields each item as the worker's
        generator yields it (time to the first item is a request's latency,
        not the generator's whole run). At most ``STREAM_WINDOW`` items are in
        flight: a slow consumer makes the worker wait. Leaving the loop early
        (``break``, cancellation, a client that disconnects) closes the
        generator on the worker (its ``finally`` runs).

        A worker that dies before the first item reached you: the stream is
        sent to another worker; after: you get the items you had, then
        :class:`~gibbs.WorkerDiedError`. A model exception mid-stream arrives
        as :class:`~gibbs.UserCodeException` after the items before it. A
        model that returns a plain value streams it as one item.

        ``gibbs_timeout``: the whole stream's deadline; when it passes, the
        generator is closed on the worker and the items already had are
        followed by :class:`~gibbs.DeadlineExceededError`. ``gibbs_priority``
        and ``gibbs_request_id`` as for :meth:`request`.
        """
        _check_deadline_args(gibbs_timeout, 0)
        gibbs_timeout = _within_caller(gibbs_timeout)
        gibbs_priority = _priority_within_caller(gibbs_priority)
        loop = asyncio.get_running_loop()
        bridge, model, payload = self._prepare(gibbs_model, args, kwargs, stream=True, request_id=gibbs_request_id)
        sink = _AsyncStream(loop)
        bridge.home(loop)
        try:
            call = bridge.submit(payload, sink, model, stream=True, timeout=gibbs_timeout, priority=gibbs_priority)
        except BaseException:
            payload.release()
            raise
        finished = False
        unacked = 0
        try:
            while True:
                kind, value = await sink.get()
                if kind is OutcomeKind.CHUNK:
                    unacked += 1
                    if unacked >= _CREDIT_EVERY:
                        bridge.consumed(call, unacked)
                        unacked = 0
                    yield _unwrap_chunk(value)
                    continue
                finished = True
                if kind is OutcomeKind.RESULT or kind is OutcomeKind.COPIED:
                    return
                _unwrap(Outcome(kind, value))  # raises
                return
        finally:
            if not finished:
                bridge.cancel(call)

    def submit_stream(
        self,
        *args: Any,
        gibbs_timeout: Optional[float] = None,
        gibbs_model: Optional[str] = None,
        gibbs_priority: Optional[int] = None,
        gibbs_request_id: Optional[str] = None,
        **kwargs: Any,
    ) -> "StreamIterator":
        """``stream`` for plain threads: an iterator over the items (blocking
        ``next``). Call ``close()`` (or leave a ``with`` block) to stop early:
        the generator is closed on the worker."""
        _check_deadline_args(gibbs_timeout, 0)
        gibbs_timeout = _within_caller(gibbs_timeout)
        gibbs_priority = _priority_within_caller(gibbs_priority)
        bridge, model, payload = self._prepare(gibbs_model, args, kwargs, stream=True, request_id=gibbs_request_id)
        it = StreamIterator(bridge)
        try:
            it._call = bridge.submit(payload, it, model, stream=True, timeout=gibbs_timeout, priority=gibbs_priority)
        except BaseException:
            payload.release()
            raise
        return it

    def set_default_timeout(self, seconds: Optional[float], model: str = DEFAULT_MODEL) -> None:
        """The deadline (``gibbs_timeout``) of the model's calls that give
        none, from now on (None: no limit). ``serve(gibbs_timeout=...)`` sets it too."""
        _check_deadline_args(seconds, 0)
        self._default_timeouts[model] = seconds
        bridge = self._bridge
        if bridge is not None and self._pid == os.getpid():
            bridge.set_default_timeout(model, seconds)

    def set_default_priority(self, priority: int, model: str = DEFAULT_MODEL) -> None:
        """The class (``gibbs_priority``, 0 to 9, higher first) of the
        model's calls that give none, from now on (0 at first).
        ``serve(gibbs_priority=...)`` sets it too. Decided by the hub whose
        workers run the call: from a client hub, set it on the router (a
        default set on a client hub is sent with its calls as their class,
        which the router then applies as if the caller gave it)."""
        check_priority(priority)
        self._default_priorities[model] = priority
        bridge = self._bridge
        if bridge is not None and self._pid == os.getpid():
            bridge.set_default_priority(model, priority)

    # ------------------------------------------------------------ workers

    def _workers_ready(self, bridge: Bridge, n: int, model: Optional[str]) -> bool:
        """True once ``n`` workers are there; raises when they cannot come."""
        if bridge.worker_count(model) >= n:
            return True
        why = bridge.unavailable(model)
        if why is not None:
            err = NoWorkersError(str(why))
            err.__cause__ = why.__cause__
            raise err
        if bridge.closed or bridge.closing or self._closed:
            raise HubClosedError("the hub was closed while waiting for workers")
        return False

    async def wait_for_workers(
        self, n: int = 1, timeout: Optional[float] = None, *, model: Optional[str] = None
    ) -> None:
        """Wait until ``n`` workers (of ``model``, or of any model) are connected.

        Raises :class:`~gibbs.NoWorkersError` as soon as no worker can come
        (every worker started by this process for the model failed to build
        it: the constructor's traceback is in the message), or after
        ``timeout`` seconds, saying what the hub saw (workers that failed,
        handshakes refused); HubClosedError if the hub closes meanwhile.
        """
        bridge = self._ensure_started()
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop is closed: nobody waits
                pass

        token = bridge.add_waiter(wake)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while not self._workers_ready(bridge, n, model):
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise NoWorkersError(self._why_no_workers(n, timeout, model))
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        finally:
            bridge.remove_waiter(token)

    def wait_for_workers_sync(
        self, n: int = 1, timeout: Optional[float] = None, *, model: Optional[str] = None
    ) -> None:
        """``wait_for_workers`` for code without an event loop (blocks)."""
        bridge = self._ensure_started()
        if bridge.has_home():  # blocking the loop that reads our sockets: the bridge thread reads them
            try:
                bridge.leave_home(asyncio.get_running_loop())
            except RuntimeError:
                pass
        changed = threading.Event()
        token = bridge.add_waiter(changed.set)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._workers_ready(bridge, n, model):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise NoWorkersError(self._why_no_workers(n, timeout, model))
                changed.clear()
                if self._workers_ready(bridge, n, model):
                    return
                changed.wait(remaining)
        finally:
            bridge.remove_waiter(token)

    def _why_no_workers(self, n: int, timeout: Optional[float], model: Optional[str]) -> str:
        bridge = self._bridge
        have = bridge.worker_count(model) if bridge else 0
        of = f" of model {model!r}" if model is not None else ""
        lines = [f"{have} of {n} workers{of} connected to {self._host}:{self.port} within {timeout} s"]
        return "\n".join(lines + self._diagnosis(model))

    def _explain_absence(self, model: str) -> str:
        """What the hub saw, for a request of ``model`` waiting with no worker
        of it connected (the bridge's warnings and errors carry it)."""
        bridge = self._bridge
        lines = [f"no worker of model {model!r} is connected to {self._host}:{self.port}"]
        if bridge is not None:
            others = sorted(m for m in bridge.models() if m != model and bridge.worker_count(m))
            if others:
                lines.append(
                    f"workers of other models are connected: {', '.join(map(repr, others))} "
                    "(a worker started with another --model / gibbs_model?)"
                )
        return "\n".join(lines + self._diagnosis(model))

    def _diagnosis(self, model: Optional[str]) -> list[str]:
        bridge = self._bridge
        lines: list[str] = []
        seen = bridge.failures() if bridge else []
        locals_ = _local_workers_of(self.port, self._created_at)
        alive = [w for w in locals_ if w.exitcode() is None]  # peeks, never reaps
        exited = [f"local worker pid {w.pid} exited: {describe_exit(c)}" for w in locals_ if (c := w.exitcode())]
        if seen or exited:
            lines.append("what the hub saw:")
            lines.extend("  " + r.rstrip().replace("\n", "\n  ") for r in seen + exited)
        loading = [w for w in (bridge.loading() if bridge else []) if model is None or w["model"] == model]
        if loading:
            longest = max(w["seconds"] for w in loading)
            lines.append(f"{len(loading)} worker(s) loading their model, the longest for {longest:.0f} s")
        elif alive:
            lines.append(
                f"{len(alive)} worker process(es) started here are still running but not connected "
                "(still building the model?)"
            )
        elsewhere = sorted(
            {f"{w.host}:{w.port}" for w in local_workers() if w.pid is not None and w.peek_exitcode() is None}
            - {f"{w.host}:{w.port}" for w in local_workers() if w.port == self.port and is_loopback(w.host)}
        )
        if elsewhere:
            lines.append(
                f"worker processes started here point at {', '.join(elsewhere)}, not at this hub "
                f"({self._host}:{self.port}): check gibbs_host/gibbs_port"
            )
        if not seen and not exited and not alive and not elsewhere and not loading:
            lines.append(
                "no worker reported a failure: are workers started, pointed at this address "
                "(gibbs_host/gibbs_port), and sharing this hub's key?"
            )
        return lines

    # ------------------------------------------------------------ a pool of local workers

    def serve(
        self,
        cls: Callable[..., Any],
        *args: Any,
        gibbs_workers: Union[None, int, tuple[int, int]] = None,
        gibbs_model: str = DEFAULT_MODEL,
        gibbs_devices: Union[None, str, Sequence[DeviceSpec]] = None,
        gibbs_workers_per_device: int = 1,
        gibbs_start_method: Optional[str] = None,
        gibbs_batch_size: int = 1,
        gibbs_batch_wait: float = 0.0,
        gibbs_concurrency: int = 1,
        gibbs_name: Optional[str] = None,
        gibbs_copy_args: bool = False,
        gibbs_launcher: Optional[Launcher] = None,
        gibbs_scale_down_after: float = 30.0,
        gibbs_max_requests: Optional[int] = None,
        gibbs_max_requests_jitter: Optional[int] = None,
        gibbs_max_memory: Optional[int] = None,
        gibbs_warmup: Optional[Sequence[Any]] = None,
        gibbs_threads: Union[int, str, None] = None,
        gibbs_pin_cpus: bool = False,
        gibbs_timeout: Optional[float] = None,
        gibbs_hedge: bool = False,
        gibbs_priority: Optional[int] = None,
        **kwargs: Any,
    ) -> Pool:
        """Start ``gibbs_workers`` local workers of ``cls(*args, **kwargs)``
        for model ``gibbs_model`` and keep them running (see :class:`Pool`):
        a worker that dies is replaced; a model whose constructor fails is
        not restarted in a loop, and its requests then fail at once with
        :class:`~gibbs.NoWorkersError` carrying the traceback.
        ``pool.scale(n)``, ``pool.close()``; the pool stops with the hub.

        ``gibbs_devices``: ``["cuda:0", "cuda:1"]``, ints, or ``"auto"``
        (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``): the workers are
        spread over them, each seeing only its own GPU;
        ``gibbs_workers_per_device`` sets the default count. Workers with a
        device start with ``spawn`` unless told otherwise (CUDA needs it).

        ``gibbs_workers=(min, max)``: autoscaling (see :mod:`gibbs.scaling`):
        the pool grows while calls wait (the oldest for 0.1 s) up to ``max``
        and shrinks after ``gibbs_scale_down_after`` seconds in which it
        never needed every worker, never below ``min`` (0: the first call
        starts a worker). ``gibbs_max_requests=N``: a worker that served
        about N calls (plus up to ``gibbs_max_requests_jitter``, default
        N/10, at random) is replaced, the new one joined before the old
        one drains; ``gibbs_max_memory`` (bytes): the same for a local
        worker whose resident memory passes it. ``gibbs_warmup``: sample
        inputs each worker runs (after the model's ``warmup()`` method, if
        any) before it joins. ``pool.update(...)`` rolls the workers onto a
        new version.

        ``gibbs_launcher``: where the workers run; default
        :class:`~gibbs.pool.LocalLauncher` (processes on this machine);
        ``gibbs.ray.Launcher(...)`` makes each worker a Ray actor placed by
        a Ray cluster (the pool still supervises them).

        ``gibbs_threads``, ``gibbs_pin_cpus``: CPU threads per worker, as for
        :class:`~gibbs.Worker` (default: the pool's workers split the cores).
        ``gibbs_timeout``: the model's default deadline (see
        :meth:`set_default_timeout`); ``gibbs_priority``: its calls' default
        class (see :meth:`set_default_priority`).
        """
        if gibbs_priority is not None:
            self.set_default_priority(gibbs_priority, gibbs_model)
        if gibbs_timeout is not None:
            self.set_default_timeout(gibbs_timeout, gibbs_model)
        if gibbs_hedge:
            self._ensure_started().set_hedging(gibbs_model, True)
        launcher: Launcher = gibbs_launcher if gibbs_launcher is not None else LocalLauncher()
        devices = resolve_devices(gibbs_devices)
        gibbs_workers, autoscale = _pool_size(gibbs_workers, devices, gibbs_workers_per_device, gibbs_scale_down_after)
        start_method = gibbs_start_method or ("spawn" if devices else None)
        bridge = self._ensure_started()
        host = "127.0.0.1" if is_loopback(self._host) or self._host in ("0.0.0.0", "::") else self._host
        port = self.port
        key = self._authkey if self._explicit else None

        def builder(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Worker]:
            def build(device: Optional[str], **overrides: Any) -> Worker:
                options: dict[str, Any] = dict(
                    gibbs_host=host, gibbs_port=port, gibbs_heartbeat_interval=self._options.heartbeat_interval,
                    gibbs_authkey=key, gibbs_start_method=start_method, gibbs_name=gibbs_name,
                    gibbs_model=gibbs_model, gibbs_batch_size=gibbs_batch_size, gibbs_batch_wait=gibbs_batch_wait,
                    gibbs_concurrency=gibbs_concurrency, gibbs_device=device, gibbs_copy_args=gibbs_copy_args,
                    gibbs_warmup=gibbs_warmup, gibbs_threads=gibbs_threads, gibbs_pin_cpus=gibbs_pin_cpus,
                )
                options.update(overrides)
                return Worker(cls, *args, **options, **kwargs)

            return build

        make = WorkerFactory(
            builder(cls, args, kwargs), bind_host=self._host, port=port, authkey=self._authkey, devices=devices,
            rebuild=builder, model=(cls, args, kwargs), version="1",
        )
        make(None)  # check the options here, at the call site, before any process starts
        launcher.prepare(make)
        # In a client hub (another web process of the family holds the
        # address), the family's workers are the router's: this pool waits,
        # and starts its workers only if this hub takes the address over.
        pool = Pool(
            self, make, gibbs_workers, gibbs_model, devices,
            joined=bridge.has_joined, on_give_up=lambda why: bridge.give_up_model(gibbs_model, why),
            launcher=launcher, standby=bridge.role == "client" and self._router is None,
            observe=lambda: bridge.observe(gibbs_model), on_rollout=lambda c: bridge.roll_out(gibbs_model, c),
            failure_of=bridge.init_failure_of, autoscale=autoscale, scale_down_after=gibbs_scale_down_after,
            max_requests=gibbs_max_requests, max_requests_jitter=gibbs_max_requests_jitter,
            max_memory=gibbs_max_memory,
        )
        with self._state_lock:
            closed = self._closed
            if not closed:
                self._pools.append(pool)
                if pool.standby:
                    self._place.standby.append(pool)
                    if bridge.role == "router":  # took the address over meanwhile
                        pool.activate()
        if closed:
            pool.close(0)
            raise HubClosedError("the hub is closed")
        return pool

    def pools(self) -> list[Pool]:
        """The pools ``serve`` started (and not yet closed)."""
        return list(self._pools)

    # ------------------------------------------------------------ health and metrics

    def health(self) -> dict[str, Any]:
        """A small summary for a ``/healthz`` or ``/readyz`` endpoint:
        ``status`` ("ok": every model known here has a worker ready or busy;
        "degraded": some have none; "down": no worker at all, or closed),
        ``ready`` (the models that can serve now), and per model its workers
        by state, queue length and the oldest queued request's age."""
        s = self.statistics()
        models = {
            name: {
                "workers": dict(m.get("states", {})),
                "queued": m.get("queued", 0),
                "oldest_queued_seconds": m.get("oldest_queued_seconds", 0.0),
            }
            for name, m in s["models"].items()
        }
        ready = sorted(name for name, m in s["models"].items() if m.get("workers", 0) > 0)
        if s.get("closing") or self._closed or not ready:
            status = "down"
        elif len(ready) < len(models):
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "role": s.get("role"),
            "ready": ready,
            "workers": s.get("workers", 0),
            "loading": s.get("loading", 0),
            "queued": s.get("queued", 0),
            "oldest_queued_seconds": s.get("oldest_queued_seconds", 0.0),
            "models": models,
        }

    def prometheus(self) -> str:
        """``statistics()`` as Prometheus text exposition (version 0.0.4;
        serve it with ``Hub.PROMETHEUS_CONTENT_TYPE``)."""
        return prometheus_text(self.statistics())

    PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE
    """The ``Content-Type`` to serve ``prometheus()`` with (text format 0.0.4)."""

    def statistics(self) -> dict[str, Any]:
        """Counters and current state: workers, busy, idle, queued, in_flight,
        completed, failed, retried, resent, cancelled, worker_deaths,
        handshake_failures, and ``models``: the same per model."""
        bridge = self._bridge
        if bridge is None:
            return {
                "workers": 0, "busy": 0, "idle": 0, "queued": 0, "in_flight": 0,
                "closing": self._closed, "models": {}, "restarts": 0,
            }
        stats = bridge.statistics()
        restarts = 0
        for pool in self._pools:
            restarts += pool.restarts
            m = stats["models"].get(pool.model)
            if m is not None:
                m["restarts"] = m.get("restarts", 0) + pool.restarts
        stats["restarts"] = restarts
        stats["shared_memory"] = bridge.shared_memory()
        return stats

    def models(self) -> dict[str, dict[str, Any]]:
        """Per model name: its class, workers, busy, queued, in_flight,
        batch_size, and batch_sizes (how many batches of each size were sent)."""
        bridge = self._bridge
        return bridge.models() if bridge is not None else {}

    def workers(self) -> list[dict[str, Any]]:
        """One dict per connected worker: pid, host, name, model, class,
        address, in_flight, served, batch_size."""
        bridge = self._bridge
        return bridge.workers() if bridge is not None else []

    def __repr__(self) -> str:
        where = f"{self._host}:{self.port}"
        if self._closed:
            return f"<Hub {where} [closed]>"
        if self._bridge is None:
            return f"<Hub {where} [not started]>"
        s = self._bridge.statistics()
        text = (
            f"<Hub {where} [{s['workers']} workers: {s['busy']} busy, {s['idle']} idle"
            f" | {s['queued']} queued]"
        )
        models = s["models"]
        if len(models) > 1 or (models and DEFAULT_MODEL not in models):
            text += " " + ", ".join(
                f"{name}: {m['workers']} workers, {m['queued']} queued" for name, m in sorted(models.items())
            )
        return text + ">"


def _check_deadline_args(timeout: Optional[float], retries: int) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError("gibbs_timeout must be > 0 or None")
    if retries < -1:
        raise ValueError("gibbs_retries must be >= -1")


def _pool_size(
    workers: Any, devices: Sequence[Any], per_device: Any, down_after: float
) -> tuple[int, Optional[tuple[int, int]]]:
    """``serve``'s ``gibbs_workers``: how many workers to start, and the
    autoscaling bounds (min, max) when it gave them. Checked here, at the
    call site."""
    if not isinstance(per_device, int) or per_device < 1:
        raise ValueError("gibbs_workers_per_device must be an int >= 1")
    if workers is None:
        workers = len(devices) * per_device if devices else 1
    autoscale: Optional[tuple[int, int]] = None
    if isinstance(workers, tuple):
        if len(workers) != 2:
            raise ValueError(f"gibbs_workers=(min, max) takes two ints, got {workers!r}")
        autoscale = (workers[0], workers[1])
        Autoscaler(*autoscale, down_after=down_after)  # checks them here
        workers = autoscale[0]
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"gibbs_workers must be an int >= 0 or (min, max), got {workers!r}")
    return workers, autoscale


def _where_to(
    host: str, port: int, address: Optional[str], authkey: KeyLike
) -> tuple[str, int, Optional[tuple[str, int]], bytes, bool]:
    """Where a new hub listens or which router it joins (``address``,
    ``GIBBS_HUB``, else the hub of the worker it is made in), and with which
    key: (host, port, router or None, key, whether the key was given).
    Refuses a key-less address beyond loopback."""
    key, explicit = resolve_authkey(authkey)
    if address is None:
        address = os.environ.get(HUB_ENV) or None
    inside = _context.serving
    if address is None and inside is not None:
        # Made inside a worker (a model that calls models): a client of
        # the hub this worker serves, with the worker's own key.
        address = f"[{inside.host}]:{inside.port}" if ":" in inside.host else f"{inside.host}:{inside.port}"
        if authkey is None:
            key, explicit = inside.authkey, inside.explicit
    router: Optional[tuple[str, int]] = None  # set: a client of the hub there, never a router
    if address is not None:
        try:
            router = parse_address(address, DEFAULT_PORT)
        except ValueError as exc:
            raise ValueError(f"bad hub address {address!r} ({HUB_ENV} or address=): {exc}") from None
        if not is_loopback(router[0]) and not explicit:
            raise ValueError(
                f"refusing to send calls to {address!r} without an explicit key: pass authkey=... or "
                "set GIBBS_AUTHKEY (the key of the hub there)"
            )
        host, port = router
    elif not is_loopback(host) and not explicit:
        raise ValueError(
            f"refusing to listen on {host!r} without an explicit key: any process that can "
            "reach this address could send work and read answers. Pass authkey=... or set "
            "GIBBS_AUTHKEY (the same key on every worker), or bind 127.0.0.1."
        )
    return host, port, router, key, explicit


def _within_caller(timeout: Optional[float]) -> Optional[float]:
    """A call made while a worker serves a call with a deadline (a model
    calling a model) inherits what is left of it: never more."""
    left = _context.remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise DeadlineExceededError(
            "the request this call is made for has passed its deadline: the call is not sent", in_queue=True
        )
    return left if timeout is None else min(timeout, left)


def _priority_within_caller(priority: Optional[int]) -> Optional[int]:
    """A call made while a worker serves a call (a model calling a model)
    takes that call's class when it gives none of its own."""
    if priority is not None:
        return check_priority(priority)
    return _context.current_priority()


def _local_workers_of(port: int, since: float) -> list[LocalWorker]:
    """Worker processes started by this process for the hub on ``port``,
    since the hub was made (older ones served an earlier hub on that port)."""
    return [
        LocalWorker(w.pid, w.model, _exitcode_of(w), w.sentinel)
        for w in local_workers()
        if w.pid is not None and w.port == port and is_loopback(w.host) and (w.started_at or 0.0) >= since
    ]


def _exitcode_of(worker: Worker) -> Callable[[], Optional[int]]:
    return worker.peek_exitcode  # never reaps: the thread that joins the worker does


def _finalize_unclosed(
    bridge: Bridge, probe_path: Optional[str], pool: Optional[protocol.SegmentPool], where: str
) -> None:
    """A started hub collected without close(): release what it holds."""
    warnings.warn(f"gibbs Hub {where} was never closed; closing it now", ResourceWarning, stacklevel=2)
    bridge.begin_close(0.0, lambda: None)
    bridge.join()
    if pool is not None:
        pool.close()
    if probe_path is not None:
        try:
            os.unlink(probe_path)
        except OSError:
            pass


def _remove_stale_segments() -> None:
    """Remove /dev/shm files left by gibbs processes that no longer exist."""
    try:
        names = os.listdir(protocol.SHM_DIR)
    except OSError:
        return
    for name in names:
        if not name.startswith(protocol.SHM_PREFIX):
            continue
        rest = name[len(protocol.SHM_PREFIX) :]
        for tag in ("probe", "h", "w"):
            if rest.startswith(tag):
                digits = rest[len(tag) :].split("-", 1)[0]
                if digits.isdigit():
                    try:
                        os.kill(int(digits), 0)
                    except ProcessLookupError:
                        try:
                            os.unlink(os.path.join(protocol.SHM_DIR, name))
                        except OSError:
                            pass
                    except PermissionError:
                        pass
                break


def _after_fork_in_child() -> None:
    for hub in list(_live_hubs):
        try:
            hub._after_fork_in_child()
        except Exception:  # noqa: BLE001 - every hub must let go of the parent's bridge, this one too
            hub._bridge = None


def _close_all_at_exit() -> None:
    for hub in list(_live_hubs):
        if hub._pid == os.getpid():
            try:
                hub.close(grace=0)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
