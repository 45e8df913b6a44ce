"""The sans-I/O core, driven by hypothesis with random event orders: no
socket, no thread, no sleep. After every event the core's own invariants are
checked, and a model of what callers saw checks the promises from outside:
one outcome per call, cancelled-while-queued never sent, first answer wins,
everything resolved by the close deadline, nothing held for a gone caller."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gibbs.core import (
    PIPELINE_WINDOW,
    PRIORITIES,
    STARVATION_BOUND,
    Call,
    Core,
    Credit,
    Deliver,
    Drop,
    Outcome,
    OutcomeKind,
    Refuse,
    Release,
    Resolve,
    Send,
    Stop,
    WorkerInfo,
)
from gibbs.errors import HubClosedError, NoWorkersError, OverloadedError, QueueFullError, WorkerDiedError

EXAMPLES = int(os.environ.get("GIBBS_HYPOTHESIS_EXAMPLES", "800"))
MODELS = ["a", "b"]


class CoreMachine(RuleBasedStateMachine):
    """Random callers, workers and a clock against one Core."""

    @initialize(
        max_attempts=st.integers(1, 3),
        max_queued=st.one_of(st.none(), st.integers(0, 6)),
        no_worker_timeout=st.one_of(st.none(), st.sampled_from([0.005, 0.02])),
    )
    def setup(self, max_attempts: int, max_queued: Any, no_worker_timeout: Any) -> None:
        import gibbs.core

        # Hedging after a couple of answers (not 32), so that short runs reach it.
        self._hedge_consts = (gibbs.core.HEDGE_EVERY, gibbs.core.HEDGE_MIN_SAMPLES)
        gibbs.core.HEDGE_EVERY, gibbs.core.HEDGE_MIN_SAMPLES = 1, 1
        self.core = Core(max_attempts=max_attempts, max_queued=max_queued, no_worker_timeout=no_worker_timeout)
        self.now = 0.0
        self.next_call = 1
        self.next_worker = 1
        self.calls: dict[int, Call] = {}
        self.outcomes: dict[int, Outcome] = {}
        self.released: set[int] = set()
        self.resends: dict[int, int] = {}  # call id -> resends asked (the resend rules)
        self.cancelled_while_queued: set[int] = set()
        self.sent: dict[int, int] = {}  # call id -> times sent
        self.live: dict[int, WorkerInfo] = {}
        self.holding: dict[int, list[int]] = {}  # worker -> call ids sent, in order, unanswered
        self.answered_by: dict[int, set[int]] = {}  # call id -> workers that answered
        self.refused: set[int] = set()
        self.chunks: dict[int, int] = {}  # call id -> chunks delivered
        self.stopped: set[tuple[int, int]] = set()  # (worker, call) asked to stop

    def apply(self, actions: list[Any]) -> None:
        drops: list[tuple[int, str]] = []
        self._apply(actions, drops)
        for wid, reason in drops:
            self.live.pop(wid, None)
            self.holding.pop(wid, None)
            self.apply(self.core.worker_lost(wid, reason, self.now))

    def _apply(self, actions: list[Any], drops: list[tuple[int, str]]) -> None:
        # Each worker's load before these sends (the core's estimate of the
        # time to answer counts the units committed before each one).
        load = {}
        for a in actions:
            if isinstance(a, Send) and a.worker in self.live:
                load[a.worker] = load.get(a.worker, self.live[a.worker].load) - 1
        for a in actions:
            if isinstance(a, Send):
                assert a.worker in self.live, "sent to a worker that is gone"
                w = self.live[a.worker]
                assert 1 <= len(a.calls) <= w.batch_size
                est = None if w.ewma is None else w.ewma * (1 + load[a.worker] // w.slots)
                load[a.worker] += 1
                for c in a.calls:
                    assert c.id not in self.cancelled_while_queued, "a call cancelled while queued was sent"
                    final = c.final_deadline
                    if final is not None:
                        assert self.now < final, "a call past its deadline was sent"
                        if est is not None:
                            assert self.now + est <= final + 1e-9, "a call that cannot finish in time was sent"
                    assert c.id not in self.outcomes, "a call already resolved was sent"
                    assert c.model == w.model, "a call was sent to a worker of another model"
                    self.sent[c.id] = self.sent.get(c.id, 0) + 1
                    assert c.id not in self.holding[a.worker], "two attempts of one call on one worker"
                    self.holding[a.worker].append(c.id)
            elif isinstance(a, Resolve):
                assert a.call.id not in self.outcomes, "a call resolved twice"
                self.outcomes[a.call.id] = a.outcome
                if a.outcome.kind is OutcomeKind.EXCEPTION and getattr(a.outcome.value, "model", None):
                    # Failed for want of workers: only after waiting the whole timeout.
                    timeout = self.core.no_worker_timeout
                    assert timeout is not None and self.now - a.call.t0 >= timeout - 1e-9, "failed before its wait was up"
                if a.outcome.kind is OutcomeKind.EXPIRED:
                    c = a.call
                    assert c.deadline is not None
                    if not a.outcome.value.detail:  # its window ended, no retry left
                        assert self.now >= c.deadline and (c.retries == 0 or c.stream)
            elif isinstance(a, Release):
                assert a.call.id not in self.released, "released twice"
                assert a.call.id in self.outcomes, "released before its outcome"
                assert not any(a.call.id in ids for ids in self.holding.values()), "released while a worker holds it"
                self.released.add(a.call.id)
            elif isinstance(a, Refuse):
                self.refused.add(a.worker)
                self.live.pop(a.worker, None)
                self.holding.pop(a.worker, None)
            elif isinstance(a, Drop):
                # Only an idle worker, and only while closing: the driver
                # closes its connection, and its loss follows.
                assert self.core.closing, "a worker dropped while the hub is open"
                assert a.worker in self.live and not self.holding[a.worker], "dropped a worker that holds calls"
                drops.append((a.worker, a.reason))
            elif isinstance(a, Deliver):
                assert a.call.stream, "a chunk delivered for a call that is not a stream"
                assert a.call.id not in self.outcomes, "a chunk delivered after the call's outcome"
                self.chunks[a.call.id] = self.chunks.get(a.call.id, 0) + 1
            elif isinstance(a, Stop):
                assert a.worker in self.live
                self.stopped.add((a.worker, a.call.id))
            elif isinstance(a, Credit):
                assert a.worker in self.live and a.call.id not in self.outcomes

    def teardown(self) -> None:
        import gibbs.core

        if hasattr(self, "_hedge_consts"):
            gibbs.core.HEDGE_EVERY, gibbs.core.HEDGE_MIN_SAMPLES = self._hedge_consts

    @invariant()
    def a_hedged_call_has_at_most_two_attempts_from_hedging(self) -> None:
        # Hedging adds one attempt at most; a resend (a caller's retry, or a
        # client hub's RESEND to its router, whose copy has no retries of
        # its own) may add its own.
        for call in self.core.calls.values():
            if call.hedge == 2 and not call.retries:
                assert len(call.holders) <= 2 + call.attempts + self.resends.get(call.id, 0), call

    # ------------------------------------------------------------ callers

    @rule(
        model=st.sampled_from(MODELS),
        stream=st.booleans(),
        timeout=st.one_of(st.none(), st.floats(0.001, 0.03)),
        retries=st.sampled_from([0, 0, 1, 2, -1]),
        hedge=st.booleans(),
        priority=st.sampled_from([None, 0, 1, 2]),
        single=st.sampled_from([True, True, False]),
    )
    def submit(
        self, model: str, stream: bool, timeout: Any, retries: int, hedge: bool, priority: Any, single: bool
    ) -> None:
        call = Call(
            self.next_call, model, payload=b"x", stream=stream, timeout=timeout, retries=retries, priority=priority,
            single=single,
        )
        call.hedge = 1 if hedge and not stream else 0
        self.next_call += 1
        pred = self.core.predicted_wait(model, priority or 0, self.now)
        n_calls = len(self.core.calls)
        try:
            actions = self.core.submit(call, self.now)
        except OverloadedError as exc:
            # Shed at once: it gets its error now, and nothing of it is kept.
            assert call.id not in self.core.calls and len(self.core.calls) == n_calls and not call.queued
            assert exc.retry_after >= 0 and exc.reason in ("deadline", "max_queued")
            if exc.reason == "deadline":
                assert pred is not None and exc.retry_after > 0
            return
        except (HubClosedError, NoWorkersError):
            return
        except TypeError:
            # Refused at once: it does not fit the batches of its model's
            # workers; nothing of it is kept.
            m = self.core.models[model]
            assert (stream or not single) and any(w.batch_size > 1 for w in m.workers.values())
            assert call.id not in self.core.calls and len(self.core.calls) == n_calls and not call.queued
            return
        m = self.core.models[model]
        assert not ((stream or not single) and any(w.batch_size > 1 for w in m.workers.values())), (
            "a call that does not fit its model's batches was taken"
        )
        final = call.final_deadline
        if pred is not None and final is not None:
            assert pred[1] < final - self.now and pred[0] <= self.core.queue_share * (final - self.now - pred[1]), (
                "a call that the predicted wait says cannot be served in time was queued"
            )
        self.calls[call.id] = call
        self.apply(actions)

    @rule(model=st.sampled_from(MODELS), n=st.integers(2, 6))
    def burst(self, model: str, n: int) -> None:
        """Several plain calls at once: queues that workers must drain."""
        for _ in range(n):
            self.submit(model, stream=False, timeout=None, retries=0, hedge=False, priority=None, single=True)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def submit_nested(self, data: st.DataObject) -> None:
        """A worker's model calls a model (maybe its own) while it serves."""
        wid = data.draw(st.sampled_from(sorted(self.live)))
        call = Call(self.next_call, data.draw(st.sampled_from(MODELS)), payload=b"x")
        call.origin = f"t{wid}"
        self.next_call += 1
        try:
            actions = self.core.submit(call, self.now)
        except (HubClosedError, QueueFullError, NoWorkersError, OverloadedError):
            return
        self.calls[call.id] = call
        self.apply(actions)

    @precondition(lambda self: any(c.id not in self.outcomes for c in self.calls.values()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        open_calls = [c for c in self.calls.values() if c.id not in self.outcomes]
        call = data.draw(st.sampled_from(open_calls))
        queued_only = call.queued and not call.holders
        holders = list(call.holders)
        self.apply(self.core.cancel(call))
        # Every worker running it is told to stop (a stream's generator, an
        # async model's coroutine; a sync model ignores it).
        assert all((w, call.id) in self.stopped for w in holders), "a gone caller's call was not stopped"
        assert self.outcomes[call.id].kind is OutcomeKind.CANCELLED
        if queued_only:
            self.cancelled_while_queued.add(call.id)
            assert call.id in self.released

    @precondition(lambda self: any(c.id not in self.outcomes for c in self.calls.values()))
    @rule(data=st.data())
    def client_gone(self, data: st.DataObject) -> None:
        """A client hub went away: the calls it forwarded are cancelled at
        once, each stopped where it runs; the queued ones never run."""
        open_calls = [c for c in self.calls.values() if c.id not in self.outcomes]
        gone = data.draw(st.lists(st.sampled_from(open_calls), min_size=1, unique_by=lambda c: c.id))
        before = {c.id: (c.queued and not c.holders, list(c.holders)) for c in gone}
        self.apply(self.core.client_gone(gone))
        for c in gone:
            queued_only, holders = before[c.id]
            assert self.outcomes[c.id].kind is OutcomeKind.CANCELLED, "a gone client's call was not cancelled"
            assert all((w, c.id) in self.stopped for w in holders), "a gone client's call was not stopped"
            if queued_only:
                self.cancelled_while_queued.add(c.id)

    @precondition(lambda self: any(c.id not in self.outcomes for c in self.calls.values()))
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        open_calls = [c for c in self.calls.values() if c.id not in self.outcomes]
        call = data.draw(st.sampled_from(open_calls))
        self.resends[call.id] = self.resends.get(call.id, 0) + 1
        self.apply(self.core.resend(call, self.now))

    @precondition(lambda self: any(c.holders and c.id not in self.outcomes for c in self.calls.values()))
    @rule(data=st.data(), error=st.booleans())
    def retry_then_first_attempt_answers(self, data: st.DataObject, error: bool) -> None:
        """gibbs_retries: a second attempt is sent, then the first one answers."""
        running = [c for c in self.calls.values() if c.holders and c.id not in self.outcomes]
        call = data.draw(st.sampled_from(running))
        first = call.holders[0]
        if not self.core.closing:  # a free worker for the second attempt
            self.join(call.model, self.core.models[call.model].cls or "A", 1, 1, 1)
        self.resends[call.id] = self.resends.get(call.id, 0) + 1
        self.apply(self.core.resend(call, self.now))
        if call.id in self.outcomes:
            # The second attempt could not finish in the time left: the call
            # expired then (a worker's answer after that is dropped).
            assert self.outcomes[call.id].kind is OutcomeKind.EXPIRED
            return
        if call.id in self.holding.get(first, []):
            self.holding[first].remove(call.id)
            outcome = Outcome(OutcomeKind.ERROR if error else OutcomeKind.RESULT, (first, call.id))
            self.apply(self.core.answered(first, call.id, outcome, self.now))
            assert self.outcomes.get(call.id) == outcome, "the first attempt's answer was thrown away"

    # ------------------------------------------------------------ workers

    @rule(
        model=st.sampled_from(MODELS),
        cls=st.sampled_from(["A", "A", "B"]),
        slots=st.integers(1, 3),
        batch=st.sampled_from([1, 1, 2, 4]),
        depth=st.integers(1, 4),
    )
    def join(self, model: str, cls: str, slots: int, batch: int, depth: int) -> None:
        wid = self.next_worker
        self.next_worker += 1
        w = WorkerInfo(wid, model, cls, slots=slots, batch_size=batch, depth=depth, token=f"t{wid}")
        self.live[wid] = w
        self.holding[wid] = []
        self.apply(self.core.worker_joined(w, self.now))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.live)))
        self.live.pop(wid)
        self.holding.pop(wid)
        self.apply(self.core.worker_lost(wid, "killed", self.now))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def goodbye(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.live)))
        actions = self.core.worker_leaving(wid, self.now)
        # What it held comes back: it will not answer it.
        self.holding[wid] = []
        self.apply(actions)

    @precondition(lambda self: any(self.holding.values()))
    @rule(data=st.data(), error=st.booleans(), dt=st.sampled_from([0.0, 0.0, 0.002, 0.01]))
    def answer(self, data: st.DataObject, error: bool, dt: float) -> None:
        if dt:  # the model takes time: the core measures it (and time passes for everyone)
            self.tick(dt)
        if not any(self.holding.values()):
            return
        wid = data.draw(st.sampled_from(sorted(w for w, ids in self.holding.items() if ids)))
        ids = self.holding[wid]
        cid = data.draw(st.sampled_from(ids))
        ids.remove(cid)
        first = cid not in self.outcomes
        outcome = Outcome(OutcomeKind.ERROR if error else OutcomeKind.RESULT, (wid, cid))
        self.apply(self.core.answered(wid, cid, outcome, self.now))
        if first:
            assert self.outcomes[cid] == outcome, "the first answer did not win"
        self.answered_by.setdefault(cid, set()).add(wid)

    @precondition(lambda self: any(self.holding.values()))
    @rule(data=st.data())
    def chunk(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(w for w, ids in self.holding.items() if ids)))
        cid = data.draw(st.sampled_from(self.holding[wid]))
        self.apply(self.core.chunk(wid, cid, Outcome(OutcomeKind.CHUNK, cid)))

    @precondition(lambda self: any(c.stream and c.id not in self.outcomes for c in self.calls.values()))
    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        streams = [c for c in self.calls.values() if c.stream and c.id not in self.outcomes]
        self.apply(self.core.consumed(data.draw(st.sampled_from(streams)), 1))

    @rule(model=st.sampled_from(MODELS), n=st.integers(0, 2))
    def loading(self, model: str, n: int) -> None:
        self.apply(self.core.workers_loading(model, n, self.now))

    @rule(model=st.sampled_from(MODELS))
    def unavailable(self, model: str) -> None:
        self.apply(self.core.model_unavailable(model, NoWorkersError("constructor raised")))

    # ------------------------------------------------------------ time

    @rule(dt=st.floats(0, 0.025))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.apply(self.core.tick(self.now))
        if self.core.closing:
            # Closing: a worker that holds nothing is let go at once (it
            # goes looking for the hub that takes the address over).
            idle = [wid for wid, w in self.core.workers.items() if not w.held and not w.relay and not w.leaving]
            assert not idle, f"idle workers kept while closing: {idle}"

    @precondition(lambda self: self.core.no_worker_timeout is not None and self.core.n_queued)
    @rule()
    def wait_out_the_no_worker_timeout(self) -> None:
        assert self.core.no_worker_timeout is not None
        self.now += self.core.no_worker_timeout
        self.apply(self.core.tick(self.now))

    @rule(grace=st.sampled_from([0.0, 0.005, 1.0]))
    def close(self, grace: float) -> None:
        self.apply(self.core.close(self.now, grace))

    @precondition(lambda self: any(self.holding.values()))
    @rule(data=st.data(), goodbye=st.booleans())
    def close_then_lose_a_busy_worker(self, data: st.DataObject, goodbye: bool) -> None:
        """The awkward order: a worker leaves or dies while the hub closes."""
        self.apply(self.core.close(self.now, 1.0))
        wid = data.draw(st.sampled_from(sorted(w for w, ids in self.holding.items() if ids)))
        if goodbye:
            actions = self.core.worker_leaving(wid, self.now)
            self.holding[wid] = []
            self.apply(actions)
        else:
            self.live.pop(wid)
            self.holding.pop(wid)
            self.apply(self.core.worker_lost(wid, "killed", self.now))

    # ------------------------------------------------------------ checks

    @invariant()
    def core_invariants(self) -> None:
        self.core.check_invariants()

    @invariant()
    def every_call_has_one_fate(self) -> None:
        for cid, call in self.calls.items():
            if cid in self.outcomes:
                assert call.done
                assert cid not in self.core.calls, "a resolved call is still held by the core"
                for model in self.core.models.values():
                    assert cid not in model.queue
                # Nothing held for it once no worker holds an attempt.
                if not any(cid in ids for ids in self.holding.values()):
                    assert cid in self.released, f"call {cid} resolved and free of workers but never released"
            else:
                assert call.queued or any(h in self.live for h in call.holders), f"call {cid} stranded"

    @invariant()
    def no_call_outlives_its_window(self) -> None:
        """tick(now) ended every window that is over: the call expired, or
        (retries left) its next window opened."""
        for c in self.calls.values():
            if c.id not in self.outcomes and c.deadline is not None and not self.core.closing:
                assert c.deadline > self.now, f"{c} is past its deadline {c.deadline} at {self.now}"

    @invariant()
    def close_deadline_kept(self) -> None:
        core = self.core
        if core.closing and core.close_deadline is not None and self.now >= core.close_deadline:
            self.apply(core.tick(self.now))
            assert not core.calls, "calls open after the close deadline"
            assert all(c.id in self.outcomes for c in self.calls.values())

    @invariant()
    def no_wait_past_the_no_worker_timeout(self) -> None:
        """A call never waits longer than no_worker_timeout with no worker of
        its model there (the tick at that time has failed it)."""
        timeout = self.core.no_worker_timeout
        if timeout is None or self.core.closing:
            return
        for model in self.core.models.values():
            if not model.absent():
                continue
            for call in model.queue.values():
                if not call.holders:
                    assert model.absent_since is not None
                    assert max(call.t0, model.absent_since) + timeout > self.now, f"{call} waits past the timeout"

    @invariant()
    def no_call_waits_while_a_worker_could_take_it(self) -> None:
        """Work conservation: after every event, a queued call is one no
        worker could be sent now (none has a free slot or room to pipeline
        it, or the one that has holds an attempt of it, or it waits on a
        call that worker is running), unless its model waits to fill a batch."""
        if self.core.closing:
            return
        for model in self.core.models.values():
            if not model.queue or model.batch_wait:
                continue
            for w in model.workers.values():
                load = len(w.units)
                room = load < w.slots or (
                    w.ewma is not None and load < w.depth and load * w.ewma < PIPELINE_WINDOW and not w.streams
                )
                if w.leaving or not room:
                    continue
                for call in model.queue.values():
                    waits_on_it = load >= w.slots and call.origin is not None and call.origin == w.token
                    assert w.id in call.holders or waits_on_it, (
                        f"{call} waits while {w.describe} (load {load}) could take it"
                    )

    @invariant()
    def streams_are_never_run_twice_once_delivered(self) -> None:
        for cid, n in self.chunks.items():
            if n and cid not in self.outcomes:
                call = self.calls[cid]
                assert len(call.holders) == 1 and not call.queued, "a stream with chunks out went to a second worker"

    @invariant()
    def max_attempts_bound(self) -> None:
        for outcome in self.outcomes.values():
            if outcome.kind is OutcomeKind.EXCEPTION and isinstance(outcome.value, WorkerDiedError):
                if "stream was cut" not in str(outcome.value):
                    assert len(outcome.value.failures) >= self.core.max_attempts


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------- plain examples


