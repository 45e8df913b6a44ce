"""Priorities end to end, through the public API and real workers: a
higher class overtakes a queued backlog, is counted per class, and a call a
model makes while it serves one inherits that call's class."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
from conftest import run
from gibbs_test_models import CallsPriorityOf, PriorityOf, Sleep

from gibbs import Hub
from gibbs.core import STARVATION_BOUND


def test_high_priority_calls_overtake_a_queued_backlog(hub: Hub, make_workers: Any) -> None:
    make_workers(hub, Sleep, 1)
    hub.wait_for_workers_sync(1, timeout=30)
    assert hub.submit(0.0, "warm").result(30) == "warm"
    done: list[str] = []
    lock = threading.Lock()

    def note(tag: str) -> Callable[[Any], None]:
        def cb(_: Any) -> None:
            with lock:
                done.append(tag)

        return cb

    n_low, n_high = 12, 3
    futures = []
    for i in range(n_low):
        f = hub.submit(0.05, f"low{i}", gibbs_priority=0)
        f.add_done_callback(note(f"low{i}"))
        futures.append(f)
    for i in range(n_high):
        f = hub.submit(0.05, f"high{i}", gibbs_priority=5)
        f.add_done_callback(note(f"high{i}"))
        futures.append(f)
    for f in futures:
        f.result(60)
    assert len(done) == n_low + n_high
    # The backlog was queued first: with FIFO the high calls would end last.
    # Higher first, within STARVATION_BOUND (8 > 3): they end among the first
    # few (the low calls already sent when they arrived may end before).
    last_high = max(done.index(f"high{i}") for i in range(n_high))
    assert n_high <= STARVATION_BOUND
    assert last_high < n_low, done
    assert [t for t in done if t.startswith("high")] == [f"high{i}" for i in range(n_high)]  # FIFO in a class
    per = hub.statistics()["models"]["default"]["priorities"]
    assert per["5"]["requests"] == per["5"]["completed"] == n_high
    assert per["0"]["requests"] == per["0"]["completed"] == n_low + 1
    text = hub.prometheus()
    assert 'gibbs_priority_requests_total{model="default",priority="5"} 3' in text
    assert 'gibbs_priority_outcomes_total{model="default",priority="0",outcome="completed"} 13' in text


def test_bad_priorities_fail_at_the_call_site(hub: Hub) -> None:
    with pytest.raises(ValueError, match="gibbs_priority"):
        hub.submit(1, gibbs_priority=10)
    with pytest.raises(TypeError, match="gibbs_priority"):
        run(hub.request(1, gibbs_priority="high"))
    with pytest.raises(ValueError, match="gibbs_priority"):
        hub.set_default_priority(-1)


@pytest.mark.timeout(120)
def test_a_nested_call_inherits_its_callers_class(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    hub = make_hub()
    make_workers(hub, PriorityOf, 1, gibbs_model="prio")
    make_workers(hub, CallsPriorityOf, 1, gibbs_model="outer")
    run(hub.wait_for_workers(2, timeout=60))
    # (the inner model's class, the outer model's), as each worker saw them
    assert tuple(hub.submit(gibbs_model="outer", gibbs_priority=4).result(30)) == (4, 4)
    assert tuple(hub.submit(gibbs_model="outer").result(30)) == (None, None)  # class 0: nothing to inherit
    assert tuple(hub.submit(2, gibbs_model="outer", gibbs_priority=7).result(30)) == (2, 7)  # its own wins
    hub.set_default_priority(3, model="outer")
    assert tuple(hub.submit(gibbs_model="outer").result(30)) == (3, 3)
    per = hub.statistics()["models"]["prio"]["priorities"]
    assert per["4"]["completed"] == 1 and per["2"]["completed"] == 1 and per["3"]["completed"] == 1


@pytest.mark.timeout(120)
def test_an_explicit_class_0_through_a_client_hub_is_not_the_routers_default(
    make_hub: Callable[..., Hub], make_workers: Any
) -> None:
    """The nested call goes through the client hub inside the outer worker:
    class 0 given there stays 0; none given takes the router's default."""
    hub = make_hub()
    make_workers(hub, PriorityOf, 1, gibbs_model="prio")
    make_workers(hub, CallsPriorityOf, 1, gibbs_model="outer")
    run(hub.wait_for_workers(2, timeout=60))
    hub.set_default_priority(5, model="prio")
    assert tuple(hub.submit(gibbs_model="outer").result(30)) == (5, None)  # none given: the router's default
    assert tuple(hub.submit(0, gibbs_model="outer").result(30)) == (None, None)  # 0 given: 0 (read as None)
    assert tuple(hub.submit(6, gibbs_model="outer").result(30)) == (6, None)
    per = hub.statistics()["models"]["prio"]["priorities"]
    assert per["0"]["completed"] == 1 and per["5"]["completed"] == 1 and per["6"]["completed"] == 1
