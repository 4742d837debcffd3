"""find-spans on plain PyTorch models: runs, refusals with reasons, similarity, contracts."""

from __future__ import annotations

import math

import pytest
import torch

from loopify import capture
from loopify.graphs import ProgramIndex, find_stacks, isomorphisms, layer_graph
from loopify.passes.find_spans import FindSpans, find_spans
from loopify.pipeline import State
from tests.models import TinyStack, export


def _cap(model, tmp_path, name="m.pt2"):
    path = tmp_path / name
    with open(path, "wb") as f:
        torch.export.save(export(model.eval()), f)
    return capture.load(path)


def test_uniform_stack_is_one_span(tiny_capture):
    a = find_spans(tiny_capture)
    assert [(s.stack, s.start, s.length) for s in a.spans] == [("blocks", 0, 5)]
    assert a.refused == []
    sp = a.spans[0]
    # 32*96+96 + 32*32+32 + 32*64+64 + 64*32+32 + 2 LayerNorms (2*32 each)
    assert sp.params_per_layer == (32 * 96 + 96) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 4 * 32
    assert sp.side_inputs, "the causal mask is a side input shared by every layer"


def test_similarity_is_measured_and_consistent(tiny_capture):
    sp = find_spans(tiny_capture).spans[0]
    sim = sp.similarity
    assert len(sim["weight_residual"]) == len(sim["block_influence"]) == len(sim["angular_distance"]) == 5
    # Independent random layers are far from their mean; never more than 100% away.
    assert all(0.3 < r < 1.0 for r in sim["weight_residual"])
    for ang, bi in zip(sim["angular_distance"], sim["block_influence"]):
        assert 0 < ang < 0.5 and 0 < bi < 1
        # arccos(mean cos) >= mean arccos(cos) is not guaranteed, but both describe the same small angle.
        assert abs(math.cos(ang * math.pi) - (1 - bi)) < 0.1


def test_identical_layers_have_zero_residual(tmp_path):
    torch.manual_seed(0)
    m = TinyStack(n=4)
    for b in m.blocks[1:]:
        b.load_state_dict(m.blocks[0].state_dict())
    sp = find_spans(_cap(m, tmp_path)).spans[0]
    assert max(sp.similarity["weight_residual"]) < 1e-12
    assert min(sp.similarity["weight_cosine_to_mean"]) > 1 - 1e-12


def test_layer_with_other_mlp_width_breaks_the_run(tmp_path):
    # Negative model 1: layer 2 has a different MLP width.
    torch.manual_seed(0)
    a = find_spans(_cap(TinyStack(n=6, hiddens=[64, 64, 48, 64, 64, 64]), tmp_path))
    assert [(s.start, s.length) for s in a.spans] == [(0, 2), (3, 3)]
    layers = {r["layer"]: r["reason"] for r in a.refused}
    assert set(layers) == {2, 3}
    assert ("different parameter shapes (fc.bias: (64,):float32 vs (48,):float32; "
            "fc.weight: (64, 32):float32 vs (48, 32):float32; out.weight: (32, 64):float32 vs (32, 48):float32)") in layers[2]
    assert "(vs layer 2)" in layers[3]


def test_alternating_attention_kinds_are_refused(tmp_path):
    # Negative model 2: full and sliding-window attention alternate; no two neighbours match
    # (as single layers: groups=false; the pairs are a run of groups, see test_groups.py).
    torch.manual_seed(0)
    a = find_spans(_cap(TinyStack(n=4, windows=[None, 3, None, 3]), tmp_path), groups=False)
    assert a.spans == []
    assert [r["layer"] for r in a.refused] == [1, 2, 3]
    assert all("different op graph" in r["reason"] for r in a.refused)


def test_mid_stack_output_breaks_the_run(tmp_path):
    # The hidden state after layer 1 is also a model output: it cannot disappear inside a loop.
    torch.manual_seed(0)
    a = find_spans(_cap(TinyStack(n=4, tap=1), tmp_path))
    assert [(s.start, s.length) for s in a.spans] == [(0, 2), (2, 2)]
    assert "also a model output" in a.refused[0]["reason"]


def test_depth_specific_buffer_breaks_the_run(tmp_path):
    class Scaled(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.register_buffer("scale", torch.tensor([s]))

        def forward(self, x):
            return x + self.lin(x) * self.scale

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Scaled(1.0), Scaled(1.0), Scaled(0.5)])

        def forward(self, x):
            for l in self.layers:
                x = l(x)
            return x

    ep = torch.export.export(M().eval(), (torch.randn(2, 8),), strict=False)
    path = tmp_path / "buf.pt2"
    torch.export.save(ep, path)
    a = find_spans(capture.load(path))
    assert [(s.start, s.length) for s in a.spans] == [(0, 2)]
    assert "depth-specific buffer 'scale'" in a.refused[0]["reason"]


def test_isomorphism_is_exact_and_preserves_labels(tiny_capture):
    idx = ProgramIndex.build(tiny_capture.program)
    g0, g1 = layer_graph(idx, "blocks.0"), layer_graph(idx, "blocks.1")
    assert g0.wl_hash == g1.wl_hash
    m = next(isomorphisms(g0, g1))
    assert all(g0.graph.nodes[a]["label"] == g1.graph.nodes[b]["label"] for a, b in m.items())


def test_find_stacks_needs_contiguous_indices():
    paths = {"", "a", "a.0", "a.1", "a.2", "b", "b.0", "b.2", "c", "c.0", "d.0.x", "d.1.x", "d"}
    assert find_stacks(paths) == {"a": ["a.0", "a.1", "a.2"], "d": ["d.0", "d.1"]}


def test_pass_contract_changes_nothing_and_reports(tiny_capture):
    state = State(tiny_capture, tiny_capture.unflatten())
    res = FindSpans().run(state)
    assert res.modified is False and res.state.module is state.module
    assert "spans" not in state.analyses  # input untouched
    assert res.report["spans"][0]["length"] == 5
    again = FindSpans().run(res.state)
    assert again.report["spans"] == res.report["spans"]


def test_unknown_stack_is_refused(tiny_capture):
    with pytest.raises(ValueError, match="no layer stack 'nope'; stacks found: blocks"):
        find_spans(tiny_capture, stacks=("nope",))
