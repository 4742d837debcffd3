"""Example inputs made from what a model's forward takes (loopify.capture.modalities), for
architectures that read no tokens, or more than tokens and images. Each model is a real
transformers class with a tiny random config (tests/tiny.py); capture must build its inputs,
export it, and match the eager model (EXPORT_RTOL as in test_hf.py: float32 reordering only)."""

from __future__ import annotations

import pytest
import torch

from loopify import capture
from loopify.capture import hf
from tests.tiny import write_tiny

EXPORT_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return lambda arch, **kw: write_tiny(arch, root, layers=2, **kw)


def _rel_err(ref, out) -> float:
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((r - o).abs().max()) for r, o in zip(ref, out)) / max(scale, 1e-12)


@pytest.mark.parametrize("arch, inputs", [
    ("ViTModel", {"pixel_values"}),
    ("CLIPVisionModel", {"pixel_values"}),
    ("SiglipVisionModel", {"pixel_values"}),
    ("CLIPModel", {"input_ids", "attention_mask", "pixel_values"}),           # both towers
    ("WhisperModel", {"input_features", "decoder_input_ids", "decoder_attention_mask"}),
    ("T5Model", {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}),
])
def test_inputs_from_the_forward_signature_export_exactly(tiny_dir, arch, inputs):
    m = hf.load_hf_dir(tiny_dir(arch))
    assert set(m.inputs) == inputs
    with torch.no_grad():
        ep = torch.export.export(m.module, (), dict(m.inputs), strict=False)
        ref, out = m.module(**m.inputs), ep.module()(**m.inputs)
    assert _rel_err(ref, out) <= EXPORT_RTOL


def test_vision_only_pixels_follow_the_config(tiny_dir):
    m = hf.load_hf_dir(tiny_dir("ViTModel", image_size=48, num_channels=2))
    assert tuple(m.inputs["pixel_values"].shape) == (1, 2, 48, 48)
    assert m.info["modalities"] == ["image"]


def test_image_layout_inputs_become_constants_of_the_program(tiny_dir):
    """LlavaNext's image_sizes is read as Python numbers (tile counts, unpadding): it is fixed
    in the wrapper's flags, like the input shapes, so that torch.export sees no data-dependent
    guard, and is no longer an input."""
    m = hf.load_hf_dir(tiny_dir("LlavaNextForConditionalGeneration"))
    assert "image_sizes" not in m.inputs and m.module.flags["image_sizes"] == [[32, 32]]
    c = capture.load(tiny_dir("LlavaNextForConditionalGeneration"))
    with torch.no_grad():
        assert _rel_err(c.run(), c.program.module()(*c.args, **c.kwargs)) <= EXPORT_RTOL


def test_an_input_that_cannot_be_built_is_named_with_the_way_out(tiny_dir):
    """A time-series model reads past values, which no rule builds: one line naming the input
    and --inputs, never a traceback from inside the model."""
    d = tiny_dir("TimeSeriesTransformerModel", prediction_length=4)
    with pytest.raises(hf.HFLoadError) as e:
        hf.load_hf_dir(d)
    msg = str(e.value)
    assert "\n" not in msg and "past_values" in msg and "--inputs FILE" in msg, msg
