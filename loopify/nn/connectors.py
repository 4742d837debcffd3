"""Connectors between recursion steps.

RecursiveVLM's Recursive Connector (arXiv 2602.09080): before step i > 0, the hidden states that
the previous step produced at evenly spaced depths ("taps") are each RMS-normalised, projected
with modality-specific projections (image-token positions and text-token positions have their
own), summed, and added to the hidden state with a learnable scale that starts at zero, so the
model is unchanged when the connector is inserted.

Also: ``identity`` (no transformation; the ablation baseline) and ``embedding`` (a learnable
per-step vector added to the hidden state, zero at insertion).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

_MODALITY = contextvars.ContextVar("loopify_modality", default=None)


@contextlib.contextmanager
def modality(mask: torch.Tensor | None):
    """Make ``mask`` ([B, S] bool, True at image positions) the modality mask that loops of the
    module form read while the block runs (the graph form threads it as an argument instead)."""
    token = _MODALITY.set(mask)
    try:
        yield
    finally:
        _MODALITY.reset(token)


def current_modality() -> torch.Tensor | None:
    return _MODALITY.get()


def tap_positions(step_len: int, taps: int) -> list[int]:
    """Evenly spaced indices into a step of ``step_len`` depths, always including the last."""
    taps = max(1, min(taps, step_len))
    if taps == 1:
        return [step_len - 1]
    return sorted({round(i * (step_len - 1) / (taps - 1)) for i in range(taps)})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class RecursiveConnector(nn.Module):
    """h + scale * sum_t P_{m(pos), t}(RMSNorm_t(tap_t)).

    Args:
        dim: hidden size.
        step_len: depths per recursion step (taps are chosen among them).
        taps: number of taps.
        modalities: 1 (one projection per tap) or 2 (text, image: chosen per position by the
            modality mask passed as the extra argument).
    """

    kind = "recursive"

    def __init__(self, dim: int, step_len: int, taps: int = 2, modalities: int = 1):
        super().__init__()
        self.args = {"dim": dim, "step_len": step_len, "taps": taps, "modalities": modalities}
        self.positions = tap_positions(step_len, taps)
        self.modalities = modalities
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in self.positions)
        # proj[m][t]: identity at insertion, so once the scale moves the taps pass through as is.
        self.proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in self.positions) for _ in range(modalities))
        with torch.no_grad():
            for per_mod in self.proj:
                for lin in per_mod:
                    lin.weight.copy_(torch.eye(dim) / len(self.positions))
        self.scale = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor, taps: list[torch.Tensor], step: int, *extras) -> torch.Tensor:
        mixed = []
        for m in range(self.modalities):
            acc = None
            for t, pos in enumerate(self.positions):
                y = self.proj[m][t](self.norms[t](taps[pos]))
                acc = y if acc is None else acc + y
            mixed.append(acc)
        if self.modalities == 1:
            out = mixed[0]
        else:
            (image_mask,) = extras  # [B, S] bool: True at image-token positions
            if image_mask is None or image_mask.shape != h.shape[:-1]:  # no aligned mask: all text
                out = mixed[0]
            else:
                out = torch.where(image_mask.unsqueeze(-1), mixed[1], mixed[0])
        return h + self.scale * out

    def staged(self, h, taps, step, extras):
        """The step-tensor form used by compiled loop bodies: the taps start at zero, which makes
        the connector exactly ``h`` at step 0."""
        return self(h, taps, 0, *extras)

    def config(self) -> dict:
        return {"kind": self.kind, **self.args}


class IdentityConnector(nn.Module):
    kind = "identity"
    positions: list[int] = []

    def forward(self, h, taps, step, *extras):
        return h

    def staged(self, h, taps, step, extras):
        return h

    def config(self) -> dict:
        return {"kind": self.kind}


class EmbeddingConnector(nn.Module):
    """h + e[step]: a learnable vector per recursion step, zero at insertion."""

    kind = "embedding"

    positions: list[int] = []

    def __init__(self, dim: int, max_steps: int):
        super().__init__()
        self.args = {"dim": dim, "max_steps": max_steps}
        self.embedding = nn.Parameter(torch.zeros(max_steps, dim))

    def forward(self, h, taps, step, *extras):
        return h + self.embedding[min(step, self.embedding.shape[0] - 1)]

    def staged(self, h, taps, step, extras):
        """Step-tensor form: the vector of ``step`` (clamped to the last), none at step 0."""
        idx = step.clamp(max=self.embedding.shape[0] - 1).reshape(1)
        e = self.embedding.index_select(0, idx).squeeze(0)
        return h + e * (step > 0).to(h.dtype)

    def config(self) -> dict:
        return {"kind": self.kind, **self.args}


KINDS = {"recursive": RecursiveConnector, "identity": IdentityConnector, "embedding": EmbeddingConnector}


def from_config(cfg: dict) -> nn.Module:
    """A connector from its :meth:`config` (weights are loaded afterwards)."""
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown connector kind {kind!r}; kinds: {', '.join(KINDS)}")
    return KINDS[kind](**cfg)