def _core(**kw: Any) -> Core:
    return Core(**kw)


def test_idle_worker_pulls_and_fifo() -> None:
    core = _core()
    calls = [Call(i, "default", b"") for i in range(1, 4)]
    for c in calls:
        assert core.submit(c) == []
    acts = core.worker_joined(WorkerInfo(1, "default", "A"))
    assert [a for a in acts if isinstance(a, Send)] == [Send(1, (calls[0],))]
    acts = core.answered(1, 1, Outcome(OutcomeKind.RESULT, b"r"), now=0.5)
    assert Send(1, (calls[1],)) in acts


def test_first_answer_wins_with_a_resent_attempt() -> None:
    core = _core()
    c = Call(1, "default", b"")
    core.worker_joined(WorkerInfo(1, "default"))
    core.worker_joined(WorkerInfo(2, "default"))
    assert core.submit(c) == [Send(1, (c,))]
    assert core.resend(c) == [Send(2, (c,))]
    acts = core.answered(2, 1, Outcome(OutcomeKind.RESULT, "second"))
    assert Resolve(c, Outcome(OutcomeKind.RESULT, "second")) in acts
    assert not any(isinstance(a, Release) for a in acts)  # worker 1 may still read it
    acts = core.answered(1, 1, Outcome(OutcomeKind.RESULT, "first"))
    assert acts == [Release(c)]


