"""Example inputs other than text tokens, made from what a model's forward takes.

A model is not assumed to read tokens: each input its forward signature names is built by a rule
keyed on that name (Hugging Face's conventions), from the config:

=======================  ===================================================================
input                    rule
=======================  ===================================================================
pixel_values             one image per row of the (vision) config's ``image_size`` and
                         ``num_channels``, values in [-1, 1], fixed seed (vision-only models,
                         dual encoders such as CLIP, and vision-language models).
image_sizes,             describe an image's layout (tiles, patch grid, images per sample),
image_grid_thw,          which only the family's image processor knows how to make: the
batch_num_images         pixels then come from that processor, its settings (size, patch
                         size, merge size, tile pinpoints) taken from the config, or from
                         the directory's own
                         ``preprocessor_config.json`` -- when that processor makes them (LLaVA's
                         forward names ``image_sizes``, its processor makes none: plain pixels).
input_features           log-mel features ``(batch, num_mel_bins, frames)``; frames are twice
                         ``max_source_positions`` (a stride-2 convolution front end) when the
                         config gives it, else 64.
input_values             raw audio ``(batch, 3200)`` samples (a convolutional feature encoder).
decoder_input_ids        encoder-decoders: the decoder start token, then random ids (8 tokens),
                         with an all-ones ``decoder_attention_mask`` when the forward takes one.
=======================  ===================================================================

What no rule can build is named with a way out (``--inputs FILE``): :func:`missing`.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Inputs that describe an image's layout: only the family's image processor makes them.
IMAGE_LAYOUT_INPUTS = ("image_sizes", "image_grid_thw", "batch_num_images")
#: Inputs a model reads as data; the other forward parameters are options or alternatives.
DATA_INPUTS = ("input_ids", "pixel_values", "input_features", "input_values", "decoder_input_ids",
               *IMAGE_LAYOUT_INPUTS)
DECODER_LEN = 8
AUDIO_SAMPLES = 3200
PIXEL_SEED = 1


def vision_config(config):
    """The config that describes images: ``vision_config`` when there is one, else the config."""
    vc = getattr(config, "vision_config", None)
    return vc if vc is not None else config


def image_size(config) -> tuple[int, int] | None:
    """(height, width) of the images a (vision) config takes, or None when it names none."""
    s = getattr(vision_config(config), "image_size", None)
    if s is None:
        return None
    return (int(s[0]), int(s[1])) if isinstance(s, (list, tuple)) else (int(s), int(s))


def plain_pixels(config, batch: int, dtype, five_d: bool = False) -> torch.Tensor | None:
    """``batch`` random images of the config's size (None when the config gives no size)."""
    hw = image_size(config)
    if hw is None:
        return None
    ch = int(getattr(vision_config(config), "num_channels", 3) or 3)
    shape = (batch, 1, ch, *hw) if five_d else (batch, ch, *hw)
    return (torch.rand(shape, generator=torch.Generator().manual_seed(PIXEL_SEED)) * 2 - 1).to(dtype)


def needs_processor(fwd_params) -> bool:
    """Whether the forward takes an image-layout input (then pixels come from the processor)."""
    return any(n in fwd_params for n in IMAGE_LAYOUT_INPUTS)


def processor_pixels(path: Path, config, model_type: str, fwd_params, batch: int) -> dict[str, torch.Tensor]:
    """Pixel values and their layout inputs for ``batch`` random images, made by the family's image
    processor (the directory's own, else one set up from the config); keeps what the forward takes."""
    import numpy as np
    from PIL import Image

    proc = _image_processor(path, config, model_type)
    hw = image_size(config) or _default_side(config)
    rng = np.random.RandomState(PIXEL_SEED)
    images = [Image.fromarray((rng.rand(hw[0], hw[1], 3) * 255).astype("uint8")) for _ in range(batch)]
    out = proc(images=images, return_tensors="pt")
    return {k: v for k, v in out.items() if k in fwd_params and isinstance(v, torch.Tensor)}


def _default_side(config) -> tuple[int, int]:
    """An image side for configs without an image size: four merged patches across."""
    vc = vision_config(config)
    side = int(getattr(vc, "patch_size", 14) or 14) * int(getattr(vc, "spatial_merge_size", 1) or 1) * 4
    return side, side


