"""CPU threads per worker: local workers split this process's cores.

Numerical libraries (OpenMP, MKL, OpenBLAS, torch, ...) start one thread per
core in every process by default. N workers on one machine then run N times
as many busy threads as there are cores, and each is slower than a worker
with its share alone. So a worker started on this machine gets, by default,
an equal share of the cores of ``os.sched_getaffinity(0)``, one core left
to the process that starts them (the web process, which runs the hub)::

    share = max(1, (cores - 1) // workers)

where ``workers`` counts the live local workers of the starting process
(those of every pool, of ``python -m gibbs worker -n N`` and loose
``Worker(...).start()`` calls alike; a pool or the command line counts its
full size from its first worker on). The share is written into the usual
environment variables before the model's module is imported in the worker,
and given to ``torch.set_num_threads`` when torch is loaded there (with the
fork start method the parent may have imported it already). A worker whose
count of siblings grew after it started (workers started one by one) takes
the smaller share of torch threads on its next request.

The option (``gibbs_threads=`` / ``--threads`` / ``GIBBS_THREADS``):

- ``"auto"`` (the default): the share above. A variable the user exported
  (``OMP_NUM_THREADS=4 python app.py``) is kept; an exported
  ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` (the two torch reads) stands
  for both, and torch then keeps the count it makes of it.
- an int N >= 1: N threads, whatever is exported.
- ``"inherit"``: leave the variables and torch alone.

``gibbs_pin_cpus=True`` / ``--pin-cpus`` also binds each worker to its own
``share`` cores (``os.sched_setaffinity``), in turn.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from typing import Any, Optional, Union

__all__ = ["THREAD_VARS", "ThreadsOption", "parse_threads", "cpu_count", "plan", "apply_in_child", "refresh"]

#: The variables a worker's share is written into.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
    "RAYON_NUM_THREADS",  # Rust's rayon: Hugging Face tokenizers
)
ENV = "GIBBS_THREADS"
AUTO = "auto"
INHERIT = "inherit"

ThreadsOption = Union[int, str, None]


def parse_threads(value: ThreadsOption) -> Union[int, str]:
    """``None`` -> ``$GIBBS_THREADS`` or ``"auto"``; ``"auto"``, ``"inherit"``
    or an int >= 1 (also as a string) stay. Anything else raises ValueError."""
    if value is None:
        value = os.environ.get(ENV, "").strip() or AUTO
    if isinstance(value, bool):
        raise ValueError(f"gibbs_threads must be 'auto', 'inherit' or an int >= 1, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (AUTO, INHERIT):
            return text
        if text.isdigit():
            value = int(text)
        else:
            raise ValueError(f"gibbs_threads must be 'auto', 'inherit' or an int >= 1, got {value!r}")
    if isinstance(value, int) and value >= 1:
        return value
    raise ValueError(f"gibbs_threads must be 'auto', 'inherit' or an int >= 1, got {value!r}")


def cpu_list() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_count() -> int:
    return len(cpu_list())


# ---------------------------------------------------------------- the parent

_lock = threading.Lock()  # owns: _shared
_shared: Any = None  # multiprocessing RawValue('i'): how many local workers share the cores now


def _counter() -> Any:
    global _shared
    with _lock:
        if _shared is None or _shared_pid != os.getpid():
            _reset_counter()
        return _shared


_shared_pid = -1


def _reset_counter() -> None:
    global _shared, _shared_pid
    _shared = multiprocessing.RawValue("i", 0)
    _shared_pid = os.getpid()


class Plan:
    """What one worker process applies before its model's module is
    imported: picklable, small (travels as an argument of the process)."""

    __slots__ = ("env", "torch_threads", "cpus", "share_of", "cores", "counter")

    def __init__(
        self,
        env: dict[str, str],
        torch_threads: Optional[int],
        cpus: Optional[list[int]],
        share_of: Optional[int],
        cores: int,
        counter: Any,
    ) -> None:
        self.env = env  # variables to set (the user's exported ones are left out)
        self.torch_threads = torch_threads  # for torch.set_num_threads, None: leave torch alone
        self.cpus = cpus  # sched_setaffinity, None: no pinning
        self.share_of = share_of  # auto: the count of workers sharing the cores at start, else None
        self.cores = cores
        self.counter = counter  # auto: the shared count, read again in the child

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for s, v in zip(self.__slots__, state):
            setattr(self, s, v)


#: Cores left to the process that starts the workers (the web process and
#: its hub): measured, a worker with every core starves it (README).
WEB_SHARE = 1


def share(cores: int, workers: int) -> int:
    """Threads per worker when ``workers`` local workers share ``cores``."""
    spare = cores - WEB_SHARE if cores > WEB_SHARE else cores
    return max(1, spare // max(1, workers))


def plan(option: Union[int, str], workers: int, slot: int, pin: bool) -> Optional[Plan]:
    """The plan of a worker about to start from this process: ``workers``
    local workers (this one included) share the cores; ``slot`` is its index
    among them (for pinning). None when there is nothing to do."""
    if option == INHERIT:
        return None
    cpus = cpu_list()
    cores = len(cpus)
    counter = None
    if option == AUTO:
        counter = _counter()
        counter.value = max(1, workers)
        n = share(cores, workers)
        env = {v: str(n) for v in THREAD_VARS if v not in os.environ}
        torch_threads: Optional[int] = n
        exported = os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")
        if exported is not None:
            # torch reads these two (MKL's over OMP's): the exported one
            # stands for both, and torch keeps the count it makes of it.
            for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                if v in env:
                    env[v] = exported
            torch_threads = None
        share_of: Optional[int] = workers
    else:
        n = int(option)
        env = {v: str(n) for v in THREAD_VARS}
        torch_threads = n
        share_of = None
        counter = None
    pinned = None
    if pin:
        per = min(n, cores)
        groups = max(1, cores // per)
        start = (slot % groups) * per
        pinned = cpus[start : start + per]
    if not env and torch_threads is None and pinned is None:
        return None
    return Plan(env, torch_threads, pinned, share_of, cores, counter if torch_threads is not None else None)


# ---------------------------------------------------------------- the child

_applied: Optional[Plan] = None
_torch_set = 0  # the count last given to torch here


def apply_in_child(p: Optional[Plan]) -> None:
    """In a new worker process, before the model's module is imported."""
    global _applied
    _applied = p
    if p is None:
        return
    if p.cpus:
        try:
            os.sched_setaffinity(0, p.cpus)
        except (AttributeError, OSError):
            pass
    env = dict(p.env)
    n = _current_share(p)
    if n is not None:  # siblings started after this worker's start() and before it ran
        env = {k: str(n) for k in env}
    os.environ.update(env)
    refresh()


def _current_share(p: Plan) -> Optional[int]:
    if p.counter is None or p.share_of is None:
        return None
    try:
        workers = int(p.counter.value)
    except Exception:
        return None
    return share(p.cores, max(workers, p.share_of))


def refresh() -> None:
    """Give torch its share, when torch is loaded in this process (cheap when
    nothing changed; called before the worker handles what it read)."""
    global _torch_set
    p = _applied
    if p is None or p.torch_threads is None:
        return
    torch = sys.modules.get("torch")
    if torch is None:
        return
    n = _current_share(p) or p.torch_threads
    if n != _torch_set:
        try:
            torch.set_num_threads(n)
        except Exception:
            return
        _torch_set = n


def applied() -> Optional[Plan]:
    return _applied
