"""Models and helpers that worker processes must be able to import."""

from __future__ import annotations

import time
from typing import Any


class Echo:
    """The trivial model: gives back its argument (identity)."""

    def __call__(self, x: Any) -> Any:
        return x


class Sleeper:
    """The walkthrough's model: sleeps, then answers."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, x: Any) -> Any:
        time.sleep(self.seconds)
        return x


class Gated:
    """Echo whose first call waits for ``gate`` (a multiprocessing.Event):
    lets a benchmark connect workers to a hub holding a long queue, and start
    the clock only when every worker is connected and the gate opens."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.opened = False

    def __call__(self, x: Any) -> Any:
        if not self.opened:
            self.gate.wait(120)
            self.opened = True
        return x


def identity(x: Any) -> Any:
    """The trivial model for ProcessPoolExecutor."""
    return x


def pipe_echo(conn: Any) -> None:
    """Child end of the raw Pipe baseline: send back whatever arrives."""
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            conn.send(msg)
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        conn.close()
