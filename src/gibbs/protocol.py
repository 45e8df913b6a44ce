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

import collections
import json
import mmap
import os
import pickle
import struct
import threading
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
RELEASE = 9  # hub -> worker: "I have copied your answer out of this segment" (body: its name)

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
    refers to, if any: the side that wrote it owns it and must call
    :meth:`release` when no peer will read it again (the file goes back to
    its pool, or is removed if it came from none).
    """

    __slots__ = ("body", "shm_path", "_inline", "_pool", "_name")

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
        if path is None:
            return
        if self._pool is not None and self._name is not None:
            self._pool.release(self._name)
        else:
            _unlink_quietly(path)


class Segment:
    __slots__ = ("name", "path", "size", "mm")

    def __init__(self, name: str, path: str, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.mm = mm


class SegmentPool:
    """Shared-memory files one process writes into, used again and again.

    A new 16 MiB file costs thousands of page faults to fill; a file that was
    filled before costs none. A segment is leased while a peer may read it
    and comes back with :meth:`release`; up to ``max_free_bytes`` of free
    segments are kept. Every file's name starts with ``prefix`` (which names
    the owning process, so that files of a dead process can be found).
    Thread-safe.
    """

    def __init__(self, prefix: str, max_free_bytes: int = 256 << 20) -> None:
        self.prefix = prefix
        self._max_free = max_free_bytes
        self._lock = threading.Lock()  # owns: _free, _leased, _free_bytes
        self._free: list[Segment] = []
        self._leased: dict[str, Segment] = {}
        self._free_bytes = 0

    @staticmethod
    def size_class(nbytes: int) -> int:
        size = 1 << 20
        while size < nbytes:
            size <<= 1
        return size

    def acquire(self, nbytes: int) -> Segment:
        size = self.size_class(nbytes)
        with self._lock:
            for i, seg in enumerate(self._free):
                if seg.size == size:
                    del self._free[i]
                    self._free_bytes -= size
                    self._leased[seg.name] = seg
                    return seg
        name = f"{self.prefix}{uuid.uuid4().hex[:16]}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            _unlink_quietly(path)
            raise
        finally:
            os.close(fd)
        seg = Segment(name, path, size, mm)
        with self._lock:
            self._leased[name] = seg
        return seg

    def release(self, name: str) -> None:
        with self._lock:
            seg = self._leased.pop(name, None)
            if seg is None:
                return
            if self._free_bytes + seg.size <= self._max_free:
                self._free.append(seg)
                self._free_bytes += seg.size
                return
        self._destroy(seg)

    def _destroy(self, seg: Segment) -> None:
        _unlink_quietly(seg.path)
        try:
            seg.mm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with it

    def close(self) -> None:
        """Remove every file of this pool (free or leased)."""
        with self._lock:
            segs = self._free + list(self._leased.values())
            self._free, self._leased, self._free_bytes = [], {}, 0
        for seg in segs:
            self._destroy(seg)

    def forget(self) -> None:
        """In a forked child: drop the parent's segments without removing them."""
        self._lock = threading.Lock()
        self._free, self._leased, self._free_bytes = [], {}, 0



class MappingCache:
    """The receiving side: mappings of a peer's segments, kept open (up to
    ``size`` of them) so that reading a reused segment maps nothing anew.
    Buffers are copied out, so the peer may reuse the segment at once."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()  # owns: _maps
        self._maps: "collections.OrderedDict[str, mmap.mmap]" = collections.OrderedDict()

    def get(self, name: str) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(name)
            if mm is not None:
                self._maps.move_to_end(name)
                return mm
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        with self._lock:
            self._maps[name] = mm
            while len(self._maps) > self._size:
                _, old = self._maps.popitem(last=False)
                _close_map(old)
        return mm

    def forget(self, prefix: str) -> None:
        """Drop the mappings of segments whose names start with ``prefix``."""
        with self._lock:
            names = [n for n in self._maps if n.startswith(prefix)]
            maps = [self._maps.pop(n) for n in names]
        for mm in maps:
            _close_map(mm)

    def clear(self) -> None:
        self.forget("")


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass


def read_copy(body: Buffer, cache: MappingCache) -> tuple[bytes, list[bytearray], str]:
    """Read a shared-memory payload into private memory: (pickle, buffers,
    segment name). After this the writer may reuse the segment."""
    mv = memoryview(body)
    name, bufs, pos = _parse_shm_head(mv)
    mm = cache.get(name)
    whole = memoryview(mm)
    try:
        copies = []
        for off, length in bufs:
            if off + length > len(mm):
                raise ProtocolError("shared-memory buffer out of range")
            copies.append(bytearray(whole[off : off + length]))
    finally:
        whole.release()
    return bytes(mv[pos:]), copies, name


def _parse_shm_head(mv: memoryview) -> tuple[str, list[tuple[int, int]], int]:
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
    return name, bufs, pos


def is_shm(body: Buffer) -> bool:
    return bool(body) and body[0] == _SHM


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def encode(
    obj: Any,
    shm: "Union[str, SegmentPool, None]" = None,
    threshold: int = DEFAULT_SHM_THRESHOLD,
) -> Payload:
    """Pickle ``obj`` (protocol 5). With ``shm`` (a :class:`SegmentPool`, or a
    name prefix for a one-off file), out-of-band buffers of at least
    ``threshold`` bytes are written to shared memory. Raises whatever pickle
    raises."""
    if shm is None:
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
    if isinstance(shm, SegmentPool):
        seg = shm.acquire(total)
        try:
            for v, off in zip(views, offsets):
                seg.mm[off : off + v.nbytes] = v
        except BaseException:
            shm.release(seg.name)
            raise
        name, path, pool = seg.name, seg.path, shm
    else:
        name = f"{shm}{uuid.uuid4().hex[:16]}"
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
        pool = None
    encoded_name = name.encode()
    head = bytearray([_SHM])
    head += _SHM_HEAD.pack(len(encoded_name), len(views))
    head += encoded_name
    for v, off in zip(views, offsets):
        head += _SHM_BUF.pack(off, v.nbytes)
    return Payload(bytes(head) + pickled, shm_path=path, pool=pool, name=name)


def open_shm_payload(body: Buffer, unlink: bool) -> tuple[memoryview, list[memoryview], str]:
    """Map the shared-memory file a payload refers to.

    Returns the pickle, the out-of-band buffers (views of the mapping, which
    stays alive as long as any object built on them) and the file's path. With
    ``unlink``, the file is removed at once: the mapping keeps the memory.
    """
    mv = memoryview(body)
    name, bufs, pos = _parse_shm_head(mv)
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


def decode(body: Buffer, unlink: bool = False, cache: Optional[MappingCache] = None) -> Any:
    """Unpickle a payload body. With ``cache``, shared-memory buffers are
    copied out (the writer may reuse its segment at once); without, they are
    mapped in place and ``unlink`` removes a one-off file."""
    if not body:
        raise ProtocolError("empty payload")
    flavour = body[0]
    if flavour == _INLINE:
        return pickle.loads(memoryview(body)[1:])
    if flavour == _SHM and cache is not None:
        copied, copies, _ = read_copy(body, cache)
        return pickle.loads(copied, buffers=copies)
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

