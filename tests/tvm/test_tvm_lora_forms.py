"""Per-depth LoRA in TVM artifacts: merged matrices precomputed per depth (bound per step to one
compiled loop body) or factored, chosen per matrix and recorded in the manifest.

The reference is the converted model merging ``W + s * B @ A`` in the graph (autograd on, so no
merged-weight cache either). Tolerance 1e-4 relative, as for every artifact: TVM reorders
float32 reductions (measured ~1e-7 here); a depth bound to the wrong step's weights is O(1e-1)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tvm")

import loopify.runtime as rt  # noqa: E402
from loopify import convert as conv  # noqa: E402
from loopify.compile import compile_model  # noqa: E402
from loopify.errors import LoopifyError  # noqa: E402
from loopify.nn import set_loops  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope="module")
def relaxed(written, tmp_path_factory):
    """The zoo Llama (4 layers) at rank 4, cycle (2 blocks x 2) and sequence sharing."""
    out = {}
    for sharing in ("cycle", "sequence"):
        path = tmp_path_factory.mktemp("lora") / f"llama-{sharing}.pt2"
        conv.convert(written["llama"]["hf"], conv.ConvertConfig(rank=4, sharing=sharing, blocks=2), path)
        out[sharing] = path
    return out


def _reference(path, k):
    module, inputs, _ = conv.load_converted(path)
    set_loops(module, k)
    with torch.enable_grad():
        return module(*inputs.args, **inputs.kwargs)[0].detach(), inputs.flat_inputs()


@pytest.mark.parametrize("sharing,form", [("cycle", "merged"), ("cycle", "factored"), ("sequence", "merged")])
def test_artifact_equals_the_merge_in_the_graph(relaxed, tmp_path, sharing, form):
    res = compile_model(relaxed[sharing], tmp_path / "a.x86", lora_form=form)
    m = json.loads((res.path / "manifest.json").read_text())
    loops = m["lora"]["loops"]
    assert m["lora"]["policy"] == form
    assert {e["form"] for mats in loops.values() for e in mats.values()} == {form}
    names = m["params"]
    if form == "merged":  # per-depth matrices stored; the shared ones and the factors are not read
        assert any(".premerged.d3_" in n for n in names) and not any("lora_A" in n for n in names)
    else:
        assert any("lora_A" in n for n in names) and not any("premerged" in n for n in names)
    art = rt.load(res.path)
    for k in (1, 2):
        ref, inputs = _reference(relaxed[sharing], k)
        got = torch.as_tensor(art(*inputs, loops=k)[0])
        assert float((got - ref).abs().max()) <= RTOL * float(ref.abs().max()), k


def test_unknown_lora_form_is_refused(relaxed, tmp_path):
    with pytest.raises(LoopifyError, match="LoRA form must be one of auto, merged, factored, got 'fused'"):
        compile_model(relaxed["cycle"], tmp_path / "x.x86", lora_form="fused")
    assert not (tmp_path / "x.x86").exists()
