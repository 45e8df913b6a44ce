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

import json
import mmap
import os
import pickle
import struct
import uuid
from typing import Any, Optional, Union

from .errors import ProtocolError

Buffer = Union[bytes, bytearray, memoryview]

# Message kinds (one byte).
HELLO = 1  # worker -> hub: JSON {pid, host, name, heartbeat_interval, shm}
WELCOME = 2  # hub -> worker: JSON {heartbeat_interval, shm_probe}
REQUEST = 3  # hub -> worker: payload of (args, kwargs)
RESULT = 4  # worker -> hub: payload of the return value
ERROR = 5  # worker -> hub: pickle of an error record (see make_error_body)
HEARTBEAT = 6  # both ways, empty
GOODBYE = 7  # worker -> hub: "I am leaving; re-queue what I have not started"
INIT_FAILED = 8  # worker -> hub: JSON {pid, host, exc_type, message, traceback}

KIND_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    REQUEST: "REQUEST",
    RESULT: "RESULT",
    ERROR: "ERROR",
    HEARTBEAT: "HEARTBEAT",
    GOODBYE: "GOODBYE",
    INIT_FAILED: "INIT_FAILED",
}

HEADER = struct.Struct("!BQI")
HEADER_SIZE = HEADER.size

#: Default upper bound on one frame's body (hub option ``max_frame_bytes``).
DEFAULT_MAX_FRAME = 1 << 30  # 1 GiB
#: Buffers of at least this many bytes go through shared memory when possible.
DEFAULT_SHM_THRESHOLD = 1 << 18  # 256 KiB

# Payload flavours (first byte of a REQUEST/RESULT body).
_INLINE = 0
_SHM = 1
_SHM_HEAD = struct.Struct("!HI")  # name length, buffer count
_SHM_BUF = struct.Struct("!QQ")  # offset, length

SHM_DIR = "/dev/shm"
SHM_PREFIX = "gibbs-"

# Error-record kinds carried by ERROR frames.
ERR_USER = "user"  # the model raised
ERR_RESULT_PICKLE = "result-pickle"  # the model's return value could not be pickled
ERR_ARGS_UNPICKLE = "args-unpickle"  # the worker could not unpickle the arguments


def pack_frame(kind: int, req_id: int, body: Buffer = b"") -> list[Buffer]:
    """Return the buffers of one frame, for ``socket.sendmsg``."""
    n = len(body) if not isinstance(body, memoryview) else body.nbytes
    if n > 0xFFFFFFFF:
        raise ProtocolError(f"frame body of {n} bytes is over the 4 GiB limit of the format")
    head = HEADER.pack(kind, req_id, n)
    return [head, body] if n else [head]


