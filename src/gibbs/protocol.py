"""Wire format: message kinds, framing, and payload encoding.

Every message after the handshake is one frame::

    +--------+----------------+----------------+=================+
    | kind   | request id     | body length    | body            |
    | 1 byte | 8 bytes (u64)  | 4 bytes (u32)  | length bytes    |
    +--------+----------------+----------------+=================+

Bodies of ``REQUEST`` and ``RESULT`` frames are *payloads*: a pickle
(protocol 5). Large out-of-band buffers (NumPy arrays, ``pickle.PickleBuffer``; plain
``bytes`` are always pickled in band) of ``shm_threshold`` bytes or more travel through a file in ``/dev/shm`` when
both ends share one machine; the frame then names the file and the buffers'
offsets, and the pickle carries only the small rest. Across machines the
same call is inline.

Control bodies (``HELLO``, ``WELCOME``, ``INIT_FAILED``) are JSON: nothing a
peer sends is unpickled before the HMAC handshake has passed, and control
messages are never unpickled at all.
"""

from __future__ import annotations

import collections.abc
import json
import os
import pickle
import struct
from typing import Any, Optional, Union, cast

from . import _torch
from .errors import ProtocolError
from .shm import (  # noqa: F401 - re-exported: the wire format names them
    INLINE,
    OOB,
    SHM,
    SHM_BUF,
    SHM_DIR,
    SHM_HEAD,
    SHM_PREFIX,
    MappingCache,
    Segment,
    SegmentPool,
    is_shm,
    map_payload,
    read_copy,
    read_views,
    remove_segments,
    shm_available,
)

Buffer = Union[bytes, bytearray, memoryview]

# Message kinds (one byte).
HELLO = 1  # worker -> hub: JSON {pid, host, name, heartbeat_interval, shm, token (optional)}
WELCOME = 2  # hub -> worker: JSON {heartbeat_interval, shm_probe}
REQUEST = 3  # hub -> worker: payload of (args, kwargs)
RESULT = 4  # worker -> hub: payload of the return value
ERROR = 5  # worker -> hub: pickle of an error record (see make_error_body)
HEARTBEAT = 6  # both ways, empty
GOODBYE = 7  # worker -> hub: "I am leaving; re-queue what I have not started"
INIT_FAILED = 8  # worker -> hub: JSON {pid, host, exc_type, message, traceback}
RELEASE = 9  # hub -> worker: "I have copied your answer out of this segment" (body: its name)
REFUSED = 10  # hub -> worker: JSON {reason}; the hub will not serve this worker (then closes)
BATCH = 11  # hub -> worker: several requests, see pack_batch; answered one RESULT/ERROR each
STREAM = 12  # hub -> worker: a request whose items go back as CHUNKs, then a RESULT (None) or ERROR
CHUNK = 13  # worker -> hub: one item of a stream (an inline payload)
CREDIT = 14  # hub -> worker: u32, the caller consumed that many more chunks of this stream
STOP = 15  # hub -> worker: the caller of this stream is gone: close the generator
# Between a client hub (a web process that routes through another) and its router:
FORWARD = 16  # client -> router: a call, see pack_forward; answered RESULT/ERROR/EXC, CHUNKs first for a stream
EXC = 17  # router -> client: JSON {type, message, failures}: the call failed in the router (type "" = cancelled)
RESEND = 18  # client -> router: gibbs_retries: send this running call again to another worker
LOADING = 20  # worker -> hub: JSON {pid, host, name, model, device}: building the model (the connection stays open until it is built)
STATS = 21  # observer -> hub: empty, "send your statistics"; hub -> observer: JSON {statistics, workers}
DEADLINE = 22  # hub -> worker: f64, seconds left to this call's deadline (sent just before it, to workers that said "deadlines" in HELLO)
PRIORITY = 23  # hub -> worker: u8, this call's priority class (sent just before it, when not 0, to workers that read DEADLINE frames)
TRACE = 24  # hub -> worker: ASCII "<W3C traceparent> <seconds queued>" of the call that follows (only when its caller traces)
REQUEST_ID = 25  # hub -> worker: UTF-8, the request id of the call that follows (sent just before it, only for an id given by its caller, inherited or forwarded)
POOL = 19  # router -> client: JSON {models: {name: {class, workers, batched, queued}}}, on every change
# (client -> router also: STOP = cancel this call, CREDIT = as for a worker; HEARTBEAT both ways)

