"""x86 artifacts: outputs match PyTorch; corrupt, incomplete or foreign artifacts are refused.

Tolerance 1e-4 relative (max abs error / max abs reference): the compiled code reorders float32
reductions (tiled matmuls, fused norms/softmax), ~1e-6 relative on these models; an error in
the compiled program is orders of magnitude larger.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("tvm")

import loopify.runtime as rt  # noqa: E402
from loopify.artifact import ArtifactError  # noqa: E402
from loopify.backends.tvm import compile_program  # noqa: E402
from loopify.backends.tvm.testing import LogitsOnly, export, llama_inputs, tiny_bert, tiny_llama  # noqa: E402

RTOL = 1e-4


@pytest.fixture(scope="module")
def llama_art(tmp_path_factory):
    model = LogitsOnly(tiny_llama(layers=2))
    inputs = llama_inputs(model.model, seq=8)
    res = compile_program(export(model, inputs), "x86", tmp_path_factory.mktemp("a") / "llama.x86")
    return model, inputs, res.path


def test_tiny_llama_matches_torch(llama_art):
    model, inputs, path = llama_art
    checks = rt.validate(path, lambda *i: model(*i), inputs, rtol=RTOL)
    assert [c.ok for c in checks] == [True], checks


def test_minilm_shaped_bert_matches_torch(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 12, dtype=torch.int64)
    mask[0, -3:] = 0  # padding exercises the attention-mask path
    res = compile_program(export(model, (ids, mask)), "x86", tmp_path / "bert.x86")
    checks = rt.validate(res.path, lambda *i: model(*i), (ids, mask), rtol=RTOL)
    assert len(checks) == 2 and all(c.ok for c in checks), checks


def test_outputs_as_numpy_and_torch(llama_art):
    model, inputs, path = llama_art
    art = rt.load(path)
    (t,), (n,) = art(*inputs), art(*inputs, output="numpy")
    assert isinstance(t, torch.Tensor) and t.shape == tuple(art.outputs[0]["shape"])
    assert (t.numpy() == n).all()


def test_wrong_input_shape_is_one_line(llama_art):
    from loopify.errors import LoopifyError

    _, inputs, path = llama_art
    with pytest.raises(LoopifyError, match="input 0") as e:
        rt.load(path)(inputs[0][:, :4], inputs[1])
    assert "\n" not in str(e.value)


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _refused(path, match):
    with pytest.raises(ArtifactError, match=match) as e:
        rt.load(path)
    assert "\n" not in str(e.value)


def test_flipped_byte_in_params_is_refused(llama_art, tmp_path):
    p = _copy(llama_art[2], tmp_path)
    data = bytearray((p / "params.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (p / "params.safetensors").write_bytes(bytes(data))
    _refused(p, "params.safetensors is corrupt")


def test_truncated_library_is_refused(llama_art, tmp_path):
    p = _copy(llama_art[2], tmp_path)
    lib = p / "lib.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    _refused(p, "lib.so is corrupt")


def test_missing_manifest_is_refused(llama_art, tmp_path):
    p = _copy(llama_art[2], tmp_path)
    (p / "manifest.json").unlink()
    _refused(p, "no manifest.json")


def test_missing_file_is_refused(llama_art, tmp_path):
    p = _copy(llama_art[2], tmp_path)
    (p / "params.safetensors").unlink()
    _refused(p, "missing")


def test_other_version_is_refused(llama_art, tmp_path):
    p = _copy(llama_art[2], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["version"] = 99
    (p / "manifest.json").write_text(json.dumps(m))
    _refused(p, "version 99")


def test_not_a_directory_is_refused(tmp_path):
    _refused(tmp_path / "nothing-here", "not an artifact directory")


def _retarget(path, tmp_path, target, name):
    p = _copy(path, tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["target"], m["target_name"] = target, name
    (p / "manifest.json").write_text(json.dumps(m))
    return p


def test_arm64_artifact_on_x86_says_so(llama_art, tmp_path):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("checks the x86 host case")
    p = _retarget(llama_art[2], tmp_path, {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "arm64")
    _refused(p, "built for arm64")


def test_cuda_artifact_without_gpu_says_so(llama_art, tmp_path):
    import tvm

    if tvm.runtime.cuda(0).exist:
        pytest.skip("a GPU is present")
    p = _retarget(llama_art[2], tmp_path, {"kind": "cuda", "arch": "sm_90"}, "cuda")
    _refused(p, "no CUDA GPU")


def test_cpu_without_needed_features_says_so(llama_art, tmp_path):
    p = _copy(llama_art[2], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["requires_cpu_flags"] = ["avx2", "imaginary_feature_x"]
    (p / "manifest.json").write_text(json.dumps(m))
    _refused(p, "imaginary_feature_x")


def test_rewrite_is_atomic(llama_art, tmp_path):
    # A failing build leaves neither a half-written artifact nor temporary directories behind.
    from loopify import artifact

    def boom(tmp):
        (tmp / "lib.so").write_bytes(b"x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        artifact.write(tmp_path / "art", boom, {})
    assert list(tmp_path.iterdir()) == []


def test_runtime_imports_no_compiler_machinery():
    import subprocess
    import sys

    code = ("import sys, loopify.runtime; "
            "bad = [m for m in sys.modules if m.startswith(('loopify.passes', 'loopify.backends', "
            "'loopify.capture', 'tvm', 'torch._export'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