def test_worker_lost_during_close_fails_its_call() -> None:
    core = _core()
    c = Call(1, "default", b"")
    core.worker_joined(WorkerInfo(1, "default"))
    core.submit(c)
    core.close(now=0.0, grace=10.0)
    acts = core.worker_lost(1, "killed")
    (res,) = [a for a in acts if isinstance(a, Resolve)]
    assert isinstance(res.outcome.value, HubClosedError)


def test_batch_takes_what_is_queued_and_lone_call_is_not_held() -> None:
    core = _core()
    w = WorkerInfo(1, "m", batch_size=4)
    core.worker_joined(w)
    a = Call(1, "m", b"")
    assert core.submit(a) == [Send(1, (a,))]  # lone call: at once, a batch of one
    more = [Call(i, "m", b"") for i in range(2, 8)]
    for c in more:
        core.submit(c)
    acts = core.answered(1, 1, Outcome(OutcomeKind.RESULT, None), now=1.0)
    sends = [a for a in acts if isinstance(a, Send)]
    assert sends == [Send(1, tuple(more[:4]))]


def test_class_mismatch_is_refused() -> None:
    core = _core()
    core.worker_joined(WorkerInfo(1, "text", "mod:Text"))
    acts = core.worker_joined(WorkerInfo(2, "text", "mod:Image"))
    assert len(acts) == 1 and isinstance(acts[0], Refuse)
    assert "mod:Text" in acts[0].reason and 2 not in core.workers


