"""Delivery to callers: the sinks a call's outcome reaches, and turning an
outcome into the caller's value or exception.

* an asyncio caller's future, resolved on its own loop (one
  ``call_soon_threadsafe`` per loop per hand-over, or in place from the
  loop that reads the worker sockets itself); the result is unpickled
  there, by the caller;
* ``submit()``'s future (:class:`_SubmitFuture`: no Condition until someone
  waits), resolved on the bridge's delivery thread, where its callbacks run,
  or by the thread blocked in its ``result()`` when it has none (one
  thread woken, not two);
* a stream's sinks (:class:`_AsyncStream`, :class:`StreamIterator`), which
  credit the worker as their consumer takes items.

``_unwrap`` is the one place an outcome becomes a value or an exception
(the model's, rebuilt from its error record; the hub's own).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import pickle
import queue
import threading
from typing import Any, Optional

from . import protocol
from .bridge import Bridge
from .core import Call, Expired, Outcome, OutcomeKind
from .errors import (
    DeadlineExceededError,
    GibbsError,
    SerializationError,
    UserCodeException,
)

_PENDING = concurrent.futures._base.PENDING
_RUNNING = concurrent.futures._base.RUNNING
_CANCELLED = concurrent.futures._base.CANCELLED
_CANCELLED_AND_NOTIFIED = concurrent.futures._base.CANCELLED_AND_NOTIFIED
_FINISHED = concurrent.futures._base.FINISHED
_WAITING = (_PENDING, _RUNNING)  # not yet settled
_CONDITION_LOCK = threading.Lock()

#: A stream's consumer credits the worker every this many items (half the window).
_CREDIT_EVERY = max(1, protocol.STREAM_WINDOW // 2)


class _SubmitFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future ``submit`` returns: cancelling it while the request is
    queued removes the request (it never runs). No done-callback per
    request: a queue of 100 000 costs no 100 000 closures."""

    _gibbs_bridge: Optional[Bridge] = None
    _gibbs_call: Optional[Call] = None
    _gibbs_waiting = 0  # threads blocked in result() or exception() (under the Condition)
    _gibbs_raw: Optional[Outcome] = None  # the outcome handed to one of them, still pickled

    def __init__(self) -> None:  # noqa: D107 - Future.__init__ but its Condition
        # A Condition (with its lock, deque and bound methods) is most of a
        # Future's 2 KiB; a queued request needs none until someone waits on
        # it or it is done: made on first use, below.
        self._state = _PENDING
        self._result = None
        self._exception: Optional[BaseException] = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self.__dict__.get("_cond")
        if cond is None:
            with _CONDITION_LOCK:
                cond = self.__dict__.get("_cond")
                if cond is None:
                    cond = self.__dict__["_cond"] = threading.Condition()
        return cond

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        _start_or_notify_cancel(self)  # wait() and as_completed() see it at once
        call = self._gibbs_call
        if call is not None and self._gibbs_bridge is not None:
            self._gibbs_bridge.cancel(call)
        return True

    def result(self, timeout: Optional[float] = None) -> Any:
        if not self.done():
            self._gibbs_blocking()
            self._gibbs_wait(timeout)
            return super().result(0)  # done, or the time is up
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if not self.done():
            self._gibbs_blocking()
            self._gibbs_wait(timeout)
            return super().exception(0)
        return super().exception(timeout)

    def _gibbs_wait(self, timeout: Optional[float]) -> None:
        """Wait for the outcome; when the bridge hands it to this waiting
        thread (see :func:`_offer_sync`: the future is RUNNING from then
        on, so that ``cancel()`` cannot drop an answer that came), unpickle
        it and settle the future here: the delivery thread is not woken in
        between. Done-callbacks, even one added meanwhile, still run on the
        delivery thread, and so does the settling when this thread is
        interrupted (KeyboardInterrupt) with the outcome in hand."""
        cond = self._condition
        raw: Optional[Outcome] = None
        try:
            with cond:
                self._gibbs_waiting += 1
                try:
                    cond.wait_for(lambda: self._state not in _WAITING or self._gibbs_raw is not None, timeout)
                finally:
                    self._gibbs_waiting -= 1
                    raw, self._gibbs_raw = self._gibbs_raw, None
            if raw is not None:
                self._gibbs_settle(raw)
                raw = None
        except BaseException:
            bridge = self._gibbs_bridge
            if raw is not None and bridge is not None:
                taken = raw
                bridge.run_on_delivery(lambda: self._gibbs_settle(taken))
            raise

    def _gibbs_settle(self, raw: Outcome) -> None:
        """Unpickle the outcome handed over and settle the future with it."""
        value: Any = None
        error: Optional[BaseException] = None
        try:
            value = _unwrap(raw)
        except BaseException as exc:  # noqa: BLE001 - the caller's to see
            error = exc
        cond = self._condition
        with cond:
            if self._state is not _RUNNING:
                return  # settled already (by an interrupted waiter's hand-off)
            self._result, self._exception = value, error
            self._state = _FINISHED
            for waiter in self._waiters:
                if error is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            cond.notify_all()
            callbacks = bool(self._done_callbacks)
        if callbacks and self._gibbs_bridge is not None:
            self._gibbs_bridge.run_on_delivery(self._invoke_callbacks)  # type: ignore[attr-defined]

    def _gibbs_blocking(self) -> None:
        """About to block: if this thread runs the loop that reads the
        workers, that loop cannot read the answer while it waits here; the
        bridge thread takes the sockets back at once."""
        bridge = self._gibbs_bridge
        if bridge is not None and bridge.has_home():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            bridge.leave_home(loop)


