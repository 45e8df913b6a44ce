"""An async worker's slots: its model's coroutines (and async generators)
run on an event loop in a thread of its own, ``gibbs_concurrency`` at once;
a STOP from the hub cancels the coroutine (``CancelledError`` in the
model), a stream waits on its own credit there, so one slow consumer holds
up no other slot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from . import protocol, tracing

if TYPE_CHECKING:
    from .worker import _Runtime

async def _drain_agen(agen: Any) -> None:
    async for _ in agen:
        pass


async def _identity(aw: Any) -> Any:
    return await aw


async def _one(value: Any) -> Any:
    yield value


class _AsyncStreamState:
    """Flow control of one stream running on an async worker's loop (touched
    only on that loop: the serving thread hands frames over with
    ``call_soon_threadsafe``)."""

    __slots__ = ("granted", "stopped", "changed")

    def __init__(self) -> None:
        self.granted = protocol.STREAM_WINDOW
        self.stopped = False
        self.changed: Optional[asyncio.Event] = None

    def control(self, n: int) -> None:
        if n < 0:
            self.stopped = True
        else:
            self.granted += n
        if self.changed is not None:
            self.changed.set()


class AsyncSlots:
    def __init__(self, rt: "_Runtime") -> None:
        self.rt = rt

    def start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self.rt.aloop = loop
        self.rt.aloop_thread = threading.Thread(target=run, name="gibbs-worker-loop", daemon=True)
        self.rt.aloop_thread.start()
        ready.wait()

    def stop_loop(self) -> None:
        loop, thread = self.rt.aloop, self.rt.aloop_thread
        if loop is None or thread is None:
            return
        self.drain()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()
        self.rt.aloop = self.rt.aloop_thread = None

    def drain(self, timeout: float = 60.0) -> None:
        """Wait for the async calls in progress (each sends its own answer)."""
        if self.rt.async_calls:
            concurrent.futures.wait(list(self.rt.async_calls), timeout)

    def run(self, req_id: int, aw: Any) -> None:
        if self.rt.aloop is None:  # a sync __call__ that returned an awaitable
            self.start_loop()
        assert self.rt.aloop is not None
        sock = self.rt.sock
        fut = asyncio.run_coroutine_threadsafe(self._answer(sock, req_id, aw), self.rt.aloop)
        if self.rt._span is not None:  # a traced call: its span ends with the coroutine
            span, self.rt._span, started = self.rt._span, None, time.monotonic()
            fut.add_done_callback(lambda f: tracing.finish(span, started, "cancelled" if f.cancelled() else None))
        self.rt.async_calls.add(fut)
        self.rt.async_by_id[req_id] = fut
        fut.add_done_callback(self.rt.async_calls.discard)
        fut.add_done_callback(lambda f: self._done(sock, req_id, f))

    def _done(self, sock: Optional[socket.socket], req_id: int, fut: "concurrent.futures.Future[Any]") -> None:
        """An async call ended. One the hub stopped (its caller is gone: the
        model got CancelledError) is answered all the same, with an error the
        hub drops, so that the hub knows its slot is free."""
        self.rt.async_by_id.pop(req_id, None)
        if not fut.cancelled() or req_id not in self.rt.stopped_ids:
            return
        self.rt.stopped_ids.discard(req_id)
        if sock is None:
            return
        try:
            err = asyncio.CancelledError("stopped: its caller is gone")
            self.rt._send(sock, self.rt._calls.error_frame(req_id, protocol.ERR_USER, err, tb=""))
        except OSError:
            pass

    async def _answer(self, sock: Optional[socket.socket], req_id: int, aw: Any) -> None:
        try:
            if inspect.isasyncgen(aw):
                result: Any = [item async for item in aw]
            else:
                result = await aw
        except Exception as exc:
            buffers = self.rt._calls.error_frame(req_id, protocol.ERR_USER, exc)
            payloads: list[protocol.Payload] = []
        else:
            buffers, payloads = self.rt._calls.result_frame(req_id, result)
            del result
        if sock is None:
            return
        try:
            self.rt._send_answers(sock, buffers, [p for p in payloads if p.shm_path is not None])
        except OSError:
            pass  # the connection is gone: the hub re-sends what we held

    def start_stream(self, sock: socket.socket, req_id: int, body: protocol.Buffer) -> None:
        """An async worker streams on its loop, so that its other slots (and
        other streams) go on while one consumer is slow. CREDIT and STOP
        frames reach the stream through ``async_streams``."""
        if self.rt.aloop is None:
            self.start_loop()
        assert self.rt.aloop is not None
        state = _AsyncStreamState()
        self.rt.async_streams[req_id] = state
        fut = asyncio.run_coroutine_threadsafe(self._astream(sock, req_id, body, state), self.rt.aloop)
        self.rt.async_calls.add(fut)
        fut.add_done_callback(self.rt.async_calls.discard)

    async def _astream(self, sock: socket.socket, req_id: int, body: protocol.Buffer, state: "_AsyncStreamState") -> None:
        state.changed = asyncio.Event()
        out: list[protocol.Buffer]
        try:
            try:
                args, kwargs = protocol.decode(body, cache=self.rt.maps, in_place=not self.rt.spec.copy_args)
            except Exception as exc:
                out = self.rt._calls.error_frame(req_id, protocol.ERR_ARGS_UNPICKLE, exc)
            else:
                out = await self._astream_items(sock, req_id, args, kwargs, state)
            try:
                self.rt._send(sock, out)
            except OSError:
                pass
        finally:
            self.rt.async_streams.pop(req_id, None)

    async def _astream_items(
        self, sock: socket.socket, req_id: int, args: Any, kwargs: Any, state: "_AsyncStreamState"
    ) -> list[protocol.Buffer]:
        """Send the items; return the closing frame (RESULT None, or ERROR)."""
        agen: Any = None
        sent = 0
        changed = state.changed
        assert changed is not None
        try:
            result = self.rt.model(*args, **kwargs)
            del args, kwargs
            if inspect.isasyncgen(result):
                agen = result
            else:
                value = await result if inspect.isawaitable(result) else result
                agen = _one(value)
            async for item in agen:
                try:
                    payload = protocol.encode(item)
                except Exception as exc:
                    return self.rt._calls.error_frame(req_id, protocol.ERR_RESULT_PICKLE, exc)
                while sent >= state.granted and not state.stopped:
                    changed.clear()
                    await changed.wait()
                if state.stopped:
                    break
                try:
                    self.rt._send(sock, protocol.pack_frame(protocol.CHUNK, req_id, payload.body))
                except OSError:
                    break  # the hub is gone: it re-sends or fails the stream
                sent += 1
        except Exception as exc:
            return self.rt._calls.error_frame(req_id, protocol.ERR_USER, exc)
        finally:
            if agen is not None:
                await agen.aclose()  # runs its finally when stopped early
        return protocol.pack_frame(protocol.RESULT, req_id, protocol.encode(None).body)

    def await_(self, aw: Any) -> Any:
        if self.rt.aloop is None:
            self.start_loop()
        assert self.rt.aloop is not None
        return asyncio.run_coroutine_threadsafe(_identity(aw), self.rt.aloop).result()

    def iterate(self, agen: Any) -> Any:
        """A plain generator over an async generator run on the worker's
        loop (one item at a time, driven from the serving thread)."""
        try:
            while True:
                try:
                    yield self.await_(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.await_(agen.aclose())
