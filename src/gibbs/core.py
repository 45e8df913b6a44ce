"""The core: every rule of a call's life, with no I/O.

This module does no I/O, starts no thread and reads no clock (time comes in
as an argument), in the manner of h11 and h2: the driver (``bridge.py``) turns
socket events into calls of the methods below, and carries out the actions
they return. Property-based tests drive it with random event orders and check
:meth:`Core.check_invariants` after every event.

Events in (methods)                      Actions out (records returned)
───────────────────────────────────────  ───────────────────────────────────
submit(call)                             Send(worker, calls)       one unit
cancel(call, outcome)                    Resolve(call, outcome)    once a call
resend(call)             (gibbs_retries) Release(call)             payload free
worker_joined(w) / worker_leaving(w)     Refuse(worker, why)       at join
worker_lost(w, why)                      Drop(worker, why)         idle, closing
upstream_lost(relays)    (a client hub)  Deliver(call, chunk)      a stream's item
client_gone(calls)       (the router)
answered(w, call_id, outcome, now)       Stop(worker, call)        caller gone
chunk(w, call_id, chunk)                 Credit(worker, call, n)   stream window
consumed(call, n)                        Resend(relay, call)       via the router
model_unavailable(model, error)
workers_loading(model, n, now)
roll_out(model, cls)                     (a rolling update: two classes)
close(now, grace) / tick(now)

A call is in exactly one of these states (``CallState``; the allowed moves
are written once, in ``TRANSITIONS``, and any other raises
``CallStateError`` at once):

* **new**: made by the driver, not submitted yet;
* **queued**: in its model's queue (possibly also held by workers, when a
  retry asked for a second attempt);
* **running**: held by one or more live workers (each holds one attempt);
* **done**: its outcome was returned in a ``Resolve``; it may still be held
  by workers whose answer will be dropped; once no worker holds it, a
  ``Release`` says its payload (shared memory) may be reused.

Transitions::

    submit ──► queued ──dispatch──► running ──answer──► done
                 ▲  │                  │ │
                 │  └─cancel──► done   │ └─cancel / close deadline──► done
                 └──── worker lost (attempts left) ◄┘
                       worker lost (no attempts left) ──► done (WorkerDiedError)

Scheduling: idle workers pull work. Each model has its own FIFO queue and its
own workers. Priorities (``Call.priority``, an int in ``PRIORITIES``, higher
first): a free worker takes the highest class queued first, FIFO within a
class, except that a queued call is passed by at most ``STARVATION_BOUND``
units (calls, or batches) carrying calls of a higher class: then it goes in
the next unit (the lowest such class first, so that serving it passes no
other starving call). A worker runs ``slots`` units at once (a unit is one call, or a
batch of up to ``batch_size`` calls); a busy worker may be sent a unit ahead
(pipelining) only while the work already committed to it stays under
``PIPELINE_WINDOW`` seconds by its measured service time, and never more
than ``depth`` units. Batching is work-conserving: a free worker takes what
is queued for its model, up to its batch size, at once, unless the model asks
to wait ``batch_wait`` seconds to fill a batch.

No endless wait for absent workers: with ``no_worker_timeout``, a queued call
that has waited that long while no worker of its model was there (none
joined, none loading, or every one leaving) fails with ``NoWorkersError``;
the wait counts from the later of its submit and the moment the model's last
worker went.
"""

from __future__ import annotations

import collections
import enum
import heapq
from typing import Any, Hashable, Iterator, NamedTuple, Optional, Sequence, Union

from .errors import HubClosedError, NoWorkersError, OverloadedError, QueueFullError, WorkerDiedError
from .metrics import Window, _quantile

__all__ = [
    "Core",
    "Call",
    "CallState",
    "CallStateError",
    "TRANSITIONS",
    "WorkerInfo",
    "Outcome",
    "OutcomeKind",
    "Send",
    "Resolve",
    "Release",
    "Refuse",
    "Drop",
    "Deliver",
    "Stop",
    "Credit",
    "Resend",
    "Expired",
    "Action",
    "PIPELINE_WINDOW",
    "DEFAULT_MODEL",
    "PRIORITIES",
    "STARVATION_BOUND",
    "check_priority",
]

DEFAULT_MODEL = "default"

#: The priority classes of a call (gibbs_priority): higher first; 0 by default.
PRIORITIES = range(0, 10)

#: A queued call is passed by at most this many units (calls, or batches)
#: carrying calls of a higher class; then it goes in the next unit. The
#: higher classes keep at least 8/9 of the workers while the lower ones
#: wait, and no lower call waits for ever (docs/how-to/overload.md).
STARVATION_BOUND = 8


