"""Runs of repeating groups of layers (issue 15, class 5): find-spans finds a run of groups of p
layers where single layers do not repeat, fold-loops folds it as one loop whose body is whole
groups (each block one group position's layer), in both forms of a model.

Models: TinyStack with per-layer attention windows (the layers' op graphs differ), and the zoo's
neg-alt-attn, a real Qwen2 whose layers alternate full and sliding-window attention (same op
graph, another mask per layer: a side input). Lossless plans (full-rank relax, deepen x1) are
held to 1e-5 relative (helpers.RTOL: only float32 re-association changes, ~4e-7 measured).
"""

from __future__ import annotations

import re

import pytest
import torch

from loopify import capture
from loopify.errors import PipelineError
from loopify.nn import recursions, set_loops
from loopify.nn.recursion import GroupInput
from loopify.passes.find_spans import find_spans
from loopify.passes.fold_loops import FoldLoops
from tests.models import TinyStack, export
from tests.passes.helpers import RTOL, out, rel, run


def _cap(model, tmp_path, name="m.pt2"):
    path = tmp_path / name
    torch.manual_seed(0)
    with open(path, "wb") as f:
        torch.export.save(export(model.eval()), f)
    return capture.load(path)


@pytest.fixture(scope="module")
def alternating(tmp_path_factory):
    torch.manual_seed(0)
    return _cap(TinyStack(n=4, windows=[None, 3, None, 3]), tmp_path_factory.mktemp("alt"))


# -- find-spans ----------------------------------------------------------------------------------


def test_alternating_layers_are_one_run_of_pairs(alternating):
    (sp,) = find_spans(alternating, similarity=False).spans
    assert (sp.start, sp.length, sp.period, sp.groups) == (0, 4, 2, 2)
    assert sp.why_groups.startswith("layer 1 differs from layer 0: different op graph")
    # The single-layer refusals inside the run are the run's reason, not refusals any more.
    assert find_spans(alternating, similarity=False).refused == []


def test_groups_can_be_turned_off(alternating):
    # groups=false: the single-layer analysis alone, every neighbour pair refused.
    a = find_spans(alternating, similarity=False, groups=False)
    assert a.spans == [] and [r["layer"] for r in a.refused] == [1, 2, 3]


def test_groups_that_differ_are_no_run(tmp_path):
    # Negative: position 1 of the second pair has another window, so no two groups match.
    a = find_spans(_cap(TinyStack(n=4, windows=[None, 3, None, 5]), tmp_path), similarity=False)
    assert a.spans == [] and [r["layer"] for r in a.refused] == [1, 2, 3]


def test_smallest_period_covering_most_layers(tmp_path):
    # Every fourth layer differs (SmolLM3's no-RoPE layer): single layers give two runs of 3
    # (6 layers), groups of 4 cover all 8, and no smaller period does; the similarity is
    # measured against the mean of the layers at the same group position.
    a = find_spans(_cap(TinyStack(n=8, windows=[None, None, None, 3] * 2), tmp_path))
    (sp,) = a.spans
    assert (sp.start, sp.length, sp.period) == (0, 8, 4)
    assert len(sp.similarity["weight_residual"]) == 8 and len(sp.similarity["block_influence"]) == 8
    # Plain stacks are never read as groups: a uniform run stays period 1.
    (flat,) = find_spans(_cap(TinyStack(n=4), tmp_path, "u.pt2"), similarity=False).spans
    assert (flat.length, flat.period) == (4, 1)


def test_side_input_groups_are_said_as_a_person_would(captured):
    """neg-alt-attn (Qwen2): the layers differ only in the mask they are given."""
    (sp,) = find_spans(captured("neg-alt-attn")).spans
    assert (sp.length, sp.period) == (4, 2)
    assert re.fullmatch(r"layer 1 differs from layer 0: layer 1 uses the sliding-window mask \(window \d+\), "
                        r"layer 0 the full causal mask", sp.why_groups), sp.why_groups


# -- fold-loops ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["graph", "module"])
def test_group_fold_is_exact_at_full_rank_and_deepen_once(captured, form):
    cap = captured("neg-alt-attn", "hf")
    ref = cap.run()[0]
    res = run(cap, "fold-loops,relax{rank=full}", form=form)
    assert rel(ref, out(cap, res.state.module)) < RTOL
    (rec,) = recursions(res.state.module).values()
    # The body is one group: block 0 at the full-attention positions, block 1 at the sliding ones.
    assert (rec.spec.period, rec.spec.blocks, rec.spec.max_loops) == (2, 2, 2)
    assert rec.sharing() == [0, 1, 0, 1]
    assert rec.blocks[0].self_attn.q_proj.weight is not rec.blocks[1].self_attn.q_proj.weight
    # One loop count fewer runs one group: the output changes (the loop count is real).
    set_loops(res.state.module, 1)
    assert rel(ref, out(cap, res.state.module)) > 1e-3
    deep = run(cap, "fold-loops{mode=deepen,repeat=1}", form=form)
    assert rel(ref, out(cap, deep.state.module)) < RTOL


def test_module_form_keeps_each_positions_list_entry(captured):
    """The model picks a layer's mask by its list position (config.layer_types[i]): the loop
    takes p entries, a GroupInput for position 0 and itself at position 1."""
    cap = captured("neg-alt-attn", "hf")
    res = run(cap, "fold-loops", form="module")
    layers = res.state.module.model.model.layers
    assert [type(m).__name__ for m in layers] == ["GroupInput", "Recursion"]
    assert isinstance(layers[0], GroupInput) and layers[0].phase == 0
    blocks = layers[1].blocks
    assert [b.self_attn.layer_type for b in blocks] == ["full_attention", "sliding_attention"]
    # No weights twice: the group input holds none.
    assert list(layers[0].parameters()) == []


def test_graph_form_op_graph_groups_fold_exactly(alternating):
    res = run(alternating, "fold-loops,relax{rank=full}")
    assert rel(alternating.run()[0], out(alternating, res.state.module)) < RTOL
    (rec,) = recursions(res.state.module).values()
    # Each block keeps its position's op graph: the windowed one has the extra mask ops.
    ops = [sum(n.op == "call_function" for n in b.graph.nodes) for b in rec.blocks]
    assert rec.spec.period == 2 and ops[1] > ops[0]


@pytest.mark.parametrize("form", ["graph", "module"])
def test_second_run_changes_nothing(captured, form):
    cap = captured("neg-alt-attn", "hf")
    res = run(cap, "fold-loops", form=form)
    again = FoldLoops().run(res.state)
    assert not again.modified and again.report["note"] == "every span is folded already"


@pytest.mark.parametrize("spec, message", [
    # The body must be whole groups: 1 block would tie a full and a sliding layer.
    ("fold-loops{blocks=1}", r"blocks=1 does not fit a run of 2 groups of 2 layers: .*choose blocks in \{2, 4\}"),
    ("fold-loops{loops=3}", r"loops=3 does not fit a run of 2 groups of 2 layers"),
    # Sequence sharing ties neighbours, which are different positions of a group.
    ("fold-loops{sharing=sequence,blocks=2}", r"cycle sharing only"),
    ("fold-loops{subsample=true,blocks=2}", r"subsample does not apply"),
])
def test_group_fold_refusals(captured, spec, message):
    with pytest.raises(PipelineError, match=message):
        run(captured("neg-alt-attn"), spec)
