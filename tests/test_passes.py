"""fold-loops, relax and insert-connectors: numerical equivalence, contracts, ties, refusals.

Tolerances: lossless rewrites (full-rank relax, connectors at zero, deepen x1, folding identical
layers) must match within 1e-5 relative (max abs error / max abs output): the only change is
float32 re-association (W + B@A instead of W), ~1e-7 measured. Lossy plans are checked for
structure, not for closeness.
"""

from __future__ import annotations

import pytest
import torch

from loopify.errors import PipelineError
from loopify.passes.find_spans import find_spans
from loopify.passes.fold_loops import FoldLoops, default_blocks
from loopify.pipeline import State, parse, run_pipeline
from loopify.nn import recursions, schedule, set_loops, sharing_map
from tests.models import TinyStack

RTOL = 1e-5


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _run(cap, spec, form="graph"):
    """Run ``spec`` after find-spans (fold-loops' precondition) on the graph or module form."""
    module = cap.unflatten() if form == "graph" else cap.editable()
    return run_pipeline(parse("find-spans{similarity=false}," + spec), State(cap, module))


def _out(cap, module):
    with torch.no_grad():
        return module(*cap.args, **cap.kwargs)[0]


# -- sharing maps ---------------------------------------------------------------------------------


def test_sharing_maps_follow_the_papers():
    assert sharing_map("cycle", 6, 3) == [0, 1, 2, 0, 1, 2]
    assert sharing_map("sequence", 6, 3) == [0, 0, 1, 1, 2, 2]
    assert sharing_map("middle-cycle", 6, 4) == [0, 1, 2, 1, 2, 3]
    assert sharing_map("middle-sequence", 6, 4) == [0, 1, 1, 2, 2, 3]
    assert schedule("cycle", 6, 3, 1) == [0, 1, 2]
    assert schedule("sequence", 6, 3, 1) == [0, 2, 4]
    assert schedule("middle-cycle", 6, 4, 1) == [0, 1, 2, 5]
    assert default_blocks(6) == 3 and default_blocks(4) == 2 and default_blocks(2) == 1 and default_blocks(5) == 1


@pytest.mark.parametrize("kind,l,k", [("cycle", 6, 4), ("sequence", 5, 2), ("middle-cycle", 6, 2), ("middle-cycle", 7, 4)])
def test_sharing_maps_refuse_uneven_splits(kind, l, k):
    with pytest.raises(ValueError):
        sharing_map(kind, l, k)


# -- fold-loops ----------------------------------------------------------------------------------


def test_folding_identical_layers_is_exact(tmp_path):
    from loopify import capture
    from tests.models import export

    torch.manual_seed(0)
    m = TinyStack(n=4)
    for b in m.blocks[1:]:
        b.load_state_dict(m.blocks[0].state_dict())
    path = tmp_path / "same.pt2"
    torch.export.save(export(m), path)
    cap = capture.load(path)
    for init in ("average", "stepwise", "lower", "upper"):
        res = _run(cap, f"fold-loops{{blocks=1,init={init}}}")
        assert _rel(cap.run()[0], _out(cap, res.state.module)) < RTOL


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle-cycle", "middle-sequence"])
@pytest.mark.parametrize("init", ["stepwise", "average", "lower", "upper"])
def test_every_sharing_and_init_on_llama(captured, sharing, init):
    cap = captured("llama")
    blocks = 3 if sharing.startswith("middle") else 2  # L = 4
    res = _run(cap, f"fold-loops{{blocks={blocks},sharing={sharing},init={init}}},relax{{rank=full}}")
    # Full-rank relaxation restores every depth exactly, whatever the sharing and init.
    assert _rel(cap.run()[0], _out(cap, res.state.module)) < RTOL
    (rec,) = recursions(res.state.module).values()
    assert rec.spec.blocks == blocks and len(rec.blocks) == blocks
    assert rec.sharing() == sharing_map(sharing, 4, blocks)


