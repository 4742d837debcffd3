"""loopify.examples.zoo: HF directories, torch.export archives, stack paths, negative models."""
from __future__ import annotations

import collections
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from loopify.capture import hf
from loopify.examples import zoo

SMALL = zoo.names(include_large=False)
TINY_LIMIT = 5 * 2**20  # bytes: every random zoo model stays well under this


@pytest.fixture(scope="session")
def programs(written):
    loaded = {}

    def get(name):
        if name not in loaded:
            with open(written[name]["export"], "rb") as f:
                loaded[name] = torch.export.load(f)
        return loaded[name]

    return get


def _stacks(ep) -> dict[str, int]:
    """ModuleList-like stacks in the unflattened hierarchy: path -> number of numbered children."""
    counts = collections.Counter()
    for name, _ in torch.export.unflatten(ep).named_modules():
        m = re.match(r"^(.*)\.(\d+)$", name)
        if m:
            counts[m.group(1)] += 1
    return dict(counts)


def test_names_and_entries():
    assert set(zoo.names()) == set(zoo.ZOO)
    assert "bench-llama" in zoo.names() and "bench-llama" not in SMALL
    for want in ("llava-clip", "llava-siglip", "idefics3", "paligemma", "qwen2-vl-text", "llama", "qwen2",
                 "minilm", "nanogpt", "neg-mlp-width", "neg-alt-attn"):
        assert want in SMALL
    for e in zoo.ZOO.values():
        assert e.description and e.expected
        assert all(p.startswith("model.") for p in e.expected)
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("nope")


def test_write_zoo_writes_both_forms(written):
    assert set(written) == set(SMALL)
    for name, paths in written.items():
        d = paths["hf"]
        assert d.name == name and hf.is_hf_dir(d) and (d / "model.safetensors").is_file()
        assert paths["export"] == d.parent / f"{name}.pt" and paths["export"].is_file()
        if name != "minilm":
            assert (d / "model.safetensors").stat().st_size < TINY_LIMIT, name
    assert (written["minilm"]["hf"] / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", SMALL)
def test_export_archive_loads_and_runs(name, written, programs):
    ep = programs(name)
    assert ep.example_inputs is not None
    args, kwargs = ep.example_inputs
    m = zoo.load(name, written[name]["hf"])
    assert list(kwargs) == list(m.inputs)
    for k, v in m.inputs.items():
        assert torch.equal(kwargs[k], v)
    with torch.no_grad():
        out = ep.module()(*args, **kwargs)
        ref = m.module(**m.inputs)
    assert all(type(t) is torch.Tensor for t in out)
    scale = max(float(r.abs().max()) for r in ref)
    # float32 reordering only (see tests/test_hf.py); measured 0 for every entry
    assert max(float((r - o).abs().max()) for r, o in zip(ref, out)) <= 1e-4 * scale


@pytest.mark.parametrize("name", SMALL)
def test_expected_stacks(name, programs):
    ep = programs(name)
    assert _stacks(ep) == zoo.ZOO[name].expected
    # the same paths appear in the graph's nn_module_stack metadata, one per layer
    seen = collections.defaultdict(set)
    for node in ep.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            for stack in zoo.ZOO[name].expected:
                m = re.match(re.escape(stack) + r"\.(\d+)(\.|$)", path)
                if m:
                    seen[stack].add(int(m.group(1)))
    assert {k: len(v) for k, v in seen.items()} == zoo.ZOO[name].expected


@pytest.mark.parametrize("name", ["llama", "paligemma", "nanogpt"])
def test_build_is_deterministic(name):
    a, b = zoo.build(name).state_dict(), zoo.build(name).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_dir_roundtrip_weights(written):
    m = hf.load_hf_dir(written["llama"]["hf"])
    ref = zoo.build("llama").state_dict()
    got = m.module.model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_neg_mlp_width_layer_differs(written, programs):
    cfg = json.loads((written["neg-mlp-width"]["hf"] / "config.json").read_text())
    assert cfg["architectures"] == ["NanoGPT"] and cfg["mlp_widths"][2] != cfg["mlp_widths"][0]
    sd = programs("neg-mlp-width").state_dict
    widths = [sd[f"model.h.{i}.mlp.c_fc.weight"].shape[0] for i in range(6)]
    assert widths == [256, 256, 128, 256, 256, 256]


def test_neg_alt_attn_layers_see_different_masks(written, programs):
    cfg = json.loads((written["neg-alt-attn"]["hf"] / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "sliding_attention"] * 2
    ep = programs("neg-alt-attn")
    args, kwargs = ep.example_inputs
    assert cfg["sliding_window"] < kwargs["input_ids"].shape[-1]  # the window really cuts
    mask_of = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
            path = list(node.meta["nn_module_stack"].values())[-1][0]
            layer = int(re.search(r"layers\.(\d+)\.", path).group(1))
            mask_of[layer] = node.args[3] if len(node.args) > 3 else node.kwargs["attn_mask"]
    assert mask_of[0] is mask_of[2] and mask_of[1] is mask_of[3] and mask_of[0] is not mask_of[1]
    # and the two masks differ in value: evaluate them on the example inputs
    from loopify.graphs import record_values

    gm = ep.module()
    flat = [kwargs[p.name] if p.name in kwargs else None for p in gm.graph.find_nodes(op="placeholder")]
    values = record_values(gm, flat, {mask_of[0].name, mask_of[1].name})
    full, sliding = values[mask_of[0].name], values[mask_of[1].name]
    assert full.shape == sliding.shape and not torch.equal(full, sliding)


def test_nanogpt_has_six_identical_blocks(programs):
    sd = programs("nanogpt").state_dict
    shapes = [tuple((k.split(".", 3)[3], tuple(v.shape)) for k, v in sd.items() if k.startswith(f"model.h.{i}."))
              for i in range(6)]
    assert all(s == shapes[0] for s in shapes)


def test_bench_llama_size():
    e = zoo.ZOO["bench-llama"]
    assert e.large and e.seq_len == 128
    model = zoo.build("bench-llama")
    n = sum(p.numel() for p in model.parameters())
    assert n == 33_694_208  # ~33.7M
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == (8, 512, 1376, 8, 8, 8192)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LOOPIFY_SLOW"), reason="large model; set LOOPIFY_SLOW=1")
def test_bench_llama_export(tmp_path):
    paths = zoo.write_zoo(tmp_path, names=["bench-llama"])["bench-llama"]
    with open(paths["export"], "rb") as f:
        ep = torch.export.load(f)
    args, kwargs = ep.example_inputs
    assert kwargs["input_ids"].shape == (1, 128)
    assert _stacks(ep) == zoo.ZOO["bench-llama"].expected


def test_cli_writes_selected(tmp_path, capsys):
    assert zoo.main([str(tmp_path), "--only", "nanogpt"]) == 0
    assert hf.is_hf_dir(tmp_path / "nanogpt") and (tmp_path / "nanogpt.pt").is_file()
    assert "nanogpt" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nanogpt", "nanogpt.pt"]


def test_write_export_alone(tmp_path):
    p = zoo.write_export("qwen2-vl-text", tmp_path)
    assert p == tmp_path / "qwen2-vl-text.pt"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["qwen2-vl-text.pt"]  # no leftover HF dir
    with open(p, "rb") as f:
        ep = torch.export.load(f)
    args, kwargs = ep.example_inputs
    with torch.no_grad():
        (h,) = ep.module()(*args, **kwargs)
    assert h.shape == (1, 24, 64)
