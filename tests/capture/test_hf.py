"""loopify.capture.hf: loading Hugging Face directories for export (zoo models as fixtures)."""
from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from loopify.capture import hf, masks
from loopify.examples import zoo

SMALL = zoo.names(include_large=False)
VLMS = [n for n in SMALL if "vlm" in zoo.ZOO[n].tags]

# Export vs eager: the exported program runs the same aten ops on the same float32 weights; the
# only admissible difference is float32 rounding from a different op order or fusion, which
# stays orders of magnitude below 1e-4 of the output's scale (measured: exactly 0 for every
# zoo model). A semantic difference (the PaliGemma mask bug) is ~0.1 of the scale.
EXPORT_RTOL = 1e-4


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_zoo")


@pytest.fixture(scope="session")
def hf_dir(zoo_dir):
    written = {}

    def get(name):
        if name not in written:
            written[name] = zoo.write_hf(name, zoo_dir)
        return written[name]

    return get


def _rel_err(ref, out) -> float:
    scale = max(float(r.abs().max()) for r in ref)
    err = max(float((r - o).abs().max()) for r, o in zip(ref, out))
    return err / max(scale, 1e-12)


def _export_and_compare(m: hf.HFModel):
    with torch.no_grad():
        ep = torch.export.export(m.module, (), dict(m.inputs), strict=False)
        ref = m.module(**m.inputs)
        out = ep.module()(**m.inputs)
    return ep, ref, out


@pytest.mark.parametrize("name", SMALL)
def test_zoo_model_loads_exports_and_matches_eager(name, hf_dir):
    d = hf_dir(name)
    assert hf.is_hf_dir(d)
    m = zoo.load(name, d)
    assert isinstance(m, hf.HFModel)
    assert isinstance(m.module.model, torch.nn.Module)  # exported paths start with "model."
    assert not m.module.training
    assert m.output_names and isinstance(m.output_names, list)
    assert "attention_mask" in m.inputs and bool((m.inputs["attention_mask"] == 1).all())
    assert m.attn_implementation in ("eager", "sdpa")
    assert m.architecture == json.loads((d / "config.json").read_text())["architectures"][0]

    ep, ref, out = _export_and_compare(m)
    assert type(ref) is tuple and len(ref) == len(m.output_names)
    assert all(type(t) is torch.Tensor for t in ref)  # plain tensors, never a ModelOutput
    assert all(type(t) is torch.Tensor for t in out)
    assert _rel_err(ref, out) <= EXPORT_RTOL, f"{name}: export differs from eager ({m.attn_implementation})"
    assert list(m.info["output_shapes"]) == m.output_names


@pytest.mark.parametrize("name", VLMS)
def test_vlm_image_tokens_match_what_the_model_consumes(name, hf_dir):
    m = zoo.load(name, hf_dir(name))
    n_in_ids = int((m.inputs["input_ids"] == m.image_token_id).sum())
    assert m.image_token_id is not None
    assert n_in_ids == m.info["num_image_tokens"] == zoo.ZOO[name].image_tokens
    # the config formula and the model's own image features agree
    assert m.info["image_tokens_from_config"] == m.info["image_tokens_measured"] == n_in_ids
    # one image token too many is refused by the model: the count is exact, not merely accepted
    ids = m.inputs["input_ids"].clone()
    first_text = int((ids[0] != m.image_token_id).nonzero()[-1])
    ids[0, first_text] = m.image_token_id
    with pytest.raises(Exception):
        with torch.no_grad():
            m.module(**{**m.inputs, "input_ids": ids})
    # pixel values have the vision tower's image size
    size = m.info["image_size"]
    assert list(m.inputs["pixel_values"].shape[-2:]) == size


def test_paligemma_prefix_lm_inputs_and_sdpa(hf_dir):
    m = zoo.load("paligemma", hf_dir("paligemma"))
    assert m.attn_implementation == "sdpa" and "attn_fallback" not in m.info
    tti = m.inputs["token_type_ids"][0]
    ids = m.inputs["input_ids"][0]
    n_img = m.info["num_image_tokens"]
    assert bool((ids[:n_img] == m.image_token_id).all())  # image first, then BOS + prompt
    assert bool((tti[: m.info["prefix_len"]] == 0).all()) and bool((tti[m.info["prefix_len"]:] == 1).all())
    assert 0 < int(tti.sum()) < len(tti) - n_img
    # Without token_type_ids the eager SDPA path skips the causal mask and attends over the
    # whole sequence (Gemma's is_causal=False), while export materialises it: the guard sees it.
    no_tti = {k: v for k, v in m.inputs.items() if k != "token_type_ids"}
    assert masks.mask_skip_changes_output(m.module, no_tti) > 1e-3
    assert masks.mask_skip_changes_output(m.module, m.inputs) == 0.0