KIND_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    REQUEST: "REQUEST",
    RESULT: "RESULT",
    ERROR: "ERROR",
    HEARTBEAT: "HEARTBEAT",
    GOODBYE: "GOODBYE",
    INIT_FAILED: "INIT_FAILED",
    RELEASE: "RELEASE",
    REFUSED: "REFUSED",
    BATCH: "BATCH",
    STREAM: "STREAM",
    CHUNK: "CHUNK",
    CREDIT: "CREDIT",
    STOP: "STOP",
    FORWARD: "FORWARD",
    EXC: "EXC",
    RESEND: "RESEND",
    POOL: "POOL",
    LOADING: "LOADING",
    STATS: "STATS",
    DEADLINE: "DEADLINE",
    PRIORITY: "PRIORITY",
    REQUEST_ID: "REQUEST_ID",
    TRACE: "TRACE",
}

#: FORWARD flags
FWD_STREAM = 1  # the caller streams
FWD_SINGLE = 2  # one positional argument and no keyword: fit for a batched model
FWD_PRIORITY_SHIFT = 4  # bits 4-7: the call's priority class (older routers ignore them)
FWD_REQUEST_ID = 4  # the model's name is followed by the request id (u8 length, UTF-8)
FWD_TRACE = 8  # then by the caller's W3C traceparent (u8 length, ASCII)
_FWD_HEAD = struct.Struct("!BH")
#: The longest request id (UTF-8 bytes) a frame carries.
MAX_REQUEST_ID = 200


def pack_forward(
    req_id: int,
    model: str,
    flags: int,
    body: Buffer,
    request_id: Optional[str] = None,
    trace: Optional[str] = None,
) -> list[Buffer]:
    name = model.encode()
    if request_id is None and trace is None:
        head = _FWD_HEAD.pack(flags, len(name)) + name
    else:
        extra = b""
        if request_id is not None:
            flags |= FWD_REQUEST_ID
            rid = request_id.encode()
            extra = bytes((len(rid),)) + rid
        if trace is not None:
            flags |= FWD_TRACE
            tp = trace.encode()
            extra += bytes((len(tp),)) + tp
        head = _FWD_HEAD.pack(flags, len(name)) + name + extra
    n = len(head) + (body.nbytes if isinstance(body, memoryview) else len(body))
    return [HEADER.pack(FORWARD, req_id, n) + head, body]


def unpack_forward(body: Buffer) -> tuple[str, int, memoryview, Optional[str], Optional[str]]:
    """(model, flags, payload body, request id or None, traceparent or None)
    of a FORWARD frame."""
    mv = memoryview(body)
    if len(mv) < _FWD_HEAD.size:
        raise ProtocolError("malformed FORWARD")
    flags, n = _FWD_HEAD.unpack_from(mv)
    end = _FWD_HEAD.size + n
    if len(mv) < end + 1:
        raise ProtocolError("malformed FORWARD")
    try:
        model = bytes(mv[_FWD_HEAD.size : end]).decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed FORWARD: model name is not UTF-8") from None
    if not model:
        raise ProtocolError("malformed FORWARD: empty model name")
    request_id = None
    if flags & FWD_REQUEST_ID:
        k = mv[end]
        start, end = end + 1, end + 1 + k
        if len(mv) < end + 1:
            raise ProtocolError("malformed FORWARD")
        request_id = unpack_request_id(mv[start:end])
    trace = None
    if flags & FWD_TRACE:
        k = mv[end]
        start, end = end + 1, end + 1 + k
        if len(mv) < end + 1:
            raise ProtocolError("malformed FORWARD")
        trace = bytes(mv[start:end]).decode("ascii", "replace")
    return model, flags, mv[end:], request_id, trace


def pack_request_id(req_id: int, request_id: str) -> list[Buffer]:
    """A REQUEST_ID frame: ``request_id`` is the id of call ``req_id``."""
    return pack_frame(REQUEST_ID, req_id, request_id.encode())


def unpack_request_id(body: Buffer) -> str:
    if not 0 < len(body) <= MAX_REQUEST_ID:
        raise ProtocolError(f"a request id is 1 to {MAX_REQUEST_ID} bytes, not {len(body)}")
    try:
        return bytes(body).decode()
    except UnicodeDecodeError:
        raise ProtocolError("a request id is not UTF-8") from None


def request_id_prefix() -> str:
    """A new hub's prefix of the request ids it makes: its calls are
    ``prefix + str(call id)``, a counter, so that an id costs nothing until
    it is read (a worker learns the prefix in WELCOME)."""
    return os.urandom(4).hex() + "-"


def pack_trace(req_id: int, traceparent: str, queued: float) -> list[Buffer]:
    """A TRACE frame: the caller's trace context, and how long call ``req_id`` waited in the hub."""
    return pack_frame(TRACE, req_id, f"{traceparent} {queued:.6f}".encode())


