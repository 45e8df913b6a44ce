"""Command line: ``python -m gibbs demo``, ``worker``, ``hub`` and ``status``.

``python -m gibbs worker package.module:ClassName --hub HOST:PORT [-n N] [ARG ...]``
starts N worker processes serving ``ClassName(*ARGS, **KWARGS)`` to the hub,
and keeps them running: each reconnects on its own with backoff, and one that
exits unexpectedly is started again. On SIGTERM or SIGINT every worker
finishes the request in hand, then the command exits 0.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
import os
import signal
import socket
import ssl
import sys
import time
from types import FrameType
from typing import Any, Optional, Sequence

from . import _threads
from .transport import ANY_APP, AUTHKEY_ENV, PORT_ENV, default_port, is_loopback, parse_address

logger = logging.getLogger("gibbs")


class CliError(Exception):
    """A one-line error for the user; exit status 2."""


def _size(text: str) -> int:
    """``4G``, ``512M``, ``1048576``: bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 4G, 512M)") from None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_model_args(items: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """``1 0.5 name=foo size=3`` -> ([1, 0.5], {"name": "foo", "size": 3}).
    Values are Python literals where they parse as one, else strings."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key.isidentifier():
            kwargs[key] = _literal(value)
        else:
            if kwargs:
                raise CliError(f"positional argument {item!r} after keyword arguments")
            args.append(_literal(item))
    return args, kwargs


def load_target(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"bad target {target!r}: expected package.module:ClassName")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the module's own import-time error
        raise CliError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CliError(f"{target} is not a class or callable")
    return obj


def read_authkey(path: Optional[str], loopback: bool = False) -> Optional[bytes]:
    """The key from --authkey-file or $GIBBS_AUTHKEY. None (no key needed)
    for a hub on this machine's loopback: the hub lets in processes of the
    same user by their user id."""
    if path is not None:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise CliError(f"cannot read the key file {path!r}: {exc.strerror}") from exc
        if not key:
            raise CliError(f"the key file {path!r} is empty")
        return key
    env = os.environ.get(AUTHKEY_ENV)
    if env:
        return env.encode()
    if loopback:
        return None
    raise CliError(
        f"no key: set {AUTHKEY_ENV} or pass --authkey-file (the hub's key: needed for a hub "
        "that is not on this machine's loopback)"
    )


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    from .tls import CA_ENV, CERT_ENV, KEY_ENV

    for option, env, what in (
        ("--tls-cert", CERT_ENV, "this process's certificate (PEM): TCP to or from the hub carries TLS"),
        ("--tls-key", KEY_ENV, "the certificate's private key (PEM), if not in the certificate's file"),
        ("--tls-ca", CA_ENV, "the authority (PEM) that signed the peers' certificates: the hub asks clients for one"),
    ):
        parser.add_argument(option, metavar="PATH", help=f"{what} (default: ${env})")


def _apply_tls_options(ns: argparse.Namespace) -> None:
    """--tls-* set GIBBS_TLS_*: the hub, its workers (started by any method)
    and the observer read them there."""
    from .tls import CA_ENV, CERT_ENV, KEY_ENV, files_from_env

    for attr, env in (("tls_cert", CERT_ENV), ("tls_key", KEY_ENV), ("tls_ca", CA_ENV)):
        path = getattr(ns, attr, None)
        if path is not None:
            os.environ[env] = path
    try:
        files = files_from_env()
        if files is not None:
            if ns.command == "hub":
                files.server_context()
            files.client_context()
    except (OSError, ValueError) as exc:
        raise CliError(f"bad TLS files: {exc}") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gibbs",
        description="gibbs: scale a Python model across worker processes and machines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    try:
        port = default_port()  # GIBBS_PORT, else 5019
    except ValueError as exc:
        raise CliError(str(exc)) from None

    _add_demo(sub)
    _add_worker(sub, port)
    _add_hub(sub, port)
    _add_status(sub, port)
    return parser


