"""protocol.py and shm.py: framing, payload encoding (inline and through
pooled /dev/shm segments), error records."""

from __future__ import annotations

import json
import os
import pickle
import threading
import uuid

import numpy as np
import pytest

from gibbs import ProtocolError
from gibbs import protocol as p

needs_shm = pytest.mark.skipif(not p.shm_available(), reason="no writable /dev/shm")


@pytest.fixture
def prefix():
    """A segment pool under a /dev/shm name prefix of this test's own; once
    the pool is closed, every file under it must be gone."""
    pre = f"{p.SHM_PREFIX}test{os.getpid()}-{uuid.uuid4().hex[:6]}-"
    pool = p.SegmentPool(pre)
    yield pool
    pool.close()
    left = _files(pre)
    p.remove_segments(pre)
    assert not left, f"shared-memory files left behind: {left}"


def _files(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(p.SHM_DIR) if n.startswith(prefix))
    except OSError:
        return []


def frame(kind: int, req_id: int, body: bytes = b"") -> bytes:
    return b"".join(bytes(b) for b in p.pack_frame(kind, req_id, body))


# ------------------------------------------------------------------ framing


def test_pack_frame_header_layout() -> None:
    bufs = p.pack_frame(p.RESULT, 7, b"abc")
    assert len(bufs) == 2
    assert p.HEADER.unpack(bufs[0]) == (p.RESULT, 7, 3)
    assert bufs[1] == b"abc"
    # an empty body is the header alone
    assert p.pack_frame(p.HEARTBEAT, 0) == [p.HEADER.pack(p.HEARTBEAT, 0, 0)]
    # a memoryview body is measured in bytes, not items
    mv = memoryview(np.arange(4, dtype=np.int64)).cast("B")
    assert p.HEADER.unpack(p.pack_frame(p.REQUEST, 1, mv)[0])[2] == 32


def test_frame_reader_partial_frames_byte_by_byte() -> None:
    data = frame(p.REQUEST, 1, b"hello") + frame(p.HEARTBEAT, 0) + frame(p.RESULT, 2**64 - 1, b"x" * 1000)
    reader = p.FrameReader()
    got = []
    for i in range(len(data)):
        got.extend(reader.feed(data[i : i + 1]))
        if i < p.HEADER_SIZE + 4:
            assert got == [], "a frame came out before all of it arrived"
    assert got == [(p.REQUEST, 1, b"hello"), (p.HEARTBEAT, 0, b""), (p.RESULT, 2**64 - 1, b"x" * 1000)]
    assert reader.pending == 0


def test_frame_reader_split_header_and_body() -> None:
    data = frame(p.RESULT, 5, b"0123456789")
    reader = p.FrameReader()
    assert reader.feed(data[:5]) == []  # half a header
    assert reader.pending == 5
    assert reader.feed(data[5 : p.HEADER_SIZE + 3]) == []  # header and part of the body
    assert reader.feed(data[p.HEADER_SIZE + 3 :]) == [(p.RESULT, 5, b"0123456789")]
    assert reader.pending == 0


def test_frame_reader_many_frames_in_one_feed_and_a_tail() -> None:
    frames = [(p.RESULT, i, os.urandom(i)) for i in range(200)]
    data = b"".join(frame(*f) for f in frames)
    tail = frame(p.ERROR, 999, b"partial")
    reader = p.FrameReader()
    assert reader.feed(data + tail[:-3]) == frames
    assert reader.pending == len(tail) - 3
    assert reader.feed(tail[-3:]) == [(p.ERROR, 999, b"partial")]
    assert reader.pending == 0


def test_frame_reader_accepts_bytearray_and_memoryview() -> None:
    reader = p.FrameReader()
    data = frame(p.RESULT, 3, b"abc")
    assert reader.feed(bytearray(data[:4])) == []
    assert reader.feed(memoryview(data)[4:]) == [(p.RESULT, 3, b"abc")]


def test_frame_reader_oversized_frame_raises_before_buffering_the_body() -> None:
    reader = p.FrameReader(max_frame=1024)
    assert reader.feed(frame(p.RESULT, 1, b"x" * 1024)) == [(p.RESULT, 1, b"x" * 1024)]  # at the limit: fine
    with pytest.raises(ProtocolError, match="over the limit"):
        # the header alone announces 1025 bytes: refused before any body arrives
        reader.feed(p.HEADER.pack(p.RESULT, 2, 1025))


def test_frame_reader_huge_announced_length() -> None:
    reader = p.FrameReader()  # default limit, 1 GiB
    with pytest.raises(ProtocolError):
        reader.feed(p.HEADER.pack(p.RESULT, 1, 0xFFFFFFFF))


