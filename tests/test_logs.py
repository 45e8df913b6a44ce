"""Log lines name the model, the worker and the request id: as fields of the
record (extra=), and gibbs.LogFields gives every record the three."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
from conftest import run, wait_until

import gibbs
from gibbs import Hub
from gibbs.worker import _REQUEST_ID


def test_log_fields_fills_what_a_record_lacks() -> None:
    f = gibbs.LogFields()
    plain = logging.makeLogRecord({"msg": "x"})
    assert f.filter(plain)
    assert (plain.gibbs_model, plain.gibbs_worker, plain.gibbs_request_id) == (None, None, None)
    token = _REQUEST_ID.set("web-1")  # as in an endpoint behind gibbs.asgi
    try:
        mine = logging.makeLogRecord({"msg": "x"})
        assert f.filter(mine) and mine.gibbs_request_id == "web-1"
        given = logging.makeLogRecord({"msg": "x", **gibbs.logs.fields("m", "w", "r")})
        assert f.filter(given)
        assert (given.gibbs_model, given.gibbs_worker, given.gibbs_request_id) == ("m", "w", "r")
    finally:
        _REQUEST_ID.reset(token)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(120)
def test_hub_lines_name_the_worker_model_and_the_calls_it_held(
    make_hub: Callable[..., Hub], make_workers: Any
) -> None:
    from gibbs_test_models import Sleep

    keep = _Keep()
    log = logging.getLogger("gibbs")
    log.addHandler(keep)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        hub = make_hub()
        (w,) = make_workers(hub, Sleep, 1, gibbs_model="sleepy", gibbs_name="sleeper-1")
        run(hub.wait_for_workers(1, timeout=60))
        joined = next(r for r in keep.records if "joined" in r.getMessage() and "sleeper-1" in r.getMessage())
        assert (joined.gibbs_model, joined.gibbs_worker) == ("sleepy", "sleeper-1")  # type: ignore[attr-defined]
        fut = hub.submit(30.0, gibbs_model="sleepy", gibbs_request_id="held-7", gibbs_timeout=60)
        assert wait_until(lambda: hub.statistics()["models"]["sleepy"]["in_flight"] == 1, timeout=30)
        w.kill()
        assert wait_until(lambda: any("lost" in r.getMessage() for r in keep.records), timeout=30)
        lost = next(r for r in keep.records if "lost" in r.getMessage())
        assert lost.gibbs_request_id == "held-7", lost.__dict__  # type: ignore[attr-defined]
        assert (lost.gibbs_model, lost.gibbs_worker) == ("sleepy", "sleeper-1")  # type: ignore[attr-defined]
        fut.cancel()
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