def check_priority(priority: object) -> int:
    """``priority`` as a class of PRIORITIES, or a clear error."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"gibbs_priority must be an int from {PRIORITIES[0]} to {PRIORITIES[-1]}, got {priority!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"gibbs_priority must be from {PRIORITIES[0]} to {PRIORITIES[-1]} (higher first), got {priority}")
    return priority

#: Hedging: a model's p95 service time is recomputed every this many
#: answers, once it has at least HEDGE_MIN_SAMPLES of them.
HEDGE_EVERY = 16
HEDGE_MIN_SAMPLES = 32
#: ... over the last this many answers of the model.
HEDGE_SAMPLES = 256

#: Queue disciplines the core knows (see Core.discipline).
DISCIPLINES = ("fifo", "lifo")

#: Admission control: a new call is shed at once when its predicted wait
#: exceeds this share of the time it has left after its service time (or
#: its service time alone exceeds its deadline). Measured on the core
#: (benchmarks.overload_sim): 1.0 keeps answered calls' latency at the
#: deadline under overload; 0.5 halves it for about 1 % of goodput at
#: exactly full load and none beyond. (The share is of the time left after
#: the service, not of the whole deadline: a model that takes more than
#: half the deadline would otherwise have every call shed, idle or not.)
QUEUE_SHARE = 0.5

#: A busy worker may be sent more work only while the work already committed
#: to it stays under this many seconds (by its moving-average service time):
#: fast models do not wait a round trip between calls, and no call waits long
#: behind another while a worker could free up. Slow models never get a unit
#: beyond their slots.
PIPELINE_WINDOW = 0.001


#: What statistics() counts per priority class.
_PRIO_COUNTS = ("requests", "completed", "errors", "failed", "cancelled", "expired", "shed")


class OutcomeKind(enum.Enum):
    RESULT = "result"  # value: the answer's payload, as the driver received it
    ERROR = "error"  # value: the worker's error record (bytes)
    COPIED = "copied"  # value: (pickle, buffers) read out of shared memory
    EXCEPTION = "exception"  # value: an exception instance made here or by the driver
    CANCELLED = "cancelled"  # value: None; the caller gave up
    CHUNK = "chunk"  # value: one item of a stream, as the driver received it
    EXPIRED = "expired"  # value: an Expired record; its deadline ended the call


class Outcome(NamedTuple):
    kind: OutcomeKind
    value: Any


CANCELLED = Outcome(OutcomeKind.CANCELLED, None)


class CallState(enum.Enum):
    """Where a call is in its life (see the table in the module docstring)."""

    NEW = "new"  # made by the driver, not submitted yet
    QUEUED = "queued"  # in its model's queue (maybe also held, on a retry)
    RUNNING = "running"  # out of the queue, held by one or more workers
    DONE = "done"  # its Resolve was returned: the caller has its outcome

    # Members are singletons: hash them by identity (C), not by name
    # (Enum's __hash__ is Python code, and every move hashes two of them).
    __hash__ = object.__hash__


#: Every allowed move, written once. Anything else raises CallStateError at
#: once rather than leave a call in a state no rule expects.
TRANSITIONS: frozenset[tuple[CallState, CallState]] = frozenset(
    {
        (CallState.NEW, CallState.QUEUED),  # submit
        (CallState.QUEUED, CallState.RUNNING),  # dispatch
        (CallState.RUNNING, CallState.QUEUED),  # resend; lost with attempts left
        (CallState.QUEUED, CallState.DONE),  # cancelled, expired, closed while queued
        (CallState.RUNNING, CallState.DONE),  # answered, cancelled, expired, failed
    }
)


#: TRANSITIONS by the state moved from (what Call._move looks up).
_MOVES: dict[CallState, frozenset[CallState]] = {
    state: frozenset(to for frm, to in TRANSITIONS if frm is state) for state in CallState
}
_QUEUED, _DONE = CallState.QUEUED, CallState.DONE


class CallStateError(RuntimeError):
    """A move the lifecycle does not allow (a bug in gibbs, never the user's)."""


class Call:
    """One request. The driver makes it; the core owns the fields below
    ``sink``. ``payload`` and ``sink`` are opaque to the core."""

    __slots__ = (
        "id", "model", "payload", "sink", "state", "holders",
        "attempts", "failures", "queued_at", "stream", "delivered", "t0", "dispatched",
        "timeout", "retries", "deadline", "windows", "origin", "hedge", "sent_at",
        "priority", "mark", "single",
    )

    def __init__(
        self,
        call_id: int,
        model: str,
        payload: Any,
        sink: Any = None,
        stream: bool = False,
        *,
        timeout: Optional[float] = None,
        retries: int = 0,
        priority: Optional[int] = None,
        single: bool = True,
    ) -> None:
        self.id = call_id
        self.model = model
        self.payload = payload
        self.sink = sink
        self.state = CallState.NEW
        # One positional argument and no keyword: fit for a batched model
        # (whose model is called with a list of them).
        self.single = single
        # Workers holding an attempt: a tuple, empty (shared) while queued,
        # so that a queued call costs no list of its own.
        self.holders: tuple[Hashable, ...] = ()
        self.attempts = 0  # attempts lost with their worker
        self.failures: Optional[list[str]] = None  # how each lost attempt ended
        self.queued_at = 0.0
        self.stream = stream  # chunks go to the caller as the worker yields them
        self.delivered = 0  # chunks handed to the caller
        self.t0 = 0.0  # when it was submitted (for its latency and queue wait)
        self.dispatched = False  # sent to a worker at least once
        # gibbs_timeout: seconds per attempt window (None: the model's
        # default, else no limit); gibbs_retries: windows left after this
        # one (-1: forever). ``deadline`` is the end of the current window,
        # set by submit from the driver's ``now``.
        self.timeout = timeout
        self.retries = retries
        self.deadline: Optional[float] = None
        self.windows = 1  # attempt windows opened so far
        # The worker (its token) whose own call made this one (a model
        # calling a model), when the driver knows: see Core._self_wait.
        self.origin: Optional[str] = None
        # Hedging (gibbs_hedge): a second attempt may go to an idle worker
        # once this one has run past the model's recent p95 service time:
        # 0 no, 1 it may, 2 its second attempt went out. ``sent_at``: first sent.
        self.hedge = 0
        self.sent_at = 0.0
        # gibbs_priority (None: the model's default, else 0); ``mark``: the
        # model's count of units that passed this class when it was submitted
        # (see Core._order): it has been passed by ``passed[priority] - mark``.
        self.priority = priority
        self.mark = 0

    @property
    def final_deadline(self) -> Optional[float]:
        """When the call fails for good: the end of its last window (None:
        no limit, or retries forever)."""
        if self.deadline is None or self.retries < 0:
            return None
        assert self.timeout is not None
        return self.deadline + self.retries * self.timeout

    @property
    def queued(self) -> bool:
        """In its model's queue."""
        return self.state is CallState.QUEUED

    @property
    def done(self) -> bool:
        """Its outcome was returned (workers may still hold attempts)."""
        return self.state is CallState.DONE

    def _move(self, to: CallState) -> None:
        if to not in _MOVES[self.state]:
            raise CallStateError(f"call {self.id}: {self.state.value} -> {to.value} is not an allowed move")
        self.state = to

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.model} {self.state.value} holders={self.holders}>"


class WorkerInfo:
    """What the core knows of one connected worker."""

    __slots__ = (
        "id", "model", "cls", "slots", "batch_size", "depth", "units", "held",
        "ewma", "last_done", "leaving", "served", "describe", "relay", "token", "streams",
    )

    def __init__(
        self,
        worker_id: Hashable,
        model: str,
        cls: str = "",
        *,
        slots: int = 1,
        batch_size: int = 1,
        depth: int = 1,
        describe: str = "",
        relay: bool = False,
        token: Optional[str] = None,
    ) -> None:
        self.id = worker_id
        self.token = token  # its identity across connections (HELLO's token), when it gave one
        # A relay hands calls to another hub, which owns their attempts: a
        # retry is asked of it (Resend), and its timing says nothing of the model.
        self.relay = relay
        self.model = model
        self.cls = cls
        self.slots = max(1, slots)
        self.batch_size = max(1, batch_size)
        self.depth = max(self.slots, depth)
        # Units in the order sent; each is the list of call ids it still owes.
        self.units: collections.deque[list[int]] = collections.deque()
        self.held: dict[int, Call] = {}  # call id -> call, every attempt it holds
        self.streams = 0  # how many of those are streams
        self.ewma: Optional[float] = None  # seconds per unit
        self.last_done = 0.0
        self.leaving = False
        self.served = 0
        self.describe = describe or f"worker {worker_id}"

    @property
    def load(self) -> int:
        return len(self.units)


