"""OpenTelemetry (gibbs[otel]): a traced call makes a span in the caller and
a child span in the worker, through a real pool; without OpenTelemetry (its
import blocked) gibbs serves calls and never imports it; installed but not
configured, nothing goes on the wire."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from conftest import free_port

from gibbs import protocol, tracing

pytest.importorskip("opentelemetry.sdk", reason="the test extra installs opentelemetry-sdk (gibbs[otel])")

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(TESTS), "src")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, TESTS, env.get("PYTHONPATH", "")])
    return env


def _one(spans: list[dict[str, Any]], name: str, rid: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and s["attributes"].get("gibbs.request_id") == rid]
    assert len(found) == 1, (name, rid, spans)
    return found[0]


@pytest.mark.timeout(180)
def test_a_traced_call_has_a_span_in_the_caller_and_a_child_in_the_worker() -> None:
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS, "scripts", "otel_pool.py"), str(free_port())],
        env=_env(), capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    caller, leaf, outer = out["caller"], out["leaf"], out["outer"]

    for rid, root_name in (("r-sync", "web request"), ("r-async", "async web request")):
        root = next(s for s in caller if s["name"] == root_name)
        mine = _one(caller, "gibbs leaf", rid)
        assert mine["parent"] == root["span_id"] and mine["trace_id"] == root["trace_id"]
        assert mine["attributes"]["gibbs.model"] == "leaf"
        assert mine["attributes"]["gibbs.queue_wait_s"] >= 0
        served = _one(leaf, "gibbs leaf serve", rid)
        assert served["trace_id"] == root["trace_id"] and served["parent"] == mine["span_id"]
        attrs = served["attributes"]
        assert (attrs["gibbs.model"], attrs["gibbs.worker"]) == ("leaf", "leaf-1")
        assert attrs["gibbs.queue_wait_s"] >= 0 and attrs["gibbs.model_time_s"] >= 0
        assert not mine["error"] and not served["error"]

    # A call that raised: both spans say so.
    assert _one(caller, "gibbs leaf", "r-boom")["error"]
    assert _one(leaf, "gibbs leaf serve", "r-boom")["error"]

    # A model calling a model: one trace, caller -> outer worker -> its call -> leaf worker.
    top = _one(caller, "gibbs outer", "r-nested")
    outer_served = _one(outer, "gibbs outer serve", "r-nested")
    nested = _one(outer, "gibbs leaf", "r-nested")
    leaf_served = _one(leaf, "gibbs leaf serve", "r-nested")
    assert outer_served["parent"] == top["span_id"]
    assert nested["parent"] == outer_served["span_id"]
    assert leaf_served["parent"] == nested["span_id"]
    assert len({top["trace_id"], outer_served["trace_id"], nested["trace_id"], leaf_served["trace_id"]}) == 1


BLOCKED = textwrap.dedent('''
    import importlib.abc
    import sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())

    import asyncio
    import gibbs
    from gibbs import Hub
    from gibbs_test_models import OtelImported

    with Hub(port=int(sys.argv[1])) as hub:
        hub.serve(OtelImported, gibbs_workers=1)
        hub.wait_for_workers_sync(1, timeout=60)
        answers = [hub.submit(i, gibbs_request_id=f"r{i}").result(timeout=30) for i in range(5)]
        answers.append(asyncio.run(hub.request(5)))
    assert [a[0] for a in answers] == list(range(6)), answers
    assert all(a[1] == [] for a in answers), answers  # the worker never imported it
    here = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    assert here == [], here
    print("ok")
''')


@pytest.mark.timeout(120)
def test_without_opentelemetry_gibbs_serves_and_never_imports_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(free_port())], env=_env(), capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


def test_imported_but_not_configured_sends_nothing() -> None:
    import opentelemetry.trace as trace

    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider", "a test set a provider in-process"
    payload = protocol.Payload(b"")
    assert tracing.begin("m", payload) is None and payload.trace is None
    assert not tracing.active()


def test_trace_frames_round_trip() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    frame = b"".join(bytes(b) for b in protocol.pack_trace(3, tp, 0.25))
    kind, req_id, _ = protocol.HEADER.unpack_from(frame)
    assert (kind, req_id) == (protocol.TRACE, 3)
    assert protocol.unpack_trace(frame[protocol.HEADER.size :]) == (tp, 0.25)
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_trace(b"nonsense")
    body = protocol.encode(((1,), {})).body
    fwd = b"".join(bytes(b) for b in protocol.pack_forward(9, "m", 0, body, "rid-1", tp))
    model, flags, payload, rid, trace = protocol.unpack_forward(fwd[protocol.HEADER.size :])
    assert (model, rid, trace, bytes(payload)) == ("m", "rid-1", tp, bytes(body))
    fwd = b"".join(bytes(b) for b in protocol.pack_forward(9, "m", 0, body, None, tp))
    assert protocol.unpack_forward(fwd[protocol.HEADER.size :])[3:] == (None, tp)
