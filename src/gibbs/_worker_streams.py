"""A sync worker's streams: the generator's items go back as CHUNKs
within the caller's credit window (CREDIT frames widen it, STOP closes the
generator); the worker reads control frames between items.
"""

from __future__ import annotations

import inspect
import select
import socket
from typing import TYPE_CHECKING, Any

from . import protocol

if TYPE_CHECKING:
    from .worker import _Runtime


class Streams:
    def __init__(self, rt: "_Runtime") -> None:
        self.rt = rt

    def stream(self, sock: socket.socket, req_id: int, body: protocol.Buffer) -> None:
        """Run a streamed request: each item the model yields goes out as a
        CHUNK at once, at most ``STREAM_WINDOW`` ahead of what the caller has
        consumed (CREDIT frames); a STOP closes the generator (its
        ``finally`` runs). Ends with a RESULT (None), or an ERROR."""
        try:
            args, kwargs = protocol.decode(body, cache=self.rt.maps, in_place=not self.rt.spec.copy_args)
        except Exception as exc:
            self.rt._send(sock, self.rt._calls.error_frame(req_id, protocol.ERR_ARGS_UNPICKLE, exc))
            return
        granted = protocol.STREAM_WINDOW
        sent = 0
        stopped = False
        gen: Any = None
        try:
            result = self.rt.model(*args, **kwargs)
            del args, kwargs
            if inspect.isasyncgen(result):
                items: Any = self.rt._async.iterate(result)
            elif inspect.iscoroutine(result):
                items = iter((self.rt._async.await_(result),))
            else:
                items = result if inspect.isgenerator(result) else iter((result,))
            gen = items
            for item in items:
                try:
                    payload = protocol.encode(item)
                except Exception as exc:
                    self.rt._send(sock, self.rt._calls.error_frame(req_id, protocol.ERR_RESULT_PICKLE, exc))
                    return
                while sent >= granted and not stopped:
                    granted, stopped = self.wait_credit(sock, req_id, granted)
                if stopped:
                    break
                self.rt._send(sock, protocol.pack_frame(protocol.CHUNK, req_id, payload.body))
                sent += 1
                # A STOP may already be here: look without waiting.
                granted, stopped = self.take_controls(req_id, granted, stopped)
                if stopped:
                    break
        except Exception as exc:
            self.rt._send(sock, self.rt._calls.error_frame(req_id, protocol.ERR_USER, exc))
            return
        finally:
            if gen is not None and inspect.isgenerator(gen):
                gen.close()  # runs the generator's finally when it was stopped early
        self.rt._send(sock, protocol.pack_frame(protocol.RESULT, req_id, protocol.encode(None).body))

    def take_controls(self, req_id: int, granted: int, stopped: bool) -> tuple[int, bool]:
        """Consume the CREDIT and STOP frames for ``req_id`` already read."""
        keep = []
        for frame in self.rt.pending:
            kind, rid, body = frame
            if rid == req_id and kind == protocol.CREDIT:
                granted += protocol.unpack_credit(body)
            elif rid == req_id and kind == protocol.STOP:
                stopped = True
            elif kind in (protocol.CREDIT, protocol.STOP):
                pass  # for a stream that is over
            else:
                keep.append(frame)
        if len(keep) != len(self.rt.pending):
            self.rt.pending.clear()
            self.rt.pending.extend(keep)
        return granted, stopped

    def wait_credit(self, sock: socket.socket, req_id: int, granted: int) -> tuple[int, bool]:
        """Block until the caller consumed something (or stopped): the worker
        waits rather than buffer without bound for a slow consumer."""
        while True:
            before = granted
            granted, stopped = self.take_controls(req_id, granted, False)
            if stopped or granted != before:
                return granted, stopped
            frames = self.rt._read_frames(sock)
            if frames is None:
                raise ConnectionResetError("the hub closed the connection during a stream")
            for frame in frames:
                kind = frame[0]
                if kind == protocol.RELEASE:
                    if self.rt.pool is not None:
                        self.rt.pool.release(frame[2].decode(errors="replace"))
                elif kind == protocol.DEADLINE:
                    self.rt._calls.note_deadline(frame[1], frame[2])
                elif kind == protocol.PRIORITY:
                    self.rt.priorities[frame[1]] = protocol.unpack_priority(frame[2])
                elif kind == protocol.REQUEST_ID:
                    self.rt.rids[frame[1]] = protocol.unpack_request_id(frame[2])
                elif kind == protocol.TRACE:
                    self.rt.traces[frame[1]] = protocol.unpack_trace(frame[2])
                elif kind == protocol.REQUEST and self.rt.is_async:
                    # An async worker's other slots go on while this stream
                    # waits for its consumer: the call runs on the loop.
                    buffers, payloads = self.rt._calls.handle(frame[1], frame[2])
                    if buffers:
                        self.rt._send_answers(sock, buffers, [p for p in payloads if p.shm_path is not None])
                else:
                    self.rt.pending.append(frame)

    def poll_controls(self, sock: socket.socket) -> None:
        """Read, without waiting, the frames the hub sent while the previous
        unit ran: they join ``pending`` (a batch that waited here behind
        another, pipelined, is then thinned of the items they stop)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return
        if readable:
            frames = self.rt._read_frames(sock)
            if frames:
                self.rt.pending.extend(frames)