def _set_if_pending(fut: "asyncio.Future[Any]", value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _resolve_batch(batch: list[tuple["asyncio.Future[Outcome]", Outcome]]) -> None:
    """Runs on the caller's loop. An outcome nobody waits for (the caller
    was cancelled) is dropped here: an answer lent on a worker's shared
    memory goes back to its worker when its buffers are freed, now."""
    for fut, outcome in batch:
        if not fut.done():  # else cancelled meanwhile
            fut.set_result(outcome)


def _deliver_async(items: list[tuple[Call, Outcome]]) -> None:
    """Runs in the bridge thread, or in the home event loop when it read the
    answers itself: one hand-over per event loop; the running loop's own
    callers are resolved at once."""
    try:
        running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    by_loop: Optional[dict[asyncio.AbstractEventLoop, list[tuple[Any, Outcome]]]] = None
    for call, outcome in items:
        sink = call.sink
        loop = sink.get_loop()
        if loop is running:  # as _resolve_batch, without a batch
            if not sink.done():  # else cancelled meanwhile
                sink.set_result(outcome)
            continue
        if by_loop is None:
            by_loop = {}
        by_loop.setdefault(loop, []).append((sink, outcome))
    if by_loop is None:
        return
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_batch, batch)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass


def _start_or_notify_cancel(fut: "concurrent.futures.Future[Any]") -> bool:
    """``set_running_or_notify_cancel`` that may be called twice, from
    ``cancel()`` and from the delivery thread, in either order: True when
    the future was pending (now running: its outcome is to be set)."""
    with fut._condition:  # type: ignore[attr-defined]
        state = fut._state  # type: ignore[attr-defined]
        if state == _CANCELLED:
            fut._state = _CANCELLED_AND_NOTIFIED  # type: ignore[attr-defined]
            for waiter in fut._waiters:  # type: ignore[attr-defined]
                waiter.add_cancelled(fut)
            return False
        if state == _PENDING:
            fut._state = _RUNNING  # type: ignore[attr-defined]
            return True
        return False  # told already, or settled by another thread


def _offer_sync(call: Call, outcome: Outcome) -> bool:
    """Runs in the hand-over, outside the bridge's lock: a ``submit()``
    future that a thread is blocked on, with no done-callbacks, takes its
    outcome to that thread (True); else it goes to the delivery thread."""
    sink = call.sink
    if type(sink) is not _SubmitFuture or not sink._gibbs_waiting:
        return False
    with sink._condition:
        if not sink._gibbs_waiting or sink._done_callbacks or sink._state is not _PENDING:
            return False
        sink._gibbs_raw = outcome
        sink._state = _RUNNING  # answered: cancel() is refused from now on, as on the delivery thread
        sink._condition.notify_all()
    return True


def _deliver_sync(call: Call, outcome: Outcome) -> None:
    """Runs on the bridge's delivery thread: unpickles the result and runs
    the future's done-callbacks (user code) there."""
    sink = call.sink
    if type(sink) is StreamIterator:
        sink._items.put(outcome)
        return
    if not _start_or_notify_cancel(sink):
        return
    try:
        sink.set_result(_unwrap(outcome))
    except BaseException as exc:  # noqa: BLE001 - the caller's to see
        sink.set_exception(exc)


def _unwrap_chunk(value: Any) -> Any:
    try:
        return protocol.decode(value)
    except BaseException as exc:  # noqa: BLE001 - a peer's pickle may raise SystemExit: never the caller's own
        raise SerializationError(f"a streamed item could not be unpickled in the hub: {exc!r}") from exc


class _AsyncStream:
    """The sink of a stream on an event loop. Future-like where the bridge
    delivers (``get_loop``, ``done``, ``set_result``): each outcome, chunks
    then the final one, is appended in order on the caller's loop."""

    __slots__ = ("_loop", "_items", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Outcome] = collections.deque()
        self._waiter: Optional[asyncio.Future[None]] = None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return False

    def set_result(self, outcome: Outcome) -> None:
        self._items.append(outcome)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Outcome:
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()