def test_models_have_their_own_queues() -> None:
    core = _core()
    core.worker_joined(WorkerInfo(1, "a"))
    core.worker_joined(WorkerInfo(2, "b"))
    burst = [Call(i, "a", b"") for i in range(1, 10)]
    for c in burst:
        core.submit(c)
    b = Call(100, "b", b"")
    assert core.submit(b) == [Send(2, (b,))]


def test_model_unavailable_fails_queued_and_new_calls() -> None:
    core = _core()
    c = Call(1, "m", b"")
    core.submit(c)
    acts = core.model_unavailable("m", NoWorkersError("boom"))
    assert isinstance(acts[0], Resolve) and isinstance(acts[0].outcome.value, NoWorkersError)
    with pytest.raises(NoWorkersError):
        core.submit(Call(2, "m", b""))
    core.worker_joined(WorkerInfo(1, "m"))
    c3 = Call(3, "m", b"")
    assert core.submit(c3) == [Send(1, (c3,))]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from(["submit", "cancel", "join", "answer"]), max_size=40))
def test_cancelled_queue_holds_nothing(ops: list[str]) -> None:
    """Calls cancelled while queued leave no trace in the core (the 20 000
    timed-out requests that stayed in the queue with their bodies)."""
    core = _core()
    n = 0
    for op in ops:
        if op == "submit":
            n += 1
            c = Call(n, "default", b"x" * 10)
            core.submit(c)
            core.cancel(c)
    assert core.n_queued == 0 and not core.calls
    assert all(not m.queue for m in core.models.values())


def test_same_class_across_a_script_and_its_import() -> None:
    from gibbs.core import same_class

    assert same_class("app:Model", "app:Model")
    assert same_class("__main__:Model", "app:Model")
    assert not same_class("app:Model", "other:Model")
    assert not same_class("__main__:Model", "app:Other")


def test_batched_and_unbatched_workers_do_not_share_a_name() -> None:
    core = _core()
    core.worker_joined(WorkerInfo(1, "m", "mod:M", batch_size=4))
    acts = core.worker_joined(WorkerInfo(2, "m", "mod:M"))
    assert len(acts) == 1 and isinstance(acts[0], Refuse) and "batching" in acts[0].reason
    assert core.worker_joined(WorkerInfo(3, "m", "mod:M", batch_size=8)) == []


def test_a_rollout_lets_a_second_class_serve_one_name_until_it_ends() -> None:
    core = _core()
    core.worker_joined(WorkerInfo("old", "m", "app:V1"), 0.0)
    refused = core.worker_joined(WorkerInfo("x", "m", "app:V2"), 0.0)
    assert any(isinstance(a, Refuse) for a in refused), "another class under a taken name before any rollout"
    core.roll_out("m", "app:V2")
    assert not any(isinstance(a, Refuse) for a in core.worker_joined(WorkerInfo("new", "m", "app:V2"), 0.0))
    assert any(isinstance(a, Refuse) for a in core.worker_joined(WorkerInfo("y", "m", "app:V3"), 0.0))
    core.worker_leaving("old", 0.0)
    core.worker_lost("old", "left", 0.0)
    core.roll_out("m", None)
    assert core.models["m"].cls == "app:V2"  # the new class is the model's now
    assert any(isinstance(a, Refuse) for a in core.worker_joined(WorkerInfo("late", "m", "app:V1"), 0.0))


