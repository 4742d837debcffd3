"""Staging a converted model into straight stages and loop bodies with a run-time loop count.

The staged model run in PyTorch must equal the converted eager model at every loop count: the
stages are the same aten ops cut at the loop boundaries, so the match is exact (0.0 measured);
1e-6 relative leaves room for kernel choices."""

from __future__ import annotations

import pytest
import torch

from loopify.convert import ConvertConfig, convert_captured
from loopify.nn import set_loops
from loopify.staging import run_stages, stages_of


@pytest.mark.parametrize("name,config,counts,kinds", [
    ("llama", ConvertConfig(rank=4, connector="recursive"), (1, 2), ["straight", "loop", "straight"]),
    ("llava-clip", ConvertConfig(rank=4, connector="recursive"), (1, 2),
     ["straight", "loop", "straight", "loop", "straight"]),
    ("llama", ConvertConfig(mode="deepen", repeat=2, connector="embedding"), (0, 1, 3), ["straight", "loop", "straight"]),
    # sequence: one loop per block, all with the loop's one count; middle-*: the first and last
    # layers are straight pieces around the middle loop(s). LoRA makes every depth distinct, so a
    # wrong depth or block would show.
    ("llama", ConvertConfig(rank=4, sharing="sequence", blocks=2), (1, 2), ["straight", "loop", "loop", "straight"]),
    ("llama", ConvertConfig(rank=4, sharing="middle-cycle", blocks=3), (1, 2),
     ["straight", "straight", "loop", "straight", "straight"]),
    ("llama", ConvertConfig(rank=4, sharing="middle-sequence", blocks=3), (1, 2),
     ["straight", "straight", "loop", "straight", "straight"]),
])
def test_stages_match_the_converted_model_at_every_loop_count(captured, name, config, counts, kinds):
    cap = captured(name)
    res = convert_captured(cap, config)
    stages = stages_of(res.module, cap)
    assert [s.kind for s in stages] == kinds
    n_loops = len({s.group for s in stages if s.kind == "loop"})  # one count per converted loop
    for n in counts:
        set_loops(res.module, n)
        with torch.no_grad():
            ref = res.module(*cap.args, **cap.kwargs)[0]
        out = run_stages(stages, cap.flat_inputs(), [n] * n_loops)[0]
        assert float((out - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), n


def test_loop_body_stores_shared_weights_once(captured):
    cap = captured("llama")
    res = convert_captured(cap, ConvertConfig(blocks=1))
    body = [s for s in stages_of(res.module, cap) if s.kind == "loop"][0]
    names = list(body.program.state_dict)
    assert all(n.startswith("model.model.layers_loop.blocks.0.") for n in names), names
    assert body.max_loops == 4 and body.min_loops == 1


def test_loops_of_one_span_share_one_count(captured):
    cap = captured("llama")
    res = convert_captured(cap, ConvertConfig(sharing="sequence", blocks=2))
    loops = [s for s in stages_of(res.module, cap) if s.kind == "loop"]
    assert len(loops) == 2 and len({s.group for s in loops}) == 1
    assert [s.max_loops for s in loops] == [2, 2]
