"""metrics.py: the duration Window and the Prometheus text exposition."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gibbs.metrics import BUCKETS, CONTENT_TYPE, Window, prometheus_text

INF = float("inf")

# ---------------------------------------------------------------- Window


def test_empty_snapshot() -> None:
    snap = Window().snapshot()
    assert snap["count"] == 0
    assert snap["sum"] == 0.0
    assert snap["p50"] is None and snap["p95"] is None and snap["p99"] is None
    assert [le for le, _ in snap["buckets"]] == [*BUCKETS, "+Inf"]
    assert all(n == 0 for _, n in snap["buckets"])


def test_buckets_cumulative_and_monotone() -> None:
    w = Window()
    rng = random.Random(7)
    samples = [rng.expovariate(1 / 0.2) for _ in range(5000)] + [100.0, 0.0, 0.0005, 60.0]
    for s in samples:
        w.add(s)
    snap = w.snapshot()
    bounds = [le for le, _ in snap["buckets"]]
    counts = [n for _, n in snap["buckets"]]
    assert bounds == [*BUCKETS, "+Inf"]
    assert counts == sorted(counts)  # monotone
    # Cumulative, Prometheus "le" semantics: a bucket counts samples <= its bound.
    for le, n in snap["buckets"]:
        bound = INF if le == "+Inf" else le
        assert n == sum(1 for s in samples if s <= bound)
    assert counts[-1] == snap["count"] == len(samples)
    assert snap["sum"] == pytest.approx(sum(samples))


def test_sample_on_a_bound_goes_into_that_bucket() -> None:
    w = Window()
    w.add(0.001)
    w.add(60.0)
    w.add(60.000001)
    buckets = dict((le, n) for le, n in w.snapshot()["buckets"])
    assert buckets[0.0005] == 0
    assert buckets[0.001] == 1
    assert buckets[30.0] == 1
    assert buckets[60.0] == 2
    assert buckets["+Inf"] == 3


def test_quantiles_on_known_data() -> None:
    w = Window()
    values = [i / 1000 for i in range(1, 101)]  # 0.001 .. 0.100
    random.Random(1).shuffle(values)
    for v in values:
        w.add(v)
    snap = w.snapshot()
    assert snap["p50"] == 0.050
    assert snap["p95"] == 0.095
    assert snap["p99"] == 0.099


def test_quantiles_single_and_few_samples() -> None:
    w = Window()
    w.add(0.3)
    snap = w.snapshot()
    assert snap["p50"] == snap["p95"] == snap["p99"] == 0.3
    w.add(0.1)
    snap = w.snapshot()
    assert snap["p50"] == 0.1  # nearest rank: ceil(0.5 * 2) = 1st
    assert snap["p95"] == snap["p99"] == 0.3


def test_ring_keeps_only_the_last_size_samples() -> None:
    w = Window()
    assert w.size == 1024
    # 1000 huge samples, then 1024 small ones: the huge ones must be gone
    # from the quantiles, but stay in the histogram, count and sum.
    for _ in range(1000):
        w.add(50.0)
    for i in range(1, 1025):
        w.add(i / 10_000)  # 0.0001 .. 0.1024
    snap = w.snapshot()
    assert snap["count"] == 2024
    assert snap["sum"] == pytest.approx(50_000 + sum(i / 10_000 for i in range(1, 1025)))
    assert snap["p99"] is not None and snap["p99"] < 0.11
    assert snap["p50"] == 512 / 10_000
    assert snap["p95"] == 973 / 10_000  # ceil(0.95 * 1024) = 973
    assert snap["p99"] == 1014 / 10_000  # ceil(0.99 * 1024) = 1014
    buckets = dict((le, n) for le, n in snap["buckets"])
    assert buckets[60.0] == 2024 and buckets[30.0] == 1024


def test_small_ring_wraps() -> None:
    w = Window(size=3)
    for v in (9.0, 8.0, 1.0, 2.0, 3.0):
        w.add(v)
    snap = w.snapshot()
    assert snap["p50"] == 2.0 and snap["p99"] == 3.0
    assert snap["count"] == 5
    with pytest.raises(ValueError):
        Window(size=0)


def test_snapshot_is_a_copy_and_json_friendly() -> None:
    w = Window()
    w.add(0.02)
    snap = w.snapshot()
    snap["buckets"][0][1] = 99
    assert w.snapshot()["buckets"][0][1] == 0
    # Strict JSON (no Infinity): what web frameworks' JSON responses demand.
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap


# ---------------------------------------------------------------- exposition

ODD = 'we"ird\\na\nme'  # a quote, a backslash and a newline


def _window(samples: list[float]) -> dict[str, Any]:
    w = Window()
    for s in samples:
        w.add(s)
    return dict(w.snapshot())


def _stats() -> dict[str, Any]:
    return {
        "role": "router",
        "workers": 5,
        "busy": 2,
        "idle": 3,
        "queued": 4,
        "in_flight": 3,
        "completed": 30,
        "failed": 3,
        "errors": 2,
        "retried": 1,
        "resent": 2,
        "cancelled": 1,
        "abandoned": 0,
        "worker_deaths": 2,
        "handshake_failures": 1,
        "init_failures": 0,
        "restarts": 1,
        "clients": 7,
        "oldest_queued_seconds": 1.25,
        "models": {
            "resnet": {
                "class": "ResNet",
                "workers": 3,
                "busy": 1,
                "queued": 3,
                "in_flight": 2,
                "requests": 25,
                "completed": 20,
                "errors": 2,
                "failed": 1,
                "resent": 2,
                "retried": 1,
                "cancelled": 1,
                "restarts": 1,
                "states": {"loading": 1, "ready": 1, "busy": 1, "leaving": 0},
                "batch_sizes": {1: 4, 8: 2, 16: 1},
                "latency": _window([0.0004, 0.003, 0.02, 0.02, 0.7, 3.0, 120.0]),
                "queue_wait": _window([0.0001, 0.0002, 0.05]),
            },
            ODD: {
                "class": "Odd",
                "workers": 2,
                "busy": 1,
                "queued": 1,
                "in_flight": 1,
                "requests": 12,
                "completed": 10,
                "errors": 0,
                "failed": 2,
                "cancelled": 0,
                # no resent/retried/restarts: missing numbers are 0
                "states": {"ready": 1, "busy": 1},
                "batch_sizes": {"2": 5, "10": 1},
                "latency": _window([0.1, 0.2]),
                "queue_wait": _window([]),
            },
        },
    }


EXPECTED_TYPES = {
    "gibbs_requests": "counter",
    "gibbs_requests_completed": "counter",
    "gibbs_request_errors": "counter",
    "gibbs_requests_resent": "counter",
    "gibbs_requests_retried": "counter",
    "gibbs_worker_restarts": "counter",
    "gibbs_requests_expired": "counter",
    "gibbs_requests_shed": "counter",
    "gibbs_batches": "counter",
    "gibbs_priority_requests": "counter",
    "gibbs_priority_outcomes": "counter",
    "gibbs_priority_queued": "gauge",
    "gibbs_worker_deaths": "counter",
    "gibbs_handshake_failures": "counter",
    "gibbs_workers": "gauge",
    "gibbs_queued": "gauge",
    "gibbs_in_flight": "gauge",
    "gibbs_clients": "gauge",
    "gibbs_oldest_queued_seconds": "gauge",
    "gibbs_request_latency_seconds": "histogram",
    "gibbs_queue_wait_seconds": "histogram",
}


def _parse(text: str) -> dict[str, Any]:
    families = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in families, f"{fam.name} appears twice (not contiguous?)"
        families[fam.name] = fam
    return families


def _values(fam: Any, sample_name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in fam.samples
        if sample_name is None or s.name == sample_name
    }


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_every_family_typed_with_help() -> None:
    text = prometheus_text(_stats())
    assert text.endswith("\n")
    families = _parse(text)
    # The lax parser turns stray samples into "untyped" singletons: none allowed.
    assert {name: fam.type for name, fam in families.items()} == EXPECTED_TYPES
    for fam in families.values():
        assert fam.documentation, fam.name
    # Counters are written with their _total suffix.
    for line in text.splitlines():
        if line.startswith("# TYPE") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
    for name, kind in EXPECTED_TYPES.items():
        if kind == "counter":
            assert all(s.name == name + "_total" for s in families[name].samples)


def test_label_values_round_trip() -> None:
    families = _parse(prometheus_text(_stats()))
    models = {s.labels["model"] for s in families["gibbs_requests"].samples}
    assert models == {"resnet", ODD}
    for name in EXPECTED_TYPES:
        for s in families[name].samples:
            if "model" in s.labels:
                assert s.labels["model"] in ("resnet", ODD)


def test_escaping_is_literal() -> None:
    text = prometheus_text({"models": {ODD: {"requests": 1}}})
    assert 'gibbs_requests_total{model="we\\"ird\\\\na\\nme"} 1\n' in text
    for line in text.splitlines():
        assert not line.startswith("me")  # the raw newline never splits a line


def test_values_match_input() -> None:
    stats = _stats()
    families = _parse(prometheus_text(stats))

    def per_model(name: str, key: str) -> None:
        got = _values(families[name])
        want = {(("model", m),): float(d.get(key, 0)) for m, d in stats["models"].items()}
        assert got == want, name

    per_model("gibbs_requests", "requests")
    per_model("gibbs_requests_completed", "completed")
    per_model("gibbs_requests_resent", "resent")
    per_model("gibbs_requests_retried", "retried")
    per_model("gibbs_worker_restarts", "restarts")
    per_model("gibbs_queued", "queued")
    per_model("gibbs_in_flight", "in_flight")

    errors = _values(families["gibbs_request_errors"])
    for m, d in stats["models"].items():
        for kind, key in (("user", "errors"), ("failed", "failed"), ("cancelled", "cancelled")):
            assert errors[(("kind", kind), ("model", m))] == d.get(key, 0)
    assert len(errors) == 6

    workers = _values(families["gibbs_workers"])
    for m, d in stats["models"].items():
        for state in ("loading", "ready", "busy", "leaving"):
            assert workers[(("model", m), ("state", state))] == d["states"].get(state, 0)
    assert len(workers) == 8

    batches = _values(families["gibbs_batches"])
    assert batches == {
        (("model", "resnet"), ("size", "1")): 4,
        (("model", "resnet"), ("size", "8")): 2,
        (("model", "resnet"), ("size", "16")): 1,
        (("model", ODD), ("size", "2")): 5,
        (("model", ODD), ("size", "10")): 1,
    }

    assert _values(families["gibbs_worker_deaths"]) == {(): 2}
    assert _values(families["gibbs_handshake_failures"]) == {(): 1}
    assert _values(families["gibbs_clients"]) == {(): 7}
    assert _values(families["gibbs_oldest_queued_seconds"]) == {(): 1.25}


@pytest.mark.parametrize(
    "family, key", [("gibbs_request_latency_seconds", "latency"), ("gibbs_queue_wait_seconds", "queue_wait")]
)
def test_histograms(family: str, key: str) -> None:
    stats = _stats()
    text = prometheus_text(stats)
    fam = _parse(text)[family]
    for model, d in stats["models"].items():
        snap = d[key]
        buckets = [
            (s.labels["le"], s.value)
            for s in fam.samples
            if s.name == family + "_bucket" and s.labels["model"] == model
        ]
        les = [le for le, _ in buckets]
        assert les == [*(repr(b) for b in BUCKETS), "+Inf"]
        assert les[0] == "0.0005" and "1.0" in les and "60.0" in les
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), "cumulative"
        assert counts == [float(n) for _, n in snap["buckets"]]
        (count,) = [s.value for s in fam.samples if s.name == family + "_count" and s.labels["model"] == model]
        (total,) = [s.value for s in fam.samples if s.name == family + "_sum" and s.labels["model"] == model]
        assert counts[-1] == count == snap["count"]
        assert math.isclose(total, snap["sum"])
    assert f'{family}_bucket{{model="resnet",le="+Inf"}}' in text


def test_latency_values_known() -> None:
    fam = _parse(prometheus_text(_stats()))["gibbs_request_latency_seconds"]
    buckets = {
        s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket") and s.labels["model"] == "resnet"
    }
    # samples 0.0004, 0.003, 0.02, 0.02, 0.7, 3.0, 120.0
    assert buckets["0.0005"] == 1
    assert buckets["0.005"] == 2
    assert buckets["0.025"] == 4
    assert buckets["1.0"] == 5
    assert buckets["5.0"] == 6
    assert buckets["60.0"] == 6
    assert buckets["+Inf"] == 7


def test_minimal_and_json_round_tripped_stats() -> None:
    # Only "models" is required; a model may have nothing but a name.
    families = _parse(prometheus_text({"models": {"m": {}}}))
    assert {name: fam.type for name, fam in families.items()} == EXPECTED_TYPES
    assert _values(families["gibbs_clients"]) == {(): 0}
    lat = families["gibbs_request_latency_seconds"]
    inf = [s.value for s in lat.samples if s.labels.get("le") == "+Inf"]
    assert inf == [0]
    # Stats that went through JSON (inf -> Infinity, int keys -> str) render the same.
    stats = _stats()
    assert prometheus_text(json.loads(json.dumps(stats))) == prometheus_text(stats)
    # No models at all: still a valid exposition.
    assert _parse(prometheus_text({"models": {}}))["gibbs_clients"].type == "gauge"


def test_deterministic_sorted_order() -> None:
    stats = _stats()
    reordered = dict(stats, models=dict(reversed(list(stats["models"].items()))))
    text = prometheus_text(stats)
    assert prometheus_text(reordered) == text
    lines = [ln for ln in text.splitlines() if ln.startswith("gibbs_requests_total")]
    assert lines[0].startswith('gibbs_requests_total{model="resnet"}')  # "r" < "w"


def test_expired_and_shed_by_reason() -> None:
    stats = {
        "models": {
            "m": {
                "expired": {"queued": 3, "running": 1},
                "shed": {"deadline": 7, "max_queued": 2},
            }
        }
    }
    families = _parse(prometheus_text(stats))
    assert _values(families["gibbs_requests_expired"]) == {
        (("model", "m"), ("stage", "queued")): 3.0,
        (("model", "m"), ("stage", "running")): 1.0,
    }
    assert _values(families["gibbs_requests_shed"]) == {
        (("model", "m"), ("reason", "deadline")): 7.0,
        (("model", "m"), ("reason", "max_queued")): 2.0,
    }


def test_per_priority_class() -> None:
    stats = {
        "models": {
            "m": {
                "priorities": {
                    "0": {"requests": 9, "completed": 5, "expired": 2, "shed": 1, "queued": 2},
                    "10": {"requests": 1},
                    "3": {"requests": 4, "completed": 4, "queued": 0},
                }
            },
            "n": {},
        }
    }
    families = _parse(prometheus_text(stats))
    assert _values(families["gibbs_priority_requests"]) == {
        (("model", "m"), ("priority", "0")): 9.0,
        (("model", "m"), ("priority", "3")): 4.0,
        (("model", "m"), ("priority", "10")): 1.0,
    }
    outcomes = _values(families["gibbs_priority_outcomes"])
    assert outcomes[(("model", "m"), ("outcome", "expired"), ("priority", "0"))] == 2.0
    assert outcomes[(("model", "m"), ("outcome", "shed"), ("priority", "0"))] == 1.0
    assert outcomes[(("model", "m"), ("outcome", "completed"), ("priority", "3"))] == 4.0
    assert outcomes[(("model", "m"), ("outcome", "failed"), ("priority", "10"))] == 0.0
    assert len(outcomes) == 3 * 6
    assert _values(families["gibbs_priority_queued"]) == {
        (("model", "m"), ("priority", "0")): 2.0,
        (("model", "m"), ("priority", "3")): 0.0,
        (("model", "m"), ("priority", "10")): 0.0,
    }
    # classes in numeric order, not text order
    text = prometheus_text(stats)
    lines = [ln for ln in text.splitlines() if ln.startswith("gibbs_priority_requests_total")]
    assert [ln.split('priority="')[1].split('"')[0] for ln in lines] == ["0", "3", "10"]
