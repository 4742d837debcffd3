"""Tiny random configs of any Hugging Face architecture, made from its default config by rules on
field names (no per-family table): widths 64, MLPs 128, 4 heads (2 KV), head dim 16, vocabulary
512, 4 layers, 32x32 images of 8x8 patches, 4 experts (2 per token), short audio windows.

``tiny_config("ViTModel")`` gives the config object; ``write_tiny(arch, out_dir)`` writes a Hugging
Face directory (config.json + model.safetensors, fixed seed) that ``loopify`` reads. The sweep
(tests/bench/sweep.py) and the coverage tests build their models with it; overrides name fields
as in the config (``text_config.num_hidden_layers=8`` for a nested one).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

VOCAB = 512
LAYERS = 4

# field name -> value, applied at every level of a config (nested sub-configs too)
_SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "dim": 64, "embed_dim": 64, "projection_dim": 64,
    "out_hidden_size": 64, "text_embed_dim": 64, "vision_embed_dim": 64, "embedding_size": 32,
    "pooler_hidden_size": 64, "pooler_output_size": 64, "classifier_proj_size": 32, "projection_size": 64,
    "intermediate_size": 128, "ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "d_ff": 128,
    "n_inner": 128, "ffn_hidden_size": 128, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16, "d_kv": 16, "kv_lora_rank": 16,
    "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "vocab_size": VOCAB, "image_size": 32, "patch_size": 8, "num_mel_bins": 16, "max_source_positions": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
    "sliding_window": 8, "window_size": 4, "mm_tokens_per_image": 4, "image_seq_length": 16, "vision_feature_layer": -1, "num_hidden_groups": 1,
}
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                 "num_decoder_layers", "depth")
_POSITIONS = ("max_position_embeddings", "n_positions", "max_target_positions", "n_ctx")
# per-layer lists the config derives from the layer count again when they are absent
_PER_LAYER = ("layer_types", "no_rope_layers", "mlp_only_layers", "fullatt_block_indexes", "block_types",
              "out_features", "out_indices", "stage_names")


def _shrink(d: dict, layers: int) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
            out[k] = _shrink(v, layers)
        elif k in _PER_LAYER:
            continue
        elif k in _LAYER_COUNTS and isinstance(v, int):
            out[k] = layers
        elif k in _POSITIONS and isinstance(v, int):
            out[k] = min(v, 256)
        elif k in _SIZES and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[k] = _SIZES[k]
        elif k in ("depths",) and isinstance(v, list):
            out[k] = [2] * min(len(v), 2)
        elif k == "num_heads" and isinstance(v, list):
            out[k] = [2 * 2 ** i for i in range(min(len(v), 2))]
        elif k == "image_grid_pinpoints" and isinstance(v, list):
            out[k] = [[32, 32], [32, 64], [64, 32], [64, 64]]
        elif k in ("rope_parameters", "rope_scaling") and isinstance(v, dict):
            out[k] = _rope(v)
        else:
            out[k] = v
    if "depths" in out and "hidden_size" in out:  # hierarchical (Swin): the last stage's width, derived
        out.pop("hidden_size")
    if "depths" in out and isinstance(out.get("window_size"), int) and out.get("patch_size"):
        # each stage halves the patch grid: the window must fit the last stage's grid (a window
        # larger than it breaks the relative position bias, 4 vs 16 positions)
        last = (_SIZES["image_size"] // out["patch_size"]) >> (len(out["depths"]) - 1)
        out["window_size"] = max(1, min(out["window_size"], last))
    if "spatial_merge_size" in out and "window_size" in out:  # a window in pixels (Qwen2.5-VL), not patches
        out["window_size"] = 4 * _SIZES["patch_size"]
    return out


def _mrope(d: dict) -> None:
    """Models with (t, h, w) patch grids (``temporal_patch_size``) rotate by 3-D positions: their
    rope needs an ``mrope_section`` that fits the tiny head dim, whether or not the config names one."""
    def has_grid(x):
        return any(k == "temporal_patch_size" or (isinstance(v, dict) and has_grid(v)) for k, v in x.items())

    def walk(x):
        for k, v in x.items():
            if k in ("rope_parameters", "rope_scaling") and isinstance(v, dict) and "mrope_section" not in v:
                v["mrope_section"] = [2, 3, 3]
            elif isinstance(v, dict):
                walk(v)

    if has_grid(d):
        walk(d)


def _rope(r: dict) -> dict:
    """mrope sections (Qwen-VL) must add up to half the head dim (16 -> 8 frequencies)."""
    r = dict(r)
    sec = r.get("mrope_section")
    if isinstance(sec, list) and sum(sec):
        half = _SIZES["head_dim"] // 2
        new = [max(1, math.floor(s * half / sum(sec))) for s in sec]
        new[0] += half - sum(new)
        r["mrope_section"] = new
    return r


def _fix_token_ids(d: dict, vocab: int) -> None:
    """Special token ids past the tiny vocabulary move to its top end, each to its own id."""
    nxt = [vocab - 1]

    def walk(x):
        for k, v in list(x.items()):
            if isinstance(v, dict):
                walk(v)
            elif isinstance(k, str) and k.endswith(("_token_id", "_token_index")) and isinstance(v, int) \
                    and not isinstance(v, bool) and v >= vocab:
                x[k] = remap.setdefault(v, nxt[0])
                if x[k] == nxt[0]:
                    nxt[0] -= 1
            elif isinstance(k, str) and k.endswith("_token_id") and isinstance(v, list):
                x[k] = [remap.setdefault(i, i) if i < vocab else vocab - 2 for i in v if isinstance(i, int)]

    remap: dict[int, int] = {}
    walk(d)


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = value


def config_class(arch: str):
    import transformers

    return getattr(transformers, arch).config_class


def tiny_config(arch: str, layers: int = LAYERS, **overrides):
    """A tiny config for the transformers model class ``arch`` (see the module doc)."""
    cls = config_class(arch)
    d = {k: v for k, v in cls().to_dict().items() if k not in ("transformers_version", "architectures",
                                                                "_name_or_path", "id2label", "label2id")}
    d = _shrink(d, layers)
    _mrope(d)
    _fix_token_ids(d, VOCAB)
    for k, v in overrides.items():
        _set(d, k.replace("__", "."), v)
    cfg = cls(**d)
    cfg.architectures = [arch]
    return cfg


def build(arch: str, layers: int = LAYERS, seed: int = 0, **overrides):
    """The model class ``arch`` with a tiny config and random weights (fixed seed), eval mode."""
    import transformers

    cfg = tiny_config(arch, layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, arch)(cfg)
    return model.eval()


def write_tiny(arch: str, out_dir, layers: int = LAYERS, name: str | None = None, **overrides) -> Path:
    """Write ``out_dir/<name or arch>/`` as a Hugging Face directory of a tiny ``arch``."""
    import transformers

    d = Path(out_dir) / (name or arch)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model = build(arch, layers, **overrides)
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()
    try:
        model.save_pretrained(str(d))
    finally:
        if bars:
            transformers.logging.enable_progress_bar()
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("architectures") != [arch]:
        cfg["architectures"] = [arch]
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d
