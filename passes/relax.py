"""relax: per-depth LoRA on the tied blocks, initialised from the truncated SVD of the residual.

Relaxed Recursive Transformers (arXiv 2410.20672): depth l of a loop sees
``W_l' = W_shared + s * B_l @ A_l`` for every matrix of the block, where
``R_l = W_l - W_shared = U S V^T`` and, at rank r,

    B_l = U_r S_r / s,    A_l = V_r^T,

with s the LoRA scale (``alpha / r``), compensated so that ``s * B_l @ A_l = U_r S_r V_r^T``
whatever s is. At full rank the original layer is reproduced exactly (up to float32 rounding);
at rank r the reconstruction error ``||R_l - U_r S_r V_r^T||_F`` equals the energy of the dropped
singular values ``sqrt(sum_{i>r} s_i^2)`` (Eckart-Young), which the report gives per matrix.

"Matrices" are the block's 2-D parameters that are not embedding tables: what linear layers,
projections and convolutions-as-matmul use. Vectors (biases, norm scales) cannot take a low-rank
correction, so by default (``vectors=true``) each depth keeps its own: they cost a fraction of a
percent of the parameters and, measured on the real MiniLM, averaging them loses most of what the
LoRA wins back (see the README's fidelity table). At ``rank=full`` they are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from loopify.hierarchy import clone, graph_nodes
from loopify.pipeline import Pass, PassResult, State
from loopify.recursion import Recursion, _key, recursions


def matrix_params(block: nn.Module) -> list[str]:
    """2-D parameters of ``block`` that no embedding lookup reads."""
    embedding_tables = {prefix + n.target for prefix, n in graph_nodes(block)
                        if n.op == "get_attr" and any("embedding" in str(u.target) for u in n.users)}
    return [name for name, p in block.named_parameters() if p.dim() == 2 and name not in embedding_tables]


@dataclass(frozen=True)
class Relax(Pass):
    """Add per-depth LoRA to every loop's matrices, initialised from the SVD of the residual.

    Attributes:
        rank: LoRA rank r, or ``full`` (reproduces the original model). 0 adds nothing.
        alpha: LoRA alpha; the scale is alpha / r (0: scale 1). Compensated in the init.
        vectors: keep every depth's own biases and norm scales (always on at rank=full).
    """

    name: ClassVar[str] = "relax"
    rank: int | Literal["full"] = 8
    alpha: float = 0.0
    vectors: bool = True

    def __post_init__(self):
        if self.rank != "full" and self.rank < 0:
            raise ValueError("rank must be >= 0 or 'full'")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")

    def run(self, state: State) -> PassResult:
        loops = recursions(state.module)
        if not loops:
            raise ValueError("no loop to relax: run fold-loops first")
        if self.rank == 0 and not self.vectors:
            return PassResult(state, False, {"rank": 0, "note": "rank 0: nothing to relax"})
        
        module = clone(state.module)
        original = state.captured.program.state_dict
        report = []
        for path, rec in recursions(module).items():
            if rec.deepen:
                report.append({"loop": path, "skipped": "deepen mode keeps each layer's own weights"})
                continue
            report.append(self._relax(path, rec, original))
        return PassResult(state.replace(module=module), True, {"rank": self.rank, "loops": report})

    def _relax(self, path: str, rec: Recursion, original: dict) -> dict:
        spec = rec.spec
        sharing = rec.sharing()
        names = matrix_params(rec.blocks[0])
        errors = []
        added = 0
        ranks = {}
        for name in (names if self.rank != 0 else []):
            shared = [dict(b.named_parameters())[name].detach() for b in rec.blocks]
            out_f, in_f = shared[0].shape
            r = min(out_f, in_f) if self.rank == "full" else min(int(self.rank), out_f, in_f)
            ranks[name] = r
            scale = (self.alpha / r) if self.alpha else 1.0
            A = torch.zeros(spec.layers, r, in_f)
            B = torch.zeros(spec.layers, out_f, r)
            for depth in range(spec.layers):
                w_orig = original[f"{spec.depth_paths[depth]}.{name}"].detach().double()
                w_shared = shared[sharing[depth]].double()
                resid = w_orig - w_shared
                U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
                B[depth] = (U[:, :r] * S[:r] / scale).float()
                A[depth] = Vh[:r].float()
                recon = resid - scale * (B[depth].double() @ A[depth].double())
                norm = w_orig.norm().clamp_min(1e-30)
                errors.append({"depth": depth, "param": name,
                               "recon_error": float(recon.norm() / norm),
                               "dropped_energy": float(S[r:].square().sum().sqrt() / norm)})
            rec.lora_A[_key(name)] = nn.Parameter(A)
            rec.lora_B[_key(name)] = nn.Parameter(B)
            added += A.numel() + B.numel()
            rec.lora_scales[name] = scale
        vec_added = 0
        if self.vectors or self.rank == "full":
            for name, p in rec.blocks[0].named_parameters():
                if name in names or _key(name) in rec.depth_params:
                    continue
                stacked = torch.stack([original[f"{spec.depth_paths[d]}.{name}"].detach() for d in range(spec.layers)])
                rec.depth_params[_key(name)] = nn.Parameter(stacked.clone())
                vec_added += stacked.numel()
        worst = max((abs(e["recon_error"] - e["dropped_energy"]) for e in errors), default=0.0)
        return {"loop": path, "matrices": len(names), "ranks": ranks, "params_added": int(added + vec_added),
                "per_depth_vector_params": int(vec_added),
                "scales": dict(rec.lora_scales),
                "max_recon_error": max((e["recon_error"] for e in errors), default=0.0),
                "max_recon_vs_dropped_gap": worst, "per_matrix": errors}
