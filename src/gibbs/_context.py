"""What a process knows of the serving it does: which hub and model it
serves as a worker (``serving``: a ``Hub()`` made here becomes a client of
that hub), and what a model's call knows of itself while it runs: its
deadline, priority class and request id (context variables, set by the
worker around each call; an async model's task copies them), with the
accessors a model uses (``gibbs.remaining()``, ``gibbs.request_id()``).
"""

from __future__ import annotations

import contextvars
import time
from typing import Optional, Union

from . import protocol

__all__ = ["Serving", "current_priority", "remaining", "request_id", "serving"]

class Serving:
    """Where this process serves as a worker: its hub's address and key, and
    its model. A plain ``Hub()`` made here (in a model's constructor or
    call) becomes a client of that hub, so that a model calls other models
    (``hub.request(..., gibbs_model="b")``) with no address to pass."""

    __slots__ = ("host", "port", "authkey", "explicit", "model", "token", "name")

    def __init__(
        self, host: str, port: int, authkey: bytes, explicit: bool, model: str, token: str, name: str = ""
    ) -> None:
        self.host = host
        self.port = port
        self.authkey = authkey
        self.explicit = explicit
        self.model = model
        self.token = token
        self.name = name  # the worker's (its log lines name it)


#: Set once this process serves a model (``Worker.start()``, ``run()``, a Ray
#: actor); read by ``Hub()`` and the log fields.
serving: Optional[Serving] = None


#: The deadline (time.monotonic() of this process) of the call being run
#: here: set around each call, so that a model, sync or async, reads its own.
_DEADLINE: "contextvars.ContextVar[Optional[float]]" = contextvars.ContextVar("gibbs_deadline", default=None)
#: The priority class of the call being run here (PRIORITY frames), for the
#: calls a model makes while it serves it: None outside a call, or class 0.
_PRIORITY: "contextvars.ContextVar[Optional[int]]" = contextvars.ContextVar("gibbs_priority", default=None)
#: The request id of the call being served here: set by the worker before
#: each call (an int: the hub's call id, the hub's prefix before it makes the
#: id; a str: an id given by the caller), by gibbs.asgi for an endpoint.
_REQUEST_ID: "contextvars.ContextVar[Union[str, int, None]]" = contextvars.ContextVar("gibbs_request_id", default=None)
#: The prefix of the request ids the hub this worker serves makes (WELCOME).
request_ids = ""


def remaining() -> Optional[float]:
    """Inside a model's call in a worker: seconds left before the call's
    deadline (``gibbs_timeout``), negative once it has passed: the caller
    has its :class:`~gibbs.DeadlineExceededError` and will not read the
    answer. ``None`` when the call has no deadline (or outside a call).

    A cheap check for a sync model that cannot be interrupted::

        for step in range(n):
            if (left := gibbs.remaining()) is not None and left <= 0:
                break  # nobody waits for this answer any more
            ...

    In a batched call, the earliest deadline of the batch's items.
    """
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()



def current_priority() -> Optional[int]:
    """Inside a model's call in a worker: the call's priority class, when
    the hub gave it one other than 0 (in a batch: the highest of its items)."""
    return _PRIORITY.get()



def request_id() -> Optional[str]:
    """The request id of the call being served: inside a model's call in a
    worker, its call's (the ``gibbs_request_id`` its caller gave, else the
    one its hub made); in an endpoint behind :class:`gibbs.asgi.CancelOnDisconnect`,
    the request's ``X-Request-ID``. ``None`` elsewhere.

    A call made while serving one (a model calling a model) carries the same
    id, and gibbs's log lines name it, so that a chain can be followed::

        class Model:
            def __call__(self, x):
                logging.getLogger("app").info("serving %s", gibbs.request_id())
                return x

    In a batched call, the id of the batch's first request.
    """
    rid = _REQUEST_ID.get()
    if rid is None or type(rid) is str:
        return rid
    return f"{request_ids}{rid}"



def _request_id_of_caller(given: Optional[str]) -> Optional[str]:
    """The request id a call made here carries: ``given``, else the one
    being served (None: its hub makes one)."""
    if given is not None:
        return protocol.check_request_id(given)
    if _REQUEST_ID.get() is None:
        return None
    return request_id()
