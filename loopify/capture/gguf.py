"""GGUF files (llama.cpp's format): dequantised to float32 through transformers' GGUF loader.

A ``.gguf`` file is a model wherever loopify takes one: its weights are dequantised (transformers
reads the GGUF tensors; the ``gguf`` package is needed), its tokenizer and chat template come from
the file. The architecture is written as a Hugging Face config (quantisation settings removed:
the weights are float32 now) with the tokenizer files into a directory that the converted model
carries as its assets, so nothing reads the GGUF file again. Dequantising is slow (77 s for
SmolLM2-135M measured here): the example zoo writes the result once as a Hugging Face directory
(:func:`write_hf_dir`).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from loopify.capture.hf import HFLoadError, HFModel, finish_model, one_line
from loopify.errors import LoopifyError

MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _quiet_transformers():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def restore():
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    return restore


def read(path: Path, attn_implementation: str = "sdpa"):
    """(model in float32, tokenizer) of a GGUF file.

    Raises:
        HFLoadError: transformers or gguf missing, or a file they cannot read.
    """
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF files
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise HFLoadError(f"{path}: reading GGUF files needs the 'transformers' and 'gguf' packages "
                          f"(pip install 'loopify[hf]'; missing: {e.name})") from None
    restore = _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    except Exception as e:  # noqa: BLE001 - a GGUF transformers cannot read is one line
        raise HFLoadError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {one_line(e)})") from None
    finally:
        restore()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the weights are float32 now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval(), tok


def write_hf_dir(path: Path, out: Path) -> Path:
    """Write a GGUF file as a Hugging Face directory (config.json, float32 model.safetensors,
    tokenizer files, generation config)."""
    model, tok = read(path, "eager")
    plain = type(model)(model.config)  # a model transformers will save (the GGUF-loaded one refuses)
    plain.load_state_dict(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    restore = _quiet_transformers()
    try:
        plain.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    finally:
        restore()
    return out


def load(path: Path, *, seq_len: int | None = None, attn_implementation: str | None = None,
         batch: int | None = None) -> HFModel:
    """Load a GGUF file for export, with its config and tokenizer files in an assets directory
    (``info["assets_dir"]``, removed at exit) that a converted model copies."""
    impl = attn_implementation or "sdpa"
    model, tok = read(path, impl)
    assets = Path(tempfile.mkdtemp(prefix="loopify-gguf-"))
    atexit.register(shutil.rmtree, assets, ignore_errors=True)
    model.config.save_pretrained(str(assets))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(assets))
    tok.save_pretrained(str(assets))
    arch = type(model).__name__
    info = {"assets_dir": str(assets), "gguf": path.name}
    return finish_model(assets, arch, model, seq_len, attn_implementation, batch or 1, tokenizer=tok, info=info)


def write_float_copy(src: Path, dst: Path, dtype: str = "f32") -> Path:
    """Write ``src`` (a quantised GGUF) as a float GGUF with the same metadata and the same
    weights dequantised: a llama.cpp model of equal precision to loopify's float32 one (``f16``:
    matrices in float16, vectors stay float32 as llama.cpp wants them)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    if dtype not in ("f32", "f16"):
        raise LoopifyError(f"GGUF float copy: dtype f32 or f16, not {dtype!r}")
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = 0 if dtype == "f32" else 1  # LLAMA_FTYPE_ALL_F32 / MOSTLY_F16
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        arr = np.asarray(dequantize(t.data, GGMLQuantizationType(t.tensor_type)), dtype=np.float32)
        writer.add_tensor(t.name, arr.astype(np.float16) if dtype == "f16" and arr.ndim > 1 else arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
