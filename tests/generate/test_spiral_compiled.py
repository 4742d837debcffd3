"""Generation artifacts of multi-resolution loops (SpiralFormer): the decode state in and out.

A coarse schedule position runs densely over the call's tokens (each token's query the mean of
its group so far, keys valid only at group ends) or, in a call where no group ends, only
updates its state: each step's logits must equal the eager decoder's, which equals the
cache-free forward (tests/nn/test_spiral.py). Gates are moved off zero (seeded), else a coarse
step adds nothing. Tolerance: ARTIFACT_RTOL-like 1e-5 relative on logits (TVM reorders float32
reductions; measured <= 2.4e-7); tokens compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from loopify import convert as conv  # noqa: E402
from loopify.errors import LoopifyError  # noqa: E402
from loopify.nn import recursions, set_loops  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def spiral_gen(captured, tmp_path_factory):
    """The zoo Llama 2 x 2 with schedule 2:1 (the first step on pairs), gates off zero, compiled
    for generation (validated by compile at both counts)."""
    from loopify.compile import compile_model

    d = tmp_path_factory.mktemp("spiral-gen")
    cap = captured("llama", "hf")
    res = conv.convert_captured(cap, conv.ConvertConfig(schedule=(2, 1)))
    g = torch.Generator().manual_seed(0)
    for rec in recursions(res.module).values():
        rec.spiral.gate.data.copy_(0.5 * torch.randn(rec.spiral.gate.shape, generator=g))
    conv.save(res, cap, d / "s.pt2")
    return d / "s.pt2", d / "s.gen", compile_model(d / "s.pt2", d / "s.gen", max_context=64)


def test_every_decode_step_of_the_artifact_equals_the_eager_decoder(spiral_gen):
    from loopify import runtime
    from loopify.generate.eager import EagerDecoder

    pt2, gen, res = spiral_gen
    assert res.checks and all(c["ok"] for c in res.checks)
    m = res.manifest["generation"]
    assert m["layout"]["spiral"] == [[m["layout"]["loops"][0][0], 0, 2]] and m["spiral_dim"] == 64
    assert m["inputs"][-1] == "spiral_state" and m["outputs"][-1] == "spiral_state"
    # every function kept its dataflow blocks (fused transposes): the coarse branch's selections
    # once made TVM's FuseTIR fail, and the fallback transposed every weight on every call
    assert not [k for k in res.manifest.get("timings", {}) if k.endswith("dataflow_fallback")]
    art = runtime.load(gen)
    w, _, _ = conv.load_converted(pt2)
    for k in (1, 2):
        set_loops(w, k)
        for n in (1, 4, 5):  # prompts ending inside a pair, at a pair's end; one shorter than a pair
            ids = [3 + 7 * i for i in range(n)]
            dec = EagerDecoder(w, "per-depth")
            ref = dec.prefill({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, n, dtype=torch.long),
                               "position_ids": torch.arange(n)[None]})[0].numpy()
            kk, vv = art.empty_cache()
            st = art.empty_state()
            got, kk, vv, st = art.step("prefill", [ids], np.ones((1, n), np.int64), np.arange(n)[None], kk, vv, [k],
                                       last=True, state=st)
            for _ in range(5):
                assert np.abs(got[0, -1] - ref).max() <= RTOL * np.abs(ref).max(), (k, n, len(ids))
                ids.append(int(ref.argmax()))
                t = len(ids)
                ref = dec.decode(torch.tensor([[ids[-1]]]), torch.ones(1, t, dtype=torch.long),
                                 torch.tensor([[t - 1]]))[0].numpy()
                got, kk, vv, st = art.step("decode", [[ids[-1]]], np.ones((1, t), np.int64), [[t - 1]], kk, vv, [k],
                                           state=st)
    set_loops(w, None)
    with pytest.raises(LoopifyError, match="multi-resolution loops: give their decode state"):
        art.step("prefill", [[1, 2]], [[1, 1]], [[0, 1]], *art.empty_cache(), [1])


def test_generate_serves_the_spiral_artifact_like_the_eager_model(spiral_gen):
    from loopify.generate import Sampling, open_model

    pt2, gen, _ = spiral_gen
    for loops in (1, 2):
        a = open_model(pt2).generate([[1, 9, 44, 5, 6]], Sampling(max_new_tokens=8), loops=loops)
        b = open_model(gen).generate([[1, 9, 44, 5, 6]], Sampling(max_new_tokens=8), loops=loops)
        assert a.tokens == b.tokens


def test_spiral_generation_artifacts_refuse_what_they_cannot_serve(captured, tmp_path):
    """Shared-slot KV policies and per-depth LoRA with a schedule are refused in one line,
    before anything is written."""
    from loopify.compile import compile_model

    cap = captured("llama", "hf")
    res = conv.convert_captured(cap, conv.ConvertConfig(schedule=(2, 1)))
    conv.save(res, cap, tmp_path / "s.pt2")
    with pytest.raises(LoopifyError, match="KV policy 'share-first' shares slots between recursions"):
        compile_model(tmp_path / "s.pt2", tmp_path / "a.gen", max_context=32, kv_policy="share-first")
    res = conv.convert_captured(cap, conv.ConvertConfig(schedule=(2, 1), rank=4))
    conv.save(res, cap, tmp_path / "r.pt2")
    with pytest.raises(LoopifyError, match="per-depth parameters .* are not compiled for generation yet"):
        compile_model(tmp_path / "r.pt2", tmp_path / "b.gen", max_context=32)
    assert not (tmp_path / "a.gen").exists() and not (tmp_path / "b.gen").exists()
