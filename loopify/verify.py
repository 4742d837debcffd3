"""Every comparison of outputs loopify makes, and every tolerance, with its reason.

Errors are judged relative to the reference's scale: ``rel_err`` = max abs error / max abs
reference value, so that a logit tensor of scale 10 and an embedding of scale 0.1 are judged
alike. All arithmetic is float64 numpy: this module imports neither torch nor TVM at load time
(the runtime uses it with numpy arrays alone); torch tensors are accepted and converted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Export against eager. Export only reorders float32 arithmetic (decomposed ops), which moves
#: results by ~1e-6 relative; 1e-4 leaves room for that on every output while catching any real
#: change of computation (the PaliGemma mask difference found in DESIGN.md was 0.19 absolute).
EXPORT_RTOL = 1e-4

#: Lossless plans (rank full, connectors at zero, deepen x1) against the original: float32
#: re-association of W + B@A moves results by ~1e-7 relative; 1e-5 leaves room for that through a
#: deep model.
LOSSLESS_RTOL = 1e-5

#: A compiled artifact against PyTorch: TVM fuses and reorders float32 reductions, ~1e-6 relative
#: per layer measured; 1e-4 leaves room for a few dozen layers and still catches any wrong op
#: (errors of 1e-2 and up).
ARTIFACT_RTOL = 1e-4

#: A ``--dtype float16`` artifact against the same model in float16 PyTorch: each stored
#: intermediate rounds to float16 (unit roundoff 4.9e-4), differently in TVM's fused kernels and
#: in PyTorch's; measured 8e-4 on the 4-layer zoo Llama, the same as float16 PyTorch against
#: float32. 1e-2 leaves room for a few dozen layers; a wrong op still errs by O(1).
HALF_ARTIFACT_RTOL = 1e-2


#: Staged programs (the same aten ops cut at loop boundaries) against the converted eager model:
#: measured 0.0; 1e-6 leaves room for kernel choices.
STAGED_RTOL = 1e-6


def as_array(x) -> np.ndarray:
    """A float64 numpy array of a torch tensor, TVM tensor or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return np.asarray(x.numpy(), dtype=np.float64)
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def flat_tensors(outputs) -> list:
    """All tensors in a (nested) output structure, in pytree order."""
    import torch
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor)]


@dataclass(frozen=True)
class Diff:
    """How far one output is from its reference."""

    index: int
    shape: tuple
    max_abs_err: float
    rel_err: float
    cosine: float

    def to_dict(self) -> dict:
        return asdict(self)

    def ok(self, rtol: float) -> bool:
        return self.rel_err <= rtol


class ShapeMismatch(ValueError):
    """Candidate and reference outputs do not have the same count or shapes."""


def diff(reference, candidate, index: int = 0) -> Diff:
    a, b = as_array(reference), as_array(candidate)
    if a.shape != b.shape:
        raise ShapeMismatch(f"output {index} shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not a.size:
        return Diff(index, tuple(a.shape), 0.0, 0.0, 1.0)
    err = float(np.abs(a - b).max())
    scale = float(np.abs(a).max())
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = float((a.ravel() @ b.ravel()) / max(na * nb, 1e-300)) if na and nb else float(na == nb)
    return Diff(index, tuple(a.shape), err, err / max(scale, 1e-12), cos)


def compare(reference, candidate) -> list[Diff]:
    """Compare two output structures (or lists of arrays) output by output."""
    ref = reference if isinstance(reference, list) else flat_tensors(reference)
    cand = candidate if isinstance(candidate, list) else flat_tensors(candidate)
    if len(ref) != len(cand):
        raise ShapeMismatch(f"output count differs: {len(ref)} reference vs {len(cand)} candidate")
    return [diff(a, b, i) for i, (a, b) in enumerate(zip(ref, cand))]


def kl(reference_logits, logits) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) over positions, in nats."""
    lp = _log_softmax(as_array(reference_logits))
    lq = _log_softmax(as_array(logits))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def report(reference, candidate, output_names: list[str] | None = None) -> dict:
    """Per output: max abs error, relative error, cosine, and KL for logits; and the worst of each.

    Raises:
        ShapeMismatch: when the outputs differ in count or shape.
    """
    diffs = compare(reference, candidate)
    ref = reference if isinstance(reference, list) else flat_tensors(reference)
    cand = candidate if isinstance(candidate, list) else flat_tensors(candidate)
    names = list(output_names or [])
    names += [f"output{i}" for i in range(len(names), len(diffs))]
    rows = []
    for name, d, a, b in zip(names, diffs, ref, cand):
        row = {"name": name, "shape": list(d.shape), "max_abs_err": d.max_abs_err, "rel_err": d.rel_err,
               "cosine": d.cosine}
        if name == "logits" and len(d.shape) >= 2:
            from loopify.fidelity.metrics import agreement

            row["kl"] = kl(a, b)
            row.update(agreement(_tensor(a), _tensor(b)))
        rows.append(row)
    kls = [r["kl"] for r in rows if "kl" in r]
    out = {"max_abs_err": max(r["max_abs_err"] for r in rows), "rel_err": max(r["rel_err"] for r in rows),
           "cosine": min(r["cosine"] for r in rows), "kl": max(kls) if kls else None, "outputs": rows}
    if kls:  # the worst next-token agreement over the logits outputs
        out["top1_agreement"] = min(r["top1_agreement"] for r in rows if "kl" in r)
        out["top5_overlap"] = min(r["top5_overlap"] for r in rows if "kl" in r)
    return out


def _tensor(x):
    import torch

    return x if isinstance(x, torch.Tensor) else torch.from_numpy(as_array(x))


def check_rows(reference, candidate, rtol: float, **labels) -> list[dict]:
    """One row per output: ``{**labels, "output", "max_abs_err", "rel_err", "ok"}`` (for listing
    each output ok / not ok after a compile or a staging)."""
    return [{**labels, "output": d.index, "max_abs_err": d.max_abs_err, "rel_err": d.rel_err, "ok": d.ok(rtol)}
            for d in compare(reference, candidate)]