def test_fold_contract(captured):
    cap = captured("llama")
    state = State(cap, cap.unflatten(), analyses={"spans": find_spans(cap, similarity=False)})
    res = FoldLoops().run(state)
    assert res.modified
    caller = res.state.module.get_submodule("model.model")
    calls = [n for n in caller.graph.nodes if n.op == "call_module"]
    # One loop call replaces the four layer calls; it records which pass made it.
    assert [n.target for n in calls if "layers" in n.target] == ["layers_loop"]
    loop_node = next(n for n in calls if n.target == "layers_loop")
    assert loop_node.meta["loopify_pass"] == "fold-loops"
    # The input module is untouched.
    orig = state.module.get_submodule("model.model")
    assert sum(n.op == "call_module" and n.target.startswith("layers.") for n in orig.graph.nodes) == 4
    # A second run changes nothing.
    again = FoldLoops().run(res.state)
    assert not again.modified and again.report["note"] == "every span is folded already"


def test_ties_are_real_parameter_objects(captured):
    cap = captured("llama")
    res = _run(cap, "fold-loops{blocks=2}")
    (rec,) = recursions(res.state.module).values()
    for d in range(4):
        for e in range(4):
            if rec.sharing()[d] == rec.sharing()[e]:
                pd, pe = rec.params_at(d), rec.params_at(e)
                assert all(pd[k] is pe[k] for k in pd)
    # Writing one block's weight changes the output of every depth that uses it.
    before = _out(cap, res.state.module)
    with torch.no_grad():
        next(rec.blocks[0].parameters()).mul_(1.5)
    assert not torch.equal(before, _out(cap, res.state.module))


def test_param_count_follows_the_plan(captured):
    cap = captured("llama")
    per_layer = find_spans(cap, similarity=False).spans[0].params_per_layer
    for k in (1, 2, 4):
        res = _run(cap, f"fold-loops{{blocks={k}}}")
        (rep,) = res.records[-1].report["loops"]
        assert rep["params_before"] == 4 * per_layer and rep["params_after"] == k * per_layer


def test_per_depth_norms(captured):
    cap = captured("llama")
    res = _run(cap, "fold-loops{blocks=1,norms=per-depth}")
    (rec,) = recursions(res.state.module).values()
    assert set(rec.depth_params.keys()) == {"input_layernorm__weight", "post_attention_layernorm__weight"}
    assert rec.depth_params["input_layernorm__weight"].shape == (4, 64)


def test_subsample_when_blocks_do_not_divide(captured):
    cap = captured("nanogpt")  # 6 layers
    with pytest.raises(PipelineError, match=r"6 layers do not split into 4 blocks evenly; choose blocks in \{1, 2, 3, 6\}"):
        _run(cap, "fold-loops{blocks=4}")
    res = _run(cap, "fold-loops{blocks=2,loops=0,subsample=true}")  # divides: nothing dropped
    assert res.records[-1].report["loops"][0]["dropped"] == []


def test_deepen_loops_at_run_time(captured):
    cap = captured("llama")
    res = _run(cap, "fold-loops{mode=deepen,repeat=1}")
    module = res.state.module
    assert _rel(cap.run()[0], _out(cap, module)) < RTOL  # one loop = the original model
    outs = []
    for n in (0, 1, 2, 3):
        set_loops(module, n)
        outs.append(_out(cap, module))
    assert len({o.sum().item() for o in outs}) == 4  # each extra loop changes the output


@pytest.mark.parametrize("spec,message", [
    ("fold-loops{blocks=2,loops=2}", "give blocks or loops, not both"),
    ("fold-loops{mode=deepen,blocks=2}", "deepen mode keeps every layer's weights"),
    ("fold-loops{blocks=3,sharing=middle-cycle,stacks=model.model.layers}", None),  # valid: 4 layers, 3 blocks
    ("fold-loops{stacks=nope}", "no foldable run in stack 'nope'"),
    ("fold-loops{blocks=2,sharing=middle-cycle}", "needs at least 3 blocks"),
    ("fold-loops{blocks=5}", "blocks must be between 1 and the span length 4"),
    ("fold-loops{sharing=spiral}", "expected one of cycle, sequence, middle-cycle, middle-sequence"),
    ("fold-loops{repeat=0}", "repeat must be >= 1"),
])
def test_fold_refusals(captured, spec, message):
    cap = captured("llama")
    if message is None:
        _run(cap, spec)
        return
    with pytest.raises(PipelineError, match=message):
        _run(cap, spec)