class _Model:
    __slots__ = (
        "name", "cls", "queue", "workers", "batch_wait", "unavailable", "batch_sizes", "stats", "latency", "queue_wait",
        "loading", "absent_since", "next_cls", "service", "n_service", "hedge_after", "hedge",
        "by_class", "passed", "prio_stats", "full",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.cls = ""
        self.queue: collections.OrderedDict[int, Call] = collections.OrderedDict()
        self.workers: dict[Hashable, WorkerInfo] = {}
        self.batch_wait = 0.0
        self.unavailable: Optional[BaseException] = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # of batched workers' units
        # requests, completed, errors (the model raised), failed (gibbs gave
        # up: worker deaths, closing), cancelled, resent, retried
        self.stats: collections.Counter[str] = collections.Counter()
        self.latency = Window()  # submit -> answer, answered calls
        self.queue_wait = Window()  # submit -> first sent to a worker
        # First sent -> first answer of the last HEDGE_SAMPLES answered calls
        # (for hedging; slot n % HEDGE_SAMPLES), and how many were answered:
        # a bare ring, as only its p95 is read, every HEDGE_EVERY answers.
        self.service: list[float] = []
        self.n_service = 0
        self.hedge_after: Optional[float] = None  # its recent p95 service time, refreshed every HEDGE_EVERY
        self.hedge = False  # its calls are hedged by default (serve(gibbs_hedge=True))
        self.loading = 0  # workers building this model (announced, not joined yet)
        # Since when no worker of the model is there (none joined and none
        # loading, or all leaving); None while one is.
        self.absent_since: Optional[float] = None
        self.next_cls: Optional[str] = None  # during a rolling update: the new version's class
        # The queue again, by priority class (only classes with a queued call),
        # in the queue's order; and per class, how many units carrying a call
        # of a higher class were sent (the starvation bound counts on it).
        self.by_class: dict[int, collections.OrderedDict[int, Call]] = {}
        self.passed = [0] * len(PRIORITIES)
        # (priority, what): requests, completed, errors, failed, cancelled,
        # expired, shed, per class
        self.prio_stats: collections.Counter[tuple[int, str]] = collections.Counter()
        # No worker has room for a unit: the last _pick found none. Only an
        # answer or a worker joining gives one room again, and they clear it;
        # till then a submit queues its call with no scan of the workers.
        self.full = False

    def absent(self) -> bool:
        if self.loading:
            return False
        for w in self.workers.values():
            if not w.leaving:
                return False
        return True

    @property
    def batched(self) -> bool:
        """Whether its workers batch (they all do, or none: ``worker_joined``
        refuses the other kind)."""
        return any(w.batch_size > 1 for w in self.workers.values())


def _without(holders: tuple[Hashable, ...], worker_id: Hashable) -> tuple[Hashable, ...]:
    if holders == (worker_id,):
        return ()
    if worker_id not in holders:
        raise ValueError(f"{worker_id!r} holds no attempt of this call")
    i = holders.index(worker_id)
    return holders[:i] + holders[i + 1 :]


def same_class(a: str, b: str) -> bool:
    """Whether two ``module:QualifiedName`` strings name one class. A class
    defined in a script is ``__main__:X`` in the script's process and
    ``script:X`` where the script is imported: then the qualified names
    decide. An empty name (an older worker) matches any."""
    if not a or not b or a == b:
        return True
    ma, _, qa = a.partition(":")
    mb, _, qb = b.partition(":")
    return (ma == "__main__" or mb == "__main__") and qa == qb


class Send(NamedTuple):
    worker: Hashable
    calls: tuple[Call, ...]


class Resolve(NamedTuple):
    call: Call
    outcome: Outcome


class Release(NamedTuple):
    call: Call


class Deliver(NamedTuple):
    """One chunk of a stream, for its caller (in order, before its Resolve)."""

    call: Call
    chunk: Outcome


class Stop(NamedTuple):
    """Ask the worker to stop a stream (close the generator): its caller is gone."""

    worker: Hashable
    call: Call


class Resend(NamedTuple):
    """Ask a relay (another hub, which owns the attempts) for a second attempt."""

    worker: Hashable
    call: Call


class Expired(NamedTuple):
    """The value of an EXPIRED outcome: why the call's deadline ended it."""

    model: str
    in_queue: bool  # no worker held it: it never started
    timeout: float  # seconds of each attempt window
    windows: int  # windows waited (1 + retries used)
    detail: str  # what the core saw (time left, the model's service time)
    no_worker: bool = False  # it waited with no worker of its model there (the driver says why)

    def describe(self) -> str:
        tries = f" ({self.windows} attempts)" if self.windows > 1 else ""
        if self.in_queue:
            why = f": {self.detail}" if self.detail else ""
            return f"request to model {self.model!r} expired in the queue (gibbs_timeout={self.timeout} s{tries}){why}"
        return f"request to model {self.model!r}: the model took too long (gibbs_timeout={self.timeout} s{tries})"


class Credit(NamedTuple):
    """The caller consumed ``n`` chunks: the worker may send ``n`` more."""

    worker: Hashable
    call: Call
    n: int


class Refuse(NamedTuple):
    worker: Hashable
    reason: str


class Drop(NamedTuple):
    """Close this worker's connection (it holds nothing: while closing, an
    idle worker is let go at once). Its loss follows, as a leaving worker's."""

    worker: Hashable
    reason: str


Action = Union[Send, Resolve, Release, Refuse, Drop, Deliver, Stop, Credit, Resend]

# ``_new(Send, (worker, calls))`` is ``Send(worker, calls)`` built in C: a
# NamedTuple's own constructor is a Python function, a frame per action on
# the path every call takes (the actions of each call: its Send, Resolve and
# Release). The fields in their order, as in the class.
_new = tuple.__new__


class Core:
    """The call lifecycle and the scheduler of one hub. Not thread-safe: the
    driver serialises every call (the bridge's lock)."""

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        max_queued: Optional[int] = None,
        discipline: str = "fifo",
        queue_share: float = QUEUE_SHARE,
        no_worker_timeout: Optional[float] = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if discipline not in DISCIPLINES:
            raise ValueError(f"discipline must be one of {DISCIPLINES}, got {discipline!r}")
        if not queue_share > 0:
            raise ValueError("queue_share must be > 0")
        if no_worker_timeout is not None and not no_worker_timeout > 0:
            raise ValueError("no_worker_timeout must be > 0 or None")
        self.max_attempts = max_attempts
        self.max_queued = max_queued
        self.no_worker_timeout = no_worker_timeout
        # The order a free worker takes queued calls in ("fifo", or "lifo":
        # the newest first, the older ones expire), and the share of a new
        # call's time left that its predicted wait and service may take
        # before it is shed. benchmarks.overload_sim measures them; the hub
        # uses the defaults (README: "Deadlines and overload").
        self.discipline = discipline
        self.queue_share = queue_share
        self.models: dict[str, _Model] = {}
        self.workers: dict[Hashable, WorkerInfo] = {}
        self.calls: dict[int, Call] = {}  # every call not yet done
        self.n_queued = 0
        self.closing = False
        self.close_deadline: Optional[float] = None
        self.stats: collections.Counter[str] = collections.Counter()
        # (window end, call id) of every call with a deadline; entries of
        # calls done or whose window moved on are skipped when they surface.
        self._deadlines: list[tuple[float, int]] = []
        # model name -> gibbs_timeout for its calls that give none
        self.default_timeouts: dict[str, float] = {}
        # model name -> gibbs_priority for its calls that give none (else 0)
        self.default_priorities: dict[str, int] = {}
        # Running calls that may still be hedged (call id -> call); owned here.
        self._hedging: dict[int, Call] = {}

    # ------------------------------------------------------------ helpers

    def _model(self, name: str) -> _Model:
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = _Model(name)
        return m

    def _absence(self, model: _Model, now: float) -> None:
        """After any change to the model's workers: note since when none is there."""
        if not model.absent():
            model.absent_since = None
        elif model.absent_since is None:
            model.absent_since = now

    def _resolve(self, call: Call, outcome: Outcome, out: list[Action]) -> None:
        m = self.models.get(call.model)
        if m is not None:
            kind = outcome.kind
            what = (
                "completed" if kind is OutcomeKind.RESULT or kind is OutcomeKind.COPIED
                else "errors" if kind is OutcomeKind.ERROR
                else "cancelled" if kind is OutcomeKind.CANCELLED or kind is OutcomeKind.EXPIRED
                else "failed"
            )
            m.stats[what] += 1
            m.prio_stats[(call.priority or 0, what)] += 1
        if call.state is _QUEUED:
            self._unqueue(call, CallState.DONE)
        else:
            call._move(CallState.DONE)
        self.calls.pop(call.id, None)
        if call.hedge:
            self._hedging.pop(call.id, None)
        out.append(_new(Resolve, (call, outcome)))
        if not call.holders:
            out.append(_new(Release, (call,)))

    def _enqueue(self, call: Call, front: bool = False) -> None:
        model = self._model(call.model)
        q = model.queue
        q[call.id] = call
        c = model.by_class.get(call.priority or 0)
        if c is None:
            c = model.by_class[call.priority or 0] = collections.OrderedDict()
        c[call.id] = call
        if front:
            q.move_to_end(call.id, last=False)
            c.move_to_end(call.id, last=False)
        call._move(CallState.QUEUED)
        self.n_queued += 1

    def _unqueue(self, call: Call, to: CallState = CallState.RUNNING) -> None:
        """Out of the queue: running (dispatched, or still held by a retried
        attempt) or done."""
        model = self.models[call.model]
        del model.queue[call.id]
        p = call.priority or 0
        c = model.by_class[p]
        del c[call.id]
        if not c:
            del model.by_class[p]
        call._move(to)
        self.n_queued -= 1

    # ------------------------------------------------------------ callers

    def submit(self, call: Call, now: float = 0.0) -> list[Action]:
        """A caller's new call. Raises (and stores nothing) when the hub is
        closing, the queue is full, the model is known to be unavailable, or
        its workers batch and the call does not fit a batch (TypeError)."""
        if self.closing:
            raise HubClosedError("the hub is closed")
        model = self._model(call.model)
        if model.unavailable is not None and not model.workers:
            err = NoWorkersError(str(model.unavailable))
            err.__cause__ = model.unavailable.__cause__
            raise err
        if (call.stream or not call.single) and model.batched:
            raise TypeError(
                f"model {call.model!r} is batched: a request takes exactly one positional argument and no "
                "keyword arguments, and cannot be streamed"
            )
        if call.priority is None:
            call.priority = self.default_priorities.get(call.model, 0)
        prio = call.priority
        out: list[Action] = []
        victim: Optional[Call] = None
        if self.max_queued is not None and self.n_queued >= self.max_queued:
            if not any(w.load < w.slots and not w.leaving for w in model.workers.values()):
                victim = self._displaced(model, prio)
                if victim is None:
                    pred = self.predicted_wait(model.name, prio)
                    self._count_shed(model, "shed_max_queued", prio)
                    raise QueueFullError(
                        f"{self.n_queued} requests are already queued (max_queued={self.max_queued})",
                        retry_after=pred[0] if pred else 0.0,
                    )
        if call.id in self.calls:
            raise ValueError(f"call id {call.id} is already in use")
        timeout = call.timeout if call.timeout is not None else self.default_timeouts.get(call.model)
        if timeout is not None:
            call.timeout = timeout
            call.deadline = now + timeout
            final = call.final_deadline
            if final is not None:
                pred = self.predicted_wait(model.name, prio, now)
                if pred is not None and not self.admits(pred, final - now):
                    # Admission control: shed now rather than queue what cannot be served in time.
                    wait, service = pred
                    left = final - now
                    call.deadline = None
                    self._count_shed(model, "shed_deadline", prio)
                    if service >= left:
                        raise OverloadedError(
                            f"model {model.name!r} takes about {service:.3f} s a call: more than this call's "
                            f"deadline ({left:.3f} s)",
                            retry_after=max(0.001, wait),
                            reason="deadline",
                        )
                    raise OverloadedError(
                        f"model {model.name!r} is overloaded: the predicted wait ({wait:.3f} s for "
                        f"{self._ahead(model, prio)} queued ahead) exceeds {self.queue_share:.0%} of the time "
                        f"this call has left after its service time ({left:.3f} - {service:.3f} s)",
                        retry_after=max(0.001, wait - self.queue_share * (left - service)),
                        reason="deadline",
                    )
        if victim is not None:
            self._displace(model, victim, prio, out)
        if call.deadline is not None:
            heapq.heappush(self._deadlines, (call.deadline, call.id))
        if model.hedge and not call.hedge and not call.stream:
            call.hedge = 1
        self.calls[call.id] = call
        call.t0 = now
        model.stats["requests"] += 1
        model.prio_stats[(prio, "requests")] += 1
        call.mark = model.passed[prio]
        if model.batch_wait:
            call.queued_at = now  # only a batch that may wait needs it
        self.stats["submitted"] += 1
        if not model.queue and call.deadline is None and call.origin is None and self._send_to_idle(model, call, now, out):
            return out
        self._enqueue(call)
        if model.workers and not model.full:
            self._dispatch(model, now, out)
        self._absence(model, now)
        if call.origin is not None and call.queued:
            self._self_wait(model, out)
        return out

    def _send_to_idle(self, model: _Model, call: Call, now: float, out: list[Action]) -> bool:
        """The common case of submit: nothing waits ahead, and the first
        worker is idle and unbatched (a batched one may wait to fill its
        batch). The call is sent as _dispatch would send it, without the
        queue and the scan. False: it goes through the queue."""
        if self.closing:
            return False
        for w in model.workers.values():
            if w.units or w.leaving:
                continue
            if w.batch_size != 1:
                return False
            call._move(CallState.QUEUED)
            call._move(CallState.RUNNING)
            self._start_unit(model, w, [call], now, out)
            model.absent_since = None  # a worker is there
            return True
        return False

    def _hedge_due(self, now: float, out: list[Action]) -> None:
        """Running calls that may be hedged, past their model's p95 service
        time, with an idle worker of the model: a second attempt goes out
        (the first answer of either wins). One hedge per call, at most."""
        for cid, call in list(self._hedging.items()):
            m = self.models.get(call.model)
            if call.done or call.queued or len(call.holders) != 1 or m is None:
                del self._hedging[cid]
                continue
            if m.hedge_after is None or now - call.sent_at < m.hedge_after:
                continue
            holder = call.holders[0]
            if not any(w.id != holder and not w.leaving and w.load == 0 for w in m.workers.values()):
                continue  # no idle worker: a hedge would only queue behind the others
            del self._hedging[cid]
            call.hedge = 2
            self.stats["hedged"] += 1
            m.stats["hedged"] += 1
            self._enqueue(call, front=True)
            self._dispatch(m, now, out)

    def _next_hedge(self) -> Optional[float]:
        best: Optional[float] = None
        for call in self._hedging.values():
            m = self.models.get(call.model)
            if m is not None and m.hedge_after is not None and not call.done:
                t = call.sent_at + m.hedge_after
                best = t if best is None else min(best, t)
        return best

    def _self_wait(self, model: _Model, out: list[Action]) -> None:
        """Calls a model's own workers made to it, queued while every worker
        of the model is busy waiting on such a call: none can ever be served
        (a model calling itself with no worker free). They fail at once,
        saying so, rather than wait forever or until their deadline.

        A worker counts as waiting when it has one slot (a sync model), is
        running, and a call it made to this model is still open; a worker
        with more slots (an async model) may free one: never counted."""
        live = [w for w in model.workers.values() if not w.leaving]
        if not live:
            return
        waiting = {c.origin for c in self.calls.values() if c.origin is not None and c.model == model.name}
        if not all(w.slots == 1 and w.load >= 1 and w.token is not None and w.token in waiting for w in live):
            return
        for call in [c for c in model.queue.values() if c.origin is not None and not c.holders]:
            err = NoWorkersError(
                f"every worker of model {model.name!r} is busy waiting on a call it made to {model.name!r} itself, "
                "so none is free to serve it (a model calling itself can wait on itself): give the model more "
                "workers than it makes nested calls to itself, or call another model"
            )
            self._resolve(call, Outcome(OutcomeKind.EXCEPTION, err), out)

    def admits(self, pred: tuple[float, float], left: float) -> bool:
        """Admission: whether a call with ``left`` seconds to its deadline
        and a predicted (wait, service) is queued rather than shed."""
        wait, service = pred
        return service < left and wait <= self.queue_share * (left - service)

    def _count_shed(self, model: _Model, reason: str, priority: int = 0) -> None:
        self.stats[reason] += 1
        model.stats[reason] += 1
        model.prio_stats[(priority, "shed")] += 1

    @staticmethod
    def _displaced(model: _Model, priority: int) -> Optional[Call]:
        """The queue is full (max_queued): a new call of a higher class than
        some queued call of its model takes the place of the newest queued
        call of the lowest class, rather than be refused. Which one (None:
        none is lower)."""
        for p in sorted(model.by_class):
            if p >= priority:
                break
            for victim in reversed(model.by_class[p].values()):
                if not victim.holders:  # (a retry has an attempt running: not that one)
                    return victim
        return None

    def _displace(self, model: _Model, victim: Call, priority: int, out: list[Action]) -> None:
        p = victim.priority or 0
        self._count_shed(model, "shed_max_queued", p)
        err = QueueFullError(
            f"{self.n_queued} requests are queued (max_queued={self.max_queued}): this one "
            f"(gibbs_priority={p}) gave its place to a call of a higher priority ({priority})",
            retry_after=0.0,
        )
        self._resolve(victim, Outcome(OutcomeKind.EXCEPTION, err), out)

    @staticmethod
    def _ahead(model: _Model, priority: int) -> int:
        """Calls a call of class ``priority`` submitted now waits behind:
        those queued of its class or higher, and the lower ones the
        starvation bound lets through meanwhile."""
        by_class = model.by_class
        if not by_class:
            return 0
        if len(by_class) == 1 and priority in by_class:
            return len(model.queue)
        ge = lt = 0
        for p, q in by_class.items():
            if p >= priority:
                ge += len(q)
            else:
                lt += len(q)
        return ge + min(lt, ge // STARVATION_BOUND)

    def predicted_wait(
        self, model_name: str, priority: int = 0, now: Optional[float] = None
    ) -> Optional[tuple[float, float]]:
        """(wait, service): how long a call of class ``priority`` submitted
        now would wait for a worker (the calls queued ahead of it, see
        ``_ahead``, over the model's measured throughput) and its service
        time. A worker not measured yet counts as the measured ones' mean;
        None until one is (nothing is predicted from nothing). ``now``: for
        a batched model, the time left of the batches running counts too."""
        model = self.models.get(model_name)
        if model is None:
            return None
        rate = 0.0
        service: Optional[float] = None
        free = False
        measured = unmeasured = 0
        for w in model.workers.values():
            if w.leaving or w.relay:
                continue
            free = free or w.load < w.slots
            if w.ewma is None or w.ewma <= 0.0:
                unmeasured += 1
                continue
            # Units of one worker end ewma apart (its slots overlap): batch_size calls each.
            rate += w.batch_size / w.ewma
            service = w.ewma if service is None else min(service, w.ewma)
            measured += 1
        if service is None:
            return None
        rate += unmeasured * rate / measured
        ahead = self._ahead(model, priority)
        if free and not ahead:
            return (0.0, service)
        live = [w for w in model.workers.values() if not (w.leaving or w.relay)]
        batch = sum(w.batch_size for w in live)
        if batch > len(live):
            # Batched: a call waits for the batch running to end (by its
            # measured service time), then for the whole rounds of batches
            # ahead of it, not for each item (those of its own batch run
            # with it). A call that would come too late for the next batch
            # is shed at once rather than take a place it cannot use.
            residual = 0.0
            if now is not None and not free:
                ends = [w.last_done + w.ewma - now for w in live if w.ewma is not None]
                residual = max(0.0, min(ends)) if ends else 0.0
            return (residual + (ahead // batch) * batch / rate, service)
        return (ahead / rate, service)

    def cancel(self, call: Call, outcome: Outcome = CANCELLED) -> list[Action]:
        """The caller gave up (cancelled, timed out). A queued call leaves the
        queue and is never sent; a running one is done, and its answer will
        be dropped."""
        out: list[Action] = []
        if call.done:
            return out
        self.stats["cancelled" if call.queued and not call.holders else "abandoned"] += 1
        self._stop_holders(call, out)
        self._resolve(call, outcome, out)
        return out

    def client_gone(self, calls: Sequence[Call]) -> list[Action]:
        """A client hub went away (its process died, closed, or this router
        is closing and hands its calls back): its calls are cancelled, so
        that queued ones never run and running ones are stopped (it sends
        them again to whichever hub takes the address over, if it can)."""
        out: list[Action] = []
        for call in calls:
            out.extend(self.cancel(call))
        return out

    def _stop_holders(self, call: Call, out: list[Action]) -> None:
        """The caller is gone: every worker running it is told to stop (a
        stream's generator is closed, an async model's coroutine cancelled,
        a relay removes it from its queue; a sync model cannot be stopped
        and ignores it: its answer is dropped)."""
        for wid in call.holders:
            out.append(Stop(wid, call))

    def consumed(self, call: Call, n: int) -> list[Action]:
        """The caller of a stream took ``n`` more chunks: credit the worker."""
        if call.done or not call.holders:
            return []
        return [Credit(call.holders[0], call, n)]

    def chunk(self, worker_id: Hashable, call_id: int, chunk: Outcome) -> list[Action]:
        """The worker yielded one item of a stream. Dropped when the caller
        is gone (a Stop is on its way) or the worker does not hold the call."""
        w = self.workers.get(worker_id)
        if w is None:
            return []
        call = w.held.get(call_id)
        if call is None or call.done or not call.stream:
            return []
        call.delivered += 1
        return [Deliver(call, chunk)]

    def resend(self, call: Call, now: float = 0.0) -> list[Action]:
        """gibbs_retries: the caller's timeout passed with retries left. A
        call still queued keeps its place; a running one is queued again at
        the front for a second attempt on another worker, and the first
        answer of any attempt wins."""
        out: list[Action] = []
        self._retry(call, now, out)
        return out

    def _retry(self, call: Call, now: float, out: list[Action]) -> None:
        if call.done or call.queued or call.stream:
            return  # a stream is never run twice at once: its chunks would mix
        if self.closing:
            return
        relays = [wid for wid in call.holders if (w := self.workers.get(wid)) is not None and w.relay]
        if relays:
            # The hub upstream owns the attempts: it sends it again to another of its workers.
            out.extend(Resend(wid, call) for wid in relays)
            return
        self.stats["resent"] += 1
        self.models[call.model].stats["resent"] += 1
        self._enqueue(call, front=True)
        self._dispatch(self.models[call.model], now, out)

    # ------------------------------------------------------------ deadlines

    def _window_passed(self, call: Call, now: float, out: list[Action]) -> None:
        """The call's attempt window ended: with retries left, another window
        opens (a running call gets a second attempt on another free worker;
        a queued one keeps its place); else it expires."""
        assert call.timeout is not None and call.deadline is not None
        opened = False
        while call.retries != 0 and not call.stream and call.deadline <= now:
            if call.retries > 0:
                call.retries -= 1
            call.windows += 1
            call.deadline += call.timeout
            opened = True
        if call.deadline > now:
            heapq.heappush(self._deadlines, (call.deadline, call.id))
            if opened:
                self._retry(call, now, out)
            return
        self._expire(call, now, out, "")

    def _expire(self, call: Call, now: float, out: list[Action], detail: str) -> None:
        """Fail ``call`` on its deadline: "in the queue" when no worker
        holds it, else the model took too long (its workers are told to
        stop, when they can)."""
        in_queue = not call.holders
        reason = "expired_queued" if in_queue else "expired_running"
        # Counted as the caller giving up too (as when the caller's own timer ended it).
        self.stats["cancelled" if call.queued and not call.holders else "abandoned"] += 1
        self.stats[reason] += 1
        self.models[call.model].stats[reason] += 1
        self.models[call.model].prio_stats[(call.priority or 0, "expired")] += 1
        self._stop_holders(call, out)
        assert call.timeout is not None
        absent = in_queue and self.models[call.model].absent()
        expired = Expired(call.model, in_queue, call.timeout, call.windows, detail, absent)
        self._resolve(call, Outcome(OutcomeKind.EXPIRED, expired), out)

    def _expire_due(self, now: float, out: list[Action]) -> None:
        heap = self._deadlines
        calls = self.calls
        while heap and heap[0][0] <= now:
            deadline, cid = heapq.heappop(heap)
            call = calls.get(cid)
            if call is not None and call.deadline == deadline:
                self._window_passed(call, now, out)

    # ------------------------------------------------------------ workers

    def worker_joined(self, worker: WorkerInfo, now: float = 0.0, batch_wait: float = 0.0) -> list[Action]:
        out: list[Action] = []
        if worker.id in self.workers:
            raise ValueError(f"worker {worker.id!r} joined twice")
        if self.closing:
            out.append(Refuse(worker.id, "the hub is closing"))
            return out
        model = self._model(worker.model)
        rolling = model.next_cls is not None and same_class(worker.cls, model.next_cls)
        if model.workers and not same_class(worker.cls, model.cls) and not rolling:
            out.append(
                Refuse(
                    worker.id,
                    f"model {worker.model!r} is already served by class {model.cls}, "
                    f"not {worker.cls}: start this worker under another model name (gibbs_model=...)",
                )
            )
            return out
        batched = {w.batch_size > 1 for w in model.workers.values()}
        if batched and (worker.batch_size > 1) not in batched:
            out.append(
                Refuse(
                    worker.id,
                    f"model {worker.model!r} is served {'with' if True in batched else 'without'} batching; "
                    f"this worker {'batches' if worker.batch_size > 1 else 'does not batch'}: one name, "
                    "one way of calling the model",
                )
            )
            return out
        if not model.workers:
            model.cls = worker.cls
            model.batch_wait = batch_wait
        model.unavailable = None
        model.workers[worker.id] = worker
        self.workers[worker.id] = worker
        worker.last_done = now
        model.absent_since = None
        model.full = False
        self._dispatch(model, now, out)
        return out

    def worker_leaving(self, worker_id: Hashable, now: float = 0.0) -> list[Action]:
        """The worker said goodbye: it answered what it started; what it
        holds was never started and goes back to the front of the queue."""
        out: list[Action] = []
        w = self.workers.get(worker_id)
        if w is None or w.leaving:
            return out
        w.leaving = True
        self._take_back(w, penalty=None, out=out)
        self._dispatch(self.models[w.model], now, out)
        self._absence(self.models[w.model], now)
        return out

    def worker_lost(self, worker_id: Hashable, reason: str, now: float = 0.0) -> list[Action]:
        """The worker's connection ended (death, lost host, silence, or its
        exit after a goodbye). The units it was running count one attempt
        each; the rest go back to the queue without penalty."""
        out: list[Action] = []
        w = self.workers.pop(worker_id, None)
        if w is None:
            return out
        model = self.models[w.model]
        del model.workers[worker_id]
        if not w.leaving:
            self.stats["deaths"] += 1
        self._take_back(w, penalty=None if w.leaving else reason, out=out)
        self._dispatch(model, now, out)
        self._absence(model, now)
        return out

    def upstream_lost(self, relay_ids: Sequence[Hashable], now: float = 0.0) -> list[Action]:
        """A client hub lost its router: the relays standing for it go, and
        every call they held goes back to the front of the queue with no
        attempt counted (the router's workers may live on: losing the router
        is not their death). Once a relay stands for the router again, the
        calls go to it."""
        out: list[Action] = []
        models: list[_Model] = []
        for relay_id in relay_ids:
            w = self.workers.pop(relay_id, None)
            if w is None:
                continue
            assert w.relay, f"{w.describe} is not a relay"
            model = self.models[w.model]
            del model.workers[relay_id]
            w.leaving = True
            self._take_back(w, penalty=None, out=out)
            if model not in models:
                models.append(model)
        for model in models:
            self._dispatch(model, now, out)
            self._absence(model, now)
        return out

    def _take_back(self, w: WorkerInfo, penalty: Optional[str], out: list[Action]) -> None:
        running: set[int] = set()
        if penalty is not None:
            for unit in list(w.units)[: w.slots]:
                running.update(unit)
        # Front of the queue, in the order they were sent.
        back: list[Call] = []
        for call_id, call in w.held.items():
            call.holders = _without(call.holders, w.id)
            if call.done:
                if not call.holders:
                    out.append(Release(call))
                continue
            if call.stream and call.delivered:
                # Its caller has chunks already: a second run would repeat them.
                self.stats["failed"] += 1
                failures = [f"{w.describe}: {penalty or 'left'}"]
                cut = WorkerDiedError(f"the stream was cut after {call.delivered} chunks: {failures[0]}", failures)
                self._resolve(call, Outcome(OutcomeKind.EXCEPTION, cut), out)
                continue
            if call_id in running:
                call.attempts += 1
                if call.failures is None:
                    call.failures = []
                call.failures.append(f"{w.describe}: {penalty}")
                if call.attempts >= self.max_attempts and not call.holders:
                    self.stats["failed"] += 1
                    self._resolve(call, Outcome(OutcomeKind.EXCEPTION, self._died_error(call)), out)
                    continue
                self.stats["retried"] += 1
                self.models[call.model].stats["retried"] += 1
            if call.holders or call.queued:
                continue  # another attempt is on its way
            if self.closing:
                err = HubClosedError(
                    f"the hub was closing when {w.describe} left with this request"
                    + (f" ({penalty})" if penalty else "")
                )
                self._resolve(call, Outcome(OutcomeKind.EXCEPTION, err), out)
                continue
            back.append(call)
        w.held.clear()
        w.streams = 0
        w.units.clear()
        for call in reversed(back):
            self._enqueue(call, front=True)

    def _died_error(self, call: Call) -> WorkerDiedError:
        failures = call.failures or []
        n = len(failures)
        msg = (
            f"the request was lost with the worker that ran it, {n} time{'s' if n != 1 else ''} "
            f"(max_attempts={self.max_attempts}):\n  " + "\n  ".join(failures)
        )
        return WorkerDiedError(msg, list(failures))

    def answered(self, worker_id: Hashable, call_id: int, outcome: Outcome, now: float = 0.0) -> list[Action]:
        """The worker answered one call. The first answer of any attempt
        resolves it; later ones are dropped. An answer for a call the worker
        does not hold is dropped too (a confused or hostile peer)."""
        out: list[Action] = []
        w = self.workers.get(worker_id)
        if w is None:
            return out
        call = w.held.pop(call_id, None)
        if call is None:
            return out
        if call.stream:
            w.streams -= 1
        holders = call.holders
        call.holders = () if holders == (worker_id,) else _without(holders, worker_id)
        # Free the unit once every call in it is answered.
        for unit in w.units:
            if call_id in unit:
                unit.remove(call_id)
                if not unit:
                    w.units.remove(unit)
                    service = now - w.last_done
                    w.ewma = service if w.ewma is None else 0.8 * w.ewma + 0.2 * service
                    w.last_done = now
                break
        w.served += 1
        m = self.models[w.model]  # the call's model: a worker serves one
        # w may have room now; if the model was full, only w can have.
        was_full, m.full = m.full, False
        if call.state is _DONE:
            if not call.holders:
                out.append(_new(Release, (call,)))
        else:
            self.stats["completed" if outcome.kind is not OutcomeKind.ERROR else "errors"] += 1
            m.latency.add(now - call.t0)
            if call.dispatched:
                n = m.n_service
                if n < HEDGE_SAMPLES:
                    m.service.append(now - call.sent_at)
                else:
                    m.service[n % HEDGE_SAMPLES] = now - call.sent_at
                m.n_service = n = n + 1
                if n % HEDGE_EVERY == 0 and n >= HEDGE_MIN_SAMPLES:
                    m.hedge_after = _quantile(sorted(m.service), 95)
            hedged = call.hedge == 2 and len(call.holders) > 0
            self._resolve(call, outcome, out)
            if hedged:
                # The first answer won: the other attempt is stopped (an
                # async model's coroutine cancelled; a sync one's answer dropped).
                self._stop_holders(call, out)
        if m.queue and not w.leaving:
            self._dispatch(m, now, out, (w,) if was_full else None)
        return out

    def model_unavailable(self, model_name: str, error: BaseException) -> list[Action]:
        """No worker of this model can come (every local worker failed to
        build it): fail its queued calls, and new ones at once, until a
        worker of the model joins."""
        out: list[Action] = []
        model = self._model(model_name)
        if model.workers:
            return out
        model.unavailable = error
        for call in list(model.queue.values()):
            if call.holders:
                continue
            err = NoWorkersError(str(error))
            err.__cause__ = error.__cause__
            self._resolve(call, Outcome(OutcomeKind.EXCEPTION, err), out)
        return out

    def workers_loading(self, model_name: str, n: int, now: float) -> list[Action]:
        """``n`` workers announced they are building this model (they count
        as there: calls wait for them however long they load)."""
        if n < 0:
            raise ValueError("a count of loading workers is >= 0")
        model = self._model(model_name)
        model.loading = n
        self._absence(model, now)
        return []

    def roll_out(self, model_name: str, cls: Optional[str]) -> list[Action]:
        """A rolling update of the model begins (``cls``: the new version's
        class, which may then serve beside the current one) or ends
        (``None``: the model's class is the new one if only it is left)."""
        model = self._model(model_name)
        if cls is not None:
            model.next_cls = cls
            return []
        new, model.next_cls = model.next_cls, None
        live = [w for w in model.workers.values() if not w.leaving]
        if new is not None and live and all(same_class(w.cls, new) for w in live):
            model.cls = new
        return []

    def _no_worker_deadline(self, model: _Model) -> Optional[float]:
        """When the oldest queued call of an absent model has waited too long."""
        if self.no_worker_timeout is None or model.absent_since is None:
            return None
        for call in model.queue.values():
            if not call.holders:
                return max(call.t0, model.absent_since) + self.no_worker_timeout
        return None

    def _fail_absent(self, model: _Model, now: float, out: list[Action]) -> None:
        assert self.no_worker_timeout is not None and model.absent_since is not None
        for call in list(model.queue.values()):
            if call.holders:
                continue  # a running attempt may still answer
            if max(call.t0, model.absent_since) + self.no_worker_timeout > now:
                break  # FIFO: the rest came later
            err = NoWorkersError(
                f"no worker of model {model.name!r} was connected or loading for the "
                f"{self.no_worker_timeout:g} s this request waited (no_worker_timeout)"
            )
            err.model = model.name  # type: ignore[attr-defined]
            self._resolve(call, Outcome(OutcomeKind.EXCEPTION, err), out)

    # ------------------------------------------------------------ time

    def close(self, now: float, grace: float) -> list[Action]:
        """Stop taking calls; fail the queued ones; the running ones have
        until ``now + grace`` (enforced by :meth:`tick`)."""
        out: list[Action] = []
        if self.closing:
            return out
        self.closing = True
        self.close_deadline = now + max(0.0, grace)
        for model in self.models.values():
            for call in list(model.queue.values()):
                if call.holders:
                    self._unqueue(call)  # a running attempt may still answer
                    continue
                err = HubClosedError("the hub was closed before a worker took this request")
                self._resolve(call, Outcome(OutcomeKind.EXCEPTION, err), out)
        out.extend(self.tick(now))
        return out

    def tick(self, now: float) -> list[Action]:
        """Time passed: the close deadline, and batches waiting to fill."""
        out: list[Action] = []
        if self.closing:
            assert self.close_deadline is not None
            if now >= self.close_deadline:
                for call in list(self.calls.values()):
                    err = HubClosedError("the hub was closed before the worker answered (grace period over)")
                    self._resolve(call, Outcome(OutcomeKind.EXCEPTION, err), out)
            # An idle worker is let go at once: it goes back to looking for a
            # hub, and finds the one that takes the address over (if any)
            # without waiting for this one's grace period.
            for w in self.workers.values():
                if not w.held and not w.leaving and not w.relay:
                    w.leaving = True
                    out.append(Drop(w.id, "the hub is closing"))
            return out
        if self._deadlines and self._deadlines[0][0] <= now:
            self._expire_due(now, out)
        if self._hedging:
            self._hedge_due(now, out)
        for model in self.models.values():
            if model.batch_wait and model.queue and model.workers:
                self._dispatch(model, now, out)
            if model.queue and model.absent_since is not None and self.no_worker_timeout is not None:
                t = self._no_worker_deadline(model)
                if t is not None and now >= t:
                    self._fail_absent(model, now, out)
        return out

    def next_deadline(self) -> Optional[float]:
        """The earliest time at which :meth:`tick` has something to do."""
        if self.closing:
            return self.close_deadline if self.calls else None
        best: Optional[float] = None
        heap = self._deadlines
        while heap:
            deadline, cid = heap[0]
            call = self.calls.get(cid)
            if call is not None and call.deadline == deadline:
                best = deadline
                break
            heapq.heappop(heap)  # a call done, or a window that moved on
        for model in self.models.values():
            if model.batch_wait and model.queue and model.workers:
                t = next(iter(model.queue.values())).queued_at + model.batch_wait
                best = t if best is None else min(best, t)
            if model.queue and model.absent_since is not None:
                t2 = self._no_worker_deadline(model)
                if t2 is not None:
                    best = t2 if best is None else min(best, t2)
        if self._hedging:
            t3 = self._next_hedge()
            if t3 is not None:
                best = t3 if best is None else min(best, t3)
        return best

    def abort(self, error: BaseException) -> list[Action]:
        """The driver cannot go on (its thread crashed): every open call
        fails with ``error`` now, and no call is taken any more."""
        out: list[Action] = []
        self.closing = True
        if self.close_deadline is None:
            self.close_deadline = 0.0
        for call in list(self.calls.values()):
            self._resolve(call, Outcome(OutcomeKind.EXCEPTION, error), out)
        return out

    @property
    def idle(self) -> bool:
        """Nothing open: every call is done (used to finish a close early)."""
        return not self.calls

    # ------------------------------------------------------------ scheduling

    def _pick(
        self, model: _Model, exclude: Optional[set[Hashable]] = None, among: Optional[tuple[WorkerInfo, ...]] = None
    ) -> Optional[WorkerInfo]:
        """The worker to send a unit to: an idle one first, else the least
        loaded with a free slot, else (pipelining) the least loaded whose
        committed work stays under PIPELINE_WINDOW and ``depth``; of
        ``among`` only, when the caller knows no other has room. One pass:
        on every submit and answer, len(w.units) rather than the load property."""
        free: Optional[WorkerInfo] = None
        free_load = 0
        ahead: Optional[WorkerInfo] = None
        ahead_load = 0
        for w in model.workers.values() if among is None else among:
            if w.leaving or (exclude and w.id in exclude):
                continue
            load = len(w.units)
            if load < w.slots:
                if load == 0:
                    return w
                if free is None or load < free_load:
                    free = w
                    free_load = load
            elif free is None:
                ewma = w.ewma
                if ewma is None or load >= w.depth or load * ewma >= PIPELINE_WINDOW or w.streams:
                    continue  # (a stream lasts as long as its consumer: nothing queues behind it)
                if ahead is None or load < ahead_load:
                    ahead = w
                    ahead_load = load
        return free if free is not None else ahead

    def _dispatch(
        self, model: _Model, now: float, out: list[Action], among: Optional[tuple[WorkerInfo, ...]] = None
    ) -> None:
        """Send queued calls while a worker has room (of ``among`` only: the
        others have none, as the model was full)."""
        if self.closing:
            return
        queue = model.queue
        skip: Optional[set[Hashable]] = None
        while queue:
            w = self._pick(model, skip, among)
            if w is None:
                if skip is None:
                    model.full = True
                return
            if w.batch_size > 1 and model.batch_wait and len(queue) < w.batch_size:
                first = next(iter(queue.values()))
                if now < first.queued_at + model.batch_wait:
                    return  # wait to fill the batch (tick will come back)
            calls: list[Call] = []
            late: Optional[list[Call]] = None
            # What the worker needs to answer a call sent now: its service
            # time, and the units committed to it before (pipelining).
            load = len(w.units)
            est = 0.0 if w.ewma is None or w.relay else w.ewma * (1 + load // w.slots)
            full = load >= w.slots
            order = (
                (queue.values() if self.discipline == "fifo" else reversed(queue.values()))
                if len(model.by_class) <= 1
                else self._order(model)
            )
            for call in order:
                # A worker already holding an attempt of a call (a retry)
                # would gain nothing from a second one: leave it for another.
                # Nor is a call ever queued behind the call that waits on it
                # (pipelined onto its own busy worker): a free slot only.
                if w.id not in call.holders and not (full and call.origin is not None and call.origin == w.token):
                    if call.deadline is not None:
                        final = call.final_deadline
                        if final is not None and (now >= final or now + est > final):
                            # It cannot finish in time: never sent, failed now.
                            if late is None:
                                late = []
                            late.append(call)
                            continue
                    calls.append(call)
                    if len(calls) >= w.batch_size:
                        break
            if late is not None:
                for call in late:
                    assert call.final_deadline is not None
                    self._expire(
                        call, now, out,
                        f"{max(0.0, call.final_deadline - now):.3f} s left and the model takes about {est:.3f} s",
                    )
            for call in calls:
                self._unqueue(call)
            if not calls:
                if late is None:
                    skip = (skip or set()) | {w.id}
                continue
            self._start_unit(model, w, calls, now, out)

    def _start_unit(self, model: _Model, w: WorkerInfo, calls: list[Call], now: float, out: list[Action]) -> None:
        """``calls`` (out of the queue) go to ``w`` as one unit: it holds an
        attempt of each, their first send is noted, and a Send goes out."""
        if not w.units:
            w.last_done = now
        w.units.append([c.id for c in calls] if len(calls) > 1 else [calls[0].id])
        for call in calls:
            call.holders += (w.id,)
            w.held[call.id] = call
            if call.stream:
                w.streams += 1
            if not call.dispatched:
                call.dispatched = True
                call.sent_at = now
                model.queue_wait.add(now - call.t0)
                if call.hedge == 1 and not call.stream:
                    self._hedging[call.id] = call
        if w.batch_size > 1:
            model.batch_sizes[len(calls)] += 1
        if model.by_class:
            # This unit passed the calls of lower classes still queued.
            top = max(c.priority or 0 for c in calls) if len(calls) > 1 else calls[0].priority or 0
            if top:
                passed = model.passed
                for p in model.by_class:
                    if p < top:
                        passed[p] += 1
        out.append(_new(Send, (w.id, tuple(calls))))

    def _order(self, model: _Model) -> Iterator[Call]:
        """The order a free worker takes a model's queued calls in when they
        are of several classes: first the calls passed ``STARVATION_BOUND``
        times by higher classes (the lowest class first, oldest first), then
        by class, higher first, in the discipline's order within a class."""
        by_class = model.by_class
        classes = sorted(by_class)
        top = classes[-1]
        passed = model.passed
        for p in classes[:-1]:
            bound = passed[p] - STARVATION_BOUND
            for call in by_class[p].values():
                if call.mark > bound:
                    break  # submitted later, passed fewer times
                yield call
        fifo = self.discipline == "fifo"
        for p in reversed(classes):
            q = by_class[p]
            bound = passed[p] - STARVATION_BOUND
            for call in q.values() if fifo else reversed(q.values()):
                if p != top and call.mark <= bound:
                    continue  # taken above
                yield call

    # ------------------------------------------------------------ views

    def oldest_queued(self, now: float, model: Optional[str] = None) -> float:
        """Seconds the oldest call still queued (of ``model``) has waited."""
        oldest = None
        for m in self.models.values() if model is None else [self.models[model]] if model in self.models else []:
            for call in m.queue.values():
                if not call.holders:
                    oldest = call.t0 if oldest is None else min(oldest, call.t0)
                    break  # FIFO: the first call not on a retry is the oldest
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def priority_stats(self, model_name: str) -> dict[str, dict[str, int]]:
        """Per priority class of the model (those it has seen): requests,
        their outcomes (completed, errors, failed, cancelled; expired and
        shed counted apart too) and how many are queued now."""
        m = self.models.get(model_name)
        if m is None:
            return {}
        seen = sorted({p for p, _ in m.prio_stats} | set(m.by_class))
        out: dict[str, dict[str, int]] = {}
        for p in seen:
            entry = {what: m.prio_stats[(p, what)] for what in _PRIO_COUNTS}
            entry["queued"] = len(m.by_class.get(p, ()))
            out[str(p)] = entry
        return out

    def queued(self, model: Optional[str] = None) -> int:
        if model is None:
            return self.n_queued
        m = self.models.get(model)
        return len(m.queue) if m else 0

    def check_invariants(self) -> None:
        """Assert every rule of the lifecycle (property tests call this after
        every event)."""
        n = 0
        for name, model in self.models.items():
            for cid, call in model.queue.items():
                assert call.queued and not call.done, call
                assert call.id == cid and call.model == name
                assert self.calls.get(cid) is call, call
                assert model.by_class[call.priority or 0][cid] is call, call
            assert sum(len(q) for q in model.by_class.values()) == len(model.queue)
            assert all(model.by_class.values()), "an empty class is kept"
            for p, q in model.by_class.items():
                assert list(q) == [cid for cid, c in model.queue.items() if (c.priority or 0) == p], "class order"
            n += len(model.queue)
            for wid, w in model.workers.items():
                assert self.workers[wid] is w and w.model == name
                if model.full and not w.leaving:
                    load = len(w.units)
                    room = load < w.slots or (
                        w.ewma is not None and load < w.depth and load * w.ewma < PIPELINE_WINDOW and not w.streams
                    )
                    assert not room, f"model {name!r} is marked full while {w.describe} (load {load}) has room"
            if model.absent_since is not None:
                assert model.absent(), f"model {name!r} has a worker but is marked absent"
            elif any(not c.holders for c in model.queue.values()):
                assert not model.absent(), f"calls of {name!r} wait with no worker, and no clock runs for them"
        assert n == self.n_queued
        for cid, call in self._hedging.items():
            assert call.hedge == 1 and not call.done and self.calls.get(cid) is call, call
        if self.closing:
            assert n == 0, "a call was queued while the hub was closing: nothing would ever send it"
        for call in self.calls.values():
            assert call.state is (CallState.QUEUED if call.id in self.models[call.model].queue else CallState.RUNNING)
            assert call.queued or call.holders, f"{call} is neither queued nor held"
            for wid in call.holders:
                assert wid in self.workers, f"{call} held by a worker that is gone"
            if self.closing:
                assert self.close_deadline is not None
        for wid, w in self.workers.items():
            assert w.load <= w.depth, f"{w.describe} holds {w.load} units, over {w.depth}"
            ids = [cid for unit in w.units for cid in unit]
            assert sorted(ids) == sorted(w.held), (ids, list(w.held))
            assert w.streams == sum(1 for c in w.held.values() if c.stream), (w.streams, list(w.held.values()))
            for unit in w.units:
                assert 0 < len(unit) <= w.batch_size
            if w.token is not None:
                for unit in list(w.units)[w.slots:]:
                    for cid in unit:
                        assert w.held[cid].origin != w.token, "a call was queued behind the call that waits on it"
            for cid, call in w.held.items():
                assert call.holders.count(wid) == 1
                assert call.model == w.model, f"{w.describe} holds a call of model {call.model!r}"
                if not call.done:
                    assert self.calls.get(cid) is call

