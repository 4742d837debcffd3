"""Inference forms of per-depth LoRA (``Recursion.deploy_lora``): merged per-depth matrices
computed once, or factored ``x @ W.T + s * (x @ A.T) @ B.T``, chosen per matrix.

Every form computes the same function as the merge in the graph: merged is the same sum
``W + s * B @ A`` done once (bit-identical products, a different op order only in what adds
up), factored reorders the rank-r product's reductions. Measured differences are ~1e-7 of the
output's magnitude; 1e-5 relative leaves room for kernel choices at float32."""

from __future__ import annotations

import copy

import pytest
import torch

from loopify.convert import ConvertConfig, convert_captured
from loopify.nn import deploy_lora, lora, recursions, set_loops
from loopify.staging import run_stages, stages_of

RTOL = 1e-5


def _close(a, b):
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max())


def test_choose_form_by_modelled_overhead():
    # rank 32 on MiniLM's 384 x 384: factors add 17% to the matmul -> merged; rank 32 on a
    # 4096 x 4096 projection: 1.6% -> factored; explicit policies are obeyed
    assert lora.choose_form((384, 384), 32) == "merged"
    assert lora.choose_form((4096, 4096), 32) == "factored"
    assert lora.choose_form((4096, 4096), 32, "merged") == "merged"
    assert lora.choose_form((384, 384), 32, "factored") == "factored"
    with pytest.raises(ValueError):
        lora.choose_form((8, 8), 1, "fused")


def _ops(ep):
    ops = [str(nd.target) for nd in ep.graph.nodes if nd.op == "call_function"]
    return ops.count("aten.linear.default"), sum(ops.count(f"aten.{o}.default") for o in ("mm", "matmul"))


@pytest.mark.parametrize("policy", ["merged", "factored", "auto"])
@pytest.mark.parametrize("form", ["export", "hf"])
def test_deployed_forms_equal_the_merge_in_the_graph(captured, policy, form):
    cap = captured("llama", form)
    res = convert_captured(cap, ConvertConfig(rank=4))
    ref_mod = res.module
    dep = copy.deepcopy(ref_mod)
    report = deploy_lora(dep, policy)
    forms = {r["form"] for rep in report.values() for r in rep.values()}
    # the tiny Llama's matrices are 32-64 wide: rank 4 adds 19-25% to each matmul -> auto merges
    assert forms == ({"merged"} if policy == "auto" else {policy})
    (rec,) = recursions(dep).values()
    for n in (1, 2):
        set_loops(ref_mod, n)
        set_loops(dep, n)
        with torch.enable_grad():  # the reference merges in the graph (no merged-weight cache)
            ref = ref_mod(*cap.args, **cap.kwargs)[0].detach()
        with torch.no_grad():
            got = dep(*cap.args, **cap.kwargs)[0]
        assert _close(got, ref), (policy, n)
        ep = torch.export.export(dep, tuple(cap.args), dict(cap.kwargs), strict=False)
        assert _close(ep.module()(*cap.args, **cap.kwargs)[0], ref), (policy, n)
        # every matrix application at this count: its merge B @ A is gone from the graph; factored
        # instead adds two linears (x @ A.T, then @ B.T)
        uses = len(rec.depth_schedule(n)) * len(report[next(iter(report))])
        lin_ref, mm_ref = _ops(torch.export.export(ref_mod, tuple(cap.args), dict(cap.kwargs), strict=False))
        lin, mm = _ops(ep)
        assert mm == mm_ref - uses, (mm, mm_ref, uses)
        assert lin == lin_ref + (2 * uses if policy == "factored" else 0), (lin, lin_ref, uses)
