"""Eager inference with prepacked linear weights (oneDNN).

PyTorch's ``F.linear`` on the CPU hands every call to the BLAS, which first copies the weight
matrix into its own panel layout and only then multiplies: a copy of the whole matrix per call,
read from memory (a 135M-parameter model's weights do not stay in cache), whatever the number of
rows. For few rows (decode, short prompts, the gathered tokens of a routed recursion step) that
copy is a large, fixed part of the call: at 16 rows x 576 -> 1536 it is about 40% of it.

:func:`prepack` lays each ``nn.Linear`` weight out once in oneDNN's blocked layout (the layout
``torch.compile``'s freezing uses) and makes the layer call oneDNN's matmul on it, which streams
the packed weight while it computes. Measured here (1 thread, cold weights): 1.6x faster at 16
rows, 1.2x at 128, 1.1x at 512; see the README ("Faster eager inference").

What it keeps exact and safe:

* the layer falls back to ``F.linear`` whenever the packed copy may be stale or not apply: the
  weight was replaced (``torch.func.functional_call``, a per-depth override) or changed in place
  (an optimiser step bumps its version), autograd is on, the input is not a plain float32 CPU
  tensor (fake or functional tensors under ``torch.export``, other dtypes), or it has one row (a
  GEMV, where the BLAS is as fast);
* results differ from ``F.linear`` only by the order of float additions (relative 1e-6);
* :func:`unpack` restores the layers; :func:`prepack` again re-packs stale weights only.

The packed copy costs the weights' memory once more (SmolLM2: the 576 x 49152 head, tied to the
embedding, is packed too): opt in with ``--prepack`` (``generate``, ``bench --generate``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_ATTR = "_loopify_prepacked"


def available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _Packed:
    """One layer's packed weight and what it was packed from (the parameter and its version)."""

    __slots__ = ("source", "version", "packed")

    def __init__(self, weight: torch.Tensor):
        self.source = weight
        self.version = weight._version
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def fresh(self, weight) -> bool:
        return weight is self.source and weight._version == self.version


def _packable(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            and m.weight.dim() == 2 and (m.bias is None or m.bias.dtype == torch.float32))


def _forward(layer: nn.Linear):
    def forward(x):
        p: _Packed = getattr(layer, _ATTR)
        w, b = layer.weight, layer.bias
        if (type(x) is torch.Tensor and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 2
                and not torch.is_grad_enabled() and p.fresh(w) and x.numel() != x.shape[-1]):
            return torch.ops.mkldnn._linear_pointwise(x, p.packed, b, "none", [], "")
        return F.linear(x, w, b)
    return forward


def prepack(module: nn.Module) -> int:
    """Pack every float32 CPU ``nn.Linear`` of ``module`` (see the module doc); layers already
    packed from their current weight are left as they are. Returns the number of packed layers;
    0 where oneDNN is not available."""
    if not available():
        return 0
    n = 0
    for m in module.modules():
        if not _packable(m):
            continue
        p = getattr(m, _ATTR, None)
        if p is None or not p.fresh(m.weight):
            object.__setattr__(m, _ATTR, _Packed(m.weight))
        if "forward" not in m.__dict__:
            m.forward = _forward(m)
        n += 1
    return n


def unpack(module: nn.Module) -> int:
    """Undo :func:`prepack`: every layer calls ``F.linear`` again and the packed copies are freed."""
    n = 0
    for m in module.modules():
        if getattr(m, _ATTR, None) is not None:
            object.__delattr__(m, _ATTR)
            m.__dict__.pop("forward", None)
            n += 1
    return n


def packed_bytes(module: nn.Module) -> int:
    """Bytes held by the packed copies (the memory :func:`prepack` adds)."""
    seen, total = set(), 0
    for m in module.modules():
        p = getattr(m, _ATTR, None)
        if p is not None and id(p.packed) not in seen:
            seen.add(id(p.packed))
            total += p.source.numel() * p.source.element_size()
    return total