def unpack_trace(body: Buffer) -> tuple[str, float]:
    try:
        traceparent, queued = bytes(body).decode("ascii").split(" ")
        return traceparent, float(queued)
    except ValueError:
        raise ProtocolError("malformed TRACE") from None


def check_request_id(request_id: Any) -> str:
    """``request_id`` if it is one a frame can carry, else TypeError/ValueError."""
    if not isinstance(request_id, str):
        raise TypeError(f"gibbs_request_id must be a str, got {type(request_id).__name__}")
    if not 0 < len(request_id.encode()) <= MAX_REQUEST_ID:
        raise ValueError(f"gibbs_request_id must be 1 to {MAX_REQUEST_ID} bytes of UTF-8, got {request_id[:40]!r}")
    return request_id

#: Chunks of one stream a worker may send beyond what its caller consumed.
STREAM_WINDOW = 8
_CREDIT = struct.Struct("!I")


_F64 = struct.Struct("!d")


def pack_deadline(req_id: int, seconds_left: float) -> list[Buffer]:
    return pack_frame(DEADLINE, req_id, _F64.pack(seconds_left))


def unpack_deadline(body: Buffer) -> float:
    if len(body) != _F64.size:
        raise ProtocolError(f"a DEADLINE frame carries {_F64.size} bytes, not {len(body)}")
    return float(_F64.unpack(body)[0])


_U8 = struct.Struct("!B")


def pack_priority(req_id: int, priority: int) -> list[Buffer]:
    return pack_frame(PRIORITY, req_id, _U8.pack(priority))


def unpack_priority(body: Buffer) -> int:
    if len(body) != _U8.size:
        raise ProtocolError(f"a PRIORITY frame carries {_U8.size} byte, not {len(body)}")
    return int(_U8.unpack(body)[0])


def pack_credit(req_id: int, n: int) -> list[Buffer]:
    return pack_frame(CREDIT, req_id, _CREDIT.pack(n))


def unpack_credit(body: Buffer) -> int:
    if len(body) != _CREDIT.size:
        raise ProtocolError("malformed CREDIT")
    return int(_CREDIT.unpack(body)[0])

HEADER = struct.Struct("!BQI")
HEADER_SIZE = HEADER.size
BATCH_ITEM = struct.Struct("!QI")  # request id, body length

#: Default upper bound on one frame's body (hub option ``max_frame_bytes``).
DEFAULT_MAX_FRAME = 1 << 30  # 1 GiB
#: Buffers of at least this many bytes go through shared memory when possible.
DEFAULT_SHM_THRESHOLD = 1 << 18  # 256 KiB

# Payload flavours (first byte of a REQUEST/RESULT body): see shm.py.
_INLINE = INLINE
_INLINE_HEAD = bytes([INLINE])  # the first byte of an inline payload
_SHM = SHM
_OOB_HEAD = struct.Struct("!I")
_OOB_LEN = struct.Struct("!Q")


def pack_oob(pickled: Buffer, buffers: list[Any]) -> bytes:
    """A payload with its out-of-band buffers inline, after the pickle's
    header: what a router passes on without unpickling anything."""
    parts: list[Buffer] = [bytes([OOB]), _OOB_HEAD.pack(len(buffers))]
    views = [memoryview(b).cast("B") for b in buffers]
    parts.extend(_OOB_LEN.pack(v.nbytes) for v in views)
    parts.extend(views)
    parts.append(pickled)
    return b"".join(parts)


def _unpack_oob(body: Buffer) -> tuple[memoryview, list[memoryview]]:
    mv = memoryview(body)
    pos = 1 + _OOB_HEAD.size
    if len(mv) < pos:
        raise ProtocolError("malformed payload")
    (n,) = _OOB_HEAD.unpack_from(mv, 1)
    lens = []
    for _ in range(n):
        if len(mv) < pos + _OOB_LEN.size:
            raise ProtocolError("malformed payload")
        lens.append(_OOB_LEN.unpack_from(mv, pos)[0])
        pos += _OOB_LEN.size
    views = []
    for length in lens:
        if pos + length > len(mv):
            raise ProtocolError("malformed payload")
        views.append(mv[pos : pos + length])
        pos += length
    return mv[pos:], views

# Error-record kinds carried by ERROR frames.
ERR_USER = "user"  # the model raised
ERR_RESULT_PICKLE = "result-pickle"  # the model's return value could not be pickled
ERR_ARGS_UNPICKLE = "args-unpickle"  # the worker could not unpickle the arguments
ERR_DROPPED = "dropped"  # taken out of its batch before it started: past its deadline, or its caller gone


