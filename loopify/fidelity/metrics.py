"""The numbers a user reads, as plain tensor functions (no model loading here).

* causal LMs and VLMs: perplexity of the text, and how often the converted model's next-token
  prediction agrees with the original's on the same text (top-1 agreement, top-5 overlap, and
  the KL divergence of the original's next-token distribution to the converted one's);
* encoders: cosine of sentence embeddings, and the Spearman rank correlation between the
  original's and the converted model's pairwise sentence similarities (what retrieval and STS
  users rank by).
"""

from __future__ import annotations

import math

import torch


class NextToken:
    """Next-token statistics accumulated over windows of text.

    Position t of a window predicts token t+1, so a window of T tokens scores T-1 predictions
    (the first token is context only). Perplexity is exp of the mean negative log-likelihood over
    every scored token of every window, as transformers' ``labels=`` loss computes it per window.
    """

    def __init__(self):
        self.n = 0
        self.nll = self.correct = self.top1 = self.top5 = self.kl = 0.0
        self.compared = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """``logits`` [T, V] of one window, ``ids`` [T] its tokens, ``reference`` [T, V] the
        original's logits on the same tokens (or None)."""
        pred, target = logits[:-1].double(), ids[1:]
        logp = torch.log_softmax(pred, -1)
        self.nll += float(-logp.gather(-1, target[:, None]).sum())
        self.correct += float((pred.argmax(-1) == target).sum())
        self.n += int(target.numel())
        if reference is None:
            return
        ref = torch.log_softmax(reference[:-1].double(), -1)
        self.top1 += float((ref.argmax(-1) == pred.argmax(-1)).sum())
        self.top5 += float(top_k_overlap(ref, pred, 5).sum())
        self.kl += float((ref.exp() * (ref - logp)).sum())
        self.compared += int(target.numel())

    def result(self) -> dict:
        out = {"tokens": self.n, "perplexity": math.exp(self.nll / self.n) if self.n else float("nan"),
               "nll": self.nll / self.n if self.n else float("nan"),
               "accuracy": self.correct / self.n if self.n else float("nan")}
        if self.compared:
            out.update(top1_agreement=self.top1 / self.compared, top5_overlap=self.top5 / self.compared,
                       kl=self.kl / self.compared)
        return out


def top_k_overlap(reference: torch.Tensor, candidate: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[N, V], [N, V] -> [N]: the share of the reference's k most likely tokens that are also
    among the candidate's k most likely (1.0: the same set, order aside)."""
    k = min(k, reference.shape[-1])
    r, c = reference.topk(k, -1).indices, candidate.topk(k, -1).indices
    return (r[:, :, None] == c[:, None, :]).any(-1).sum(-1).double() / k


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Top-1 agreement and top-5 overlap of two logits tensors [..., V] over every position
    (for comparing two models on the same inputs, e.g. ``convert``'s verify on its example)."""
    r = reference.detach().reshape(-1, reference.shape[-1]).double()
    c = candidate.detach().reshape(-1, candidate.shape[-1]).double()
    return {"top1_agreement": float((r.argmax(-1) == c.argmax(-1)).double().mean()),
            "top5_overlap": float(top_k_overlap(r, c, 5).mean())}


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, D], [B, S] -> [B, D], L2-normalised (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def sentence_cosines(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per-sentence cosine between two sets of normalised embeddings [N, D] -> [N]."""
    return (reference * candidate).sum(-1)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (as Spearman's rho needs)."""
    order = x.argsort()
    r = torch.empty(x.numel(), dtype=torch.float64)
    r[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    if uniq.numel() < x.numel():  # average the ranks within each group of equal values
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        r = (sums / counts)[inv]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson's r of their ranks)."""
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def pairwise_similarities(emb: torch.Tensor) -> torch.Tensor:
    """[N, D] normalised embeddings -> the N(N-1)/2 cosine similarities of distinct pairs."""
    sims = emb.double() @ emb.double().T
    i, j = torch.triu_indices(emb.shape[0], emb.shape[0], offset=1)
    return sims[i, j]


def sentence_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Cosine of each sentence's embedding to the original's (mean, min) and the Spearman
    correlation of the two models' pairwise sentence similarities."""
    cos = sentence_cosines(reference.double(), candidate.double())
    return {"sentences": int(cos.numel()), "cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            "spearman": spearman(pairwise_similarities(reference), pairwise_similarities(candidate))}
