"""The driver's small units, each through its own interface: no hub, no
process, no socket but a pipe."""

from __future__ import annotations

import gc
from typing import Any

from gibbs._loans import LoanBook


class _Peer:  # the loan book only carries its peer back
    pass


def _views(n: int, size: int) -> list[memoryview]:
    return [memoryview(bytearray(size)) for _ in range(n)]


def test_a_segment_goes_back_when_its_last_buffer_is_freed() -> None:
    woken: list[int] = []
    book = LoanBook(1000, lambda: woken.append(1))
    peer: Any = _Peer()
    lent = book.lend(peer, "seg-a", 300, _views(2, 100))
    assert lent is not None and len(lent) == 2
    assert book.snapshot()["lent"] == 1 and book.snapshot()["lent_bytes"] == 300
    first = lent.pop()
    del first
    gc.collect()
    assert not book.has_returns() and not woken  # one buffer of the segment is still held
    lent.clear()
    gc.collect()
    assert book.has_returns() and woken
    assert book.take_back() == [(peer, "seg-a")]
    assert book.take_back() == []
    snap = book.snapshot()
    assert (snap["lent"], snap["lent_bytes"], snap["answers_lent"], snap["answers_copied"]) == (0, 0, 1, 0)


def test_over_the_limit_an_answer_is_copied_not_lent() -> None:
    book = LoanBook(500, lambda: None)
    peer: Any = _Peer()
    held = book.lend(peer, "seg-a", 400, _views(1, 10))
    assert held is not None
    assert book.lend(peer, "seg-b", 200, _views(1, 10)) is None  # 600 > 500: the caller copies
    assert book.snapshot()["answers_copied"] == 1
    del held
    gc.collect()
    assert book.lend(peer, "seg-b", 200, _views(1, 10)) is not None  # room again


def test_after_close_a_freed_answer_wakes_nobody() -> None:
    woken: list[int] = []
    book = LoanBook(1000, lambda: woken.append(1))
    lent = book.lend(_Peer(), "seg-a", 10, _views(1, 10))  # type: ignore[arg-type]
    book.close()
    del lent
    gc.collect()
    assert not woken and book.take_back() == [] and book.snapshot()["lent"] == 0
    assert book.lend(_Peer(), "seg-b", 10, _views(1, 10)) is None  # type: ignore[arg-type]


def test_hub_options_name_the_field_that_is_wrong() -> None:
    import math

    import pytest

    from gibbs._options import HubOptions

    ok = HubOptions(heartbeat_interval=2, app="x")
    assert ok.heartbeat_interval == 2.0 and isinstance(ok.heartbeat_interval, float)
    bad = {
        "heartbeat_interval": [0, -1, math.nan, "1"],
        "heartbeat_misses": [0, 1.5, True],
        "max_attempts": [0],
        "max_queued": [-1, "3"],
        "max_frame_bytes": [1023],
        "handshake_timeout": [0],
        "pipeline_depth": [0],
        "shm_threshold": [-1],
        "max_lent_bytes": [-1, 1.0],
        "close_grace": [-0.5],
        "no_worker_timeout": [0, -1],
        "app": ["", None],
    }
    for field, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=field):
                HubOptions(**{field: value})  # type: ignore[arg-type]