def pack_frame(kind: int, req_id: int, body: Buffer = b"") -> list[Buffer]:
    """Return the buffers of one frame, for ``socket.sendmsg``."""
    n = len(body) if not isinstance(body, memoryview) else body.nbytes
    if n > 0xFFFFFFFF:
        raise ProtocolError(f"frame body of {n} bytes is over the 4 GiB limit of the format")
    head = HEADER.pack(kind, req_id, n)
    return [head, body] if n else [head]


#: A frame whose body is under this many bytes goes out as one buffer, its
#: header and body joined (a copy of a few bytes, against a second buffer to
#: gather and account for on every write); a larger body is not copied.
JOIN_UNDER = 4096


def pack_frame_to(out: "collections.abc.MutableSequence[Buffer]", kind: int, req_id: int, body: Buffer) -> None:
    """:func:`pack_frame` appended to ``out``: a small frame as one buffer."""
    n = len(body) if not isinstance(body, memoryview) else body.nbytes
    if n < JOIN_UNDER:
        out.append(HEADER.pack(kind, req_id, n) + body)
    else:
        out.extend(pack_frame(kind, req_id, body))


def pack_batch(items: list[tuple[int, Buffer]]) -> list[Buffer]:
    """One BATCH frame for several requests: its body is, per request, a
    ``BATCH_ITEM`` header (request id, length) and the request's payload."""
    out: list[Buffer] = [b""]
    total = 0
    for req_id, body in items:
        n = len(body) if not isinstance(body, memoryview) else body.nbytes
        out.append(BATCH_ITEM.pack(req_id, n))
        out.append(body)
        total += BATCH_ITEM.size + n
    if total > 0xFFFFFFFF:
        raise ProtocolError(f"batch of {total} bytes is over the 4 GiB limit of the format")
    out[0] = HEADER.pack(BATCH, len(items), total)
    return out


def unpack_batch(body: Buffer) -> list[tuple[int, memoryview]]:
    """The requests of a BATCH frame's body: (request id, payload) pairs."""
    mv = memoryview(body)
    items = []
    pos = 0
    end = len(mv)
    while pos < end:
        if end - pos < BATCH_ITEM.size:
            raise ProtocolError("truncated batch")
        req_id, n = BATCH_ITEM.unpack_from(mv, pos)
        pos += BATCH_ITEM.size
        if end - pos < n:
            raise ProtocolError("truncated batch item")
        items.append((req_id, mv[pos : pos + n]))
        pos += n
    return items


