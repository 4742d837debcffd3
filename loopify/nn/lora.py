"""Per-depth LoRA "relaxation" of tied blocks (Relaxed Recursive Transformers, arXiv 2410.20672).

Depth l of a loop sees ``W_l' = W_shared + s * B_l @ A_l`` for every matrix of its block. The
factors are initialised from the truncated SVD of the residual ``R_l = W_l - W_shared = U S V^T``:
at rank r, ``B_l = U_r S_r / s`` and ``A_l = V_r^T``, with s the LoRA scale (``alpha / r``)
compensated so that ``s * B_l @ A_l = U_r S_r V_r^T`` whatever s is. At full rank the original
layer is reproduced exactly (up to float32 rounding); at rank r the reconstruction error
``||R_l - U_r S_r V_r^T||_F`` equals the energy of the dropped singular values (Eckart-Young).

"Matrices" are a block's 2-D parameters that no embedding lookup reads: what linear layers,
projections and convolutions-as-matmul use. This module holds both halves, the initialisation
(:func:`svd_factors`, used by the ``relax`` pass) and the application (:func:`merged`, used by
the loop at every depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def matrix_params(block: nn.Module) -> list[str]:
    """2-D parameters of ``block`` that no embedding lookup reads.

    Works for both forms of a block: an eager module (``nn.Embedding`` submodules hold tables)
    and an unflattened graph module (a ``get_attr`` whose user is an embedding op).
    """
    from loopify.hierarchy import graph_nodes

    tables = {f"{path}.weight" if path else "weight" for path, m in block.named_modules()
              if isinstance(m, nn.Embedding)}
    tables |= {prefix + n.target for prefix, n in graph_nodes(block)
               if n.op == "get_attr" and any("embedding" in str(u.target) for u in n.users)}
    return [name for name, p in block.named_parameters() if p.dim() == 2 and name not in tables]


@dataclass(frozen=True)
class Factors:
    """The LoRA factors of one matrix at one depth and how well they reconstruct the residual."""

    A: torch.Tensor          # [r, in]
    B: torch.Tensor          # [out, r]
    recon_error: float       # ||R - s B A||_F / ||W_orig||_F
    dropped_energy: float    # sqrt(sum of dropped s_i^2) / ||W_orig||_F


def full_rank(shape) -> int:
    return min(int(shape[0]), int(shape[1]))


def svd_factors(original: torch.Tensor, shared: torch.Tensor, rank: int, scale: float) -> Factors:
    """Rank-``rank`` factors of ``original - shared`` (float64 SVD), compensated for ``scale``."""
    w_orig = original.detach().double()
    resid = w_orig - shared.detach().double()
    U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
    B = (U[:, :rank] * S[:rank] / scale).float()
    A = Vh[:rank].float()
    recon = resid - scale * (B.double() @ A.double())
    norm = w_orig.norm().clamp_min(1e-30)
    return Factors(A, B, float(recon.norm() / norm), float(S[rank:].square().sum().sqrt() / norm))


def merged(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight one depth sees: ``W + s * B @ A`` (A [r, in], B [out, r])."""
    return weight + scale * (B @ A)


# -- how a relaxed matrix is applied at inference -------------------------------------------------

#: ``merged``: each depth's ``W + s * B @ A`` computed once (at load / compile) and read as a plain
#: weight; ``factored``: ``x @ W.T + s * (x @ A.T) @ B.T`` (the shared W once, the factors per
#: depth); ``auto``: per matrix by :func:`choose_form`.
FORMS = ("auto", "merged", "factored")

#: ``auto`` keeps a matrix factored while the factors add at most this fraction to its matmul's
#: work (``r * (in + out) / (in * out)``). A merged matrix costs nothing at run time but holds a
#: full matrix per depth; below 5% the time it would save is within run-to-run noise here, while
#: the memory it costs is the full per-depth weights the loop exists to avoid (e.g. rank 32 on a
#: 4096 x 4096 projection: 1.6% extra work, 16x the factors' bytes).
FACTORED_MAX_OVERHEAD = 0.05


def factored_overhead(shape, rank: int) -> float:
    """Extra multiply-adds of the factored form relative to the plain matmul (per token)."""
    out_f, in_f = int(shape[0]), int(shape[1])
    return rank * (in_f + out_f) / (in_f * out_f)


#: ``auto``'s rule per use: ``forward`` (forward artifacts, bench) factors a matrix while the
#: factors add at most :data:`FACTORED_MAX_OVERHEAD` of its work; ``decode`` (generation
#: artifacts) merges only when the factors are at least half the matrix's size, so the artifact
#: grows by at most twice the factors. A decode step reads every weight once per token, so a
#: merged matrix per depth costs its full bytes where the factors cost ``r * (in + out)``; the
#: factored form costs that same fraction in time (``factored_overhead``).
RULES = ("forward", "decode")


def choose_form(shape, rank: int, policy: str = "auto", rule: str = "forward") -> str:
    """``"merged"`` or ``"factored"`` for one matrix of ``shape`` ([out, in]) at LoRA ``rank``."""
    if policy not in FORMS:
        raise ValueError(f"LoRA form must be one of {', '.join(FORMS)}, got {policy!r}")
    if policy != "auto":
        return policy
    if rule == "decode":
        out_f, in_f = int(shape[0]), int(shape[1])
        return "merged" if rank * (in_f + out_f) * 2 >= in_f * out_f else "factored"
    return "factored" if factored_overhead(shape, rank) <= FACTORED_MAX_OVERHEAD else "merged"


_LINEAR_FUNCS = None


def _linear_funcs() -> tuple:
    global _LINEAR_FUNCS
    if _LINEAR_FUNCS is None:
        _LINEAR_FUNCS = (torch.nn.functional.linear, torch._C._nn.linear, torch.ops.aten.linear.default)
    return _LINEAR_FUNCS


class FactoredMode(torch.overrides.TorchFunctionMode):
    """Applies factored LoRA while a block runs: ``linear(x, W, b)`` for a factored matrix W
    becomes ``linear(x, W, b) + s * linear(linear(x, A), B)``. The blocks are eager modules
    (``F.linear``) or unflattened graph modules (``aten.linear``); both reach this mode, also
    under torch.export, whose graph then holds the factored ops. Any other op given W (a
    transpose, a matmul spelled by hand) gets the merged weight instead, so the result is right
    whatever the block does with it.

    ``factors``: ``{id(W): (A [r, in], B [out, r], s)}`` with W the tensor the block reads."""

    def __init__(self, factors: dict):
        super().__init__()
        self.factors = factors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":  # attribute reads (.shape, .dtype)
            return func(*args, **kwargs)
        if func in _linear_funcs() and len(args) >= 2 and id(args[1]) in self.factors:
            A, B, s = self.factors[id(args[1])]
            y = func(*args, **kwargs)
            return y + s * torch.nn.functional.linear(torch.nn.functional.linear(args[0], A), B)
        if self.factors and any(id(a) in self.factors for a in _tensor_args(args, kwargs)):
            import torch.utils._pytree as pytree

            def swap(a):
                if isinstance(a, torch.Tensor) and id(a) in self.factors:
                    A, B, s = self.factors[id(a)]
                    return merged(a, A, B, s)
                return a

            args, kwargs = pytree.tree_map(swap, (args, kwargs))
        return func(*args, **kwargs)


def _tensor_args(args, kwargs):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            yield a
