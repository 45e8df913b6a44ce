"""Torch tensors through shared memory, like NumPy arrays: read in place by
the model, answers lent to the caller until freed, nested anywhere."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from typing import Any, Callable

import pytest
from conftest import run, wait_until
from gibbs_test_models import BatchIdentity, Identity, TensorDoubled, TensorWhere, shm_mapping_of

from gibbs import Hub
from gibbs.errors import WorkerDiedError

torch = pytest.importorskip("torch", reason="torch is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")

MiB = 1 << 20

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
]


def sample(dtype: Any, nbytes: int = MiB) -> Any:
    """A tensor of ``nbytes`` random bytes (finite values for floats)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = max(1, nbytes // itemsize)
    g = torch.Generator().manual_seed(n)
    if dtype is torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(n, dtype=torch.complex128 if dtype.is_complex else torch.float64, generator=g)
        return t.to(dtype)
    return torch.randint(0, 100, (n,), generator=g, dtype=torch.int64).to(dtype)


def lent(hub: Hub) -> dict[str, Any]:
    return hub.statistics()["shared_memory"]


def served(hub: Hub, make_workers: Callable[..., Any], cls: Any, n: int = 1, *args: Any, **kw: Any) -> None:
    # A model that computes with torch starts with forkserver: this process
    # used torch's OpenMP threads, and GNU OpenMP does not survive a fork.
    if cls in (TensorWhere, TensorDoubled):
        kw.setdefault("gibbs_start_method", "forkserver")
    make_workers(hub, cls, n, *args, **kw)
    hub.wait_for_workers_sync(n, timeout=30)


def same(a: Any, b: Any) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).rpartition(".")[2])
def test_every_dtype_round_trips_in_place(hub: Hub, make_workers: Any, dtype: Any) -> None:
    served(hub, make_workers, Identity)
    t = sample(dtype).reshape(4, -1)
    before = lent(hub)

    async def main() -> None:
        out = await hub.request(t)
        assert same(out, t)
        assert shm_mapping_of(out.data_ptr()).startswith("/dev/shm/gibbs-w")  # lent, not copied
        assert lent(hub)["lent"] == 1
        del out

    run(main())
    gc.collect()
    s = lent(hub)
    assert s["answers_lent"] == before["answers_lent"] + 1 and s["answers_copied"] == before["answers_copied"]
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)


def test_the_model_reads_its_argument_in_place(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, TensorWhere)
    t = torch.arange(MiB, dtype=torch.float32).reshape(256, -1)
    got = run(hub.request(t))
    assert got["where"].startswith("/dev/shm/gibbs-")  # the hub's segment, no copy
    assert got["sum"] == float(t.double().sum()) and got["dtype"] == "torch.float32" and got["shape"] == (256, 4096)