@pytest.mark.parametrize("kind", [0, 42, 200, 255])
def test_frame_reader_unknown_kind(kind: int) -> None:
    reader = p.FrameReader()
    with pytest.raises(ProtocolError, match="unknown message kind"):
        reader.feed(p.HEADER.pack(kind, 1, 0))


def test_frame_reader_unknown_kind_after_good_frames() -> None:
    reader = p.FrameReader()
    with pytest.raises(ProtocolError):
        reader.feed(frame(p.HEARTBEAT, 0) + p.HEADER.pack(200, 0, 0))


def test_json_control_messages() -> None:
    data = p.pack_json(p.HELLO, {"pid": 12, "host": "h"})
    [(kind, req_id, body)] = p.FrameReader().feed(data)
    assert (kind, req_id) == (p.HELLO, 0)
    assert p.unpack_json(body) == {"pid": 12, "host": "h"}
    with pytest.raises(ProtocolError):
        p.unpack_json(b"\x80not json")
    with pytest.raises(ProtocolError):
        p.unpack_json(json.dumps([1, 2]).encode())  # not an object
    with pytest.raises(ProtocolError):
        p.unpack_json(pickle.dumps({"a": 1}))  # a pickle is never taken for a control message


# ------------------------------------------------------------------ payloads

DTYPES = [
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "longdouble",
    "complex64", "complex128", "clongdouble",
    "datetime64[ns]", "datetime64[D]", "timedelta64[ms]",
    "U7", "S5", "V4",
    ">i4", "<f8",  # explicit byte orders
]


def _sample(dtype: str, shape=(6, 5)) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt.kind == "b":
        a = np.arange(n) % 3 == 0
    elif dt.kind in "iu":
        a = np.arange(n) * 3 + 1
    elif dt.kind in "fc":
        a = np.linspace(-5, 5, n)
        if dt.kind == "c":
            a = a + 1j * a[::-1]
    elif dt.kind in "mM":
        a = np.arange(n).astype("i8")
        return a.astype(dt).reshape(shape)
    elif dt.kind == "U":
        a = np.array([f"é{i}" for i in range(n)])
    elif dt.kind == "S":
        a = np.array([f"b{i}".encode() for i in range(n)])
    else:  # void
        a = np.frombuffer(bytes(range(n * dt.itemsize)), dtype=dt)
    return np.asarray(a).astype(dt).reshape(shape)


STRUCTURED = np.dtype([("id", "<i4"), ("pos", "<f8", (3,)), ("name", "U4"), ("ok", "?")])


def _structured(n: int = 20) -> np.ndarray:
    a = np.zeros(n, dtype=STRUCTURED)
    a["id"] = np.arange(n)
    a["pos"] = np.arange(3 * n).reshape(n, 3) / 7
    a["name"] = [f"n{i}" for i in range(n)]
    a["ok"] = np.arange(n) % 2 == 0
    return a


