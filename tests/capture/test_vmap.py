"""Programs whose forward builds a value with torch.vmap (issue 15, class 3: transformers builds
Gemma3's masks by vmapping a mask function). torch.export records the vmap as functorch nodes
around a flat_apply: the program runs, but find-spans' value recording failed ("tensor may have
escaped from inside a function being vmapped") and torch.export.save cannot serialise it.
capture.loader.lower_vmap traces it again at the ATen level. Tolerance: the same ops, reordered
by nothing: 1e-6 relative."""

from __future__ import annotations

import torch
from torch import nn

from loopify.capture.loader import export_module, lower_vmap
from loopify.passes.find_spans import find_spans


class Layer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.v = nn.Linear(dim, dim)

    def forward(self, x, mask):  # x: [B, T, D], mask: [T, T]
        return x + torch.softmax((x @ x.transpose(-1, -2)).masked_fill(~mask, -1e9), -1) @ self.v(x)


class VmapMasked(nn.Module):
    """Three identical layers under a causal mask made by vmapping a per-query function."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim) for _ in range(3))

    def forward(self, x):  # x: [B, T, D]
        t = torch.arange(x.shape[1])
        mask = torch.vmap(lambda q: t <= q)(t)  # [T, T] causal, built per query by vmap
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _functorch_nodes(ep) -> int:
    return sum(n.op == "call_function" and (getattr(n.target, "__module__", "") or "").startswith("torch._functorch")
               for n in ep.graph.nodes)


def test_vmap_is_traced_away_and_the_program_saves(tmp_path):
    torch.manual_seed(0)
    m = VmapMasked().eval()
    x = torch.randn(1, 6, 16)
    raw = torch.export.export(m, (x,), strict=False)
    assert _functorch_nodes(raw) > 0  # what export records (the case this guards)
    ep = export_module(m, (x,), {}, source=tmp_path / "m")
    assert _functorch_nodes(ep) == 0
    with torch.no_grad():
        ref = m(x)
        got = ep.module()(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6
    torch.export.save(ep, tmp_path / "m.pt2")  # flat_apply made this fail
    assert lower_vmap(ep) is ep  # nothing left to lower: unchanged


def test_find_spans_records_values_of_a_vmap_program(tmp_path):
    from loopify import capture

    torch.manual_seed(0)
    m = VmapMasked().eval()
    x = torch.randn(1, 6, 16)
    torch.export.save(export_module(m, (x,), {}, source=tmp_path / "m"), tmp_path / "m.pt2")
    a = find_spans(capture.load(tmp_path / "m.pt2"))  # similarity on: a recorded run
    (sp,) = a.spans
    assert sp.length == 3 and len(sp.similarity["block_influence"]) == 3
