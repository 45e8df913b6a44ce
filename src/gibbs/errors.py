"""Every exception gibbs raises, in one place.

"You did it" and "something outside broke it" are different exceptions: closing
the hub yourself gives :class:`HubClosedError`; a worker process that dies gives
:class:`WorkerDiedError`. Where a lower-level error explains the failure, it is
attached as ``__cause__``.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "GibbsError",
    "UserCodeException",
    "WorkerDiedError",
    "HubClosedError",
    "QueueFullError",
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


class QueueFullError(GibbsError):
    """Raised at once by ``hub.request`` when ``max_queued`` requests are already
    waiting for a worker (``Hub(max_queued=N)``)."""


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
