"""Run by tests/test_tracing.py in a process of its own (a tracer provider
is set once per process): a traced caller, a real pool, the spans of both
sides printed as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gibbs_test_models import Traced  # noqa: E402

from gibbs import Hub, UserCodeException  # noqa: E402


def spans(exporter: InMemorySpanExporter) -> list[dict]:
    return [
        {
            "name": s.name,
            "trace_id": s.context.trace_id,
            "span_id": s.context.span_id,
            "parent": s.parent.span_id if s.parent is not None else None,
            "attributes": dict(s.attributes or {}),
            "error": not s.status.is_ok,
        }
        for s in exporter.get_finished_spans()
    ]


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("test")
    with Hub(port=int(sys.argv[1])) as hub:
        hub.serve(Traced, gibbs_workers=1, gibbs_model="leaf", gibbs_name="leaf-1")
        hub.serve(Traced, "leaf", gibbs_workers=1, gibbs_model="outer", gibbs_name="outer-1")
        hub.wait_for_workers_sync(2, timeout=60)
        with tracer.start_as_current_span("web request"):
            assert hub.submit(3, gibbs_model="leaf", gibbs_request_id="r-sync").result(timeout=30) == 3
        with tracer.start_as_current_span("async web request"):
            assert asyncio.run(hub.request(4, gibbs_model="leaf", gibbs_request_id="r-async")) == 4
        try:
            hub.submit("boom", gibbs_model="leaf", gibbs_request_id="r-boom").result(timeout=30)
        except UserCodeException:
            pass
        else:
            raise AssertionError("boom did not raise")
        assert hub.submit(5, gibbs_model="outer", gibbs_request_id="r-nested").result(timeout=30) == 5
        # Each worker reports the spans it recorded (these calls are untraced: no current span is needed).
        out = {
            "caller": spans(exporter),
            "leaf": hub.submit("spans", gibbs_model="leaf").result(timeout=30),
            "outer": hub.submit("spans", gibbs_model="outer").result(timeout=30),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
