"""Every exception gibbs raises, in one place.

"You did it" and "something outside broke it" are different exceptions: closing
the hub yourself gives :class:`HubClosedError`; a worker process that dies gives
:class:`WorkerDiedError`. Where a lower-level error explains the failure, it is
attached as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Optional

__all__ = [
    "GibbsError",
    "UserCodeException",
    "WorkerDiedError",
    "HubClosedError",
    "OverloadedError",
    "QueueFullError",
    "DeadlineExceededError",
    "NoWorkersError",
    "SerializationError",
    "AuthenticationError",
    "ProtocolError",
    "WorkerRefusedError",
    "AddressInUseError",
]


class GibbsError(Exception):
    """Base class of every exception raised by gibbs itself."""


class UserCodeException(GibbsError):
    """Raised by ``hub.request`` when the model raised.

    The model's own exception is kept: ``original`` (also ``__cause__``) is the
    exception object when it could be pickled back to the hub, else ``None``;
    ``exc_type`` and ``exc_message`` always give its type name and message, and
    ``remote_traceback`` the traceback formatted in the worker process.
    The worker that raised keeps serving.
    """

    def __init__(
        self,
        message: str,
        *,
        original: Optional[BaseException] = None,
        exc_type: str = "",
        exc_message: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.original = original
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            _rebuild_user_code_exception,
            (str(self), self.exc_type, self.exc_message, self.remote_traceback),
        )


def _rebuild_user_code_exception(
    message: str, exc_type: str, exc_message: str, remote_traceback: str
) -> UserCodeException:
    return UserCodeException(
        message, exc_type=exc_type, exc_message=exc_message, remote_traceback=remote_traceback
    )


class WorkerDiedError(GibbsError):
    """Raised by ``hub.request`` when the request was in the hands of a worker
    that died (or went silent) on every one of its ``max_attempts`` attempts.

    ``failures`` lists one line per attempt, naming the worker (pid, host) and
    how it ended (exit code, signal, end of connection, missed heartbeats).
    """

    def __init__(self, message: str, failures: Optional[list[str]] = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class HubClosedError(GibbsError):
    """Raised when a request is made on a hub that was closed, and for requests
    still queued (never started) when ``hub.close()`` was called."""


class OverloadedError(GibbsError):
    """Raised at once, before anything is sent, when the hub sheds a new call
    rather than queue what it cannot serve in time.

    ``reason`` says why: ``"deadline"``, the predicted wait (the work queued
    ahead over the model's measured throughput) and the model's service time
    exceed the call's deadline; ``"max_queued"``, the queue is full
    (:class:`QueueFullError`). ``retry_after``: seconds after which the queue
    ahead should have drained enough (an HTTP ``Retry-After``).
    """

    def __init__(self, message: str, *, retry_after: float = 0.0, reason: str = "deadline") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (str(self),), {"retry_after": self.retry_after, "reason": self.reason})


class QueueFullError(OverloadedError):
    """Raised at once by ``hub.request`` when ``max_queued`` requests are already
    waiting for a worker (``Hub(max_queued=N)``); an :class:`OverloadedError`
    whose ``reason`` is ``"max_queued"``."""

    def __init__(self, message: str, *, retry_after: float = 0.0, reason: str = "max_queued") -> None:
        super().__init__(message, retry_after=retry_after, reason=reason)


# asyncio's, concurrent.futures' and the builtin TimeoutError are one class
# from Python 3.11, three before: a deadline error is each of them, so that
# ``except asyncio.TimeoutError`` (gibbs 0.2 code) and ``except TimeoutError``
# both catch it everywhere.
_TIMEOUT_BASES = tuple(dict.fromkeys((asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError)))


class DeadlineExceededError(GibbsError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """The call's deadline (``gibbs_timeout``, or the model's default) passed.

    ``in_queue`` tells the two cases apart: True, it expired in the queue
    (it never started, or could not finish in the time it had left by the
    model's measured service time, so it was never sent); False, the model
    took too long (a worker was running it). A subclass of
    ``asyncio.TimeoutError`` and of ``TimeoutError``.
    """

    def __init__(self, message: str, *, in_queue: bool = True) -> None:
        super().__init__(message)
        self.in_queue = in_queue

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_deadline_error, (str(self), self.in_queue))


def _rebuild_deadline_error(message: str, in_queue: bool) -> DeadlineExceededError:
    return DeadlineExceededError(message, in_queue=in_queue)


class NoWorkersError(GibbsError):
    """No worker of the model is there to take the request.

    Raised by ``hub.wait_for_workers`` when the workers did not come in time;
    by ``hub.request`` (and ``submit``, ``stream``) at once when no worker of
    the model can come (every worker started for it failed to build the
    model), and for a request that waited ``Hub(no_worker_timeout=...)``
    seconds while no worker of its model was connected or loading.

    The message says why when gibbs knows: a worker whose model constructor
    raised reports its traceback to the hub, local worker processes that
    exited are listed with their exit codes, and refused handshakes with
    their reason.
    """


class SerializationError(GibbsError):
    """An argument or a result could not be pickled (or unpickled).

    For arguments it is raised at the call site and nothing is sent. For
    results it fails that one request; the worker goes on serving.
    The pickling error is the ``__cause__`` when available.
    """


class AuthenticationError(GibbsError):
    """The HMAC handshake failed: the two sides do not share the same key."""


class ProtocolError(GibbsError):
    """A peer sent bytes that are not a valid gibbs frame (malformed or over
    the size limit). Only that connection is closed."""


class WorkerRefusedError(GibbsError):
    """Raised in a worker the hub refused: another class already serves the
    model name it asked for (``gibbs_model``), or the hub is closing. The
    worker stops (the worker command exits non-zero) instead of retrying."""


class AddressInUseError(GibbsError, OSError):
    """The hub cannot take its address: another program holds it (something
    that is not a gibbs hub, or the hub of another application).

    Two processes are one application when their hubs were made by the same
    program (the same command line in the same directory, as the web
    processes of ``gunicorn -w N`` are) or name the same application
    (``Hub(app=...)`` or ``GIBBS_APP``). A hub never joins, as a client, the
    hub of another application: its calls would be answered by that
    application's models. Give each application its own address
    (``Hub(port=...)`` or ``GIBBS_PORT``, and the same port for its workers).
    An ``OSError`` (``errno.EADDRINUSE``) too, as a failed bind is.
    """
