"""Shared memory: segments one process writes and its peer reads.

Large out-of-band buffers of a payload (NumPy arrays, ``pickle.PickleBuffer``)
travel through files in ``/dev/shm`` when both ends share one machine. The
writer leases a segment from its :class:`SegmentPool` and gets it back when
the peer says it is done with it (the hub's ``Release`` action for requests,
a RELEASE frame for answers); the reader keeps mappings open in a
:class:`MappingCache` and reads the buffers in place (or copies them out). Every file's name starts with
``gibbs-`` and names its owner's pid, so files of a dead process can be found
and removed.

A payload that refers to a segment starts with ``SHM`` (1), then::

    u16 name length | u32 buffer count | name | (u64 offset, u64 length)* | pickle
"""

from __future__ import annotations

import collections
import mmap
import os
import struct
import threading
import uuid
from typing import Union

from .errors import ProtocolError

Buffer = Union[bytes, bytearray, memoryview]

SHM_DIR = "/dev/shm"
SHM_PREFIX = "gibbs-"

INLINE = 0
SHM = 1
OOB = 2  # inline, with out-of-band buffers after a small header (protocol.pack_oob)
SHM_HEAD = struct.Struct("!HI")  # name length, buffer count
SHM_BUF = struct.Struct("!QQ")  # offset, length


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

    def stats(self) -> dict[str, int]:
        """Its files now: leased (a peer may read them) and free (kept for reuse)."""
        with self._lock:
            return {
                "leased": len(self._leased),
                "leased_bytes": sum(s.size for s in self._leased.values()),
                "free": len(self._free),
                "free_bytes": self._free_bytes,
            }

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
    ``size`` of them and ``max_bytes`` in all, plus those still read in
    place) so that reading a reused segment maps nothing anew. Thread-safe.

    A cached mapping keeps its memory alive after the peer removes the file
    (until evicted, or :meth:`forget` when the peer goes): hence the bound
    in bytes."""

    def __init__(self, size: int = 64, max_bytes: int = 256 << 20, readonly: bool = False) -> None:
        self._size = size
        self._max_bytes = max_bytes
        # A reader that only reads (a worker, of the hub's requests) maps
        # read-only: a write into an argument (a torch tensor has no
        # read-only flag) faults rather than change what a retry would send.
        self._readonly = readonly
        self._lock = threading.Lock()  # owns: _maps, mapped
        self._maps: "collections.OrderedDict[str, mmap.mmap]" = collections.OrderedDict()
        #: How many times a segment was mapped (a reused segment still cached is not).
        self.mapped = 0

    def view(self, name: str) -> memoryview:
        """A view of the whole of segment ``name``. While it (or a slice of
        it) lives, its mapping stays open and cached."""
        with self._lock:
            mm = self._maps.get(name)
            if mm is not None:
                self._maps.move_to_end(name)
                return memoryview(mm)  # under the lock: no eviction closes it first
        fd = os.open(os.path.join(SHM_DIR, name), (os.O_RDONLY if self._readonly else os.O_RDWR) | os.O_NOFOLLOW)
        try:
            if self._readonly:
                mm = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
            else:
                mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        with self._lock:
            self.mapped += 1
            old = self._maps.get(name)
            if old is not None:  # mapped meanwhile by another thread: keep one
                _close_map(mm)
                mm = old
            self._maps[name] = mm
            self._maps.move_to_end(name)
            whole = memoryview(mm)
            self._evict_locked()
            return whole

    def _evict_locked(self) -> None:
        """Close the oldest mappings beyond ``size``, skipping those still read
        in place (views of answers lent to callers): closing them would fail,
        and dropping them would map their segment anew on its next use."""
        total = sum(len(mm) for mm in self._maps.values())
        if len(self._maps) <= self._size and total <= self._max_bytes:
            return
        for n in list(self._maps)[:-1]:  # oldest first; never the one just read
            if len(self._maps) <= self._size and total <= self._max_bytes:
                return
            mm = self._maps[n]
            size = len(mm)
            try:
                mm.close()
            except BufferError:
                continue
            total -= size
            del self._maps[n]

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

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
    whole = cache.view(name)
    try:
        copies = []
        for off, length in bufs:
            if off + length > whole.nbytes:
                raise ProtocolError("shared-memory buffer out of range")
            copies.append(bytearray(whole[off : off + length]))
    finally:
        whole.release()
    return bytes(mv[pos:]), copies, name


def read_views(
    body: Buffer, cache: MappingCache, readonly: bool, owner: str = SHM_PREFIX
) -> tuple[bytes, list[memoryview], str, int]:
    """Read a shared-memory payload in place: (pickle, views of its buffers
    on the peer's segment, segment name, segment size). Nothing is copied;
    the peer must not reuse the segment while a view is alive. A name that
    does not start with ``owner`` (the sending peer's own prefix) is a
    :class:`ProtocolError`: a peer reads out of its own segments only."""
    mv = memoryview(body)
    name, bufs, pos = _parse_shm_head(mv)
    if not name.startswith(owner):
        raise ProtocolError(f"shared-memory segment {name!r} is not the sender's (its names start {owner!r})")
    whole = cache.view(name)
    size = whole.nbytes
    if readonly:
        whole = whole.toreadonly()
    views = []
    for off, length in bufs:
        if off + length > size:
            raise ProtocolError("shared-memory buffer out of range")
        views.append(whole[off : off + length])
    return bytes(mv[pos:]), views, name, size


def _parse_shm_head(mv: memoryview) -> tuple[str, list[tuple[int, int]], int]:
    """The segment name and (offset, length) of each buffer of a payload that
    refers to shared memory. Raises :class:`ProtocolError`, and nothing else,
    for a header that is short, names a file outside ``/dev/shm/gibbs-*``, or
    lists more buffers than it carries."""
    end = len(mv)
    if end < 1 + SHM_HEAD.size:
        raise ProtocolError("malformed shared-memory payload: short header")
    name_len, count = SHM_HEAD.unpack_from(mv, 1)
    pos = 1 + SHM_HEAD.size
    if end - pos < name_len + count * SHM_BUF.size:
        raise ProtocolError(f"malformed shared-memory payload: {count} buffers announced, not carried")
    try:
        name = bytes(mv[pos : pos + name_len]).decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed shared-memory payload: the name is not UTF-8") from None
    pos += name_len
    if "/" in name or "\0" in name or not name.startswith(SHM_PREFIX):
        raise ProtocolError(f"bad shared-memory name {name!r}")
    bufs = []
    for _ in range(count):
        bufs.append(SHM_BUF.unpack_from(mv, pos))
        pos += SHM_BUF.size
    return name, bufs, pos


def is_shm(body: Buffer) -> bool:
    return bool(body) and body[0] == SHM


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def map_payload(body: Buffer) -> tuple[memoryview, list[memoryview]]:
    """Map the segment a payload refers to, without copying: the pickle and
    views of its out-of-band buffers (the mapping lives as long as they do)."""
    mv = memoryview(body)
    name, bufs, pos = _parse_shm_head(mv)
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    whole = memoryview(mm)
    views = []
    for off, length in bufs:
        if off + length > size:
            raise ProtocolError("shared-memory buffer out of range")
        views.append(whole[off : off + length])
    return mv[pos:], views


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