class StreamIterator:
    """What ``hub.submit_stream`` returns: iterate it from any thread;
    ``close()`` stops the stream (the worker closes the generator)."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        self._call: Optional[Call] = None
        self._items: "queue.SimpleQueue[Outcome]" = queue.SimpleQueue()
        self._finished = False
        self._unacked = 0

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self._items.empty() and self._bridge.has_home():
            try:  # blocking in the loop that reads the workers: let the bridge read
                self._bridge.leave_home(asyncio.get_running_loop())
            except RuntimeError:
                pass
        kind, value = self._items.get()
        if kind is OutcomeKind.CHUNK:
            self._unacked += 1
            if self._unacked >= _CREDIT_EVERY and self._call is not None:
                self._bridge.consumed(self._call, self._unacked)
                self._unacked = 0
            return _unwrap_chunk(value)
        self._finished = True
        if kind is OutcomeKind.RESULT or kind is OutcomeKind.COPIED:
            raise StopIteration
        return _unwrap(Outcome(kind, value))  # raises

    def close(self) -> None:
        """Stop early (idempotent): the worker closes the generator."""
        if not self._finished:
            self._finished = True
            if self._call is not None:
                self._bridge.cancel(self._call)

    def __enter__(self) -> "StreamIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _unwrap(outcome: Outcome) -> Any:
    kind, value = outcome
    if kind is OutcomeKind.RESULT:
        try:
            return protocol.decode(value)
        except BaseException as exc:  # noqa: BLE001 - a peer's pickle may raise SystemExit: never the caller's own
            raise SerializationError(f"the result could not be unpickled in the hub: {exc!r}") from exc
    if kind is OutcomeKind.COPIED:
        pickled, buffers = value
        try:
            return pickle.loads(pickled, buffers=buffers)
        except BaseException as exc:  # noqa: BLE001 - as above
            # The error's traceback keeps this frame and the caller's (and
            # their locals) alive as long as the caller keeps the error: let
            # go of the buffers so that a lent segment goes back now.
            buffers.clear()
            exc.__traceback__ = None
            raise SerializationError(f"the result could not be unpickled in the hub: {exc!r}") from exc
    if kind is OutcomeKind.ERROR:
        raise _error_from_record(value)
    if kind is OutcomeKind.EXPIRED:
        raise _timeout_error(value)
    raise value


def _timeout_error(expired: Expired) -> DeadlineExceededError:
    """The error a caller gets when its call's deadline passed (the one place
    it is made)."""
    return DeadlineExceededError(expired.describe(), in_queue=expired.in_queue)


def _error_from_record(body: bytes) -> GibbsError:
    """The caller's exception for an ERROR frame. Its body is the worker's
    pickle: whatever it holds or raises on loading (``SystemExit`` too) ends
    as a :class:`SerializationError`, with the cause chained."""
    try:
        record = pickle.loads(body)
    except BaseException as exc:  # noqa: BLE001 - a peer's pickle: never the caller's own exception
        raise SerializationError(f"the worker's error record could not be unpickled in the hub: {exc!r}") from exc
    if not isinstance(record, dict):
        raise SerializationError(f"the worker's error record is not a record: {type(record).__name__}")
    kind = record.get("kind")
    type_name = str(record.get("type"))
    message = str(record.get("message", ""))
    tb = str(record.get("traceback", ""))
    if kind == protocol.ERR_USER:
        original: Optional[BaseException] = None
        if record.get("exception") is not None:
            try:
                loaded = pickle.loads(record["exception"])
            except BaseException:  # noqa: BLE001 - as above: the message and traceback still say what happened
                loaded = None
            original = loaded if isinstance(loaded, BaseException) else None
        err = UserCodeException(
            f"Exception raised in user-defined code: {type_name}: {message}\n"
            f"Remote traceback:\n{tb}",
            original=original,
            exc_type=type_name,
            exc_message=message,
            remote_traceback=tb,
        )
        err.__cause__ = original
        return err
    if kind == protocol.ERR_DROPPED:
        # The worker took it out of its batch: its deadline had passed there
        # (when the hub's own timer had not ended it yet).
        return DeadlineExceededError(
            "request expired in the queue: its deadline passed while its batch waited on the worker", in_queue=True
        )
    if kind == protocol.ERR_RESULT_PICKLE:
        return SerializationError(
            f"the model's return value cannot be pickled: {type_name}: {message}"
        )
    return SerializationError(f"the worker could not unpickle the arguments: {type_name}: {message}")