def test_a_rolled_back_rollout_keeps_the_old_class() -> None:
    core = _core()
    core.worker_joined(WorkerInfo("old", "m", "app:V1"), 0.0)
    core.roll_out("m", "app:V2")
    core.worker_joined(WorkerInfo("new", "m", "app:V2"), 0.0)
    core.roll_out("m", None)  # ended with the old one still there: rolled back
    assert core.models["m"].cls == "app:V1"
    core.worker_lost("new", "killed", 0.0)
    assert any(isinstance(a, Refuse) for a in core.worker_joined(WorkerInfo("again", "m", "app:V2"), 0.0))


def test_call_states_and_a_wrong_move_raises() -> None:
    from gibbs.core import CallState, CallStateError

    core = _core()
    c = Call(1, "default", b"")
    assert c.state is CallState.NEW and "new" in repr(c)
    core.submit(c)
    assert c.state is CallState.QUEUED and "queued" in repr(c)
    core.worker_joined(WorkerInfo(1, "default"))
    assert c.state is CallState.RUNNING and "running" in repr(c)
    core.answered(1, 1, Outcome(OutcomeKind.RESULT, b""))
    assert c.state is CallState.DONE and "done" in repr(c)
    with pytest.raises(CallStateError, match="done -> queued"):
        core._enqueue(c)  # a done call never goes back to the queue
    assert "?" not in repr(Call(2, "default", b""))


def _measured_worker(core: Core, wid: int, service: float, model: str = "default") -> float:
    """Join a worker and let it answer one call in ``service`` seconds (its
    measured service time); returns the time then."""
    core.worker_joined(WorkerInfo(wid, model))
    warm = Call(10_000 + wid, model, b"")
    core.submit(warm, 0.0)
    core.answered(wid, warm.id, Outcome(OutcomeKind.RESULT, b""), service)
    return service


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    service=st.floats(0.001, 0.05),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["submit", "answer", "tick"]), st.floats(0.0, 0.03), st.floats(0.001, 0.1),
            st.sampled_from([0, 1, 2]),
        ),
        max_size=30,
    ),
)
def test_a_call_that_cannot_finish_in_time_is_never_sent(service: float, ops: list[Any]) -> None:
    """By the model's measured service time: a call whose time left is
    shorter is failed at once (EXPIRED, in the queue), never sent, whatever
    its priority class."""
    core = _core()
    now = _measured_worker(core, 1, service)
    held: list[Call] = []
    n = 0
    for op, dt, timeout, priority in ops:
        now += dt
        if op == "submit":
            n += 1
            try:
                acts = core.submit(Call(n, "default", b"", timeout=timeout, priority=priority), now)
            except OverloadedError:
                continue
        elif op == "answer" and held:
            c = held.pop(0)
            acts = core.answered(1, c.id, Outcome(OutcomeKind.RESULT, b""), now)
        else:
            acts = core.tick(now)
        w = core.workers[1]
        for a in acts:
            if isinstance(a, Send):
                assert w.ewma is not None
                for c in a.calls:
                    assert c.final_deadline is not None and now + w.ewma <= c.final_deadline + 1e-9, (
                        "a call that cannot finish in its time left was sent"
                    )
                    held.append(c)
            if isinstance(a, Resolve) and a.outcome.kind is OutcomeKind.EXPIRED and a.outcome.value.detail:
                assert a.outcome.value.in_queue  # failed for lack of time: it never started


def test_expiry_in_the_queue_and_while_running() -> None:
    core = _core()
    core.worker_joined(WorkerInfo(1, "default"))
    running = Call(1, "default", b"", timeout=0.2)
    queued = Call(2, "default", b"", timeout=0.1)
    assert core.submit(running, 0.0) == [Send(1, (running,))]
    assert core.submit(queued, 0.0) == []
    assert core.next_deadline() == 0.1
    (res,) = [a for a in core.tick(0.1) if isinstance(a, Resolve)]
    assert res.call is queued and res.outcome.kind is OutcomeKind.EXPIRED and res.outcome.value.in_queue
    acts = core.tick(0.2)
    (res2,) = [a for a in acts if isinstance(a, Resolve)]
    assert res2.call is running and not res2.outcome.value.in_queue  # the model took too long
    assert core.models["default"].stats["expired_queued"] == 1
    assert core.models["default"].stats["expired_running"] == 1


def test_a_window_passing_with_retries_left_sends_a_second_attempt() -> None:
    """gibbs_retries in the core: when the window ends, a running call goes
    to another free worker; the final deadline is the end of the last window."""
    core = _core()
    core.worker_joined(WorkerInfo(1, "default"))
    c = Call(1, "default", b"", timeout=0.1, retries=1)
    assert core.submit(c, 0.0) == [Send(1, (c,))]
    assert c.final_deadline == pytest.approx(0.2)
    core.worker_joined(WorkerInfo(2, "default"), 0.05)
    assert core.tick(0.1) == [Send(2, (c,))]
    acts = core.tick(0.2)
    assert [a.outcome.kind for a in acts if isinstance(a, Resolve)] == [OutcomeKind.EXPIRED]
    forever = Call(2, "default", b"", timeout=0.1, retries=-1)
    core.submit(forever, 0.2)
    for t in (0.3, 0.4, 0.5, 10.0):
        assert not any(isinstance(a, Resolve) for a in core.tick(t))
    assert forever.final_deadline is None and not forever.done


def test_a_model_default_timeout() -> None:
    core = _core()
    core.default_timeouts["m"] = 0.5
    c = Call(1, "m", b"")
    core.submit(c, 1.0)
    assert c.deadline == 1.5
    assert Call(2, "other", b"").deadline is None


def test_admission_sheds_at_once_with_retry_after() -> None:
    """2 workers of a 10 ms model: about 200 calls/s. With 200 ms
    deadlines, of which the predicted wait and service may take half
    (QUEUE_SHARE), the queue takes about 18 calls; the next is shed at once."""
    core = _core()
    for wid in (1, 2):
        core.worker_joined(WorkerInfo(wid, "default"))
    warm = [Call(100 + wid, "default", b"") for wid in (1, 2)]
    sends = [a for c in warm for a in core.submit(c, 0.0)]
    for send in sends:
        core.answered(send.worker, send.calls[0].id, Outcome(OutcomeKind.RESULT, b""), 0.01)
    assert core.predicted_wait("default") == (0.0, pytest.approx(0.01))
    now = 0.01
    admitted = 0
    with pytest.raises(OverloadedError) as info:
        for i in range(1000):
            core.submit(Call(i, "default", b"", timeout=0.2), now)
            admitted += 1
    assert core.queue_share == 0.5
    assert 16 <= admitted <= 24, admitted
    assert info.value.reason == "deadline" and 0 < info.value.retry_after < 0.1
    assert "overloaded" in str(info.value)
    assert core.stats["shed_deadline"] == 1 and core.models["default"].stats["shed_deadline"] == 1
    # A call with no deadline is never shed by prediction (max_queued still applies).
    core.submit(Call(5000, "default", b""), now)
    assert issubclass(QueueFullError, OverloadedError)