def _add_demo(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    demo = sub.add_parser(
        "demo",
        help="run the walkthrough's scenario (4 workers, 10 concurrent requests, 0.25 s model)",
        description="Start a hub and workers, send concurrent requests to a sleeping model, "
        "and print the time with gibbs beside one in-process model and the ideal.",
    )
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    demo.add_argument("--requests", type=int, default=10, help="concurrent requests (default 10)")
    demo.add_argument("--wait-time", type=float, default=0.25, help="seconds per model call (default 0.25)")


def _add_worker(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", port: int) -> None:
    worker = sub.add_parser(
        "worker",
        help="serve a model to a hub, on this or another machine",
        description="Start N worker processes serving TARGET to the hub at --hub. Each "
        "reconnects forever with backoff; SIGTERM or SIGINT lets every worker finish the "
        "request in hand, then the command exits 0. The key comes from $GIBBS_AUTHKEY or "
        "--authkey-file and must be the hub's.",
        epilog="Constructor arguments are Python literals where they parse as one, else strings: "
        "'python -m gibbs worker app:Model --hub 10.0.0.1:5019 0.25 device=cpu'",
    )
    worker.add_argument("target", metavar="TARGET", help="the model class, as package.module:ClassName")
    worker.add_argument(
        "model_args",
        metavar="ARG",
        nargs="*",
        help="constructor arguments: VALUE (positional) or NAME=VALUE (keyword)",
    )
    worker.add_argument(
        "--hub",
        default=f"127.0.0.1:{port}",
        metavar="HOST:PORT",
        help=f"the hub's address (default 127.0.0.1:{port}; {PORT_ENV} sets the port)",
    )
    worker.add_argument("-n", "--workers", type=int, default=None, help="worker processes to run (default 1, or one per device)")
    worker.add_argument("--authkey-file", metavar="PATH", help=f"file holding the key (default: ${AUTHKEY_ENV})")
    _add_tls_options(worker)
    worker.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between heartbeats to the hub (default 1.0)",
    )
    worker.add_argument(
        "--reset-after-n-miss",
        type=int,
        default=2,
        metavar="N",
        help="reconnect after the hub has been silent for N of its heartbeat intervals (default 2)",
    )
    worker.add_argument(
        "--start-method",
        choices=["fork", "spawn", "forkserver"],
        default=None,
        help="multiprocessing start method for the worker processes (default: Python's)",
    )
    worker.add_argument("--name", default=None, help="a name for these workers in the hub's logs")
    worker.add_argument(
        "--model",
        default="default",
        metavar="NAME",
        help="the model name these workers serve (requests pick it with gibbs_model=NAME; default 'default')",
    )
    worker.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="call the model with lists of up to N requests' arguments (default 1: no batching)",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="calls at once per worker for an async model (default 1)",
    )
    _add_worker_lifecycle(worker)
    worker.add_argument(
        "--copy-args",
        action="store_true",
        help="give the model private, writable copies of large request arrays "
        "(default: read-only views on shared memory, valid during the call)",
    )
    worker.add_argument(
        "--batch-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="longest wait to fill a batch (default 0: a lone request goes at once)",
    )
    _add_worker_placement(worker)
    worker.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")


def _add_worker_lifecycle(worker: argparse.ArgumentParser) -> None:
    """Autoscaling and recycling: how many workers, and for how long each."""
    worker.add_argument("--min", type=int, default=None, metavar="N",
                        help="autoscale: never fewer than N workers (with --max; 0: none until a call comes)")
    worker.add_argument("--max", type=int, default=None, metavar="N",
                        help="autoscale: more workers while calls wait, up to N (with --min)")
    worker.add_argument("--scale-down-after", type=float, default=30.0, metavar="SECONDS",
                        help="autoscale: one worker fewer after SECONDS in which not all were needed (default 30)")
    worker.add_argument("--max-requests", type=int, default=None, metavar="N",
                        help="replace a worker after about N calls (its successor joins before it drains)")
    worker.add_argument("--max-requests-jitter", type=int, default=None, metavar="N",
                        help="add 0..N calls at random to --max-requests per worker (default N/10)")
    worker.add_argument("--max-memory", type=_size, default=None, metavar="BYTES",
                        help="replace a worker whose resident memory passes BYTES (suffixes K, M, G: 4G)")