def test_mask_guard_falls_back_to_eager_attention(hf_dir, monkeypatch):
    """If the inputs leave the SDPA mask-skip path unfaithful, load_hf_dir switches to eager."""
    real = hf.make_inputs

    def without_tti(*a, **k):
        inputs, image_token_id = real(*a, **k)
        inputs.pop("token_type_ids", None)
        return inputs, image_token_id

    monkeypatch.setattr(hf, "make_inputs", without_tti)
    m = hf.load_hf_dir(hf_dir("paligemma"))
    assert "token_type_ids" not in m.inputs
    assert m.attn_implementation == "eager" and "attn_fallback" in m.info
    _, ref, out = _export_and_compare(m)
    assert _rel_err(ref, out) <= EXPORT_RTOL


def test_explicit_attn_implementation_and_seq_len(hf_dir):
    m = hf.load_hf_dir(hf_dir("llama"), seq_len=11, attn_implementation="eager")
    assert m.attn_implementation == "eager"
    assert m.inputs["input_ids"].shape == (1, 11)
    assert list(m.inputs) == ["input_ids", "attention_mask"]  # forward order
    _, ref, out = _export_and_compare(m)
    assert _rel_err(ref, out) <= EXPORT_RTOL


@pytest.mark.parametrize("name", ["llava-clip", "minilm", "idefics3"])
def test_batch_rows_differ_and_row_zero_is_batch_one(name, hf_dir):
    # --batch B: B different examples (text and image), the first one what batch 1 gets; the
    # batched export must reproduce eager like batch 1 does.
    one = hf.load_hf_dir(hf_dir(name))
    m = hf.load_hf_dir(hf_dir(name), batch=3)
    assert m.info["batch"] == 3
    for k, v in m.inputs.items():
        assert v.shape[0] == 3 and v.shape[1:] == one.inputs[k].shape[1:], k
        assert torch.equal(v[:1], one.inputs[k]), k
    assert not torch.equal(m.inputs["input_ids"][0], m.inputs["input_ids"][1])
    if "pixel_values" in m.inputs:
        assert not torch.equal(m.inputs["pixel_values"][0], m.inputs["pixel_values"][1])
    _, ref, out = _export_and_compare(m)
    assert ref[0].shape[0] == 3
    assert _rel_err(ref, out) <= EXPORT_RTOL


def test_batch_of_a_registered_architecture_repeats_its_example(hf_dir):
    m = hf.load_hf_dir(hf_dir("nanogpt"), batch=2)
    ids = m.inputs["input_ids"]
    assert ids.shape[0] == 2 and torch.equal(ids[0], ids[1])


def test_batch_needs_a_hugging_face_directory(hf_dir, tmp_path):
    from loopify import capture

    path = zoo.write_export("llama", tmp_path)
    with pytest.raises(capture.CaptureError, match="batch size applies to the dummy inputs") as err:
        capture.load(path, batch=2)
    assert "\n" not in str(err.value)


def test_random_ids_avoid_special_tokens_and_are_deterministic(hf_dir):
    a = hf.load_hf_dir(hf_dir("llava-clip"))
    b = hf.load_hf_dir(hf_dir("llava-clip"))
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    assert torch.equal(a.inputs["pixel_values"], b.inputs["pixel_values"])
    ids = a.inputs["input_ids"][0]
    assert int(ids[0]) == 1  # BOS
    text = ids[(ids != a.image_token_id)][1:]
    assert not any(int(t) in (0, 1, 2, a.image_token_id) for t in text)


