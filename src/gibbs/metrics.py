"""Request statistics: duration windows and the Prometheus text exposition.

:class:`Window` records durations (seconds) of one measure -- request latency
or queue wait -- for one model. :meth:`Window.add` is O(1) and allocates
nothing beyond the float it is given: it bumps one histogram bucket (found by
``bisect`` over the fixed :data:`BUCKETS`), the count and the sum, and writes
the sample into a preallocated ring buffer of the last ``size`` samples. The
costly part, cumulating the buckets and sorting a copy of the ring for the
quantiles, happens in :meth:`Window.snapshot`.

A window does no locking: its owner serialises ``add`` and ``snapshot`` (the
hub calls both under its own lock).

:func:`prometheus_text` renders a statistics dict (the hub's, see its
docstring for the schema) in the Prometheus text exposition format 0.0.4;
serve it with the header ``Content-Type: CONTENT_TYPE``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any, Iterable, List, Mapping, Optional, TypedDict, Union

__all__ = ["BUCKETS", "CONTENT_TYPE", "Window", "WindowSnapshot", "prometheus_text"]

#: Upper bounds (seconds, inclusive) of the histogram buckets; +Inf is implied.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: The ``Content-Type`` of :func:`prometheus_text`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_INF = float("inf")


class WindowSnapshot(TypedDict):
    """What :meth:`Window.snapshot` returns (plain, JSON-friendly types)."""

    count: int
    sum: float
    #: ``[le, cumulative count]`` pairs, bounds ascending, ``["+Inf", count]``
    #: last (a string, as in Prometheus' ``le`` label: strict JSON has no
    #: infinity, and web frameworks refuse to encode one).
    buckets: List[List[Union[float, str]]]
    p50: Optional[float]
    p95: Optional[float]
    p99: Optional[float]


class Window:
    """Durations of one measure for one model: a histogram over :data:`BUCKETS`
    since creation, plus the last ``size`` samples for quantiles.

    Samples are seconds, finite (a NaN would land in the first bucket and make
    the sum NaN for good; measure with ``time.monotonic``/``perf_counter``).
    """

    __slots__ = ("_buckets", "_count", "_sum", "_ring", "_size")

    def __init__(self, size: int = 1024) -> None:
        if size < 1:
            raise ValueError(f"Window size must be at least 1, not {size!r}")
        self._size = size
        # Per-bucket (not cumulative) counts; the last slot is +Inf.
        self._buckets: list[int] = [0] * (len(BUCKETS) + 1)
        self._count = 0
        self._sum = 0.0
        # Sample number n goes to slot n % size: no separate index to keep.
        self._ring: list[float] = [0.0] * size

    @property
    def size(self) -> int:
        """How many recent samples the quantiles are computed over (at most)."""
        return self._size

    @property
    def count(self) -> int:
        """Samples added since creation."""
        return self._count

    def add(self, seconds: float) -> None:
        """Record one duration. O(1): one bisect, a few stores, no allocation."""
        # bisect_left: the first bound >= seconds, i.e. Prometheus' "le"
        # (a sample equal to a bound belongs to that bound's bucket).
        self._buckets[bisect_left(BUCKETS, seconds)] += 1
        self._sum += seconds
        count = self._count
        self._ring[count % self._size] = seconds
        self._count = count + 1

    def snapshot(self) -> WindowSnapshot:
        """Count, sum and cumulative buckets since creation; p50/p95/p99 over
        the last ``size`` samples (None while there are none)."""
        buckets: list[list[Union[float, str]]] = []
        running = 0
        for le, n in zip(BUCKETS, self._buckets):
            running += n
            buckets.append([le, running])
        buckets.append(["+Inf", running + self._buckets[-1]])
        filled = min(self._count, self._size)
        # The ring's order does not matter once sorted; when it is not full
        # yet, its filled part is the prefix.
        recent = sorted(self._ring[:filled]) if filled else []
        return {
            "count": self._count,
            "sum": self._sum,
            "buckets": buckets,
            "p50": _quantile(recent, 50),
            "p95": _quantile(recent, 95),
            "p99": _quantile(recent, 99),
        }

    def __repr__(self) -> str:
        return f"Window(size={self._size}, count={self._count}, sum={self._sum!r})"


def _quantile(ordered: list[float], percent: int) -> Optional[float]:
    """Nearest-rank percentile of sorted data: the smallest sample with at
    least ``percent``% of the samples at or below it. Integer arithmetic, so
    that e.g. p95 of 1..100 is 95 exactly."""
    n = len(ordered)
    if not n:
        return None
    rank = (percent * n + 99) // 100  # ceil(percent / 100 * n), 1-based
    return ordered[max(rank, 1) - 1]


# --------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4
# --------------------------------------------------------------------------

_STATES = ("loading", "ready", "busy", "leaving")

# (metric name, help, key in the model's dict); counters end in _total.
_MODEL_COUNTERS = (
    ("gibbs_requests_total", "Requests received, per model.", "requests"),
    ("gibbs_requests_completed_total", "Requests answered successfully, per model.", "completed"),
)
_MODEL_COUNTERS_AFTER_ERRORS = (
    (
        "gibbs_requests_resent_total",
        "Requests sent again because the caller's timeout passed with retries left, per model.",
        "resent",
    ),
    ("gibbs_requests_retried_total", "Requests run again after their worker died, per model.", "retried"),
    ("gibbs_worker_restarts_total", "Worker processes restarted, per model.", "restarts"),
)
# (kind label, key in the model's dict)
_ERROR_KINDS = (("user", "errors"), ("failed", "failed"), ("cancelled", "cancelled"))
_HUB_COUNTERS = (
    ("gibbs_worker_deaths_total", "Worker processes or connections lost unexpectedly.", "worker_deaths"),
    ("gibbs_handshake_failures_total", "Connections that failed or were refused at the handshake.", "handshake_failures"),
)
_HISTOGRAMS = (
    ("gibbs_request_latency_seconds", "Time from a request's arrival to its answer, per model.", "latency"),
    ("gibbs_queue_wait_seconds", "Time a request waited for a worker, per model.", "queue_wait"),
)


def _escape_label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _float_text(value: float) -> str:
    """A float as Prometheus (Go) writes it: ``+Inf``, ``-Inf``, ``NaN``,
    else Python's shortest repr with Go's earlier switch to exponents."""
    if value == _INF:
        return "+Inf"
    if value == -_INF:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _number(value: object) -> float:
    """A statistic as a number: missing/None/unreadable -> 0."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _value_text(value: object) -> str:
    number = _number(value)
    if isinstance(number, int):
        return str(number)
    return _float_text(number)