def _add_worker_placement(worker: argparse.ArgumentParser) -> None:
    """Where the workers run: GPUs, CPU threads, cores."""
    worker.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="spread the workers over these GPUs ('0,1', 'cuda:0,cuda:1', or 'auto': CUDA_VISIBLE_DEVICES, else "
        "nvidia-smi); each worker sees only its own. Without -n: --workers-per-device per device",
    )
    worker.add_argument("--workers-per-device", type=int, default=1, metavar="N",
                        help="workers per device when -n is not given (default 1)")
    worker.add_argument("--threads", default=None, metavar="N|auto|inherit",
                        help="CPU threads per worker (OMP_NUM_THREADS, torch's count, ...): 'auto' (default, or "
                        "$GIBBS_THREADS) splits this machine's cores among the workers, keeping a value you "
                        "exported; N sets N; 'inherit' leaves them alone")
    worker.add_argument("--pin-cpus", action="store_true", help="bind each worker to its own share of the cores")


def _add_hub(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", port: int) -> None:
    hub = sub.add_parser(
        "hub",
        help="run a standalone hub: workers and web processes (client hubs) connect to it",
        description="Listen on --bind for workers (python -m gibbs worker ... --hub HOST:PORT) and for "
        "the hubs of web processes, which reach it with Hub(address='HOST:PORT') or GIBBS_HUB=HOST:PORT "
        "and send their calls through it. The key comes from $GIBBS_AUTHKEY or --authkey-file; it is "
        "required unless the address is loopback. SIGTERM or SIGINT closes it: running calls get "
        "--grace seconds.",
    )
    hub.add_argument(
        "--bind",
        default=f"127.0.0.1:{port}",
        metavar="HOST:PORT",
        help=f"the address to listen on (default 127.0.0.1:{port}; 0.0.0.0:{port} for other machines)",
    )
    hub.add_argument("--authkey-file", metavar="PATH", help=f"file holding the key (default: ${AUTHKEY_ENV})")
    _add_tls_options(hub)
    hub.add_argument(
        "--heartbeat-interval", type=float, default=1.0, metavar="SECONDS", help="seconds between heartbeats (default 1.0)"
    )
    hub.add_argument(
        "--grace", type=float, default=30.0, metavar="SECONDS", help="on SIGTERM, how long running calls may finish (default 30)"
    )
    hub.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")


def _add_status(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", port: int) -> None:
    status = sub.add_parser(
        "status",
        help="a live view of a running hub: models, workers, queues, latency",
        description="Connect to the hub at --hub as an observer (it can read statistics, nothing else; "
        "the key as for a worker) and show its models, workers and queues, refreshed every --interval "
        "seconds until Ctrl-C; --once prints one snapshot and exits; --json prints the raw statistics.",
    )
    status.add_argument("--hub", default=f"127.0.0.1:{port}", metavar="HOST:PORT",
                        help=f"the hub's address (default 127.0.0.1:{port})")
    status.add_argument("--authkey-file", metavar="PATH", help=f"file holding the key (default: ${AUTHKEY_ENV})")
    _add_tls_options(status)
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--json", action="store_true", help="print the statistics as JSON (with --once: one line)")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1.0)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = _build_parser()
    except CliError as exc:
        print(f"gibbs: error: {exc}", file=sys.stderr)
        return 2
    # Constructor arguments may follow the options ("app:Model --hub H:P 0.25"):
    # argparse leaves positionals after an option unparsed, so collect them here.
    ns, extra = parser.parse_known_args(argv)
    if extra:
        if ns.command == "worker" and not any(e.startswith("-") and not _is_number(e) for e in extra):
            ns.model_args.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if ns.command == "demo":
            from ._demo import run_demo

            if ns.workers < 1 or ns.requests < 1 or ns.wait_time < 0:
                raise CliError("--workers and --requests must be >= 1, --wait-time >= 0")
            return run_demo(ns.workers, ns.requests, ns.wait_time)
        if ns.command in ("hub", "status", "worker"):
            _apply_tls_options(ns)
        if ns.command == "hub":
            return _hub_command(ns)
        if ns.command == "status":
            return _status_command(ns)
        return _worker_command(ns)
    except CliError as exc:
        print(f"gibbs: error: {exc}", file=sys.stderr)
        return 2


def _hub_command(ns: argparse.Namespace) -> int:
    from .errors import AddressInUseError
    from .hub import HUB_ENV, Hub

    level = logging.WARNING - 10 * min(ns.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if ns.heartbeat_interval <= 0:
        raise CliError("--heartbeat-interval must be > 0")
    if ns.grace < 0:
        raise CliError("--grace must be >= 0")
    try:
        host, port = parse_address(ns.bind)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if port == 0:
        raise CliError("--bind needs a port: workers and web processes must know where to find the hub")
    key = read_authkey(ns.authkey_file, loopback=is_loopback(host))
    os.environ.pop(HUB_ENV, None)  # this process is the hub: it routes through nobody
    stop = False

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        nonlocal stop
        stop = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            hub = Hub(port, ns.heartbeat_interval, host=host, authkey=key, app=ANY_APP)
            hub.start()
        except AddressInUseError:
            raise CliError(f"{host}:{port} is already held by another gibbs hub") from None
        except (OSError, ValueError) as exc:
            raise CliError(str(exc)) from None
        if hub.role != "router":
            hub.close(0)
            raise CliError(f"{host}:{port} is already held by another gibbs hub")
        print(f"gibbs hub: listening on {host}:{hub.port} (pid {os.getpid()})", file=sys.stderr, flush=True)
        try:
            while not stop:
                time.sleep(0.2)
        finally:
            print("gibbs hub: closing", file=sys.stderr, flush=True)
            hub.close(ns.grace)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0


def fetch_status(
    host: str, port: int, key: Optional[bytes], timeout: float = 5.0, ssl_context: Optional[ssl.SSLContext] = None
) -> Any:
    """Connect to a hub as an observer; return a function that fetches
    {"statistics": ..., "workers": [...]} each time it is called, and the socket."""
    import json

    from . import protocol
    from .transport import dial

    sock, _, reader, pending = dial(host, port, key or b"", key is not None, timeout, ssl_context, 1 << 30)
    try:
        def read_one(kind_wanted: int) -> bytes:
            while True:
                for kind, _, body in pending:
                    if kind == kind_wanted:
                        pending.remove((kind, _, body))
                        return body
                pending.clear()
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError("the hub closed the connection")
                pending.extend(reader.feed(data))

        hello = {"role": "observer", "pid": os.getpid(), "host": socket.gethostname(), "name": "status"}
        sock.sendall(protocol.pack_json(protocol.HELLO, hello))
    except BaseException:
        sock.close()
        raise

    def fetch() -> Any:
        sock.sendall(b"".join(bytes(b) for b in protocol.pack_frame(protocol.STATS, 0)))
        return json.loads(read_one(protocol.STATS))

    return fetch, sock


def render_status(where: str, snap: Any) -> str:
    """The text ``python -m gibbs status`` shows for one snapshot."""
    s = snap["statistics"]
    lines = [
        f"gibbs hub {where}  role {s.get('role', '?')}  clients {s.get('clients', 0)}  "
        f"workers {s.get('workers', 0)} ({s.get('busy', 0)} busy, {s.get('loading', 0)} loading)  "
        f"queued {s.get('queued', 0)}  oldest {s.get('oldest_queued_seconds', 0.0):.1f} s  "
        f"completed {s.get('completed', 0)}  failed {s.get('failed', 0)}  restarts {s.get('restarts', 0)}  "
        f"init failures {s.get('init_failures', 0)}",
        "",
        f"{'MODEL':16} {'CLASS':32} {'WORKERS':>7} {'BUSY':>5} {'QUEUED':>6} {'REQUESTS':>9} {'ERRORS':>6} "
        f"{'P50 MS':>8} {'P99 MS':>8} {'WAIT P99':>8}",
    ]

    def ms(x: Any) -> str:
        return "-" if x is None else f"{x * 1000:.1f}"

    for name, m in sorted(s.get("models", {}).items()):
        lat = m.get("latency") or {}
        wait = m.get("queue_wait") or {}
        lines.append(
            f"{name[:16]:16} {str(m.get('class', ''))[:32]:32} {m.get('workers', 0):>7} {m.get('busy', 0):>5} "
            f"{m.get('queued', 0):>6} {m.get('requests', 0):>9} {m.get('errors', 0) + m.get('failed', 0):>6} "
            f"{ms(lat.get('p50')):>8} {ms(lat.get('p99')):>8} {ms(wait.get('p99')):>8}"
        )
    lines += ["", f"{'PID':>8} {'HOST':16} {'MODEL':16} {'STATE':8} {'DEVICE':8} {'SERVED':>7} {'IN FLIGHT':>9}"]
    for w in snap.get("workers", []):
        state = w.get("state", "?")
        if state == "loading":
            state = f"loading {w.get('seconds', 0):.0f}s"
        lines.append(
            f"{w.get('pid', 0):>8} {str(w.get('host', ''))[:16]:16} {str(w.get('model', ''))[:16]:16} {state:8} "
            f"{str(w.get('device') or '-'):8} {w.get('served', 0):>7} {w.get('in_flight', 0):>9}"
        )
    return "\n".join(lines)


def _status_command(ns: argparse.Namespace) -> int:
    import json

    from .errors import AuthenticationError, ProtocolError

    try:
        host, port = parse_address(ns.hub)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if ns.interval <= 0:
        raise CliError("--interval must be > 0")
    key = read_authkey(ns.authkey_file, loopback=is_loopback(host))
    try:
        from .tls import files_from_env

        files = files_from_env()
        fetch, sock = fetch_status(host, port, key, ssl_context=files.client_context() if files is not None else None)
    except AuthenticationError as exc:
        raise CliError(f"the hub at {host}:{port} refused our key: {exc}") from None
    except (OSError, ProtocolError) as exc:
        raise CliError(f"no hub at {host}:{port}: {exc}") from None
    where = f"{host}:{port}"
    tty = sys.stdout.isatty() and not ns.once
    try:
        while True:
            snap = fetch()
            if ns.json:
                text = json.dumps(snap, indent=None if ns.once else 2)
            else:
                text = ("\x1b[H\x1b[2J" if tty else "") + render_status(where, snap)
            try:
                print(text, flush=True)
            except BrokenPipeError:
                # Our own reader went (``gibbs status --json | head``): not
                # the hub's doing. Quiet, as other commands are on a closed pipe.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                return 0
            if ns.once:
                return 0
            time.sleep(ns.interval)
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as exc:
        raise CliError(f"lost the hub at {where}: {exc}") from None
    finally:
        sock.close()


def _worker_command(ns: argparse.Namespace) -> int:
    from .worker import Worker

    level = logging.WARNING - 10 * min(ns.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .pool import resolve_devices

    try:
        devices = resolve_devices(ns.devices)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--devices: {exc}") from None
    if ns.devices is not None and not devices:
        raise CliError(f"--devices {ns.devices!r}: no device found")
    if ns.workers_per_device < 1:
        raise CliError("--workers-per-device must be at least 1")
    if ns.workers is None:
        ns.workers = len(devices) * ns.workers_per_device if devices else 1
    if ns.workers < 1:
        raise CliError("-n must be at least 1")
    if ns.heartbeat_interval <= 0:
        raise CliError("--heartbeat-interval must be > 0")
    if ns.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    if ns.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    if ns.batch_wait < 0:
        raise CliError("--batch-wait must be >= 0")
    try:
        ns.threads = _threads.parse_threads(ns.threads)
    except ValueError as exc:
        raise CliError(f"--threads: {exc}") from None
    if not ns.model:
        raise CliError("--model must not be empty")
    try:
        host, port = parse_address(ns.hub)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CliError(f"cannot resolve the hub's host {host!r}: {exc.strerror}") from None
    key = read_authkey(ns.authkey_file, loopback=is_loopback(host))
    cls = load_target(ns.target)
    args, kwargs = parse_model_args(ns.model_args)

    if (ns.min is None) != (ns.max is None):
        raise CliError("--min and --max go together (autoscaling between them)")
    if ns.max_requests is not None and ns.max_requests < 1:
        raise CliError("--max-requests must be at least 1")

    def builder(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def build(device: Optional[str], **overrides: Any) -> Worker:
            options: dict[str, Any] = dict(
                gibbs_host=host,
                gibbs_port=port,
                gibbs_heartbeat_interval=ns.heartbeat_interval,
                gibbs_reset_after_n_miss=ns.reset_after_n_miss,
                gibbs_authkey=key,
                gibbs_start_method=ns.start_method or ("spawn" if device else None),
                gibbs_name=ns.name,
                gibbs_model=ns.model,
                gibbs_batch_size=ns.batch_size,
                gibbs_batch_wait=ns.batch_wait,
                gibbs_concurrency=ns.concurrency,
                gibbs_device=device,
                gibbs_copy_args=ns.copy_args,
                gibbs_threads=ns.threads,
                gibbs_pin_cpus=ns.pin_cpus,
            )
            options.update(overrides)
            w = Worker(cls, *args, **options, **kwargs)
            w._thread_group = ns.max or ns.workers  # the workers of this command share the cores
            return w

        return build

    from .pool import WorkerFactory

    factory = WorkerFactory(
        builder(cls, tuple(args), kwargs), bind_host=host, port=port, authkey=key or b"",
        rebuild=builder, model=(cls, tuple(args), kwargs), version="1",
    )
    try:
        factory(None)  # the options are checked before any process starts
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    slot_devices = [devices[i % len(devices)] if devices else None for i in range(ns.workers)]
    return _supervise(factory, ns.workers, f"{host}:{port}", slot_devices, ns=ns, key=key)


def _supervise(
    factory: Any, n: int, where: str, devices: Optional[list[Optional[str]]] = None, *,
    ns: Optional[argparse.Namespace] = None, key: Optional[bytes] = None,
) -> int:
    """Keep n workers running until SIGTERM/SIGINT, then stop them
    gracefully. The supervisor is the one ``hub.serve`` uses (``Pool``): a
    model whose constructor raises is not restarted in a loop (at the first
    failure if no worker ever built it, else after a few in a row); the
    command then tells the hub (its requests fail with the traceback) and
    exits non-zero. SIGHUP rolls the workers one by one onto a freshly
    imported model module (as gunicorn does on HUP); recycling and
    autoscaling read the hub's view of the model as ``gibbs status`` does."""
    from .pool import Pool
    from .worker import REFUSED_EXIT, report_given_up

    stopping: list[str] = []  # set from a signal handler or the pool's thread: no lock
    reload: list[int] = []
    status = 0
    built: dict[str, Any] = {}  # token -> Worker: has its model been built?
    given_up: list[str] = []
    model = ns.model if ns is not None else "default"
    host, _, port = where.rpartition(":")
    watch = _HubView(host, int(port), key, model)

    factory.on_made = lambda w: built.__setitem__(w.token, w)  # its built() flag tells a broken model

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGHUP:
            reload.append(signum)
        else:
            stopping.append("signal")

    def on_give_up(why: str) -> None:
        given_up.append(why)
        stopping.append("given up")

    slot_devices = [d for d in (devices or []) if d is not None]
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {sig: signal.signal(sig, on_signal) for sig in sigs}
    print(f"gibbs worker: starting {n} worker(s) for the hub at {where} (pid {os.getpid()})", file=sys.stderr, flush=True)
    autoscale = (ns.min, ns.max) if ns is not None and ns.min is not None else None
    try:
        pool = Pool(
            where, factory, n, model, slot_devices,
            joined=lambda token: token in built and built[token].built(), on_give_up=on_give_up,
            observe=watch.observe, autoscale=autoscale,
            scale_down_after=ns.scale_down_after if ns is not None else 30.0,
            max_requests=ns.max_requests if ns is not None else None,
            max_requests_jitter=ns.max_requests_jitter if ns is not None else None,
            max_memory=ns.max_memory if ns is not None else None,
        )
    except ValueError as exc:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        raise CliError(str(exc)) from None
    try:
        while not stopping:
            time.sleep(0.1)
            if any(w.exitcode == REFUSED_EXIT for w in built.values()):
                # The hub will refuse every restart alike (its message is above).
                print("gibbs worker: the hub refused the worker; stopping", file=sys.stderr, flush=True)
                status = 1
                break
            if reload:
                reload.clear()
                _reload_and_update(pool, ns)
    finally:
        pool.close(grace=60.0)
        watch.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if given_up:
        print(f"gibbs worker: {given_up[0]}; not restarting it (the traceback is above)", file=sys.stderr, flush=True)
        spec = next(iter(built.values()), None)
        if spec is not None:
            report_given_up(spec, given_up[0])
        status = 1
    return status


def _reload_and_update(pool: Any, ns: Optional[argparse.Namespace]) -> None:
    """SIGHUP: import the model's module afresh and roll the workers onto it."""
    from .pool import UpdateError

    if ns is None:
        return
    module_name = ns.target.partition(":")[0]
    print(f"gibbs worker: SIGHUP: reloading {module_name} and rolling the workers onto it", file=sys.stderr, flush=True)
    try:
        importlib.invalidate_caches()
        if module_name in sys.modules:
            importlib.reload(sys.modules[module_name])
        cls = load_target(ns.target)
        pool.update(cls)
    except UpdateError as exc:
        print(f"gibbs worker: {exc}; the previous version serves on", file=sys.stderr, flush=True)
        return
    except Exception as exc:  # noqa: BLE001 - a broken module must not stop the workers that serve
        print(f"gibbs worker: reload failed ({type(exc).__name__}: {exc}); the previous version serves on",
              file=sys.stderr, flush=True)
        return
    print(f"gibbs worker: now serving version {pool.version}", file=sys.stderr, flush=True)


class _HubView:
    """What the hub sees of our model, read as ``gibbs status`` does (an
    observer connection), for recycling and autoscaling; at most twice a
    second, and None while the hub cannot be reached."""

    def __init__(self, host: str, port: int, key: Optional[bytes], model: str) -> None:
        self._where = (host, port, key)
        self._model = model
        self._fetch: Any = None
        self._sock: Any = None
        self._last: Optional[dict[str, Any]] = None
        self._at = 0.0
        self._retry_at = 0.0

    def observe(self) -> Optional[dict[str, Any]]:
        now = time.monotonic()
        if now - self._at < 0.5:
            return self._last
        self._at = now
        try:
            if self._fetch is None:
                if now < self._retry_at:
                    return None
                self._fetch, self._sock = fetch_status(*self._where, timeout=2.0)
            snap = self._fetch()
        except Exception:  # noqa: BLE001 - the hub is away: no view, the pool keeps its size
            self.close()
            self._retry_at = now + 2.0
            self._last = None
            return None
        m = snap.get("statistics", {}).get("models", {}).get(self._model, {})
        self._last = {
            "queued": int(m.get("queued", 0)),
            "oldest": float(m.get("oldest_queued_seconds", 0.0)),
            "busy": int(m.get("busy", 0)),
            "workers": {
                w["token"]: {"served": w.get("served", 0), "state": w.get("state")}
                for w in snap.get("workers", []) if w.get("token") and w.get("model") == self._model
            },
        }
        return self._last

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._fetch = self._sock = None