def pack_json(kind: int, obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return HEADER.pack(kind, 0, len(body)) + body


def unpack_json(body: Buffer) -> Any:
    try:
        obj = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise ProtocolError(f"malformed control message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("malformed control message: not an object")
    return obj


_KEEP_BYTEARRAY = 1 << 16


class FrameReader:
    """Accumulates bytes from a stream and yields whole frames.

    Non-blocking friendly: feed it whatever ``recv`` returned; a partial frame
    waits for the next feed. Bodies of 64 KiB or more come as ``bytearray``
    (writable: arrays of an inline payload read in place are too), smaller
    ones as ``bytes``. A frame whose announced length is over
    ``max_frame`` raises :class:`ProtocolError` before any of it is buffered.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: Buffer) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        buf += data
        frames: list[tuple[int, int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            kind, req_id, length = HEADER.unpack_from(buf, pos)
            if kind not in KIND_NAMES:
                raise ProtocolError(f"unknown message kind {kind}")
            if length > self._max:
                raise ProtocolError(
                    f"frame of {length} bytes is over the limit of {self._max} bytes"
                )
            start = pos + HEADER_SIZE
            if end - start < length:
                break
            # A large body stays a bytearray (one copy, not two; the arrays
            # of an inline payload are then writable, as from shared memory).
            body = buf[start : start + length]
            frames.append((kind, req_id, bytes(body) if length < _KEEP_BYTEARRAY else cast(bytes, body)))
            pos = start + length
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)

    def take_pending(self) -> bytes:
        """Hand over (and forget) the bytes of an incomplete frame, e.g. to
        the reader that takes over the stream after a handshake."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


# --------------------------------------------------------------------------
# Payloads


class Payload:
    """An encoded argument tuple or result, ready to send.

    ``body`` is the frame body. ``shm_path`` is the shared-memory file it
    refers to, if any: the side that wrote it owns it and must call
    :meth:`release` when no peer will read it again (the file goes back to
    its pool, or is removed if it came from none).
    """

    __slots__ = ("body", "shm_path", "_inline", "_pool", "_name", "flags", "rid", "trace", "priority")

    def __init__(
        self,
        body: Buffer,
        shm_path: Optional[str] = None,
        pool: "Optional[SegmentPool]" = None,
        name: Optional[str] = None,
    ) -> None:
        self.body = body
        self.shm_path = shm_path
        self._inline: Optional[Buffer] = None if shm_path else body
        self._pool = pool
        self._name = name
        self.flags = 0  # FWD_SINGLE where the call suits a batched model
        self.rid: Optional[str] = None  # the request id its caller gave (or inherited); None: the hub's own
        self.trace: Optional[str] = None  # its caller's W3C traceparent, when the caller traces
        self.priority: Optional[int] = None  # the class its caller gave (or inherited); None: the model's default

    @property
    def nbytes(self) -> int:
        return len(self.body)

    def inline_body(self) -> Buffer:
        """The same payload without shared memory (for a peer on another host)."""
        if self._inline is None:
            pickled, buffers = map_payload(self.body)
            self._inline = pack_oob(pickled, buffers)  # nothing unpickled
        return self._inline

    def release(self) -> None:
        """The segment goes back to its pool (idempotent)."""
        path, self.shm_path = self.shm_path, None
        if path is not None and self._pool is not None and self._name is not None:
            self._pool.release(self._name)


def encode(obj: Any, pool: Optional[SegmentPool] = None, threshold: int = DEFAULT_SHM_THRESHOLD) -> Payload:
    """Pickle ``obj`` (protocol 5). With ``pool``, out-of-band buffers of at
    least ``threshold`` bytes are written to one of its shared-memory
    segments. Raises whatever pickle raises."""
    if pool is None:
        return Payload(_INLINE_HEAD + _torch.dumps(obj))

    big: list[pickle.PickleBuffer] = []

    def callback(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= threshold:
            big.append(buf)
            return False  # out of band
        return True  # in band

    pickled = _torch.dumps(obj, buffer_callback=callback)  # torch tensors as out-of-band buffers too
    if not big:
        return Payload(_INLINE_HEAD + pickled)

    views = [b.raw() for b in big]
    offsets = []
    total = 0
    for v in views:
        offsets.append(total)
        total += (v.nbytes + 63) & ~63  # keep every buffer 64-byte aligned
    seg = pool.acquire(total)
    try:
        for v, off in zip(views, offsets):
            seg.mm[off : off + v.nbytes] = v
    except BaseException:
        pool.release(seg.name)
        raise
    encoded_name = seg.name.encode()
    head = bytearray([_SHM])
    head += SHM_HEAD.pack(len(encoded_name), len(views))
    head += encoded_name
    for v, off in zip(views, offsets):
        head += SHM_BUF.pack(off, v.nbytes)
    return Payload(bytes(head) + pickled, shm_path=seg.path, pool=pool, name=seg.name)


def decode(body: Buffer, cache: Optional[MappingCache] = None, in_place: bool = False) -> Any:
    """Unpickle a payload body. With ``cache``, shared-memory buffers are
    copied out (the writer may reuse its segment at once), or with
    ``in_place`` read as read-only views on the writer's segment (valid until
    the writer reuses it); without ``cache``, they are mapped anew."""
    if not body:
        raise ProtocolError("empty payload")
    flavour = body[0]
    if flavour == _INLINE:
        return pickle.loads(memoryview(body)[1:])
    if flavour == OOB:
        pickled, views = _unpack_oob(body)
        if in_place:  # a model's arguments are read-only, wherever they come from
            views = [v.toreadonly() for v in views]
        return pickle.loads(pickled, buffers=views)
    if flavour == _SHM and cache is not None and in_place:
        pickled_b, ro_views, _, _ = read_views(body, cache, readonly=True)
        return pickle.loads(pickled_b, buffers=ro_views)
    if flavour == _SHM and cache is not None:
        copied, copies, _ = read_copy(body, cache)
        return pickle.loads(copied, buffers=copies)
    if flavour == _SHM:
        pickled, buffers = map_payload(body)
        return pickle.loads(pickled, buffers=buffers)
    raise ProtocolError(f"unknown payload flavour {flavour}")


# --------------------------------------------------------------------------
# Error records (ERROR frames)


def make_error_body(kind: str, exc: BaseException, tb: str) -> bytes:
    """Pickle an error record; the exception object itself only if it pickles."""
    record: dict[str, Any] = {
        "kind": kind,
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": tb,
    }
    exc_bytes: Optional[bytes]
    try:
        exc_bytes = pickle.dumps(exc, protocol=5)
        pickle.loads(exc_bytes)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:
        exc_bytes = None
    record["exception"] = exc_bytes
    return pickle.dumps(record, protocol=5)

