"""OpenTelemetry tracing of gibbs calls (optional: ``pip install 'gibbs[otel]'``).

gibbs never imports OpenTelemetry on its own account. A call is traced when
its caller's process has imported ``opentelemetry.trace`` and set a tracer
provider (the application configures the SDK and its exporter); otherwise
nothing is imported, nothing is sent and a call pays one dictionary lookup.

A traced call makes two spans:

* in the caller, ``gibbs <model>`` (kind CLIENT), a child of the caller's
  current span, from the call to its answer: ``gibbs.model``,
  ``gibbs.request_id``, ``gibbs.queue_wait_s`` (how long it waited for a
  worker), its error if it failed;
* in the worker, ``gibbs <model> serve`` (kind SERVER), a child of the first:
  ``gibbs.model``, ``gibbs.worker``, ``gibbs.request_id``,
  ``gibbs.queue_wait_s`` and ``gibbs.model_time_s`` (the model's own time).
  It is current while the model runs: the model's own spans, and the calls
  it makes through the hub, are its children. The worker's process needs
  OpenTelemetry installed and a provider set to export it (else the span
  is not recorded, and the trace goes on through it all the same).

The caller's W3C trace context (``traceparent``) travels to the worker in
a TRACE frame sent before the call, and in a FORWARD frame from a client
hub to its router. Streams and batched calls get the caller's span only.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, Optional

_OTEL = "opentelemetry.trace"
_UNSET = ("ProxyTracerProvider", "NoOpTracerProvider")


def active() -> bool:
    """True when this process traces: OpenTelemetry imported, a provider set."""
    trace = sys.modules.get(_OTEL)
    return trace is not None and type(trace.get_tracer_provider()).__name__ not in _UNSET


def begin(model: str, payload: Any) -> Any:
    """The caller's span of a call (None: this process does not trace), its
    trace context put in ``payload.trace`` for the worker."""
    trace = sys.modules.get(_OTEL)
    if trace is None or type(trace.get_tracer_provider()).__name__ in _UNSET:
        return None
    attributes = {"gibbs.model": model}
    if payload.rid is not None:
        attributes["gibbs.request_id"] = payload.rid
    span = trace.get_tracer("gibbs").start_span(f"gibbs {model}", kind=trace.SpanKind.CLIENT, attributes=attributes)
    ctx = span.get_span_context()
    if ctx.is_valid:
        payload.trace = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    return span


def end(span: Any, request_id: str, call: Any, error: Optional[BaseException]) -> None:
    """The caller's span ends: with the call's queue wait, and its error."""
    span.set_attribute("gibbs.request_id", request_id)
    if call.dispatched:
        span.set_attribute("gibbs.queue_wait_s", max(0.0, call.sent_at - call.t0))
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


def end_future(span: Any, request_id: str, call: Any, fut: Any) -> None:
    """``end`` for a ``concurrent.futures`` caller (a done-callback)."""
    error: Optional[BaseException]
    if fut.cancelled():
        error = None
        span.set_attribute("gibbs.cancelled", True)
    else:
        error = fut.exception()
    end(span, request_id, call, error)


def serve_span(traceparent: str, queued: float, model: str, worker: str, request_id: Optional[str]) -> Any:
    """The worker's span of a traced call (None: OpenTelemetry is not
    installed here, or the trace context is malformed)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    try:
        version, trace_id, span_id, flags = traceparent.split("-")
        parent = trace.SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(int(flags, 16))
        )
    except ValueError:
        return None
    if version != "00" or not parent.is_valid:
        return None
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    attributes: dict[str, Any] = {"gibbs.model": model, "gibbs.worker": worker, "gibbs.queue_wait_s": queued}
    if request_id is not None:
        attributes["gibbs.request_id"] = request_id
    return trace.get_tracer("gibbs").start_span(
        f"gibbs {model} serve", context=context, kind=trace.SpanKind.SERVER, attributes=attributes
    )


@contextlib.contextmanager
def current(span: Any) -> Iterator[None]:
    """``span`` is the current span inside the block (the model's call)."""
    if span is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


def finish(span: Any, started: float, failed: Optional[str]) -> None:
    """The worker's span ends, with the model's time and its error."""
    span.set_attribute("gibbs.model_time_s", time.monotonic() - started)
    if failed is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, failed))
    span.end()