def test_a_nested_call_is_never_pipelined_behind_the_call_that_waits_on_it() -> None:
    """A fast worker may be sent a call ahead while busy (pipelining), but
    never the call its own running call waits on: it would wait behind it."""
    core = _core()
    w = WorkerInfo(1, "m", token="w1", depth=4)
    core.worker_joined(w, 0.0)
    warm = Call(1, "m", b"")
    core.submit(warm, 0.0)
    core.answered(1, 1, Outcome(OutcomeKind.RESULT, b""), 0.0001)  # 100 us: pipelining is on
    outer = Call(2, "m", b"")
    assert core.submit(outer, 1.0) == [Send(1, (outer,))]
    nested = Call(3, "m", b"")
    nested.origin = "w1"  # made by the model running ``outer`` on worker 1
    acts = core.submit(nested, 1.0)
    assert not any(isinstance(a, Send) for a in acts), "the nested call was queued behind its own waiter"
    other = Call(4, "m", b"")
    assert core.submit(other, 1.0) == [Send(1, (other,))]  # anything else may go ahead
    core.check_invariants()


def test_a_model_waiting_on_itself_with_no_worker_free_fails_its_nested_call() -> None:
    core = _core()
    for wid in (1, 2):
        core.worker_joined(WorkerInfo(wid, "m", token=f"w{wid}"), 0.0)
    a, b = Call(1, "m", b""), Call(2, "m", b"")
    core.submit(a, 0.0)
    core.submit(b, 0.0)
    n1 = Call(3, "m", b"")
    n1.origin = "w1"
    assert not any(isinstance(x, Resolve) for x in core.submit(n1, 0.0))  # w2 might still finish b
    n2 = Call(4, "m", b"")
    n2.origin = "w2"
    acts = core.submit(n2, 0.0)  # now both wait on calls to m itself: neither can be served
    failed = {x.call.id: x.outcome.value for x in acts if isinstance(x, Resolve)}
    assert set(failed) == {3, 4}
    assert all(isinstance(e, NoWorkersError) and "itself" in str(e) for e in failed.values())
    core.check_invariants()

@settings(max_examples=EXAMPLES, deadline=None)
@given(
    service=st.floats(0.001, 0.05),
    n_workers=st.integers(1, 3),
    ops=st.lists(
        st.tuples(st.sampled_from(["submit", "submit", "answer", "tick"]), st.floats(0.0, 0.01),
                  st.one_of(st.none(), st.floats(0.005, 0.3))),
        max_size=60,
    ),
)
def test_a_shed_call_gets_its_error_at_once(service: float, n_workers: int, ops: list[Any]) -> None:
    """Admission control, with measured workers: a new call whose predicted
    wait and service exceed its share of the deadline raises OverloadedError
    from submit itself (nothing kept, no action); every call admitted fits
    the prediction; a call without a deadline is never shed by prediction."""
    core = _core()
    for wid in range(1, n_workers + 1):
        core.worker_joined(WorkerInfo(wid, "default"))
    warm = [Call(1000 + wid, "default", b"") for wid in range(1, n_workers + 1)]
    for send in [a for c in warm for a in core.submit(c, 0.0)]:
        core.answered(send.worker, send.calls[0].id, Outcome(OutcomeKind.RESULT, b""), service)
    now = service
    held: dict[int, list[int]] = {wid: [] for wid in range(1, n_workers + 1)}
    n = 0

    def sent(actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                held[a.worker].extend(c.id for c in a.calls)

    for op, dt, timeout in ops:
        now += dt
        if op == "submit":
            n += 1
            call = Call(n, "default", b"", timeout=timeout)
            pred = core.predicted_wait("default", 0, now)
            assert pred is not None
            before = dict(core.calls)
            try:
                sent(core.submit(call, now))
            except OverloadedError as exc:
                assert timeout is not None, "a call without a deadline was shed by prediction"
                left = (now + timeout) - now
                assert pred[1] >= left or pred[0] > core.queue_share * (left - pred[1])
                assert core.calls == before and call.state.value == "new", "a shed call left a trace"
                assert exc.retry_after > 0
                continue
            if timeout is not None:
                left = (now + timeout) - now
                assert pred[1] < left and pred[0] <= core.queue_share * (left - pred[1]), (
                    "admitted past the prediction"
                )
        elif op == "answer":
            busy = [w for w, ids in held.items() if ids]
            if busy:
                wid = busy[0]
                sent(core.answered(wid, held[wid].pop(0), Outcome(OutcomeKind.RESULT, b""), now))
        else:
            sent(core.tick(now))


def _fast_model(core: Core, workers: int, service: float) -> float:
    """Join workers of model m and answer enough calls for a p95 service time."""
    from gibbs.core import HEDGE_MIN_SAMPLES

    for wid in range(1, workers + 1):
        core.worker_joined(WorkerInfo(wid, "m"), 0.0)
    now = 0.0
    for i in range(HEDGE_MIN_SAMPLES):
        c = Call(1000 + i, "m", b"")
        (send,) = [a for a in core.submit(c, now) if isinstance(a, Send)]
        now += service
        core.answered(send.worker, c.id, Outcome(OutcomeKind.RESULT, b""), now)
    assert core.models["m"].hedge_after == pytest.approx(service)
    return now


def test_a_hedged_call_gets_a_second_attempt_past_the_p95_and_the_first_answer_wins() -> None:
    core = _core()
    now = _fast_model(core, 2, 0.01)
    c = Call(1, "m", b"")
    c.hedge = 1
    (first,) = core.submit(c, now)
    assert isinstance(first, Send)
    assert core.next_deadline() == pytest.approx(now + 0.01)
    assert core.tick(now + 0.005) == []  # not past the p95 yet
    acts = core.tick(now + 0.011)
    (second,) = [a for a in acts if isinstance(a, Send)]
    assert second.worker != first.worker and second.calls == (c,)
    assert core.stats["hedged"] == 1
    acts = core.answered(second.worker, 1, Outcome(OutcomeKind.RESULT, b"fast"), now + 0.012)
    assert [a.outcome.value for a in acts if isinstance(a, Resolve)] == [b"fast"]
    assert [a.worker for a in acts if isinstance(a, Stop)] == [first.worker]  # the loser is stopped
    late = core.answered(first.worker, 1, Outcome(OutcomeKind.RESULT, b"slow"), now + 0.1)
    assert not any(isinstance(a, Resolve) for a in late)  # dropped
    assert any(isinstance(a, Release) for a in late)
    core.check_invariants()


def test_no_hedge_without_an_idle_worker_or_without_the_flag() -> None:
    core = _core()
    now = _fast_model(core, 2, 0.01)
    plain = Call(1, "m", b"")
    core.submit(plain, now)
    assert not any(isinstance(a, Send) for a in core.tick(now + 1.0))  # not asked for
    hedged = Call(2, "m", b"")
    hedged.hedge = 1
    core.submit(hedged, now + 1.0)  # the other worker is busy with ``plain``
    assert not any(isinstance(a, Send) for a in core.tick(now + 2.0))
    plain_worker = plain.holders[0]
    core.answered(plain_worker, 1, Outcome(OutcomeKind.RESULT, b""), now + 2.0)  # it frees up
    acts = core.tick(now + 2.0)
    assert [a.calls for a in acts if isinstance(a, Send)] == [(hedged,)]
    core.check_invariants()


def test_a_models_default_hedges_its_calls() -> None:
    core = _core()
    now = _fast_model(core, 2, 0.01)
    core.models["m"].hedge = True
    c = Call(1, "m", b"")
    core.submit(c, now)
    assert c.hedge == 1
    assert any(isinstance(a, Send) for a in core.tick(now + 0.02))


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    n_workers=st.integers(2, 4),
    ops=st.lists(
        st.tuples(st.sampled_from(["submit", "submit", "answer", "tick", "lose"]), st.floats(0.0, 0.03),
                  st.booleans()),
        max_size=50,
    ),
)
def test_hedging_first_answer_wins_and_the_loser_is_stopped(n_workers: int, ops: list[Any]) -> None:
    """Random hedged and plain calls, answers in any order, time passing,
    workers lost: every call resolves once; a second attempt goes out only
    past the p95 and to an idle worker; when one attempt answers, the other
    worker is told to stop; the core's invariants hold after every event."""
    core = _core()
    now = _fast_model(core, n_workers, 0.01)
    live = set(range(1, n_workers + 1))
    holding: dict[int, list[int]] = {w: [] for w in live}
    resolved: dict[int, int] = {}
    next_id = 1

    def apply(acts: list[Any]) -> None:
        for a in acts:
            if isinstance(a, Send):
                assert a.worker in live
                for c in a.calls:
                    if len(c.holders) > 1 and c.hedge == 2:
                        others = [h for h in c.holders if h != a.worker]
                        assert now - c.sent_at >= (core.models["m"].hedge_after or 0.0) - 1e-9, "hedged early"
                        assert all(h in live for h in others)
                    holding[a.worker].append(c.id)
            elif isinstance(a, Resolve):
                resolved[a.call.id] = resolved.get(a.call.id, 0) + 1
                assert resolved[a.call.id] == 1, "a call resolved twice"
            elif isinstance(a, Stop):
                assert a.call.done and a.worker in a.call.holders

    for op, dt, flag in ops:
        now += dt
        if op == "submit":
            c = Call(next_id, "m", b"")
            c.hedge = 1 if flag else 0
            next_id += 1
            apply(core.submit(c, now))
        elif op == "answer":
            busy = [w for w in live if holding[w]]
            if busy:
                w = busy[0] if flag else busy[-1]
                cid = holding[w].pop(0)
                apply(core.answered(w, cid, Outcome(OutcomeKind.RESULT, b""), now))
        elif op == "lose" and len(live) > 1 and flag:
            w = max(live)
            live.discard(w)
            holding.pop(w)
            apply(core.worker_lost(w, "killed", now))
        else:
            apply(core.tick(now))
        core.check_invariants()
        for call in core.calls.values():
            if call.hedge == 2:
                assert len(call.holders) <= 2, f"{call} hedged more than once"


