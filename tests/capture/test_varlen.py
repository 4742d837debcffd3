"""Packed vision encoders (capture.varlen): the segmented attention as one masked SDPA.

Reference: attention computed per segment (what transformers' non-flash path does with
``torch.split(..., cu_seqlens.tolist())``), on segments of unequal lengths. Masked scores get
probability 0, so only the order of float32 sums changes: held to 1e-6 absolute on values of
size ~1 (measured ~1e-7).
"""

from __future__ import annotations

import torch

from loopify.capture.varlen import VARLEN_ATTENTION, packed_encoder, same_segment, varlen_sdpa


class _Attn(torch.nn.Module):
    is_causal = False
    num_key_value_groups = 1
    training = False


def _per_segment(q, k, v, cu):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]))
    return torch.cat(outs, dim=2)


def test_same_segment_is_block_diagonal():
    cu = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    m = same_segment(cu, cu, 7, 7)
    want = torch.block_diag(torch.ones(3, 3), torch.ones(1, 1), torch.ones(3, 3)).bool()
    assert torch.equal(m, want)


def test_varlen_sdpa_equals_attention_per_segment():
    torch.manual_seed(0)
    cu = torch.tensor([0, 9, 12, 15, 16], dtype=torch.int32)  # windows of 9, 3, 3 and 1
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))
    got, _ = varlen_sdpa(_Attn(), q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9,
                         scaling=8 ** -0.5, dropout=0.0, is_causal=False)
    want = _per_segment(q, k, v, cu).transpose(1, 2)  # transformers returns (batch, seq, heads, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_varlen_sdpa_exports_without_data_dependent_sizes():
    """The segment bounds are an input: the program has no item() and runs other bounds too."""
    class M(torch.nn.Module):
        def forward(self, q, cu):
            return varlen_sdpa(_Attn(), q, q, q, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.5)[0]

    q = torch.randn(1, 2, 6, 4)
    ep = torch.export.export(M(), (q, torch.tensor([0, 2, 6], dtype=torch.int32)), strict=False)
    assert not [n for n in ep.graph.nodes if "item" in str(n.target)]
    other = torch.tensor([0, 5, 6], dtype=torch.int32)
    torch.testing.assert_close(ep.module()(q, other), _per_segment(q, q, q, other).transpose(1, 2), rtol=0, atol=1e-6)


def test_models_without_packed_encoders_are_left_alone():
    from tests.tiny import build

    assert VARLEN_ATTENTION.startswith("loopify_flash")  # transformers routes names with "flash" by segments
    assert packed_encoder(build("LlavaForConditionalGeneration", layers=1), "image") is None
    assert packed_encoder(build("Qwen2_5_VLForConditionalGeneration", layers=1), "image") is not None


def test_inputs_file_of_processor_outputs_gets_the_layout(tmp_path):
    """--inputs with what a processor makes (no precomputed layout) exports as the dummy inputs
    do: the layout is added outside the program; the export matches eager exactly."""
    from loopify.capture import hf, load
    from tests.tiny import write_tiny

    d = write_tiny("Qwen2_5_VLForConditionalGeneration", tmp_path, layers=1)
    m = hf.load_hf_dir(d)
    plain = {k: v for k, v in m.inputs.items() if k not in m.info["precomputed_layout"]}
    assert "image_grid_thw" in plain and "image_cu_seqlens" not in plain
    torch.save(plain, tmp_path / "inputs.pt")
    cap = load(d, inputs=tmp_path / "inputs.pt")
    assert "image_cu_window_seqlens" in cap.kwargs and cap.export_check.max_abs_err == 0.0
