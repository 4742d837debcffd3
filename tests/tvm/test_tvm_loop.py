"""Staged programs with a run-time loop count: one artifact, any k.

A tiny Llama split by hand: stage 0 = embeddings (+ rotary cos/sin and the additive mask carried
along), stage 1 = ONE decoder layer as the loop body (the same layer object each iteration),
stage 2 = norm + lm_head. The compiled artifact, called with loops=k, must equal PyTorch running
the layer k times, for k = 0..5.

Tolerance 1e-4 relative (max abs error / max abs logit): TVM fuses and reorders float32
reductions (matmul tiling, softmax, RMSNorm), which moves results by ~1e-7 relative per layer
(measured: <= 4e-7 after 5 layers); 1e-4 leaves room for that and for other CPUs' vector widths,
while any real error (a wrong mask, a skipped or repeated iteration, wrong weights) is O(1e-1).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tvm")

import loopify.runtime as rt  # noqa: E402
from loopify.artifact import LoopCountError  # noqa: E402
from loopify.backends.tvm import Stage, compile_stages  # noqa: E402
from loopify.backends.tvm.errors import CompileError  # noqa: E402
from loopify.backends.tvm.testing import llama_loop_split  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope="module")
def split():
    return llama_loop_split(max_loops=5, min_loops=0)


@pytest.fixture(scope="module")
def looped(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "llama-loop.x86"
    return compile_stages(split.stages, "x86", out)


@pytest.mark.parametrize("k", range(6))
def test_loop_artifact_matches_torch_for_every_k(split, looped, k):
    art = rt.load(looped.path)
    checks = rt.validate(art, lambda *i: split.reference(k, *i), split.inputs, loops=k, rtol=RTOL)
    assert all(c.ok for c in checks), checks


def test_loop_counts_change_the_result(split, looped):
    # guards against a loop that silently runs a fixed number of times
    art = rt.load(looped.path)
    a, b = art(*split.inputs, loops=1)[0], art(*split.inputs, loops=2)[0]
    assert (a - b).abs().max() > 1e-3


def test_manifest_describes_loops_and_shared_weights(looped):
    m = json.loads((looped.path / "manifest.json").read_text())
    assert m["format"] == "loopify-artifact" and m["version"] == 1
    assert m["loops"] == [{"stage": 1, "stages": [1], "name": "layers", "min": 0, "max": 5, "default": 5}]
    assert m["loop"] == {"min": 0, "max": 5, "default": 5}
    assert set(m["versions"]) >= {"torch", "tvm", "loopify"}
    assert set(m["files"]) >= {"lib.so", "params.safetensors"}
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    # the layer's weights are stored once although every iteration uses them
    names = m["params"]
    assert sum("self_attn.q_proj" in n for n in names) == 1
    assert m["params_info"]["unique"] == len(names)


def test_loop_count_outside_range_is_refused(split, looped):
    art = rt.load(looped.path)
    with pytest.raises(LoopCountError, match="outside"):
        art(*split.inputs, loops=6)
    with pytest.raises(LoopCountError, match="loop stage"):
        art(*split.inputs, loops=[1, 2])


def test_params_shared_across_stages_are_stored_once(split, tmp_path):
    # The same embedding matrix used by two stages (a tied head) is one parameter.
    class Emb(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, ids):
            return (torch.nn.functional.embedding(ids, self.w),)

    class Head(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, h):
            return (h @ self.w.t(),)

    w = torch.nn.Parameter(torch.randn(32, 8))
    ids = torch.tensor([[1, 2, 3]])
    e, hd = Emb(w), Head(w)
    with torch.no_grad():
        h = e(ids)[0]
        stages = [Stage("straight", torch.export.export(e, (ids,), strict=False)),
                  Stage("straight", torch.export.export(hd, (h,), strict=False))]
    res = compile_stages(stages, "x86", None)
    assert res.manifest["params_info"] == {"unique": 1, "references": 2, "bytes": 32 * 8 * 4}


def test_loop_stage_with_mismatched_carry_is_refused(split):
    class Bad(torch.nn.Module):
        def forward(self, step, h, cos, sin, mask):
            return h[..., :-1], cos, sin, mask

    body = split.stages[1].program
    args = [torch.tensor(0)] + [torch.zeros(tuple(s.meta["val"].shape))
                                for s in body.graph.nodes if s.op == "placeholder"
                                and s.name in ("h", "cos", "sin", "mask")]
    bad = Stage("loop", torch.export.export(Bad(), tuple(args), strict=False))
    with pytest.raises(CompileError, match="differ from its carry"):
        compile_stages([split.stages[0], bad, split.stages[2]], "x86", None)
