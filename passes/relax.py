"""relax: per-depth LoRA on the tied blocks, initialised from the truncated SVD of the residual.

Relaxed Recursive Transformers (arXiv 2410.20672); the factorisation and how a depth applies it
are in :mod:`loopify.nn.lora`. At full rank the original model is reproduced exactly (up to float32
rounding); at rank r the reconstruction error of each matrix equals the energy of its dropped
singular values, which the report gives per matrix. A rank above a matrix's full rank is
clamped to it and the report says so (``clamped``); a plan whose every matrix ends at full rank
is as lossless as ``rank=full`` (``lossless`` in the report).

Vectors (biases, norm scales) cannot take a low-rank correction, so by default (``vectors=true``)
each depth keeps its own: they cost a fraction of a percent of the parameters and, measured on the
real MiniLM, averaging them loses most of what the LoRA wins back (see the README's fidelity
table). At ``rank=full`` they are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from loopify.hierarchy import clone
from loopify.nn import lora
from loopify.nn.recursion import Recursion, key, recursions, unkey
from loopify.pipeline import Pass, PassResult, State, require


@dataclass(frozen=True)
class Relax(Pass):
    """Add per-depth LoRA to every loop's matrices, initialised from the SVD of the residual.

    Precondition: a loop (fold-loops).

    Attributes:
        rank: LoRA rank r, or ``full`` (reproduces the original model). 0 adds nothing.
        alpha: LoRA alpha; the scale is alpha / r (0: scale 1). Compensated in the init.
        vectors: keep every depth's own biases and norm scales (always on at rank=full).
        ranks: per-matrix ranks that override ``rank``, as ``name@r`` entries (``:``-separated);
            ``name`` is a matrix's parameter name in the block or a dotted part of it
            (``self_attn.q_proj@16:mlp@8``); the first entry that matches wins; r = 0 leaves the
            matrix without LoRA. ``loopify plan`` chooses them from the SVD energy.
    """

    name: ClassVar[str] = "relax"
    requires: ClassVar[tuple[str, ...]] = ("loops",)
    rank: int | Literal["full"] = 8
    alpha: float = 0.0
    vectors: bool = True
    ranks: tuple[str, ...] = ()
    #: how the factors of one matrix at one depth are made (``loopify plan`` swaps in a cached one)
    factors: ClassVar = staticmethod(lora.svd_factors)

    def __post_init__(self):
        if self.rank != "full" and self.rank < 0:
            raise ValueError("rank must be >= 0 or 'full'")
        for entry in self.ranks:
            name, _, r = entry.rpartition("@")
            if not name or not r.isdigit():
                raise ValueError(f"ranks entry {entry!r}: give name@rank, e.g. self_attn.q_proj@16")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")

    def run(self, state: State) -> PassResult:
        if not require(self, state):
            return PassResult(state, False, {"note": "fold-loops made no loop: nothing to relax"})
        if self.rank == 0 and not self.vectors and not self.ranks:
            return PassResult(state, False, {"rank": 0, "note": "rank 0: nothing to relax"})
        done = self._already(state.module)
        if done:
            return PassResult(state, False, {"rank": self.rank, "note": f"already relaxed at rank {self.rank}"})
        module = clone(state.module)
        original = state.captured.program.state_dict
        report = []
        for path, rec in recursions(module).items():
            if rec.deepen:
                report.append({"loop": path, "skipped": "deepen mode keeps each layer's own weights"})
                continue
            report.append(self._relax(path, rec, original))
        relaxed = [r for r in report if "skipped" not in r]
        lossless = bool(relaxed) and all(r["full_rank"] for r in relaxed)
        return PassResult(state.replace(module=module), True, {"rank": self.rank, "lossless": lossless,
                                                               "loops": report})

    def _already(self, module) -> bool:
        """Whether every compressed loop already has this relaxation (a second run is a no-op);
        another rank is refused, since the factors are made from the original weights."""
        loops = [r for r in recursions(module).values() if not r.deepen]
        relaxed = [r for r in loops if r.lora_A or r.depth_params]
        if not relaxed:
            return False
        for r in relaxed:
            names = lora.matrix_params(r.blocks[0])
            blocks = dict(r.blocks[0].named_parameters())
            want = {n: self._rank(blocks[n].shape, n) for n in names if self._rank(blocks[n].shape, n)}
            have = {unkey(k): int(a.shape[1]) for k, a in r.lora_A.items()}
            if have != want:
                raise ValueError(f"{r.key} is already relaxed at another rank ({sorted(set(have.values()))}); "
                                 "convert again from the original")
        return len(relaxed) == len(loops)

    def _rank(self, shape, name: str = "") -> int:
        full = lora.full_rank(shape)
        return full if self._asked(name) == "full" else min(int(self._asked(name)), full)

    def _asked(self, name: str) -> int | str:
        """The rank asked for matrix ``name``: its ``ranks`` entry, else ``rank``."""
        dotted = f".{name}."
        for entry in self.ranks:
            part, _, r = entry.rpartition("@")
            if f".{part}." in dotted:
                return int(r)
        return self.rank

    def _relax(self, path: str, rec: Recursion, original: dict) -> dict:
        spec = rec.spec
        sharing = rec.sharing()
        names = lora.matrix_params(rec.blocks[0])
        errors, ranks, added, clamped = [], {}, 0, []
        for name in names:
            shared = [dict(b.named_parameters())[name].detach() for b in rec.blocks]
            out_f, in_f = shared[0].shape
            r = self._rank(shared[0].shape, name)
            if r == 0:
                continue
            ranks[name] = r
            if self._asked(name) != "full" and int(self._asked(name)) > r:
                clamped.append(name)
            scale = (self.alpha / r) if self.alpha else 1.0
            A, B = torch.zeros(spec.layers, r, in_f), torch.zeros(spec.layers, out_f, r)
            for depth in range(spec.layers):
                f = self.factors(original[f"{spec.depth_paths[depth]}.{name}"], shared[sharing[depth]], r, scale)
                A[depth], B[depth] = f.A, f.B
                errors.append({"depth": depth, "param": name, "recon_error": f.recon_error,
                               "dropped_energy": f.dropped_energy})
            rec.lora_A[key(name)] = nn.Parameter(A)
            rec.lora_B[key(name)] = nn.Parameter(B)
            added += A.numel() + B.numel()
            rec.lora_scales[name] = scale
        vec_added = 0
        if self.vectors or self.rank == "full":
            for name, p in rec.blocks[0].named_parameters():
                if name in names or key(name) in rec.depth_params:
                    continue
                stacked = torch.stack([original[f"{spec.depth_paths[d]}.{name}"].detach() for d in range(spec.layers)])
                rec.depth_params[key(name)] = nn.Parameter(stacked.clone())
                vec_added += stacked.numel()
        worst = max((abs(e["recon_error"] - e["dropped_energy"]) for e in errors), default=0.0)
        full = bool(names) and all(ranks.get(n) == lora.full_rank(dict(rec.blocks[0].named_parameters())[n].shape)
                                   for n in names) and (self.vectors or self.rank == "full")
        return {"loop": path, "matrices": len(names), "ranks": ranks, "params_added": int(added + vec_added),
                "effective_rank": max(ranks.values(), default=0), "clamped": clamped, "full_rank": full,
                "per_depth_vector_params": int(vec_added),
                "scales": dict(rec.lora_scales),
                "max_recon_error": max((e["recon_error"] for e in errors), default=0.0),
                "max_recon_vs_dropped_gap": worst, "per_matrix": errors}
