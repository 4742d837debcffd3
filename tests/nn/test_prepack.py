"""Eager inference on oneDNN-packed linear weights (loopify.nn.prepack).

Tolerances: the packed matmul sums in another order than the BLAS, so outputs agree to float32
re-association: 1e-5 relative to the output's scale (about 1e-6 is seen). Every fallback
(autograd on, one row, a replaced or changed weight, tracing) must give ``F.linear``'s result
*exactly*: it is the same call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loopify.nn import prepack as pp

pytestmark = pytest.mark.skipif(not pp.available(), reason="this PyTorch build has no oneDNN packed linear")

RTOL = 1e-5


def _close(a, b):
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 48), (1, 33, 48)])
def test_packed_layer_matches_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = F.linear(x, lin.weight, lin.bias)
    assert pp.prepack(lin) == 1 and "forward" in lin.__dict__
    with torch.no_grad():
        got = lin(x)
    assert got.shape == ref.shape and _close(got, ref)


def test_packed_path_is_taken_and_the_fallbacks_are_exact(monkeypatch):
    torch.manual_seed(1)
    lin = nn.Linear(32, 64)
    pp.prepack(lin)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    x = torch.randn(4, 32)
    with torch.no_grad():
        lin(x)
    assert calls == [x.shape]  # packed
    # autograd on: F.linear, gradients flow to the weight
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias)) and len(calls) == 1
    y.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        one = torch.randn(1, 1, 32)  # one row: the BLAS's GEMV
        assert torch.equal(lin(one), F.linear(one, lin.weight, lin.bias)) and len(calls) == 1
        # the weight changed in place (an optimiser step): the stale pack is not used
        lin.weight.add_(0.5)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and len(calls) == 1
    # a replaced weight (functional_call, a per-depth override) is used as given
    w2 = torch.randn(64, 32)
    with torch.no_grad():
        got = torch.func.functional_call(lin, {"weight": w2}, (x,))
    assert torch.equal(got, F.linear(x, w2, lin.bias)) and len(calls) == 1
    # packing again re-packs the changed weight, and the packed path serves it
    pp.prepack(lin)
    with torch.no_grad():
        assert _close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert len(calls) == 2


def test_unpack_restores_the_layers_and_packed_bytes_counts_them():
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 8).double())
    assert pp.prepack(m) == 2  # the float64 layer is left alone
    assert pp.packed_bytes(m) == (16 * 32 + 32 * 8) * 4
    assert pp.unpack(m) == 2
    assert pp.packed_bytes(m) == 0 and all("forward" not in l.__dict__ for l in m.modules())


def test_export_of_a_packed_module_traces_plain_linear():
    """torch.export runs on fake tensors: the packed layer falls back, the program holds linear."""
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    pp.prepack(m)
    x = torch.randn(3, 16)
    ep = torch.export.export(m, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("linear" in o for o in ops) and not any("mkldnn" in o for o in ops)
    with torch.no_grad():
        assert _close(ep.module()(x), m(x))


def test_routed_loop_generates_the_same_with_packed_weights(tmp_path):
    """A converted zoo Llama with an expert router moved off neutral: eager generation on packed
    weights gives the same greedy tokens, the same depth per token and logits within 1e-5
    relative of the unpacked run."""
    from loopify import capture
    from loopify.examples import zoo
    from loopify.generate import Sampling
    from loopify.generate.eager import EagerDecoder
    from loopify.generate.engine import run
    from loopify.nn import recursions
    from loopify.pipeline import State, parse, run_pipeline

    cap = capture.load(zoo.write_hf("llama", tmp_path))
    w = run_pipeline(parse("find-spans{similarity=false},fold-loops{blocks=2},route{kind=expert}"),
                     State(cap, cap.editable())).state.module
    (rec,) = recursions(w).values()
    torch.manual_seed(3)
    with torch.no_grad():
        rec.router.net[-1].weight.normal_(0, 0.5)
        rec.router.threshold.fill_(0.0)
    prompt = cap.kwargs["input_ids"][0, :9].tolist()
    s = Sampling(max_new_tokens=6)
    plain = EagerDecoder(w)
    ref = run(plain, [prompt], s)
    ref_logits = plain.prefill({"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt),
                                                                                                 dtype=torch.long)})
    packed = EagerDecoder(w, prepack=True)
    assert pp.packed_bytes(w) > 0
    got = run(packed, [prompt], s)
    logits = packed.prefill({"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt),
                                                                                             dtype=torch.long)})
    assert got.tokens == ref.tokens
    assert got.depth == ref.depth and 0 < next(iter(got.depth.values()))["average"] < 2
    assert _close(logits, ref_logits)
    pp.unpack(w)
