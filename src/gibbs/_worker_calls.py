"""A worker's calls, one at a time or a batch: a REQUEST runs
``model(*args, **kwargs)`` (an async model's on its loop, see
``_worker_async``), a BATCH runs ``model(xs)`` on the items still wanted
(those past their deadline or stopped before the batch starts are answered
"dropped"), each with its deadline, priority class, request id and (when
its caller traces) span set around it. Returns the answer's frames.
"""

from __future__ import annotations

import time
import traceback
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import TYPE_CHECKING, Any, Optional

from . import protocol, tracing
from ._context import _DEADLINE, _PRIORITY, _REQUEST_ID, request_id

_ASYNC_RESULTS = (CoroutineType, AsyncGeneratorType)

if TYPE_CHECKING:
    from .worker import _Runtime


class Calls:
    def __init__(self, rt: "_Runtime") -> None:
        self.rt = rt

    def note_deadline(self, req_id: int, body: protocol.Buffer) -> None:
        self.rt.deadlines[req_id] = time.monotonic() + protocol.unpack_deadline(body)

    def handle(self, req_id: int, body: protocol.Buffer) -> tuple[list[protocol.Buffer], list[protocol.Payload]]:
        """Run one request; return the answer's frame buffers (and its payload)."""
        # Not reset after the call: the next call sets it before it runs
        # (an async model's task copies it).
        _REQUEST_ID.set(self.rt.rids.pop(req_id, req_id) if self.rt.rids else req_id)
        if self.rt.priorities:
            ptoken = _PRIORITY.set(self.rt.priorities.pop(req_id, None))
            try:
                return self._handle_deadline(req_id, body)
            finally:
                _PRIORITY.reset(ptoken)
        return self._handle_deadline(req_id, body)

    def _handle_deadline(self, req_id: int, body: protocol.Buffer) -> tuple[list[protocol.Buffer], list[protocol.Payload]]:
        if self.rt.traces and req_id in self.rt.traces:
            return self._handle_traced(req_id, body)
        if not self.rt.deadlines:
            return self._handle_call(req_id, body)
        token = _DEADLINE.set(self.rt.deadlines.pop(req_id, None))
        try:
            return self._handle_call(req_id, body)  # an async model's task copies the deadline
        finally:
            _DEADLINE.reset(token)

    def _handle_traced(self, req_id: int, body: protocol.Buffer) -> tuple[list[protocol.Buffer], list[protocol.Payload]]:
        """``_handle`` of a call whose caller traces: in a span of its own (gibbs.tracing)."""
        traceparent, queued = self.rt.traces.pop(req_id)
        span = tracing.serve_span(traceparent, queued, self.rt.spec.model, str(self.rt.spec.name), request_id())
        token = _DEADLINE.set(self.rt.deadlines.pop(req_id, None))
        started = time.monotonic()
        self.rt._span = span
        try:
            with tracing.current(span):
                buffers, payloads = self._handle_call(req_id, body)
        finally:
            _DEADLINE.reset(token)
        if self.rt._span is not None:  # not an async call (that one ends its span when done)
            self.rt._span = None
            failed = bool(buffers) and protocol.HEADER.unpack_from(buffers[0])[0] == protocol.ERROR
            tracing.finish(span, started, "the call answered an error" if failed else None)
        return buffers, payloads

    def _handle_call(self, req_id: int, body: protocol.Buffer) -> tuple[list[protocol.Buffer], list[protocol.Payload]]:
        try:
            args, kwargs = protocol.decode(body, cache=self.rt.maps, in_place=not self.rt.spec.copy_args)
        except Exception as exc:
            return self.error_frame(req_id, protocol.ERR_ARGS_UNPICKLE, exc), []
        try:
            result = self.rt.model(*args, **kwargs)
            if isinstance(result, GeneratorType):  # (inspect.isgenerator)
                result = list(result)  # a plain request to a streaming model: all items at once
        except Exception as exc:
            del args, kwargs
            return self.error_frame(req_id, protocol.ERR_USER, exc), []
        del args, kwargs
        if isinstance(result, _ASYNC_RESULTS):  # (inspect.iscoroutine, inspect.isasyncgen)
            self.rt._async.run(req_id, result)
            return [], []  # answered from the event loop's thread when done
        return self.result_frame(req_id, result)

    def result_frame(self, req_id: int, result: Any) -> tuple[list[protocol.Buffer], list[protocol.Payload]]:
        try:
            payload = protocol.encode(result, self.rt.pool if self.rt.shm_ok else None)
        except Exception as exc:
            return self.error_frame(req_id, protocol.ERR_RESULT_PICKLE, exc), []
        frame: list[protocol.Buffer] = []
        protocol.pack_frame_to(frame, protocol.RESULT, req_id, payload.body)  # a small answer: one buffer
        return frame, [payload]

    def error_frame(
        self, req_id: int, kind: str, exc: BaseException, tb: Optional[str] = None
    ) -> list[protocol.Buffer]:
        if tb is None:
            tb = traceback.format_exc()
        return protocol.pack_frame(protocol.ERROR, req_id, protocol.make_error_body(kind, exc, tb))

    def handle_batch(self, body: protocol.Buffer) -> tuple[list[protocol.Buffer], list[protocol.Payload]]:
        """Run a batch: ``model(xs)`` with the single argument of each live
        request (an item past its deadline or stopped before the batch
        starts is answered ERR_DROPPED, and the model never sees it);
        answers go one frame per request."""
        out: list[protocol.Buffer] = []
        payloads: list[protocol.Payload] = []
        ids: list[int] = []
        xs: list[Any] = []
        items = protocol.unpack_batch(body)
        gone = self._dropped([i for i, _ in items]) if self.rt.deadlines or self.rt.pending else ()
        for req_id, item in items:
            if req_id in gone:
                self.rt.deadlines.pop(req_id, None)
                self.rt.priorities.pop(req_id, None)
                why = ValueError("taken out of its batch before it started: past its deadline, or its caller gone")
                out.extend(self.error_frame(req_id, protocol.ERR_DROPPED, why, tb=""))
                continue
            try:
                args, kwargs = protocol.decode(item, cache=self.rt.maps, in_place=not self.rt.spec.copy_args)
            except Exception as exc:
                out.extend(self.error_frame(req_id, protocol.ERR_ARGS_UNPICKLE, exc))
                continue
            if len(args) != 1 or kwargs:
                err = TypeError(
                    f"model {self.rt.spec.model!r} is batched (gibbs_batch_size={self.rt.spec.batch_size}): a request "
                    f"takes exactly one positional argument and no keyword arguments"
                )
                out.extend(self.error_frame(req_id, protocol.ERR_USER, err, tb=""))
                continue
            ids.append(req_id)
            xs.append(args[0])
        if not ids:
            return out, payloads
        rids = [self.rt.rids.pop(i, i) for i in ids] if self.rt.rids else ids
        if self.rt.traces:  # a batch has its callers' spans only
            for i in ids:
                self.rt.traces.pop(i, None)
        _REQUEST_ID.set(rids[0])
        deadlines = [d for d in (self.rt.deadlines.pop(i, None) for i in ids) if d is not None] if self.rt.deadlines else []
        classes = [p for p in (self.rt.priorities.pop(i, None) for i in ids) if p is not None] if self.rt.priorities else []
        token = _DEADLINE.set(min(deadlines) if deadlines else None)
        ptoken = _PRIORITY.set(max(classes)) if classes else None
        try:
            results = self.rt.model(xs)
        except Exception as exc:
            error = protocol.make_error_body(protocol.ERR_USER, exc, traceback.format_exc())
            for req_id in ids:
                out.extend(protocol.pack_frame(protocol.ERROR, req_id, error))
            return out, payloads
        finally:
            _DEADLINE.reset(token)
            if ptoken is not None:
                _PRIORITY.reset(ptoken)
        del xs
        try:
            n = len(results)
        except TypeError:
            n = -1
        if n != len(ids):
            got = f"{n} results" if n >= 0 else f"a {type(results).__name__}"
            bad = ValueError(
                f"a batched model must return a list of as many results as inputs: got {got} for {len(ids)} inputs"
            )
            error = protocol.make_error_body(protocol.ERR_USER, bad, "")
            for req_id in ids:
                out.extend(protocol.pack_frame(protocol.ERROR, req_id, error))
            return out, payloads
        for req_id, result in zip(ids, results):
            if isinstance(result, BaseException):
                tb = "".join(traceback.format_exception(type(result), result, result.__traceback__))
                out.extend(protocol.pack_frame(protocol.ERROR, req_id, protocol.make_error_body(protocol.ERR_USER, result, tb)))
                continue
            buffers, ps = self.result_frame(req_id, result)
            out.extend(buffers)
            payloads.extend(ps)
        return out, payloads

    def _dropped(self, ids: list[int]) -> set[int]:
        """The items of a batch about to start that nobody waits for: past
        their deadline, or stopped by the hub (their caller cancelled, or a
        hedge won) in a STOP frame already read. Their STOP frames are used up."""
        gone: set[int] = set()
        if self.rt.deadlines:
            now = time.monotonic()
            gone.update(i for i in ids if (d := self.rt.deadlines.get(i)) is not None and d <= now)
        if self.rt.pending:
            wanted = set(ids)
            stops = [f for f in self.rt.pending if f[0] == protocol.STOP and f[1] in wanted]
            if stops:
                gone.update(f[1] for f in stops)
                keep = [f for f in self.rt.pending if not (f[0] == protocol.STOP and f[1] in wanted)]
                self.rt.pending.clear()
                self.rt.pending.extend(keep)
        return gone