# ---------------------------------------------------------------- priorities


def _expected_unit(queued: list[Call], passes: dict[int, int], batch_size: int) -> list[Call]:
    """The reference rule: calls passed STARVATION_BOUND times first (the
    lowest class first, oldest first), then the higher class first, oldest
    first; ``queued`` is in submit order."""
    starving = [c for c in queued if passes[c.id] >= STARVATION_BOUND]
    starving.sort(key=lambda c: c.priority or 0)  # stable: oldest first within a class
    rest = [c for c in queued if passes[c.id] < STARVATION_BOUND]
    rest.sort(key=lambda c: -(c.priority or 0))
    return (starving + rest)[:batch_size]


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    batch_size=st.sampled_from([1, 1, 3]),
    n_workers=st.integers(1, 2),
    # (a new call's class, how many units are answered after it): a backlog
    # builds up, then drains at the end.
    ops=st.lists(st.tuples(st.sampled_from(PRIORITIES[:4]), st.sampled_from([0, 0, 0, 1, 2])), max_size=60),
)
def test_priority_order_and_the_starvation_bound(batch_size: int, n_workers: int, ops: list[Any]) -> None:
    """Every unit a free worker takes is the reference order's head (higher
    class first, FIFO within a class, a call passed STARVATION_BOUND times
    goes next), and no queued call is ever passed by more than
    STARVATION_BOUND units carrying a higher class."""
    core = _core()
    for wid in range(1, n_workers + 1):
        core.worker_joined(WorkerInfo(wid, "default", batch_size=batch_size))
    queued: list[Call] = []  # in submit order
    passes: dict[int, int] = {}
    running: list[tuple[int, tuple[Call, ...]]] = []
    now = 0.0
    n = 0

    def check(acts: list[Any]) -> None:
        for a in acts:
            if not isinstance(a, Send):
                continue
            assert list(a.calls) == _expected_unit(queued, passes, batch_size), (
                [(c.id, c.priority, passes[c.id]) for c in a.calls],
                [(c.id, c.priority, passes[c.id]) for c in queued],
            )
            for c in a.calls:
                queued.remove(c)
            top = max(c.priority or 0 for c in a.calls)
            for c in queued:
                if (c.priority or 0) < top:
                    passes[c.id] += 1
                    assert passes[c.id] <= STARVATION_BOUND, "a call was passed more often than the bound"
            running.append((a.worker, a.calls))
        assert [c.id for c in queued] == sorted(c.id for c in core.models["default"].queue.values())

    for priority, answers in ops:
        now += 0.01
        n += 1
        call = Call(n, "default", b"", priority=priority)
        passes[n] = 0
        queued.append(call)
        check(core.submit(call, now))
        for _ in range(answers):
            if not running:
                break
            now += 0.01
            wid, calls = running.pop(0)
            acts: list[Any] = []
            for c in calls:
                acts += core.answered(wid, c.id, Outcome(OutcomeKind.RESULT, b""), now)
            check(acts)
        core.check_invariants()
    # Draining the queue: every call is served, the lower ones too.
    while running:
        wid, calls = running.pop(0)
        now += 0.01
        acts: list[Any] = []
        for c in calls:
            acts += core.answered(wid, c.id, Outcome(OutcomeKind.RESULT, b""), now)
        check(acts)
    assert not queued and not core.calls


