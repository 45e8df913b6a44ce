"""Typed records of the control messages a peer sends, checked at the edge.

Control bodies are JSON (see ``protocol.py``); what a peer puts in them is
not trusted. Each record here is built only by its ``from_wire``, which
checks every field's type and range and raises :class:`ProtocolError`
naming the field, so that nothing past the edge ever meets a string where
it expects a number, a NaN interval or a negative batch size. The hub
closes that one connection with a log line saying why.

Two rules hold for every record:

* ``from_wire`` raises :class:`ProtocolError` and nothing else, whatever
  it is given (``tests/test_records.py`` fuzzes it);
* an absent optional field takes the default a peer of an older version
  would mean; a field present with the wrong type is an error, not a default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from . import errors, protocol
from .errors import GibbsError, ProtocolError

__all__ = ["Hello", "Loading", "InitFailed", "Welcome", "exc_to_json", "exc_from_json", "MAX_NAME", "MAX_TEXT", "MAX_SLOTS", "MAX_SECONDS", "MAX_PID", "ROLES"]

#: Longest name a peer may give (a host, a worker, a model, a class, a token).
MAX_NAME = 1024
#: Longest free text (an error message or a traceback in INIT_FAILED).
MAX_TEXT = 1 << 16
#: Largest batch size and concurrency a worker may announce.
MAX_SLOTS = 1 << 20
#: Largest heartbeat interval and batch wait (seconds) a peer may announce.
MAX_SECONDS = 86400.0
#: Largest pid: Linux's pid_max is at most 2**22; other systems stay under 2**31.
MAX_PID = (1 << 31) - 1

ROLES = ("worker", "client", "observer")


def _int(obj: dict[str, Any], what: str, key: str, default: Optional[int], lo: int, hi: int) -> int:
    v = obj.get(key, default)
    # bool is an int in Python: ``{"pid": true}`` is not a pid.
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"malformed {what}: {key} must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise ProtocolError(f"malformed {what}: {key} must be in [{lo}, {hi}], got {v}")
    return v


def _float(obj: dict[str, Any], what: str, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = obj.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"malformed {what}: {key} must be a number, got {_show(v)}")
    f = float(v)
    if not math.isfinite(f) or f < lo or f > hi or (lo_open and f == lo):
        raise ProtocolError(f"malformed {what}: {key} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return f


def _str(obj: dict[str, Any], what: str, key: str, default: Optional[str], limit: int = MAX_NAME) -> str:
    v = obj.get(key, default)
    if not isinstance(v, str):
        raise ProtocolError(f"malformed {what}: {key} must be a string, got {_show(v)}")
    if len(v) > limit:
        raise ProtocolError(f"malformed {what}: {key} is over {limit} characters")
    return v


def _opt_str(obj: dict[str, Any], what: str, key: str, limit: int = MAX_NAME) -> Optional[str]:
    if obj.get(key) is None:
        return None
    return _str(obj, what, key, None, limit)


def _bool(obj: dict[str, Any], what: str, key: str, default: bool) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise ProtocolError(f"malformed {what}: {key} must be true or false, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _obj(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what}: not an object")
    return obj


@dataclass(frozen=True)
class Hello:
    """What a peer says about itself after the HMAC handshake (HELLO).

    A worker announces its model, batch size, concurrency and intervals; a
    client hub or an observer (``gibbs status``) only its role and names."""

    pid: int
    host: str
    name: str
    role: str = "worker"
    heartbeat_interval: float = 1.0
    shm: bool = False
    model: str = ""
    cls: str = ""
    batch_size: int = 1
    batch_wait: float = 0.0
    concurrency: int = 1
    device: Optional[str] = None
    token: Optional[str] = None
    version: Optional[str] = None  # a label of the worker's model version (a pool's rolling update)
    app: Optional[str] = None  # a client hub's application (see Hub(app=...))
    within: Optional[str] = None  # a client hub inside a worker: that worker's token
    deadlines: bool = False  # the worker reads DEADLINE frames
    #: A client hub (or, for our router, its WELCOME): a FORWARD's class
    #: bits say "none given" (0) or the class + 1, so that an explicit class
    #: 0 stays 0 (without it: 0 is none given, the router's default).
    explicit_class: bool = False

    @classmethod
    def from_wire(cls, obj: Any) -> "Hello":
        what = "HELLO"
        o = _obj(obj, what)
        role = _str(o, what, "role", "worker")
        if role not in ROLES:
            raise ProtocolError(f"malformed {what}: unknown role {_show(role)}")
        token = _opt_str(o, what, "token")
        return cls(
            pid=_int(o, what, "pid", None, 1, MAX_PID),
            host=_str(o, what, "host", "?"),
            name=_str(o, what, "name", "worker"),
            role=role,
            heartbeat_interval=_float(o, what, "heartbeat_interval", 1.0, 0.0, MAX_SECONDS, lo_open=True),
            shm=_bool(o, what, "shm", False),
            model=_opt_str(o, what, "model") or "",
            cls=_str(o, what, "cls", ""),
            batch_size=_int(o, what, "batch_size", 1, 1, MAX_SLOTS),
            batch_wait=_float(o, what, "batch_wait", 0.0, 0.0, MAX_SECONDS),
            concurrency=_int(o, what, "concurrency", 1, 1, MAX_SLOTS),
            device=_opt_str(o, what, "device") or None,
            token=token or None,
            version=_opt_str(o, what, "version") or None,
            app=_opt_str(o, what, "app") or None,
            within=_opt_str(o, what, "within") or None,
            deadlines=_bool(o, what, "deadlines", False),
            explicit_class=_bool(o, what, "explicit_class", False),
        )


def _worker_of(o: dict[str, Any], what: str) -> dict[str, Any]:
    """The fields that say which worker reports (LOADING, INIT_FAILED)."""
    return {
        "pid": _int(o, what, "pid", None, 1, MAX_PID),
        "host": _str(o, what, "host", "?"),
        "name": _str(o, what, "name", "worker"),
        "model": _opt_str(o, what, "model") or "",
    }


@dataclass(frozen=True)
class Loading:
    """A worker building its model (LOADING): listed until its connection closes."""

    pid: int
    host: str
    name: str
    model: str = ""
    device: Optional[str] = None

    @classmethod
    def from_wire(cls, obj: Any) -> "Loading":
        what = "LOADING"
        o = _obj(obj, what)
        return cls(**_worker_of(o, what), device=_opt_str(o, what, "device") or None)


@dataclass(frozen=True)
class InitFailed:
    """A worker whose model constructor raised (INIT_FAILED)."""

    pid: int
    host: str
    name: str
    model: str = ""
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    final: bool = False  # from a supervisor that gave up: no worker of the model comes from there

    @classmethod
    def from_wire(cls, obj: Any) -> "InitFailed":
        what = "INIT_FAILED"
        o = _obj(obj, what)
        return cls(
            **_worker_of(o, what),
            exc_type=_str(o, what, "exc_type", "", MAX_TEXT),
            message=_str(o, what, "message", "", MAX_TEXT),
            traceback=_str(o, what, "traceback", "", MAX_TEXT),
            final=_bool(o, what, "final", False),
        )


@dataclass(frozen=True)
class Welcome:
    """What a hub says to a peer that passed the handshake (WELCOME)."""

    heartbeat_interval: float
    pid: int = 0
    host: str = "?"
    shm_probe: Optional[dict[str, Any]] = None
    app: Optional[str] = None  # the application the hub routes for (None or "*": any)
    explicit_class: bool = False  # it reads FORWARD class bits as class + 1 from a client that says so (Hello)

    @classmethod
    def from_wire(cls, obj: Any) -> "Welcome":
        what = "WELCOME"
        o = _obj(obj, what)
        probe = o.get("shm_probe")
        if probe is not None and not isinstance(probe, dict):
            raise ProtocolError(f"malformed {what}: shm_probe must be an object")
        return cls(
            heartbeat_interval=_float(o, what, "heartbeat_interval", 1.0, 0.0, MAX_SECONDS, lo_open=True),
            pid=_int(o, what, "pid", 0, 0, MAX_PID),
            host=_str(o, what, "host", "?"),
            shm_probe=probe,
            app=_opt_str(o, what, "app") or None,
            explicit_class=_bool(o, what, "explicit_class", False),
        )


# ---------------------------------------------------------------- EXC: an error named by a hub

#: Exceptions a router may name in an EXC frame (rebuilt by type name).
_EXC_TYPES: dict[str, type[BaseException]] = {
    name: getattr(errors, name)
    for name in (
        "GibbsError", "WorkerDiedError", "HubClosedError", "OverloadedError", "QueueFullError", "NoWorkersError",
        "SerializationError",
    )
}
_EXC_TYPES["TypeError"] = TypeError
_EXC_TYPES["ValueError"] = ValueError


def exc_to_json(exc: Optional[BaseException]) -> bytes:
    if exc is None:
        return json.dumps({"type": ""}).encode()  # cancelled
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, errors.DeadlineExceededError):
        record["in_queue"] = exc.in_queue
    if isinstance(exc, errors.OverloadedError):
        record["retry_after"] = exc.retry_after
        record["reason"] = exc.reason
    failures = getattr(exc, "failures", None)
    if failures:
        record["failures"] = list(failures)
    if exc.__cause__ is not None:
        record["cause"] = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
    return json.dumps(record).encode()


def exc_from_json(body: bytes) -> Optional[BaseException]:
    """None for "cancelled". Raises :class:`ProtocolError` for a record that
    is not one."""
    record = protocol.unpack_json(body)
    name = record.get("type", "")
    failures = record.get("failures") or []
    if not isinstance(name, str) or not isinstance(failures, list):
        raise ProtocolError("malformed EXC record")
    if not name:
        return None
    cls = _EXC_TYPES.get(name, GibbsError)
    message = str(record.get("message", ""))
    if cls is errors.WorkerDiedError:
        return errors.WorkerDiedError(message, [str(f) for f in failures])
    if name == "DeadlineExceededError":
        return errors.DeadlineExceededError(message, in_queue=bool(record.get("in_queue", True)))
    if cls is errors.OverloadedError or cls is errors.QueueFullError:
        retry_after = record.get("retry_after", 0.0)
        reason = record.get("reason", "deadline" if cls is errors.OverloadedError else "max_queued")
        if not isinstance(retry_after, (int, float)) or not math.isfinite(retry_after) or not isinstance(reason, str):
            raise ProtocolError("malformed EXC record (retry_after, reason)")
        return cls(message, retry_after=max(0.0, float(retry_after)), reason=reason[:MAX_NAME])
    exc = cls(message) if cls is not GibbsError or name == "GibbsError" else GibbsError(f"{name}: {message}")
    if record.get("cause"):
        exc.__cause__ = GibbsError(f"in the router hub: {record['cause']}")
    return exc