def _bound(value: object) -> float:
    """A bucket bound from a snapshot: a float, or a string such as ``"+Inf"``
    (e.g. after a trip through JSON)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("+inf", "inf", "infinity", "+infinity"):
            return _INF
        return float(text)
    return float(value)  # type: ignore[arg-type]


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    inner = ",".join(f'{name}="{_escape_label(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


def _batch_key(size: object) -> tuple[int, float, str]:
    """Batch sizes in numeric order (keys may be ints or strings)."""
    try:
        return (0, float(size), "")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return (1, 0.0, str(size))


def _size_label(size: object) -> str:
    if isinstance(size, float) and size.is_integer():
        return str(int(size))
    return str(size)


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Iterable[tuple[str, object]], value: object) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_value_text(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def prometheus_text(stats: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (format 0.0.4) of a hub statistics dict.

    ``stats`` has hub-wide numbers at the top level and one dict per model
    under ``"models"``; missing numbers count as 0. Models come out sorted by
    name; label values are escaped, so any model name is safe.
    """
    models_map = _mapping(stats.get("models"))
    models = [(str(name), _mapping(models_map[name])) for name in models_map]
    models.sort(key=lambda item: item[0])
    out = _Exposition()

    for name, help_text, key in _MODEL_COUNTERS:
        out.family(name, "counter", help_text)
        for model, m in models:
            out.sample(name, [("model", model)], m.get(key))

    name = "gibbs_request_errors_total"
    out.family(
        name,
        "counter",
        "Requests that ended without a result, per model and kind: user (the model raised), "
        "failed (gibbs gave up: worker deaths, closing), cancelled.",
    )
    for model, m in models:
        for kind, key in _ERROR_KINDS:
            out.sample(name, [("model", model), ("kind", kind)], m.get(key))

    for name, help_text, key in _MODEL_COUNTERS_AFTER_ERRORS:
        out.family(name, "counter", help_text)
        for model, m in models:
            out.sample(name, [("model", model)], m.get(key))

    for name, help_text, key in (
        (
            "gibbs_requests_expired_total",
            "Requests ended by their deadline, per model and stage: queued (never started, or could not "
            "finish in the time left), running (the model took too long).",
            "expired",
        ),
        (
            "gibbs_requests_shed_total",
            "Requests refused at once (OverloadedError), per model and reason: deadline (the predicted "
            "wait exceeds it), max_queued.",
            "shed",
        ),
    ):
        out.family(name, "counter", help_text)
        label = "stage" if key == "expired" else "reason"
        for model, m in models:
            by = _mapping(m.get(key))
            for kind in ("queued", "running") if key == "expired" else ("deadline", "max_queued"):
                out.sample(name, [("model", model), (label, kind)], by.get(kind))

    _priorities(out, models)

    name = "gibbs_batches_total"
    out.family(name, "counter", "Batches run, per model and batch size.")
    for model, m in models:
        sizes = _mapping(m.get("batch_sizes"))
        for size in sorted(sizes, key=_batch_key):
            out.sample(name, [("model", model), ("size", _size_label(size))], sizes[size])

    for name, help_text, key in _HUB_COUNTERS:
        out.family(name, "counter", help_text)
        out.sample(name, (), stats.get(key))

    name = "gibbs_workers"
    out.family(name, "gauge", "Worker processes, per model and state.")
    for model, m in models:
        states = _mapping(m.get("states"))
        extra = sorted(str(state) for state in states if state not in _STATES)
        for state in (*_STATES, *extra):
            out.sample(name, [("model", model), ("state", state)], states.get(state))

    for name, help_text, key in (
        ("gibbs_queued", "Requests waiting for a worker, per model.", "queued"),
        ("gibbs_in_flight", "Requests being run by a worker, per model.", "in_flight"),
    ):
        out.family(name, "gauge", help_text)
        for model, m in models:
            out.sample(name, [("model", model)], m.get(key))

    out.family("gibbs_clients", "gauge", "Clients connected to the hub.")
    out.sample("gibbs_clients", (), stats.get("clients"))
    out.family("gibbs_oldest_queued_seconds", "gauge", "Age of the oldest queued request (0 when none).")
    out.sample("gibbs_oldest_queued_seconds", (), stats.get("oldest_queued_seconds"))

    for name, help_text, key in _HISTOGRAMS:
        out.family(name, "histogram", help_text)
        for model, m in models:
            _histogram(out, name, model, _mapping(m.get(key)))

    return out.text()


