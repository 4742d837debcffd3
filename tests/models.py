"""Small plain-PyTorch models for tests: nothing Hugging Face about them, so the tests show that
capture and find-spans are generic."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm residual block: LayerNorm -> causal self-attention -> LayerNorm -> MLP."""

    def __init__(self, dim: int = 32, hidden: int = 64, window: int | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.window = window

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x: [B, T, D], mask: [T, T]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        m = mask
        if self.window is not None:  # a sliding window: a layer-specific mask op
            t = x.shape[1]
            idx = torch.arange(t)
            m = m & ((idx[:, None] - idx[None, :]) < self.window)
        att = att.masked_fill(~m, float("-inf")).softmax(-1)
        x = x + self.proj(att @ v)
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class TinyStack(nn.Module):
    """Embedding -> N blocks -> head. ``hiddens`` / ``windows`` make layers differ on purpose."""

    def __init__(self, n: int = 5, dim: int = 32, vocab: int = 50, hiddens=None, windows=None, tap: int | None = None):
        super().__init__()
        hiddens = hiddens or [2 * dim] * n
        windows = windows or [None] * n
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, h, w) for h, w in zip(hiddens, windows))
        self.head = nn.Linear(dim, vocab)
        self.tap = tap  # also return the hidden state after block `tap` (a mid-stack output)

    def forward(self, ids: torch.Tensor):  # ids: [B, T]
        t = ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        x = self.emb(ids)
        taps = []
        for i, b in enumerate(self.blocks):
            x = b(x, mask)
            if i == self.tap:
                taps.append(x)
        return (self.head(x), *taps)


def example_ids(seed: int = 0, t: int = 12, vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, t), generator=g)


def export(model: nn.Module, ids: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    ids = example_ids() if ids is None else ids
    return torch.export.export(model.eval(), (ids,), strict=False)


class Drifts(nn.Module):
    """Eager differs from the traced program, as HF code that branches on "am I being compiled"
    does (the PaliGemma mask case in DESIGN.md)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y if torch.compiler.is_exporting() else y * 2