def _assert_same_array(got, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.tobytes(order="A") == want.tobytes(order="A")


def _views() -> list[tuple[str, np.ndarray]]:
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    return [
        ("strided", np.arange(100, dtype=np.int32)[::2]),
        ("reversed", np.arange(50, dtype=np.int16)[::-1]),
        ("transposed", base.T),
        ("fortran", np.asfortranarray(base)),
        ("column", base[:, 3]),
        ("sub-block", base[1:5, 2:8]),
        ("zero-size", np.zeros((0, 4), dtype=np.float32)),
        ("0-d", np.array(3.5)),
        ("broadcast", np.broadcast_to(np.arange(5), (4, 5))),
        ("readonly", np.frombuffer(b"abcdefgh", dtype=np.uint8)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_inline_round_trip_every_dtype(dtype: str) -> None:
    a = _sample(dtype)
    payload = p.encode({"a": a})
    assert payload.shm_path is None
    _assert_same_array(p.decode(payload.body)["a"], a)


@needs_shm
@pytest.mark.parametrize("dtype", DTYPES)
def test_shm_round_trip_every_dtype(dtype: str, prefix: p.SegmentPool) -> None:
    a = _sample(dtype)
    payload = p.encode((a, "small", 3), prefix, threshold=1)
    got = p.decode(payload.body, cache=p.MappingCache())
    _assert_same_array(got[0], a)
    assert got[1:] == ("small", 3)
    payload.release()  # back to the pool: the fixture checks that closing it removes the file


@needs_shm
def test_shm_is_really_used_for_large_arrays(prefix: p.SegmentPool) -> None:
    a = np.arange(1 << 16, dtype=np.float64)  # 512 KiB, over the default threshold
    payload = p.encode(a, prefix)
    assert payload.shm_path is not None and os.path.basename(payload.shm_path).startswith(prefix.prefix)
    assert payload.nbytes < 4096  # the frame carries a name and offsets, not the data
    assert p.is_shm(payload.body) and payload.shm_path is not None
    _assert_same_array(p.decode(payload.body, cache=p.MappingCache()), a)
    payload.release()


@needs_shm
def test_small_buffers_stay_inline(prefix: p.SegmentPool) -> None:
    payload = p.encode(np.arange(10), prefix)  # far under the default threshold
    assert payload.shm_path is None
    assert not p.is_shm(payload.body)
    _assert_same_array(p.decode(payload.body), np.arange(10))


@pytest.mark.parametrize("shm", [False, True])
def test_structured_array_round_trip(shm: bool, prefix: p.SegmentPool) -> None:
    if shm and not p.shm_available():
        pytest.skip("no /dev/shm")
    a = _structured()
    payload = p.encode([a, a[::3]], prefix if shm else None, threshold=1)
    got = p.decode(payload.body, cache=p.MappingCache())
    _assert_same_array(got[0], a)
    _assert_same_array(got[1], a[::3])
    payload.release()


@pytest.mark.parametrize("shm", [False, True])
@pytest.mark.parametrize("name,view", _views(), ids=[n for n, _ in _views()])
def test_non_contiguous_views_round_trip(name: str, view: np.ndarray, shm: bool, prefix: p.SegmentPool) -> None:
    if shm and not p.shm_available():
        pytest.skip("no /dev/shm")
    payload = p.encode(view, prefix if shm else None, threshold=1)
    got = p.decode(payload.body, cache=p.MappingCache())
    _assert_same_array(got, view)
    if view.flags.f_contiguous and not view.flags.c_contiguous:
        assert got.flags.f_contiguous  # Fortran order is kept
    payload.release()


@needs_shm
def test_many_arrays_in_one_payload_are_aligned_and_intact(prefix: p.SegmentPool) -> None:
    arrays = [np.arange(n, dtype=np.uint8) for n in (1, 63, 64, 65, 1000, 4097)]
    arrays += [np.arange(100, dtype=np.complex128), _structured(7)]
    payload = p.encode({"arrays": arrays, "meta": {"x": 1}}, prefix, threshold=1)
    got = p.decode(payload.body)  # in place: the alignment is the segment's
    assert got["meta"] == {"x": 1}
    for g, a in zip(got["arrays"], arrays):
        _assert_same_array(g, a)
        assert g.ctypes.data % 64 == 0  # every out-of-band buffer starts 64-byte aligned


@pytest.mark.parametrize("shm", [False, True])
def test_bytes_and_bytearray_round_trip(shm: bool, prefix: p.SegmentPool) -> None:
    if shm and not p.shm_available():
        pytest.skip("no /dev/shm")
    big = os.urandom(1 << 19)
    obj = (b"", b"small", big, bytearray(b"mutable"), bytearray(big), memoryview(b"view").tobytes())
    payload = p.encode(obj, prefix if shm else None, threshold=1)
    got = p.decode(payload.body, cache=p.MappingCache())
    assert got == obj
    assert type(got[2]) is bytes and type(got[4]) is bytearray
    payload.release()


@needs_shm
def test_pickle_buffer_goes_out_of_band(prefix: p.SegmentPool) -> None:
    data = bytearray(os.urandom(1 << 19))
    payload = p.encode(pickle.PickleBuffer(data), prefix)
    assert payload.shm_path is not None
    got = p.decode(payload.body, cache=p.MappingCache())
    assert bytes(got) == bytes(data)
    payload.release()


@needs_shm
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_large_bytes_round_trip_inline(kind, prefix: p.SegmentPool) -> None:
    # Pickle hands only out-of-band buffers (pickle.PickleBuffer, NumPy arrays)
    # to buffer_callback: plain bytes and bytearray travel inline, as documented.
    data = kind(os.urandom(1 << 20))
    payload = p.encode(data, prefix)
    try:
        assert payload.shm_path is None
        assert p.decode(payload.body, cache=p.MappingCache()) == data
    finally:
        payload.release()


@needs_shm
def test_segment_is_read_again_until_released_then_reused(prefix: p.SegmentPool) -> None:
    a = np.arange(1000)
    payload = p.encode(a, prefix, threshold=1)
    path = payload.shm_path
    assert path is not None and os.path.exists(path)
    for _ in range(2):  # a worker may read the same request twice (a retry)
        _assert_same_array(p.decode(payload.body, cache=p.MappingCache()), a)
        assert os.path.exists(path)
    payload.release()
    payload.release()  # idempotent
    assert payload.shm_path is None
    again = p.encode(a + 1, prefix, threshold=1)
    assert again.shm_path == path  # the pool's segment, filled anew: no new file
    _assert_same_array(p.decode(again.body), a + 1)
    again.release()


@needs_shm
def test_decoded_in_place_array_outlives_the_pool(prefix: p.SegmentPool) -> None:
    a = np.arange(5000, dtype=np.float32)
    payload = p.encode(a, prefix, threshold=1)
    got = p.decode(payload.body)  # mapped in place, no copy
    payload.release()
    prefix.close()
    assert _files(prefix.prefix) == []  # the mapping keeps the memory, the name is gone
    _assert_same_array(got, a)


@needs_shm
def test_inline_body_of_a_shm_payload(prefix: p.SegmentPool) -> None:
    a = np.arange(3000).reshape(30, 100)
    payload = p.encode((a,), prefix, threshold=1)
    inline = payload.inline_body()
    assert not p.is_shm(inline)
    _assert_same_array(p.decode(inline)[0], a)
    assert payload.inline_body() is inline  # computed once
    assert payload.shm_path is not None and os.path.exists(payload.shm_path)  # still ours
    payload.release()


@needs_shm
def test_remove_segments(prefix: p.SegmentPool) -> None:
    for _ in range(3):
        p.encode(np.arange(10), prefix, threshold=1)  # three leases: three files
    assert len(_files(prefix.prefix)) == 3
    assert p.remove_segments(prefix.prefix) == 3
    assert _files(prefix.prefix) == []


def test_decode_rejects_bad_bodies() -> None:
    with pytest.raises(ProtocolError):
        p.decode(b"")
    with pytest.raises(ProtocolError):
        p.decode(b"\x07whatever")


@pytest.mark.parametrize("name", ["../etc/passwd", "gibbs-x/../../y", "notgibbs-file"])
def test_shm_payload_with_a_hostile_name_is_refused(name: str) -> None:
    raw = name.encode()
    body = bytes([1]) + p.SHM_HEAD.pack(len(raw), 0) + raw + pickle.dumps(None)
    with pytest.raises(ProtocolError):
        p.decode(body, cache=p.MappingCache())


@needs_shm
def test_shm_payload_with_out_of_range_buffer(prefix: p.SegmentPool) -> None:
    payload = p.encode(np.arange(16, dtype=np.uint8), prefix, threshold=1)
    body = bytearray(payload.body)
    name_len, count = p.SHM_HEAD.unpack_from(body, 1)
    pos = 1 + p.SHM_HEAD.size + name_len
    p.SHM_BUF.pack_into(body, pos, 0, 1 << 30)  # claims far more than the file holds
    try:
        with pytest.raises(ProtocolError):
            p.decode(bytes(body))
    finally:
        payload.release()


def test_encode_raises_pickling_errors() -> None:
    with pytest.raises(Exception):
        p.encode(lambda: 1)
    with pytest.raises(Exception):
        p.encode({"lock": threading.Lock()})


@needs_shm
def test_encode_that_fails_leaves_no_file(prefix: p.SegmentPool) -> None:
    with pytest.raises(Exception):
        p.encode((np.arange(1000), lambda: 1), prefix, threshold=1)
    assert len(_files(prefix.prefix)) <= 1  # nothing leased: at most a free segment of the pool


# ------------------------------------------------------------------ error records


class _NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from .args
        super().__init__(f"{a}-{b}")


class _HoldsALock(Exception):
    def __init__(self) -> None:
        super().__init__("locked")
        self.lock = threading.Lock()


def test_make_error_body_with_a_picklable_exception() -> None:
    try:
        raise ValueError("bad input: 3")
    except ValueError as exc:
        record = pickle.loads(p.make_error_body(p.ERR_USER, exc, "Traceback: here"))
    assert record["kind"] == p.ERR_USER
    assert record["type"] == "ValueError"
    assert record["module"] == "builtins"
    assert record["message"] == "bad input: 3"
    assert record["traceback"] == "Traceback: here"
    original = pickle.loads(record["exception"])
    assert isinstance(original, ValueError) and str(original) == "bad input: 3"


@pytest.mark.parametrize("exc", [_HoldsALock(), _NeedsTwoArgs(1, 2)], ids=["unpicklable", "unrebuildable"])
def test_make_error_body_without_the_exception_object(exc: Exception) -> None:
    record = pickle.loads(p.make_error_body(p.ERR_RESULT_PICKLE, exc, "tb"))
    assert record["exception"] is None
    assert record["type"] == type(exc).__qualname__
    assert record["module"] == __name__
    assert record["message"] == str(exc)
    assert record["kind"] == p.ERR_RESULT_PICKLE