#: Outcomes counted per priority class (keys of a model's "priorities" entries).
_PRIORITY_OUTCOMES = ("completed", "errors", "failed", "cancelled", "expired", "shed")


def _priorities(out: _Exposition, models: list[tuple[str, Mapping[str, Any]]]) -> None:
    """Per model and priority class (``gibbs_priority``): requests, outcomes, queued."""
    per = [(model, _mapping(m.get("priorities"))) for model, m in models]
    name = "gibbs_priority_requests_total"
    out.family(name, "counter", "Requests received, per model and priority class.")
    for model, classes in per:
        for p in sorted(classes, key=_batch_key):
            out.sample(name, [("model", model), ("priority", p)], _mapping(classes[p]).get("requests"))
    name = "gibbs_priority_outcomes_total"
    out.family(
        name,
        "counter",
        "Requests ended, per model, priority class and outcome: completed, errors (the model raised), "
        "failed, cancelled (expired included), expired, shed (refused at once, or displaced from a full queue).",
    )
    for model, classes in per:
        for p in sorted(classes, key=_batch_key):
            entry = _mapping(classes[p])
            for outcome in _PRIORITY_OUTCOMES:
                out.sample(name, [("model", model), ("priority", p), ("outcome", outcome)], entry.get(outcome))
    name = "gibbs_priority_queued"
    out.family(name, "gauge", "Requests waiting for a worker, per model and priority class.")
    for model, classes in per:
        for p in sorted(classes, key=_batch_key):
            out.sample(name, [("model", model), ("priority", p)], _mapping(classes[p]).get("queued"))


def _histogram(out: _Exposition, name: str, model: str, snap: Mapping[str, Any]) -> None:
    count = _number(snap.get("count"))
    raw = snap.get("buckets")
    if raw:
        buckets = sorted(((_bound(le), _number(n)) for le, n in raw), key=lambda pair: pair[0])
    else:  # no window yet: the standard bounds, all empty
        buckets = [(le, 0) for le in BUCKETS]
    if not buckets or buckets[-1][0] != _INF:
        buckets.append((_INF, count))
    for le, n in buckets:
        out.sample(f"{name}_bucket", [("model", model), ("le", _float_text(le))], n)
    out.sample(f"{name}_sum", [("model", model)], snap.get("sum"))
    out.sample(f"{name}_count", [("model", model)], count)
