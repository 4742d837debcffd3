"""fold-loops: numerical equivalence (graph and module forms), contract, ties, refusals, golden IR."""

from __future__ import annotations

import pytest
import torch

from loopify.errors import PipelineError
from loopify.nn import recursions, set_loops, sharing_map
from loopify.passes.find_spans import find_spans
from loopify.passes.fold_loops import FoldLoops
from loopify.pipeline import State, parse, run_pipeline
from tests.models import TinyStack
from tests.passes.helpers import RTOL, check_golden, describe, out, rel, run


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
        res = run(cap, f"fold-loops{{blocks=1,init={init}}}")
        assert rel(cap.run()[0], out(cap, res.state.module)) < RTOL


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle-cycle", "middle-sequence"])
@pytest.mark.parametrize("init", ["stepwise", "average", "lower", "upper"])
def test_every_sharing_and_init_on_llama(captured, sharing, init):
    cap = captured("llama")
    blocks = 3 if sharing.startswith("middle") else 2  # L = 4
    res = run(cap, f"fold-loops{{blocks={blocks},sharing={sharing},init={init}}},relax{{rank=full}}")
    # Full-rank relaxation restores every depth exactly, whatever the sharing and init.
    assert rel(cap.run()[0], out(cap, res.state.module)) < RTOL
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
    res = run(cap, "fold-loops{blocks=2}")
    (rec,) = recursions(res.state.module).values()
    for d in range(4):
        for e in range(4):
            if rec.sharing()[d] == rec.sharing()[e]:
                pd, pe = rec.params_at(d), rec.params_at(e)
                assert all(pd[k] is pe[k] for k in pd)
    # Writing one block's weight changes the output of every depth that uses it.
    before = out(cap, res.state.module)
    with torch.no_grad():
        next(rec.blocks[0].parameters()).mul_(1.5)
    assert not torch.equal(before, out(cap, res.state.module))


def test_param_count_follows_the_plan(captured):
    cap = captured("llama")
    per_layer = find_spans(cap, similarity=False).spans[0].params_per_layer
    for k in (1, 2, 4):
        res = run(cap, f"fold-loops{{blocks={k}}}")
        (rep,) = res.records[-1].report["loops"]
        assert rep["params_before"] == 4 * per_layer and rep["params_after"] == k * per_layer


def test_per_depth_norms(captured):
    cap = captured("llama")
    res = run(cap, "fold-loops{blocks=1,norms=per-depth}")
    (rec,) = recursions(res.state.module).values()
    assert set(rec.depth_params.keys()) == {"input_layernorm__weight", "post_attention_layernorm__weight"}
    assert rec.depth_params["input_layernorm__weight"].shape == (4, 64)


def test_subsample_when_blocks_do_not_divide(captured):
    cap = captured("nanogpt")  # 6 layers
    with pytest.raises(PipelineError, match=r"6 layers do not split into 4 blocks evenly; choose blocks in \{1, 2, 3, 6\}"):
        run(cap, "fold-loops{blocks=4}")
    res = run(cap, "fold-loops{blocks=2,loops=0,subsample=true}")  # divides: nothing dropped
    assert res.records[-1].report["loops"][0]["dropped"] == []


def test_deepen_loops_at_run_time(captured):
    cap = captured("llama")
    res = run(cap, "fold-loops{mode=deepen,repeat=1}")
    module = res.state.module
    assert rel(cap.run()[0], out(cap, module)) < RTOL  # one loop = the original model
    outs = []
    for n in (0, 1, 2, 3):
        set_loops(module, n)
        outs.append(out(cap, module))
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
        run(cap, spec)
        return
    with pytest.raises(PipelineError, match=message):
        run(cap, spec)


def test_non_interchangeable_span_is_not_folded(captured):
    # neg-alt-attn has no span of single layers: nothing to fold, the model is unchanged.
    cap = captured("neg-alt-attn")
    res = run_pipeline(parse("find-spans{similarity=false,groups=false},fold-loops"), State(cap, cap.unflatten()))
    assert not res.records[-1].modified and recursions(res.state.module) == {}
    # neg-mlp-width: layer 2 stays on its own, the runs around it are folded separately.
    cap = captured("neg-mlp-width")
    res = run(cap, "fold-loops{blocks=1}")
    assert sorted(r.spec.start for r in recursions(res.state.module).values()) == [0, 3]
    assert "model.h.2" in dict(res.state.module.named_modules())




# -- golden IR, module form -----------------------------------------------------------------------


def test_golden_ir(tiny_capture):
    res = run(tiny_capture, "fold-loops{blocks=1}")
    check_golden("fold-loops", describe(res.state.module))


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle-cycle", "middle-sequence"])
def test_module_form_every_sharing_is_exact_at_full_rank(captured, sharing):
    """Module form (the eager model, its layer list holding the loop): lossless at full rank,
    the loop is one entry of the module list, the layers' call convention kept."""
    cap = captured("llama", "hf")
    blocks = 3 if sharing.startswith("middle") else 2
    res = run(cap, f"fold-loops{{blocks={blocks},sharing={sharing}}},relax{{rank=full}}", form="module")
    assert rel(cap.run()[0], out(cap, res.state.module)) < RTOL
    layers = res.state.module.model.model.layers
    assert len(layers) == 1 and type(layers[0]).__name__ == "Recursion"
    assert layers[0].spec.state_name == "hidden_states"


def test_module_form_second_run_changes_nothing(captured):
    cap = captured("llama", "hf")
    res = run(cap, "fold-loops", form="module")
    again = FoldLoops().run(res.state)
    assert not again.modified and again.report["note"] == "every span is folded already"


def test_module_form_keeps_a_refused_layer_in_place(captured):
    """neg-mlp-width: the runs around layer 2 become two loops in one module list, layer 2 stays
    between them and the output is that of the original when the blocks are the layers."""
    cap = captured("neg-mlp-width", "hf")
    res = run(cap, "fold-loops{blocks=1},relax{rank=full}", form="module")
    h = res.state.module.model.h
    assert [type(m).__name__ for m in h] == ["Recursion", "Block", "Recursion"]
    assert rel(cap.run()[0], out(cap, res.state.module)) < RTOL
