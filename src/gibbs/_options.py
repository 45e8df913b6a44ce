"""A hub's options, validated once.

``Hub(...)`` takes them as keyword arguments (its public signature), builds
one :class:`HubOptions` (which checks every field and says which is wrong),
and hands that record down to its bridge, instead of copying a dozen
keyword arguments from layer to layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import protocol

__all__ = ["HubOptions"]


@dataclass(frozen=True)
class HubOptions:
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    max_attempts: int = 3
    max_queued: Optional[int] = None
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME
    handshake_timeout: float = 5.0
    pipeline_depth: int = 8
    shm_threshold: Optional[int] = protocol.DEFAULT_SHM_THRESHOLD
    max_lent_bytes: int = 512 << 20
    close_grace: float = 10.0
    no_worker_timeout: Optional[float] = 30.0
    #: The application this hub routes for (resolved: never None).
    app: str = "*"

    def __post_init__(self) -> None:
        if not _number(self.heartbeat_interval) or self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        if not _int(self.heartbeat_misses) or self.heartbeat_misses < 1:
            raise ValueError("heartbeat_misses must be >= 1")
        if not _int(self.max_attempts) or self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_queued is not None and (not _int(self.max_queued) or self.max_queued < 0):
            raise ValueError("max_queued must be >= 0 or None")
        if not _int(self.max_frame_bytes) or self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be at least 1024")
        if not _number(self.handshake_timeout) or self.handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout must be > 0, got {self.handshake_timeout!r}")
        if not _int(self.pipeline_depth) or self.pipeline_depth < 1:
            raise ValueError("pipeline_depth must be >= 1")
        if self.shm_threshold is not None and (not _int(self.shm_threshold) or self.shm_threshold < 0):
            raise ValueError(f"shm_threshold must be an int >= 0 or None, got {self.shm_threshold!r}")
        if not _int(self.max_lent_bytes) or self.max_lent_bytes < 0:
            raise ValueError(f"max_lent_bytes must be an int >= 0, got {self.max_lent_bytes!r}")
        if not _number(self.close_grace) or self.close_grace < 0:
            raise ValueError(f"close_grace must be >= 0, got {self.close_grace!r}")
        if self.no_worker_timeout is not None and (not _number(self.no_worker_timeout) or not self.no_worker_timeout > 0):
            raise ValueError(f"no_worker_timeout must be > 0 or None, got {self.no_worker_timeout!r}")
        if not isinstance(self.app, str) or not self.app:
            raise ValueError(f"app must be a non-empty str, got {self.app!r}")
        # Numbers as the driver uses them.
        object.__setattr__(self, "heartbeat_interval", float(self.heartbeat_interval))
        object.__setattr__(self, "handshake_timeout", float(self.handshake_timeout))
        object.__setattr__(self, "close_grace", float(self.close_grace))
        if self.no_worker_timeout is not None:
            object.__setattr__(self, "no_worker_timeout", float(self.no_worker_timeout))


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
