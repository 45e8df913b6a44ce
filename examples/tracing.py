"""Tracing with OpenTelemetry (``pip install 'gibbs[otel]'``): a call makes a
span in the caller and a child span in the worker that serves it.

Here both processes record their spans in memory, and the script checks
them; a real service sets an exporter (OTLP, say) in the same two places:
once at start-up in the caller's process, and in the model's constructor
(the worker's process).

    python examples/tracing.py
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gibbs import Hub


def setup_tracing() -> InMemorySpanExporter:
    """This process's tracer provider (a forked worker inherits its parent's)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # BatchSpanProcessor(OTLPSpanExporter()) in production
    return exporter


class Square:
    def __init__(self) -> None:
        self.exporter = setup_tracing()
        self.tracer = trace.get_tracer("square")

    def __call__(self, x: Any) -> Any:
        if x == "spans":  # for this example: what the worker recorded
            return [(s.name, dict(s.attributes or {}), s.parent.span_id if s.parent else None)
                    for s in self.exporter.get_finished_spans()]
        with self.tracer.start_as_current_span("square it"):  # a child of gibbs's span in the worker
            return x * x


if __name__ == "__main__":
    exporter = setup_tracing()
    tracer = trace.get_tracer("app")
    with Hub() as hub:
        hub.serve(Square, gibbs_workers=1, gibbs_name="square-1")
        hub.wait_for_workers_sync(1, timeout=30)
        with tracer.start_as_current_span("handle request"):
            assert hub.submit(7, gibbs_request_id="req-1").result(timeout=30) == 49
        worker_spans = hub.submit("spans").result(timeout=30)

    finished = exporter.get_finished_spans()
    call = next(s for s in finished if (s.attributes or {}).get("gibbs.request_id") == "req-1")
    request = next(s for s in finished if s.name == "handle request")
    assert call.name == "gibbs default" and call.parent is not None
    assert call.parent.span_id == request.context.span_id
    print("caller:", call.name, dict(call.attributes))
    served = {attrs.get("gibbs.request_id", name): (attrs, parent) for name, attrs, parent in worker_spans}
    attrs, parent = served["req-1"]
    assert parent == call.context.span_id and attrs["gibbs.request_id"] == "req-1"
    assert attrs["gibbs.worker"] == "square-1" and attrs["gibbs.model_time_s"] >= 0
    print("worker:", "gibbs default serve", attrs)
    assert "square it" in served
