"""gibbs: scale a Python model across worker processes and machines, behind asyncio.

::

    from gibbs import Hub, Worker

    hub = Hub()
    for _ in range(4):
        Worker(MyModel).start()
    result = await hub.request(x)
"""

import logging as _logging
from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .errors import (
    AddressInUseError,
    AuthenticationError,
    DeadlineExceededError,
    GibbsError,
    HubClosedError,
    NoWorkersError,
    OverloadedError,
    ProtocolError,
    QueueFullError,
    SerializationError,
    UserCodeException,
    WorkerDiedError,
    WorkerRefusedError,
)
from .hub import Hub
from .logs import LogFields
from .worker import Worker, remaining, request_id

__version__ = "1.0.0"



if _TYPE_CHECKING:
    from . import ray as ray


def __getattr__(name: str) -> _ModuleType:
    # ``gibbs.ray`` on first use: ``import gibbs`` never imports Ray.
    if name == "ray":
        import importlib

        return importlib.import_module(".ray", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Silent by default: applications choose whether to show gibbs's logs.
_logging.getLogger("gibbs").addHandler(_logging.NullHandler())

__all__ = [
    # the two classes
    "Hub",
    "Worker",
    # inside a model's call, in a worker
    "remaining",
    "request_id",
    # logging: the model, worker and request id on every record
    "LogFields",
    # errors
    "GibbsError",
    "UserCodeException",
    "WorkerDiedError",
    "HubClosedError",
    "QueueFullError",
    "OverloadedError",
    "DeadlineExceededError",
    "NoWorkersError",
    "SerializationError",
    "AuthenticationError",
    "ProtocolError",
    "WorkerRefusedError",
    "AddressInUseError",
    "__version__",
]