def test_layouts(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Identity)
    base = torch.arange(4 * MiB // 8, dtype=torch.float64).reshape(512, -1)
    c = torch.randn(512, 512, dtype=torch.complex64)
    tensors = [
        base[::2, 1::3],  # not contiguous
        base.T,
        base[100:300],  # an offset into a storage
        base.reshape(-1)[5:],
        base.reshape(8, 64, -1).permute(2, 0, 1),
        c.conj(),  # a lazy conjugate
        torch.ones(MiB, dtype=torch.float32).neg().abs(),
        torch._neg_view(c),  # a lazy negation
        torch.tensor(3.5),  # zero dimensions (small: in band)
        torch.empty(0, 7, dtype=torch.int16),  # no elements
        base.expand(3, 512, 1024)[1],  # a stride of 0 along the expanded axis, then a slice
    ]

    async def main() -> None:
        for t in tensors:
            out = await hub.request(t)
            assert out.dtype == t.dtype and out.shape == t.shape
            assert torch.equal(out.resolve_conj().resolve_neg(), t.resolve_conj().resolve_neg())
            assert out.is_contiguous()

    run(main())


def test_a_model_gets_private_copies_with_copy_args(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    hub = make_hub()
    served(hub, make_workers, TensorWhere, 1, True, gibbs_copy_args=True)
    t = torch.ones(MiB)
    got = run(hub.request(t))
    assert got["where"] == "" or not got["where"].startswith("/dev/shm")  # private memory
    assert torch.equal(t, torch.ones(MiB))  # the caller's tensor is never touched


def test_a_model_that_writes_into_its_argument_in_place_fails_loudly(
    make_hub: Callable[..., Hub], make_workers: Any
) -> None:
    """torch has no read-only tensors: in place, a model's arguments lie on
    memory mapped read-only, so a write faults (the worker dies) rather
    than change what a retry would send."""
    hub = make_hub(max_attempts=1)
    served(hub, make_workers, TensorWhere, 1, True)
    t = torch.ones(MiB)
    with pytest.raises(WorkerDiedError, match="SIGSEGV"):
        run(hub.request(t))
    assert torch.equal(t, torch.ones(MiB))


def test_a_new_answer_tensor_is_writable(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, TensorDoubled)
    out = run(hub.request(torch.ones(MiB)))
    out.fill_(3)  # the caller's own (lent) memory
    assert float(out.sum()) == 3 * MiB


def test_kept_answers_are_never_overwritten_and_freed_ones_go_back(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, TensorDoubled)

    async def main() -> list[Any]:
        kept = [await hub.request(torch.full((MiB // 8,), float(i))) for i in range(6)]
        for _ in range(30):
            assert torch.equal(await hub.request(torch.full((MiB // 8,), -1.0)), torch.full((MiB // 8,), -2.0))
        return kept

    kept = run(main())
    for i, k in enumerate(kept):
        assert torch.equal(k, torch.full((MiB // 8,), 2.0 * i))
    assert lent(hub)["lent"] == 6
    view = kept[0][10:20]  # a view keeps its answer's memory lent
    del k
    kept.clear()
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 1, timeout=5)
    assert torch.equal(view, torch.zeros(10))
    del view
    gc.collect()
    assert wait_until(lambda: lent(hub)["lent"] == 0, timeout=5)


def test_tensors_nested_in_dicts_lists_and_tuples(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Identity)
    ids = torch.randint(0, 30000, (64, 512))
    payload = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "extra": [(torch.randn(256, 256, dtype=torch.bfloat16), "text", 3), {"small": torch.arange(3)}],
    }
    before = lent(hub)["answers_lent"]
    out = run(hub.request(payload))
    assert same(out["input_ids"], payload["input_ids"]) and same(out["attention_mask"], payload["attention_mask"])
    assert same(out["extra"][0][0], payload["extra"][0][0]) and out["extra"][0][1:] == ("text", 3)
    assert same(out["extra"][1]["small"], torch.arange(3))
    assert lent(hub)["answers_lent"] == before + 1  # one segment holds the three large ones
    assert shm_mapping_of(out["input_ids"].data_ptr()) == shm_mapping_of(out["attention_mask"].data_ptr())


def test_tensors_in_batches(make_hub: Callable[..., Hub], make_workers: Any) -> None:
    import asyncio

    hub = make_hub()
    served(hub, make_workers, BatchIdentity, 1, gibbs_batch_size=8, gibbs_batch_wait=0.05)
    xs = [{"x": torch.full((MiB // 4,), float(i)), "i": i} for i in range(16)]

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(hub.request(x) for x in xs)))

    outs = run(main())
    for x, out in zip(xs, outs):
        assert out["i"] == x["i"] and same(out["x"], x["x"])
        assert shm_mapping_of(out["x"].data_ptr()).startswith("/dev/shm/gibbs-w")


def test_what_this_path_cannot_take_falls_back_to_torchs_own_pickling(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Identity)
    leaf = torch.randn(300, 300, requires_grad=True)
    sparse = torch.eye(600).to_sparse()
    with pytest.warns(UserWarning):  # deprecated in torch, still served
        quantized = torch.quantize_per_tensor(torch.randn(600, 600), 0.1, 0, torch.qint8)
    param = torch.nn.Parameter(torch.randn(600, 600))
    out = run(hub.request([leaf, sparse, quantized, param]))
    assert out[0].requires_grad and torch.equal(out[0].detach(), leaf.detach())
    assert out[1].layout == torch.sparse_coo and torch.equal(out[1].to_dense(), sparse.to_dense())
    assert out[2].is_quantized and torch.equal(out[2].int_repr(), quantized.int_repr())
    assert isinstance(out[3], torch.nn.Parameter) and torch.equal(out[3].detach(), param.detach())
    derived = leaf * 2  # not a leaf: its values and requires_grad travel, not its graph (as with torch.save)
    out = run(hub.request(derived))
    assert out.requires_grad and out.grad_fn is None and torch.equal(out.detach(), derived.detach())


def test_large_tensor_goes_through_shared_memory_both_ways(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, TensorWhere)
    t = torch.zeros(64 * MiB // 4)
    got = run(hub.request(t))
    assert got["where"].startswith("/dev/shm/gibbs-")


def test_gibbs_imports_torch_only_for_tensors() -> None:
    code = (
        "import sys, numpy, gibbs, gibbs.protocol as p, gibbs.worker, gibbs.hub\n"
        "pool = p.SegmentPool('gibbs-t%d-' % __import__('os').getpid())\n"
        "payload = p.encode(([numpy.ones(1 << 20)], {}), pool)\n"
        "assert payload.shm_path and p.decode(payload.body)[0][0].sum() == 1 << 20\n"
        "pool.close()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_cuda_tensor_travels_through_the_host(hub: Hub, make_workers: Any) -> None:
    served(hub, make_workers, Identity)
    t = torch.randn(1024, 1024, device="cuda")
    out = run(hub.request(t))
    assert out.device.type == "cpu" and torch.equal(out, t.cpu())


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def _point(x: int) -> Point:
    return Point(x + 1000)  # marks that the reducer registered with copyreg ran


def test_reducers_registered_with_copyreg_still_apply() -> None:
    """The tensor path adds to copyreg's table; a reducer registered there
    later (after gibbs pickled a tensor) is honoured too."""
    import copyreg

    from gibbs import protocol

    protocol.decode(protocol.encode(torch.ones(3)).body)
    copyreg.pickle(Point, lambda p: (_point, (p.x,)))
    try:
        out = protocol.decode(protocol.encode({"p": Point(1), "t": torch.ones(3)}).body)
    finally:
        del copyreg.dispatch_table[Point]
    assert out["p"].x == 1001 and torch.equal(out["t"], torch.ones(3))
