"""GGUF helpers: the float copy llama.cpp benchmarks at loopify's precision.

A tiny GGUF is written here with gguf-py (a Q8_0 matrix, a float32 vector, metadata); its float
copy must hold the same metadata (file type set to float32) and exactly the dequantised values:
dequantisation is deterministic, so the comparison is exact."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from loopify.capture.gguf import write_float_copy  # noqa: E402


def _tiny(path):
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_uint32("general.file_type", 7)  # MOSTLY_Q8_0
    w.add_string("general.name", "tiny")
    mat = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    q = quantize(mat, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return mat


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_float_copy_holds_the_dequantised_weights_and_the_metadata(tmp_path, dtype):
    from gguf.quants import dequantize

    src, dst = tmp_path / "q.gguf", tmp_path / "f.gguf"
    mat = _tiny(src)
    write_float_copy(src, dst, dtype)
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    assert b.fields["general.name"].contents() == "tiny" and b.fields["llama.block_count"].contents() == 1
    assert b.fields["general.file_type"].contents() == (0 if dtype == "f32" else 1)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    q = ta["blk.0.attn_q.weight"]
    want = dequantize(q.data, gguf.GGMLQuantizationType(q.tensor_type))
    got = tb["blk.0.attn_q.weight"]
    assert got.tensor_type == (gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.F16)
    np.testing.assert_array_equal(np.asarray(got.data, np.float32), want.astype(np.float16 if dtype == "f16" else np.float32))
    assert float(np.abs(want - mat).max()) < 0.05            # Q8_0 of N(0, 1): the copy is of the quantised weights
    assert tb["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32   # vectors stay float32
    np.testing.assert_array_equal(tb["blk.0.attn_norm.weight"].data, np.arange(64, dtype=np.float32))