def test_minilm_uses_its_tokenizer(hf_dir):
    m = hf.load_hf_dir(hf_dir("minilm"))
    assert m.architecture == "BertModel" and m.info["text"] == "tokenizer"
    ids = m.inputs["input_ids"][0]
    assert int(ids[0]) == 101 and int(ids[-1]) == 102  # [CLS] ... [SEP]
    assert list(m.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert m.output_names == ["last_hidden_state", "pooler_output"]
    assert m.info["num_parameters"] == 22_713_216


def test_registered_architecture_nanogpt(hf_dir):
    cfg = json.loads((hf_dir("nanogpt") / "config.json").read_text())
    assert cfg["architectures"] == ["NanoGPT"]
    m = hf.load_hf_dir(hf_dir("nanogpt"))
    assert m.architecture == "NanoGPT" and m.output_names == ["logits"]
    ref = zoo.build("nanogpt")
    with torch.no_grad():
        assert torch.equal(m.module(**m.inputs)[0], ref(**m.inputs))


def test_a_seq_len_past_a_registered_models_maximum_is_refused(hf_dir):
    """nanoGPT's example builder clamps to its block_size: a longer --seq-len used to be captured
    silently at the clamp; it is refused, naming the maximum. A length within it is honoured."""
    d = hf_dir("nanogpt")
    block = json.loads((d / "config.json").read_text())["block_size"]
    with pytest.raises(hf.HFLoadError, match=f"--seq-len {block + 72}: NanoGPT takes at most {block} tokens"):
        hf.load_hf_dir(d, seq_len=block + 72)
    assert hf.load_hf_dir(d, seq_len=block - 4).inputs["input_ids"].shape[-1] == block - 4


def test_register_architecture_custom(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.lin = torch.nn.Linear(config["n"], config["n"])

        def forward(self, x, attention_mask=None):
            return self.lin(x), self.lin(x).sum(-1)

    from safetensors.torch import save_model

    hf.register_architecture("TinyTestNet", Tiny, lambda cfg, seq_len: {"x": torch.ones(1, cfg["n"])},
                             output_names=("y", "s"))
    try:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["TinyTestNet"], "n": 4}))
        save_model(Tiny({"n": 4}), str(tmp_path / "model.safetensors"))
        m = hf.load_hf_dir(tmp_path)
        assert m.output_names == ["y", "s"] and m.architecture == "TinyTestNet"
        assert len(m.module(**m.inputs)) == 2
    finally:
        hf._REGISTRY.pop("TinyTestNet")


# ------------------------------------------------------------------------------------------
# refusals: one line, naming the directory

def _err(path, **kw) -> str:
    with pytest.raises(hf.HFLoadError) as e:
        hf.load_hf_dir(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_no_config(tmp_path):
    assert not hf.is_hf_dir(tmp_path)
    assert "no config.json" in _err(tmp_path)
    assert "no such directory" in _err(tmp_path / "missing")


def test_error_unknown_architecture(hf_dir, tmp_path):
    d = _copy(hf_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _err(d)
    assert "unknown architecture" in msg and "FrobnicatorForCausalLM" in msg


def test_error_config_not_json(hf_dir, tmp_path):
    d = _copy(hf_dir("llama"), tmp_path / "m")
    (d / "config.json").write_text("{ this is not json")
    assert "not valid JSON" in _err(d)


def test_error_config_without_architectures(hf_dir, tmp_path):
    d = _copy(hf_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert "architectures" in _err(d)


def test_error_missing_weights(hf_dir, tmp_path):
    d = _copy(hf_dir("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert "no model.safetensors" in _err(d)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_error_truncated_weights(hf_dir, tmp_path, keep):
    d = _copy(hf_dir("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: max(4, int(len(data) * keep))])
    assert "truncated or corrupt" in _err(d)


# A config.json edit that no longer fits the weights (or is invalid) is refused in one line; the
# layer-count cases are refused from the safetensors header, before the model is built (issue 16,
# case 3).
@pytest.mark.parametrize("model, key, value, message", [
    ("llama", "intermediate_size", 96, "wrong shape"),
    ("llama", "hidden_size", "abc", "hidden_size"),
    ("llama", "num_hidden_layers", 5,
     "config.json says num_hidden_layers=5, but model.safetensors does not hold them"),
    ("nanogpt", "n_layer", 7, "config.json says n_layer=7, but model.safetensors does not hold them"),
])
def test_error_config_does_not_fit_weights(hf_dir, tmp_path, model, key, value, message):
    d = _copy(hf_dir(model), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    assert message in _err(d)


def test_moe_layers_dispatch_with_batched_mm(tmp_path):
    """Mixture-of-experts models are built with transformers' batched_mm expert dispatch (issue 15,
    class 6: grouped_mm's sort / histc / grouped matmul do not import into TVM). It computes the
    same sums as the default: within 1e-5 relative (float32 reordering only)."""
    from loopify.capture.hf import _transformers_class, _transformers_config
    from tests.tiny import write_tiny

    d = write_tiny("MixtralForCausalLM", tmp_path, layers=2)
    cls = _transformers_class(d, "MixtralForCausalLM")
    config = _transformers_config(d, "MixtralForCausalLM", cls)
    assert config._experts_implementation == "batched_mm"
    model = cls.from_pretrained(str(d), config=config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = model(input_ids=ids).logits
        model.set_experts_implementation("grouped_mm")
        grouped = model(input_ids=ids).logits
    assert float((batched - grouped).abs().max() / grouped.abs().max()) < 1e-5
