"""Evaluation per depth on held-out data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loopify.fidelity.metrics import NextToken
from loopify.train.losses import Objective, pooled_loss
from loopify.train.student import _first, set_depth


@torch.no_grad()
def evaluate(student: nn.Module, examples: list[dict], targets: list[torch.Tensor], objective: Objective,
             depths: list[int]) -> dict:
    """Per depth: mean loss, and mean cosine (encoders), mean KL and top-1 agreement with the
    teacher (logits), or mean cross-entropy, perplexity and next-token accuracy (``ce``)."""
    out: dict[str, Any] = {"examples": len(examples), "depths": {}}
    try:
        for k in depths:
            set_depth(student, k)
            losses, metric, agree, n_tok = [], [], 0.0, 0
            stats = NextToken()
            for ex, tgt in zip(examples, targets):
                o = _first(student(**ex))
                mask = ex.get("attention_mask")
                u = objective.units(tgt, o, mask)
                losses.append(u)
                if objective.kind == "kl":
                    sel = mask.to(torch.bool) if mask is not None else torch.ones(o.shape[:-1], dtype=torch.bool)
                    agree += float((tgt.argmax(-1)[sel] == o.argmax(-1)[sel]).float().sum())
                    n_tok += int(sel.sum())
                    _next_token(stats, ex, o, tgt, sel)
                elif objective.kind == "ce":
                    sel = (mask[:, 1:] if mask is not None else torch.ones_like(tgt[:, 1:])).to(torch.bool)
                    agree += float((o[:, :-1].argmax(-1)[sel] == tgt[:, 1:][sel]).float().sum())
                    n_tok += int(sel.sum())
                else:
                    metric.append(1 - pooled_loss(tgt, o, mask, "cosine"))
            allu = torch.cat([l.reshape(-1) for l in losses]) if losses else torch.zeros(0)
            row = {"loss": float(allu.mean()) if allu.numel() else float("nan")}
            if objective.kind == "kl":
                row["kl"] = row["loss"]
                row["top1"] = agree / max(n_tok, 1)
                nt = stats.result()  # the user's metrics on the same tokens (loopify.fidelity)
                if nt["tokens"]:
                    row.update(perplexity=nt["perplexity"], top5_overlap=nt["top5_overlap"])
            elif objective.kind == "ce":
                row["ce"] = row["loss"]
                row["perplexity"] = float(torch.tensor(row["loss"]).exp())
                row["top1"] = agree / max(n_tok, 1)
            else:
                cos = torch.cat(metric)
                row["cosine"] = float(cos.mean())
                row["cosine_min"] = float(cos.min())
            out["depths"][str(k)] = row
    finally:
        set_depth(student, None)
    vals = [out["depths"][str(k)][objective.metric] for k in depths]
    if objective.higher_is_better:
        out["monotonic"] = all(b >= a for a, b in zip(vals, vals[1:]))
    else:
        out["monotonic"] = all(b <= a for a, b in zip(vals, vals[1:]))
    return out


def _next_token(stats: NextToken, ex: dict, logits: torch.Tensor, teacher: torch.Tensor, sel: torch.Tensor) -> None:
    """Perplexity of the example's own text and top-5 overlap with the teacher, row by row over
    its unmasked positions (causal LMs: the tokens are contiguous from the start)."""
    ids = ex.get("input_ids")
    if ids is None or logits.dim() != 3:
        return
    for b in range(logits.shape[0]):
        keep = sel[b].reshape(-1)
        if int(keep.sum()) >= 2:
            stats.add(logits[b][keep], ids[b][keep], teacher[b][keep])