def pack_json(kind: int, obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return HEADER.pack(kind, 0, len(body)) + body


def unpack_json(body: Buffer) -> Any:
    try:
        obj = json.loads(bytes(body))
    except ValueError as exc:
        raise ProtocolError(f"malformed control message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("malformed control message: not an object")
    return obj


class FrameReader:
    """Accumulates bytes from a stream and yields whole frames.

    Non-blocking friendly: feed it whatever ``recv`` returned; a partial frame
    waits for the next feed. A frame whose announced length is over
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
            frames.append((kind, req_id, bytes(buf[start : start + length])))
            pos = start + length
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)


# --------------------------------------------------------------------------
# Payloads


class Payload:
    """An encoded argument tuple or result, ready to send.

    ``body`` is the frame body. ``shm_path`` is the shared-memory file it
    refers to, if any: the side that created it owns it and must call
    :meth:`release` when no worker will read it again.
    """

    __slots__ = ("body", "shm_path", "_inline")

    def __init__(self, body: Buffer, shm_path: Optional[str] = None) -> None:
        self.body = body
        self.shm_path = shm_path
        self._inline: Optional[Buffer] = None if shm_path else body

    @property
    def nbytes(self) -> int:
        return len(self.body)

    def inline_body(self) -> Buffer:
        """The same payload without shared memory (for a peer on another host)."""
        if self._inline is None:
            pickled, buffers, _ = open_shm_payload(self.body, unlink=False)
            self._inline = bytes([_INLINE]) + pickle.dumps(
                pickle.loads(pickled, buffers=buffers), protocol=5
            )
        return self._inline

    def release(self) -> None:
        path, self.shm_path = self.shm_path, None
        if path is not None:
            _unlink_quietly(path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def encode(obj: Any, shm_prefix: Optional[str] = None, threshold: int = DEFAULT_SHM_THRESHOLD) -> Payload:
    """Pickle ``obj`` (protocol 5). With ``shm_prefix``, buffers of at least
    ``threshold`` bytes are written to one new file in ``/dev/shm`` whose name
    starts with that prefix. Raises whatever pickle raises."""
    if shm_prefix is None:
        return Payload(bytes([_INLINE]) + pickle.dumps(obj, protocol=5))

    big: list[pickle.PickleBuffer] = []

    def callback(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= threshold:
            big.append(buf)
            return False  # out of band
        return True  # in band

    pickled = pickle.dumps(obj, protocol=5, buffer_callback=callback)
    if not big:
        return Payload(bytes([_INLINE]) + pickled)

    views = [b.raw() for b in big]
    offsets = []
    total = 0
    for v in views:
        offsets.append(total)
        total += (v.nbytes + 63) & ~63  # keep every buffer 64-byte aligned
    name = f"{shm_prefix}{uuid.uuid4().hex[:16]}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(total, 1))
        with mmap.mmap(fd, max(total, 1)) as mm:
            for v, off in zip(views, offsets):
                mm[off : off + v.nbytes] = v
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)
    encoded_name = name.encode()
    head = bytearray([_SHM])
    head += _SHM_HEAD.pack(len(encoded_name), len(views))
    head += encoded_name
    for v, off in zip(views, offsets):
        head += _SHM_BUF.pack(off, v.nbytes)
    return Payload(bytes(head) + pickled, shm_path=path)


def open_shm_payload(body: Buffer, unlink: bool) -> tuple[memoryview, list[memoryview], str]:
    """Map the shared-memory file a payload refers to.

    Returns the pickle, the out-of-band buffers (views of the mapping, which
    stays alive as long as any object built on them) and the file's path. With
    ``unlink``, the file is removed at once: the mapping keeps the memory.
    """
    mv = memoryview(body)
    name_len, count = _SHM_HEAD.unpack_from(mv, 1)
    pos = 1 + _SHM_HEAD.size
    name = bytes(mv[pos : pos + name_len]).decode()
    pos += name_len
    if "/" in name or not name.startswith(SHM_PREFIX):
        raise ProtocolError(f"bad shared-memory name {name!r}")
    bufs = []
    for _ in range(count):
        bufs.append(_SHM_BUF.unpack_from(mv, pos))
        pos += _SHM_BUF.size
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
        if unlink:
            _unlink_quietly(path)
    whole = memoryview(mm)
    views = []
    for off, length in bufs:
        if off + length > size:
            raise ProtocolError("shared-memory buffer out of range")
        views.append(whole[off : off + length])
    return mv[pos:], views, path


def decode(body: Buffer, unlink: bool = False) -> Any:
    """Unpickle a payload body. ``unlink`` removes its shared-memory file (the
    receiver of a result owns it; a worker reading a request does not)."""
    if not body:
        raise ProtocolError("empty payload")
    flavour = body[0]
    if flavour == _INLINE:
        return pickle.loads(memoryview(body)[1:])
    if flavour == _SHM:
        pickled, buffers, _ = open_shm_payload(body, unlink=unlink)
        return pickle.loads(pickled, buffers=buffers)
    raise ProtocolError(f"unknown payload flavour {flavour}")


def shm_path_of(body: Buffer) -> Optional[str]:
    """The shared-memory file a payload refers to, if any (without opening it)."""
    if not body or body[0] != _SHM:
        return None
    mv = memoryview(body)
    name_len, _ = _SHM_HEAD.unpack_from(mv, 1)
    pos = 1 + _SHM_HEAD.size
    name = bytes(mv[pos : pos + name_len]).decode(errors="replace")
    if "/" in name or not name.startswith(SHM_PREFIX):
        return None
    return os.path.join(SHM_DIR, name)


def release_body(body: Buffer) -> None:
    """Remove the shared-memory file a received payload refers to, if any."""
    path = shm_path_of(body)
    if path is not None:
        _unlink_quietly(path)


def remove_segments(prefix: str) -> int:
    """Remove every shared-memory file whose name starts with ``prefix``
    (used for the files of a worker that died). Returns how many."""
    n = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            _unlink_quietly(os.path.join(SHM_DIR, name))
            n += 1
    return n


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