def test_non_interchangeable_span_is_not_folded(captured):
    # neg-alt-attn has no span: nothing to fold, the model is unchanged.
    cap = captured("neg-alt-attn")
    res = _run(cap, "fold-loops")
    assert not res.records[-1].modified and recursions(res.state.module) == {}
    # neg-mlp-width: layer 2 stays on its own, the runs around it are folded separately.
    cap = captured("neg-mlp-width")
    res = _run(cap, "fold-loops{blocks=1}")
    assert sorted(r.spec.start for r in recursions(res.state.module).values()) == [0, 3]
    assert "model.h.2" in dict(res.state.module.named_modules())


# -- relax ---------------------------------------------------------------------------------------


def test_relax_error_equals_dropped_singular_energy(captured):
    cap = captured("llama")
    for rank in (1, 4, 16):
        res = _run(cap, f"fold-loops{{blocks=1}},relax{{rank={rank}}}")
        (loop,) = res.records[-1].report["loops"]
        assert loop["max_recon_vs_dropped_gap"] < 1e-6
        assert loop["max_recon_error"] > 0


def test_relax_param_count_formula(captured):
    cap = captured("llama")  # hidden 64, intermediate 128, 4 heads, 2 kv heads (k/v: 32 x 64)
    res = _run(cap, "fold-loops{blocks=2},relax{rank=4,vectors=false}")
    (loop,) = res.records[-1].report["loops"]
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    assert loop["params_added"] == 4 * sum(4 * (o + i) for o, i in shapes)


def test_relax_alpha_is_compensated(captured):
    cap = captured("qwen2")
    a = _out(cap, _run(cap, "fold-loops,relax{rank=8}").state.module)
    b = _out(cap, _run(cap, "fold-loops,relax{rank=8,alpha=32.0}").state.module)
    assert _rel(a, b) < RTOL


@pytest.mark.parametrize("spec,message", [
    ("relax{rank=4}", "relax needs a loop: run fold-loops before it"),
    ("fold-loops,relax{rank=-1}", "rank must be >= 0 or 'full'"),
    ("fold-loops,relax{rank=lots}", "expected an integer or one of full"),
])
def test_relax_refusals(captured, spec, message):
    with pytest.raises(PipelineError, match=message):
        _run(captured("llama"), spec)


# -- insert-connectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["recursive", "identity", "embedding"])
def test_connectors_are_neutral_at_insertion(captured, kind):
    cap = captured("llava-clip")
    base = _out(cap, _run(cap, "fold-loops").state.module)
    out = _out(cap, _run(cap, f"fold-loops,insert-connectors{{kind={kind}}}").state.module)
    assert torch.equal(base, out)


def test_llava_modality_mask_marks_exactly_the_image_tokens(captured):
    cap = captured("llava-clip")
    res = _run(cap, "fold-loops,insert-connectors")
    loops = recursions(res.state.module)
    text = loops["model.model.language_model.layers_loop"]
    vision = loops["model.model.vision_tower.encoder.layers_loop"]
    assert text.connector.modalities == 2 and vision.connector.modalities == 1
    seen = {}

    def grab(module, args):  # a pre-hook must return None, or it replaces the arguments
        seen["mask"] = args[-1]

    text.register_forward_pre_hook(grab)
    _out(cap, res.state.module)
    ids = cap.kwargs["input_ids"]
    expected = ids == cap.info["image_token_id"]
    assert torch.equal(seen["mask"], expected)
    assert int(expected.sum()) == 16  # the zoo's LLaVA has 16 image tokens


def test_connector_changes_output_once_trained(captured):
    cap = captured("llama")
    res = _run(cap, "fold-loops,insert-connectors")
    (rec,) = recursions(res.state.module).values()
    assert rec.connector.modalities == 1  # text-only model
    base = _out(cap, res.state.module)
    with torch.no_grad():
        rec.connector.scale.fill_(0.5)
    assert not torch.equal(base, _out(cap, res.state.module))


def test_connectors_refuse_sequence_sharing(captured):
    with pytest.raises(PipelineError, match="cycle sharing and deepen mode, not sequence"):
        _run(captured("llama"), "fold-loops{sharing=sequence},insert-connectors")
