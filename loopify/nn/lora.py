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
