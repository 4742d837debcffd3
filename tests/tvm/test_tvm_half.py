"""``compile --dtype float16`` (issue 17 part 3) and int4 on CUDA: the zoo Llama converted (2
blocks x 2 loops) as float16 forward and generation artifacts, run on x86 against the same model in
float16 PyTorch at every loop count; CUDA builds of float16 and int4 / int4asym decode steps
(nvcc, not run: no GPU here), whose code and scale layouts (int32 words, the CUDA layout DLight's
GEMV rule schedules) are decoded by the same TIR on the host and checked against
:func:`loopify.nn.quant.dequantize`; refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")

from loopify import convert as conv  # noqa: E402
from loopify.cli import cli  # noqa: E402
from loopify.compile import compile_model  # noqa: E402
from loopify.nn import quant  # noqa: E402
from loopify.verify import HALF_ARTIFACT_RTOL  # noqa: E402


@pytest.mark.slow  # ~40 s: the real MiniLM converted 3 x 2, float16
def test_a_float16_minilm_forward_artifact_matches(written, tmp_path):
    """BERT's linears are decomposed to ``addmm`` with a bias and its attention has biases: each
    is accumulated in float32 and cast back (TVM's converter added a float16 bias to a float32
    product, which Relax refused)."""
    pt2 = tmp_path / "m.pt2"
    conv.convert(written["minilm"]["hf"], conv.ConvertConfig(), pt2)
    res = compile_model(pt2, tmp_path / "m16.x86", dtype="float16")
    assert res.checks and all(c["ok"] and c["rel_err"] < HALF_ARTIFACT_RTOL for c in res.checks), res.checks


def test_a_float16_forward_artifact_matches_float16_pytorch_at_every_loop_count(llama_pt2, tmp_path):
    """Weights, activations and logits in float16; the loop body's carry stays float16 (TVM's
    importer made every projection float32, which the staging refused). Tolerance:
    HALF_ARTIFACT_RTOL (measured 8e-4 here, the same as float16 PyTorch against float32)."""
    res = compile_model(llama_pt2, tmp_path / "h.x86", dtype="float16")
    assert res.manifest["dtype"] == "float16" and res.manifest["outputs"][0]["dtype"] == "float16"
    assert [c["loops"] for c in res.checks] == [[1], [2]]
    assert all(c["ok"] and 0 < c["rel_err"] < HALF_ARTIFACT_RTOL for c in res.checks), res.checks
    # half the bytes of the float32 artifact's weights
    f32 = compile_model(llama_pt2, tmp_path / "f.x86", validate=False)
    b16 = (res.path / "params.safetensors").stat().st_size
    b32 = (f32.path / "params.safetensors").stat().st_size
    assert 0.45 < b16 / b32 < 0.55


def test_a_float16_int4asym_generation_artifact_decodes_the_float16_eager_tokens(llama_pt2, tmp_path):
    """The decode step in float16 with int4asym weights (float32 accumulation in the fused
    kernels): the KV cache is float16, and greedy tokens equal the float16 eager model's with the
    same dequantised weights at both loop counts (compile's own validation)."""
    res = compile_model(llama_pt2, tmp_path / "h.gen", dtype="float16", max_context=48, weights="int4asym")
    assert res.manifest["generation"]["dtype"] == "float16"
    whats = {(c["what"], tuple(c["loops"])) for c in res.checks}
    assert whats == {(w, (k,)) for w in ("prefill logits", "greedy tokens") for k in (1, 2)}
    assert all(c["ok"] for c in res.checks), res.checks
    from loopify import runtime

    art = runtime.load(res.path)
    k, v = art.empty_cache()
    assert k.dtype == np.float16
    logits, k, v = art.step("prefill", [[5, 6, 7]], [[1, 1, 1]], [[0, 1, 2]], k, v, [2], last=True)
    assert logits.dtype == np.float32 and k.dtype == np.float16 and k.shape[3] == 3


@pytest.mark.parametrize("scheme", ["int4", "int4asym"])
def test_the_cuda_int4_layout_decodes_to_the_same_weights(scheme):
    """On CUDA int4 codes are int32 words (eight codes each, MLC-LLM's order) and int4asym's
    float16 (scale, min) pair one int32 word: the dequantisation PrimFunc of that layout, built for
    the host, gives exactly :func:`loopify.nn.quant.dequantize` of the codes and scales."""
    import tvm

    from loopify.backends.tvm import quant as tq

    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05 + 0.01
    q, s = quant.quantize(w, scheme, "float16")
    entry = quant.Quantized(scheme, q, s, (48, 96))
    codes, scales = tq.stored_codes(entry), tq.stored_scale(entry)
    assert codes.dtype == torch.int32 and tuple(codes.shape) == (48, 96 // 8)
    assert tuple(scales.shape) == (48, 3) and scales.dtype == (torch.int32 if scheme == "int4asym" else torch.float16)
    # the parameter types the rewrite declares, without packing, are those of the stored tensors
    assert tq.stored_types(entry) == ((list(codes.shape), "int32"),
                                      (list(scales.shape), str(scales.dtype).replace("torch.", "")))
    f = tq.dequant_func(scheme, 48, 96, "float16", "float32")
    lib = tvm.compile(tvm.IRModule({"main": f}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((48, 96), np.float32))
    lib["main"](tvm.runtime.tensor(codes.numpy()), tvm.runtime.tensor(scales.numpy()), out)
    np.testing.assert_array_equal(out.numpy(), quant.dequantize(q, s, scheme).numpy())


@pytest.mark.slow  # ~25 s each: nvcc
@pytest.mark.parametrize("scheme, dtype", [("int4", "float32"), ("int4asym", "float16")])
def test_int4_decode_steps_build_for_cuda(llama_pt2, tmp_path, scheme, dtype):
    """An int4 decode step is a GEMV with the dequantisation fused (DLight's rule): it did not
    build for CUDA with the CPU's code order. Built here with nvcc (not run: no GPU)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    res = compile_model(llama_pt2, tmp_path / "q.cuda", target="cuda", max_context=48, weights=scheme, dtype=dtype)
    m = json.loads((res.path / "manifest.json").read_text())
    t = next(iter(m["quantization"]["tensors"].values()))
    assert t["scale_dtype"] == "float16" and "MLC" in t["code_packing"]
    assert m["generation"]["dtype"] == dtype and res.checks == []  # not run here


@pytest.mark.slow  # ~60 s: three entry points with a vision tower
def test_a_float16_llava_generation_artifact_decodes_the_float16_eager_tokens(written, tmp_path):
    """The image prefill step in float16 (vision tower, projector, the image features scattered
    into the prompt), validated by compile at both loop counts. Its biased float16 linears were
    0.43 off until the matmul rule stopped computing the bias cast per tile
    (tests/tvm/test_schedules.py::test_a_side_producer_of_an_epilogue_is_not_computed_per_tile)."""
    pt2 = tmp_path / "llava.pt2"
    conv.convert(written["llava-clip"]["hf"], conv.ConvertConfig(), pt2)
    res = compile_model(pt2, tmp_path / "l16.gen", dtype="float16", max_context=96)
    assert res.manifest["generation"]["image"] is not None and res.manifest["generation"]["dtype"] == "float16"
    assert len(res.checks) == 4 and all(c["ok"] for c in res.checks), res.checks


def test_float16_is_refused_for_an_original_forward_artifact(written, tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(written["llama"]["hf"]), "-o", str(tmp_path / "x"), "--dtype", "float16"])
    assert r.exit_code == 2, r.output
    errs = [l for l in r.output.splitlines() if l.startswith("loopify:")]
    assert len(errs) == 1 and "--dtype float16 compiles a converted model or a generation artifact" in errs[0]
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()