def _image_processor(path: Path, config, model_type: str):
    from loopify.capture.hf import HFLoadError
    import transformers

    if (Path(path) / "preprocessor_config.json").is_file():
        return transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    names = names if isinstance(names, dict) else {"pil": names}
    cls = next((getattr(transformers, n, None) for n in (names.get("pil"), names.get("torchvision")) if n), None)
    if cls is None:
        raise HFLoadError(f"{path}: the forward takes {', '.join(IMAGE_LAYOUT_INPUTS)}-style image inputs and "
                          f"transformers has no image processor for {model_type!r}; pass the inputs with --inputs FILE")
    return cls(**_processor_settings(cls().to_dict(), config))


def _processor_settings(defaults: dict, config) -> dict:
    """A processor's size settings from the model's config: image size, patch size, merge size,
    temporal patch size and tile pinpoints, in the form of the processor's own defaults."""
    vc = vision_config(config)
    hw = image_size(config)

    def conf(name):
        return next((getattr(c, name) for c in (vc, config) if getattr(c, name, None) is not None), None)

    out = {}
    for k, v in defaults.items():
        if k in ("size", "crop_size") and isinstance(v, dict) and hw is not None:
            out[k] = {kk: hw[1] if kk == "width" else hw[0] for kk in v}
        elif k == "patch_size" and conf("patch_size") is not None:
            p = conf("patch_size")
            out[k] = {kk: p for kk in v} if isinstance(v, dict) else p
        elif k == "merge_size" and conf("spatial_merge_size") is not None:
            out[k] = conf("spatial_merge_size")
        elif k in ("temporal_patch_size", "image_grid_pinpoints") and conf(k) is not None:
            out[k] = conf(k)
    return out


def audio_inputs(config, fwd_params, batch: int, dtype) -> dict[str, torch.Tensor]:
    """Audio inputs the forward takes (log-mel features or raw samples), fixed seed."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    if "input_features" in fwd_params:
        mels = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None) or 80
        src = getattr(config, "max_source_positions", None)
        frames = 2 * int(src) if src else 64
        out["input_features"] = torch.randn((batch, int(mels), frames), generator=gen).to(dtype)
    elif "input_values" in fwd_params:
        out["input_values"] = torch.randn((batch, AUDIO_SAMPLES), generator=gen).to(dtype)
    return out


def decoder_inputs(config, fwd_params, batch: int, vocab: int, avoid: set[int]) -> dict[str, torch.Tensor]:
    """Encoder-decoders: decoder start token + random ids, and an all-ones decoder mask."""
    if "decoder_input_ids" not in fwd_params or not getattr(config, "is_encoder_decoder", False) or not vocab:
        return {}
    start = next((v for v in (getattr(config, k, None) for k in ("decoder_start_token_id", "pad_token_id",
                                                                  "bos_token_id")) if isinstance(v, int)), 0)
    gen = torch.Generator().manual_seed(3)
    allowed = torch.tensor([i for i in range(vocab) if i not in avoid], dtype=torch.long)
    body = allowed[torch.randint(0, len(allowed), (batch, DECODER_LEN - 1), generator=gen)]
    ids = torch.cat([torch.full((batch, 1), int(start) % vocab), body], dim=1)
    out = {"decoder_input_ids": ids}
    if "decoder_attention_mask" in fwd_params:
        out["decoder_attention_mask"] = torch.ones_like(ids)
    return out


def missing(model, fwd_params, inputs: dict) -> list[str]:
    """The data inputs the forward takes that were not built: required parameters and the
    model's main input (optional layout inputs are left to the model: LLaVA names
    ``image_sizes`` and never needs it)."""
    import inspect

    sig = inspect.signature(model.forward).parameters
    required = [n for n in fwd_params if sig[n].default is inspect.Parameter.empty and n != "kwargs"]
    main = getattr(model, "main_input_name", None)
    wanted = required + ([main] if main in fwd_params else [])
    return [n for n in dict.fromkeys(wanted) if n not in inputs]


def not_given(fwd_params, inputs: dict) -> list[str]:
    """Data inputs the forward could take that are not among ``inputs`` (for error messages)."""
    return [n for n in fwd_params if n in DATA_INPUTS and n not in inputs]
