"""Distillation losses per unit and the Monotonic Recursion Loss (RecursiveVLM, arXiv 2602.09080).

Pure functions on tensors, and the objective that picks one for a model's first output."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loopify.train.config import TrainError


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(teacher || student) at temperature 1, in nats: ``[..., S, V] -> [n]`` over the
    positions where ``mask`` (``[..., S]``) is nonzero (all positions without a mask)."""
    lt = torch.log_softmax(teacher_logits.float(), -1)
    ls = torch.log_softmax(student_logits.float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    if mask is None:
        return kl.reshape(-1)
    return kl[mask.to(torch.bool).expand_as(kl)]


def token_ce(input_ids: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token next-token cross-entropy, in nats: position t predicts ``input_ids[t+1]``;
    ``[B, S, V] -> [n]`` over the predicted positions the mask keeps (a teacher-free objective)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = input_ids[:, 1:]
    ce = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if mask is None:
        return ce.reshape(-1)
    return ce[mask[:, 1:].to(torch.bool)]


def pooled_loss(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, mask: torch.Tensor,
                kind: str = "cosine") -> torch.Tensor:
    """Per-example loss between mean-pooled, L2-normalised embeddings: ``[B, S, D] -> [B]``.

    ``cosine``: 1 - cos; ``mse``: squared distance of the normalised embeddings (= 2 - 2 cos).
    """
    from loopify.fidelity import mean_pooled

    t = mean_pooled(teacher_hidden.float(), mask)
    s = mean_pooled(student_hidden.float(), mask)
    if kind == "cosine":
        return 1 - (t * s).sum(-1)
    if kind == "mse":
        return (t - s).square().sum(-1)
    raise ValueError(f"unknown pooled loss {kind!r}")


def token_cosine(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token ``1 - cos`` between the teacher's and the student's hidden states: ``[B, S, D] ->
    [n]`` over the positions the mask keeps. Every token's state is supervised, not only their
    mean, so an encoder learns from S vectors per text instead of one."""
    d = 1 - torch.nn.functional.cosine_similarity(teacher_hidden.float(), student_hidden.float(), dim=-1)
    return d.reshape(-1) if mask is None else d[mask.to(torch.bool).expand_as(d)]


def mrl_weights(depth_losses: Sequence[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """The MRL weight of every unit at every depth: 1 at the first depth; at depth k, ``beta``
    where the unit's loss is higher than at depth k-1 (compared detached), else 1."""
    out = [torch.ones_like(depth_losses[0])]
    for prev, cur in zip(depth_losses[:-1], depth_losses[1:]):
        worse = cur.detach() > prev.detach()
        out.append(torch.where(worse, torch.full_like(cur, float(beta)), torch.ones_like(cur)))
    return out


def mrl_loss(depth_losses: Sequence[torch.Tensor], beta: float) -> tuple[torch.Tensor, dict]:
    """Monotonic Recursion Loss: ``sum_k mean_u(w_{k,u} * l_{k,u})`` (see :func:`mrl_weights`).

    ``depth_losses[k]`` holds the per-unit losses (tokens or examples) at depth k+1, same shape at
    every depth. Returns the loss and ``{"depths": [mean unweighted loss per depth],
    "worse": [fraction of units weighted by beta, per depth]}``.
    """
    if not depth_losses:
        raise ValueError("no depth losses")
    weights = mrl_weights(depth_losses, beta)
    total = sum((w * l).mean() for w, l in zip(weights, depth_losses))
    info = {"depths": [float(l.detach().mean()) for l in depth_losses],
            "worse": [float((w > 1).float().mean()) if w.numel() else 0.0 for w in weights]}
    return total, info


def last_loss(depth_losses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Only the last (full) depth is supervised."""
    return depth_losses[-1].mean(), {"depths": [float(l.detach().mean()) for l in depth_losses]}


# ----------------------------------------------------------------------------------------------
# Depths




class Objective:
    """Per-unit losses and evaluation metrics for one output kind.

    ``kl``, ``cosine``, ``mse``, ``token-cosine`` distil the teacher's output (the target is the
    teacher's first output; ``cosine`` and ``mse`` compare mean-pooled embeddings, ``token-cosine``
    every token's hidden state); ``ce`` needs no teacher: the target is the example's own token ids."""

    def __init__(self, kind: str):
        self.kind = kind  # kl | cosine | mse | ce

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "ce"

    def units(self, teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "kl":
            return token_kl(teacher, student, mask)
        if self.kind == "ce":
            return token_ce(teacher, student, mask)
        if self.kind == "token-cosine":
            return token_cosine(teacher, student, mask)
        if mask is None:
            mask = torch.ones(teacher.shape[:-1], dtype=torch.long)
        return pooled_loss(teacher, student, mask, self.kind)

    @property
    def metric(self) -> str:
        return self.kind if self.kind in ("kl", "ce") else "cosine"

    @property
    def higher_is_better(self) -> bool:
        return self.kind not in ("kl", "ce")


def resolve_objective(objective: str, captured) -> Objective:
    names = captured.info.get("output_names") or []
    first = names[0] if names else None
    if objective == "token-cosine" and first == "logits":
        raise TrainError(f"{captured.source}: --objective token-cosine compares hidden states; this model returns "
                         "logits (use kl)")
    if objective == "ce" and first != "logits":
        raise TrainError(f"{captured.source}: --objective ce needs a model whose first output is logits "
                         f"(this one returns {first or 'an unnamed output'})")
    if objective != "auto":
        return Objective(objective)
    if first == "logits":
        return Objective("kl")
    if first in ("last_hidden_state", "hidden_states", "embeddings"):
        return Objective("cosine")
    raise TrainError(f"{captured.source}: cannot tell whether its first output ({first or 'unnamed'}) is logits or "
                     "hidden states; pass --objective kl, cosine or mse")


# ----------------------------------------------------------------------------------------------