def test_priorities_higher_first_and_a_low_call_served_after_the_bound() -> None:
    core = _core()
    core.worker_joined(WorkerInfo(1, "default"))
    busy = Call(1, "default", b"")
    core.submit(busy)
    low = Call(2, "default", b"", priority=0)
    core.submit(low)
    highs = [Call(10 + i, "default", b"", priority=5) for i in range(STARVATION_BOUND + 3)]
    for c in highs:
        core.submit(c)
    order = []
    last = busy
    for t in range(len(highs) + 1):
        acts = core.answered(1, last.id, Outcome(OutcomeKind.RESULT, b""), 0.01 * (t + 1))
        (send,) = [a for a in acts if isinstance(a, Send)]
        last = send.calls[0]
        order.append(last.id)
    # STARVATION_BOUND high calls pass the low one, then it goes.
    assert order.index(low.id) == STARVATION_BOUND
    assert [i for i in order if i != low.id] == [c.id for c in highs]
    stats = core.priority_stats("default")
    assert stats["5"]["requests"] == len(highs) and stats["0"]["requests"] == 2
    assert stats["0"]["completed"] == 2 and stats["5"]["completed"] == len(highs) - 1
    assert stats["5"]["queued"] == stats["0"]["queued"] == 0  # the last high call runs


def test_bad_priorities_are_refused_clearly() -> None:
    from gibbs.core import check_priority

    for bad in (-1, 10, 1.5, "high", True):
        with pytest.raises((TypeError, ValueError), match="gibbs_priority"):
            check_priority(bad)
    assert check_priority(9) == 9


def test_a_model_default_priority() -> None:
    core = _core()
    core.default_priorities["m"] = 3
    a, b = Call(1, "m", b""), Call(2, "m", b"", priority=0)
    core.submit(a)
    core.submit(b)
    assert a.priority == 3 and b.priority == 0
    assert Call(3, "other", b"").priority is None


def test_admission_is_not_fooled_by_lower_classes_queued_ahead() -> None:
    """A backlog of class 0 fills the queue up to the admission limit; a
    class 1 call with the same deadline is still admitted (it waits behind
    none of them but the few the starvation bound lets through), and a
    class 0 call is shed."""
    core = _core()
    for wid in (1, 2):
        core.worker_joined(WorkerInfo(wid, "default"))
    warm = [Call(100 + wid, "default", b"") for wid in (1, 2)]
    sends = [a for c in warm for a in core.submit(c, 0.0)]
    for send in sends:
        core.answered(send.worker, send.calls[0].id, Outcome(OutcomeKind.RESULT, b""), 0.01)
    now = 0.01
    with pytest.raises(OverloadedError):
        for i in range(1000):
            core.submit(Call(i, "default", b"", timeout=0.2, priority=0), now)
    backlog = core.queued("default")
    assert backlog >= 16
    assert core.predicted_wait("default", 1)[0] < core.predicted_wait("default", 0)[0] / 4  # type: ignore[index]
    high = Call(5000, "default", b"", timeout=0.2, priority=1)
    core.submit(high, now)
    assert high.queued
    with pytest.raises(OverloadedError):
        core.submit(Call(5001, "default", b"", timeout=0.2, priority=0), now)
    assert core.priority_stats("default")["0"]["shed"] == 2
    # Without the classes, the same call would have been shed.
    assert core.predicted_wait("default", 0)[0] + 0.01 > 0.5 * 0.2  # type: ignore[index]


def test_a_full_queue_gives_a_low_call_s_place_to_a_higher_one() -> None:
    core = _core(max_queued=3)
    core.worker_joined(WorkerInfo(1, "default"))
    core.submit(Call(1, "default", b""))  # running
    lows = [Call(2 + i, "default", b"", priority=1) for i in range(3)]
    for c in lows:
        core.submit(c)
    with pytest.raises(QueueFullError):
        core.submit(Call(10, "default", b"", priority=1))  # not higher: refused
    acts = core.submit(Call(11, "default", b"", priority=2))
    (res,) = [a for a in acts if isinstance(a, Resolve)]
    assert res.call is lows[-1] and isinstance(res.outcome.value, QueueFullError)  # the newest of the lowest class
    assert "higher priority" in str(res.outcome.value)
    assert core.queued() == 3
    assert core.priority_stats("default")["1"]["shed"] == 2
    core.check_invariants()


# ---------------------------------------------------------------- a client hub loses its router


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["call", "stream", "stream-with-chunks"]), min_size=1, max_size=8),
    max_attempts=st.integers(1, 3),
    answered=st.integers(0, 8),
)
def test_losing_the_router_sends_every_call_again_and_costs_no_attempt(
    kinds: list[str], max_attempts: int, answered: int
) -> None:
    """``upstream_lost``: the relays standing for the router go; what they
    held goes back to the front of the queue, in the order it was sent, with
    no attempt counted and no death (the router's workers may live on); a
    stream whose caller had chunks already fails (a second run would repeat
    them); once a relay stands for the router again, the calls go to it."""
    core = Core(max_attempts=max_attempts)
    relay = WorkerInfo("relay-1", "m", "", slots=1 << 30, depth=1 << 30, relay=True)
    core.worker_joined(relay, 0.0)
    calls = [Call(i + 1, "m", b"x", object(), kind != "call") for i, kind in enumerate(kinds)]
    for call in calls:
        actions = core.submit(call, 0.0)
        assert [a.calls for a in actions if isinstance(a, Send)] == [(call,)]
    done = set()
    for call in calls[: min(answered, len(calls))]:
        if not call.stream:
            core.answered("relay-1", call.id, Outcome(OutcomeKind.RESULT, b"x"), 0.1)
            done.add(call.id)
    for call, kind in zip(calls, kinds):
        if kind == "stream-with-chunks":
            assert core.chunk("relay-1", call.id, Outcome(OutcomeKind.CHUNK, b"c"))
    actions = core.upstream_lost(["relay-1"], 0.2)
    assert "relay-1" not in core.workers and core.stats["deaths"] == 0
    failed = {a.call.id for a in actions if isinstance(a, Resolve)}
    assert failed == {c.id for c, k in zip(calls, kinds) if k == "stream-with-chunks"}
    for a in actions:
        if isinstance(a, Resolve):
            assert isinstance(a.outcome.value, WorkerDiedError)
    again = [c for c in calls if c.id not in done and c.id not in failed]
    assert all(c.queued and c.attempts == 0 and not c.holders for c in again)
    assert list(core.models["m"].queue.values()) == again  # in the order they were sent
    # The router is found again: a new relay takes them all.
    back = WorkerInfo("relay-2", "m", "", slots=1 << 30, depth=1 << 30, relay=True)
    sent = [c for a in core.worker_joined(back, 0.3) if isinstance(a, Send) for c in a.calls]
    assert sent == again
