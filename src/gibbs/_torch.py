"""Torch tensors through the same out-of-band buffers as NumPy arrays.

torch pickles a tensor's storage through ``bytes`` (``torch.save`` into a
buffer): the hub never sees a buffer, so a large tensor is copied several
times and never reaches shared memory. Here a CPU tensor pickles as its dtype,
its shape and one ``pickle.PickleBuffer`` of its bytes, like a NumPy array:
large ones go through shared memory, and the receiver rebuilds the tensor
on those bytes in place (``torch.frombuffer``: the tensor keeps the buffer,
so an answer stays lent to its caller until every tensor on it is freed).

gibbs imports torch only where torch is loaded already: the pickler takes
this reducer when ``"torch" in sys.modules`` (a payload holding a tensor
implies it), and the receiving side imports torch when it unpickles one.

- Any dtype torch can view as bytes (bool, the integer types, float16,
  bfloat16, float32/64, complex, ...), any shape; a non-contiguous tensor
  (a slice, a transpose) is made contiguous once, on the sending side;
  a lazily conjugated or negated view is resolved first.
- A CUDA (or other device) tensor is copied to the host once and arrives as
  a CPU tensor (move it with ``.to(device)`` where it is wanted).
- What this path would get wrong falls back to torch's own pickling (slow,
  exact, what ``torch.save`` keeps): a tensor that requires grad (its
  values and ``requires_grad`` travel; its autograd graph does not),
  sparse or other non-strided layouts, quantized tensors, subclasses such
  as ``nn.Parameter``.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
import pickle
import sys
import warnings
from typing import Any, Callable, Optional

__all__ = ["dumps"]

_table: Optional[dict[Any, Callable[[Any], Any]]] = None
_seen = -1  # len(copyreg.dispatch_table) when _table was made
_torch: Any = None


def _dispatch_table() -> Optional[dict[Any, Callable[[Any], Any]]]:
    """copyreg's table plus torch tensors (made again when a reducer was
    registered with copyreg since)."""
    global _table, _torch, _seen
    if _table is None or _seen != len(copyreg.dispatch_table):
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "Tensor"):  # not loaded, or still loading
            return None
        _torch = torch
        table = dict(copyreg.dispatch_table)
        table.setdefault(torch.Tensor, _reduce_tensor)  # a reducer the user registered for tensors wins
        _seen = len(copyreg.dispatch_table)
        _table = table
    return _table


def dumps(obj: Any, buffer_callback: Optional[Callable[[pickle.PickleBuffer], Any]] = None) -> bytes:
    """``pickle.dumps(obj, protocol=5, buffer_callback=...)``, with CPU torch
    tensors pickled as out-of-band buffers when torch is loaded."""
    table = _dispatch_table() if "torch" in sys.modules else None
    if table is None:
        return pickle.dumps(obj, protocol=5, buffer_callback=buffer_callback)
    f = io.BytesIO()
    p = pickle.Pickler(f, protocol=5, buffer_callback=buffer_callback)
    p.dispatch_table = table
    p.dump(obj)
    return f.getvalue()


def _reduce_tensor(t: Any) -> Any:
    torch = _torch
    if (
        t.requires_grad
        or t.layout is not torch.strided
        or t.is_quantized
        or t.device.type == "meta"
        or getattr(t, "is_nested", False)
    ):
        return t.__reduce_ex__(5)  # torch's own pickling: slow, and exact
    if t.device.type != "cpu":
        t = t.cpu()  # the host copy
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    dtype = str(t.dtype).rpartition(".")[2]
    shape = tuple(t.shape)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return _rebuild, (pickle.PickleBuffer(b""), dtype, shape)
    raw = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    raw._gibbs_tensor = t  # type: ignore[attr-defined]  # the bytes live as long as the buffer
    return _rebuild, (pickle.PickleBuffer(raw), dtype, shape)


def _rebuild(buf: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    dt = getattr(torch, dtype)
    view = memoryview(buf)
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dt)
    with warnings.catch_warnings():
        # A model's argument is a read-only view on the hub's memory; torch
        # has no read-only tensors and says so: the README says it instead.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(buf, dtype=torch.uint8)
    return t.view(dt).reshape(shape)
