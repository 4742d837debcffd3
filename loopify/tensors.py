"""Small helpers for comparing and flattening model outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.utils._pytree as pytree


def flat_tensors(outputs) -> list[torch.Tensor]:
    """All tensors in a (nested) output structure, in pytree order."""
    return [x for x in pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor)]


@dataclass(frozen=True)
class Diff:
    """How far one output tensor is from its reference.

    ``rel_err`` is the max abs error divided by the reference's max abs value, so that a logit
    tensor of scale 10 and an embedding of scale 0.1 are judged alike.
    """

    index: int
    shape: tuple
    max_abs_err: float
    rel_err: float
    cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference, candidate) -> list[Diff]:
    """Compare two output structures tensor by tensor (float32 math)."""
    ref, cand = flat_tensors(reference), flat_tensors(candidate)
    if len(ref) != len(cand):
        raise ValueError(f"output count differs: {len(ref)} reference vs {len(cand)} candidate")
    diffs = []
    for i, (a, b) in enumerate(zip(ref, cand)):
        if a.shape != b.shape:
            raise ValueError(f"output {i} shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
        a32, b32 = a.detach().double(), b.detach().double()
        err = (a32 - b32).abs().max().item() if a.numel() else 0.0
        scale = a32.abs().max().item() if a.numel() else 0.0
        cos = torch.nn.functional.cosine_similarity(a32.flatten(), b32.flatten(), dim=0).item() if a.numel() else 1.0
        diffs.append(Diff(i, tuple(a.shape), err, err / max(scale, 1e-12), cos))
    return diffs
