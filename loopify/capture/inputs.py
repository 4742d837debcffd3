"""Example inputs: files the user gives, and the dummy inputs made for Hugging Face models.

Every input is made because the model's forward takes it (a model is not assumed to read
tokens); images without image tokens, audio, decoder tokens and the layout inputs of images
follow :mod:`loopify.capture.modalities`. Input conventions for text and vision-language models
(the only model-family knowledge here; everything else is read from the config or from the
model's forward signature):

====================  =======================================================================
input                 rule
====================  =======================================================================
input_ids             BOS (when the text config has one) + random ids drawn with a fixed seed
                      from the vocabulary minus every ``*_token_id`` / ``*_token_index`` of the
                      config. A directory with a tokenizer and no vision tower gets a real
                      English sentence instead. Default text length: 24 tokens.
attention_mask        always with token ids, all ones.
token_type_ids        when the forward takes them: zeros, except for the prefix-LM families in
                      ``_PREFIX_LM`` (PaliGemma) where image + prompt are the prefix (0) and the
                      last third of the text is the suffix (1), as the PaliGemma processor
                      writes them.
mm_token_type_ids     when the forward takes them (vision-language models): 1 at the image
                      tokens, 0 elsewhere, as the processors write them.
pixel_values          for models with a ``vision_config`` and an image token: one image of the
                      vision tower's ``image_size`` (``num_channels`` channels), values in
                      [-1, 1], fixed seed; 5-D (batch, images, C, H, W) for ``_PIXELS_5D``;
                      through the family's image processor when the forward takes layout
                      inputs (``image_sizes``, ``image_grid_thw``).
image tokens          exactly as many image tokens as the model consumes, after BOS and a
                      short text prefix (``_IMAGE_FIRST`` families: first, before BOS). The
                      count comes from the config (``_image_token_count``) and is checked
                      against ``model.get_image_features`` and by one eager forward.
====================  =======================================================================
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from loopify.capture import modalities, varlen
from loopify.errors import CaptureError

DEFAULT_TEXT_LEN = 24
SENTENCE = ("The quick brown fox jumps over the lazy dog, and loopify folds the repeated layers "
            "of a transformer into a loop with shared weights.")

# Families whose inputs follow a convention the config does not spell out (see module doc).
_PREFIX_LM = {"paligemma"}           # token_type_ids: 0 = prefix (image + prompt), 1 = suffix
_IMAGE_FIRST = {"paligemma"}         # image tokens come first, then BOS and the prompt
_PIXELS_5D = {"idefics2", "idefics3", "smolvlm"}  # pixel_values: (batch, images, C, H, W)
_CLS_TOWERS = {"clip_vision_model"}  # vision towers that prepend a class token to the patches


class InputsError(CaptureError):
    """Example inputs cannot be read or made."""


def load_inputs(path: str | Path) -> tuple[tuple, dict]:
    """Load example inputs saved with ``torch.save``: a tuple/list of tensors or a dict of them.

    Loaded with ``weights_only=True``: an inputs file never runs code.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"{path}: inputs file not found")
    if path.stat().st_size == 0:
        raise CaptureError(f"{path}: inputs file is empty")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"{path}: inputs file holds objects other than tensors; refusing to unpickle it ({first[:120]})") from None
    except Exception as e:  # truncated zip, wrong format ...
        raise CaptureError(f"{path}: cannot read inputs file ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if isinstance(obj, torch.Tensor):
        return (obj,), {}
    if isinstance(obj, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in obj):
        return tuple(obj), {}
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return (), dict(obj)
    raise CaptureError(f"{path}: inputs file must hold a tensor, a tuple/list of tensors or a dict name -> tensor, got {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# Dummy inputs for Hugging Face models


def text_config(config):
    try:
        return config.get_text_config()
    except Exception:
        return getattr(config, "text_config", None) or config


def special_ids(config) -> set[int]:
    """Every ``*_token_id`` / ``*_token_index`` / ``*_token_ids`` of a config (object or dict), nested too."""
    ids: set[int] = set()

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(k, str) and k.endswith(("_token_id", "_token_index", "_token_ids")):
                for x in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(x, int) and not isinstance(x, bool):
                        ids.add(x)

    walk(config if isinstance(config, dict) else config.to_dict())
    return ids


def _image_size(vc) -> tuple[int, int]:
    s = getattr(vc, "image_size", 224)
    return (int(s[0]), int(s[1])) if isinstance(s, (list, tuple)) else (int(s), int(s))


def _image_token_count(config, model_type: str) -> int | None:
    """Image tokens one image becomes, from the config alone (checked against the model later).

    Rules, first match wins: PaliGemma-style ``text_config.num_image_tokens``; Idefics3's
    pixel shuffle (patches / scale_factor**2); LLaVA-style ``vision_feature_select_strategy``
    (patches, plus the class token of CLIP towers, minus one for "default"); else
    ``image_seq_length`` / ``num_image_tokens`` / ``mm_tokens_per_image``; else the patch count.
    """
    vc = getattr(config, "vision_config", None)
    if vc is None:
        return None
    h, w = _image_size(vc)
    ps = getattr(vc, "patch_size", None)
    ps = ps[0] if isinstance(ps, (list, tuple)) else ps
    patches = (h // ps) * (w // ps) if ps else None
    tc = text_config(config)
    if getattr(tc, "num_image_tokens", None):
        return int(tc.num_image_tokens)
    if getattr(config, "scale_factor", None) and patches:
        return int(patches // (config.scale_factor ** 2))
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if strategy is not None and patches:
        tower = patches + (1 if getattr(vc, "model_type", "") in _CLS_TOWERS else 0)
        return tower - 1 if strategy == "default" else tower
    for key in ("image_seq_length", "num_image_tokens", "mm_tokens_per_image"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return patches


def _measured_image_tokens(model, pixels: dict, batch: int = 1) -> int | None:
    """Image tokens one image becomes, as the model's own ``get_image_features`` makes them from
    ``pixels`` (pixel values of ``batch`` images and their layout inputs); None if it has none."""
    import inspect

    fn = getattr(model, "get_image_features", None) or getattr(getattr(model, "model", None), "get_image_features", None)
    if fn is None:
        return None
    try:
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in pixels.items() if k in params or k == "pixel_values"}
        if set(kw) == {"pixel_values"} and batch > 1:  # plain pixels: the first image alone
            kw, batch = {"pixel_values": kw["pixel_values"][:1]}, 1
        with torch.no_grad():
            feats = fn(**kw)
    except Exception:
        return None
    if isinstance(feats, dict):  # ModelOutput: features are the pooler_output
        feats = feats.get("pooler_output", None)
        if feats is None:
            return None
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    try:
        return int(sum(f.numel() // f.shape[-1] for f in feats)) // batch
    except Exception:
        return None


def _random_ids(n: int, vocab: int, avoid: set[int], gen: torch.Generator) -> torch.Tensor:
    allowed = torch.tensor([i for i in range(vocab) if i not in avoid], dtype=torch.long)
    return allowed[torch.randint(0, len(allowed), (n,), generator=gen)]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def has_tokenizer(path: Path) -> bool:
    """Whether a directory holds tokenizer files."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def _batch_texts(batch: int) -> list[str]:
    """``batch`` different real sentences, the first being SENTENCE (so batch 1 is unchanged)."""
    if batch == 1:
        return [SENTENCE]
    from loopify import texts

    try:
        pool = [t for t in texts.sentences(min_words=12) if t != SENTENCE]
    except Exception:  # noqa: BLE001 - no licence texts on this system
        pool = []
    pool = pool or [f"{SENTENCE} ({i})" for i in range(batch)]
    return [SENTENCE] + [pool[i % len(pool)] for i in range(batch - 1)]


def image_token_id_of(config) -> int | None:
    """The image token of a vision-language config (``image_token_id`` or ``image_token_index``)."""
    tid = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if tid is None else tid


def make_inputs(path: Path, model, config, model_type: str, fwd_params: list[str], seq_len: int | None,
                info: dict, batch: int = 1, tokenizer=None, verify: bool = True) -> tuple[dict[str, torch.Tensor], int | None]:
    """Example keyword inputs for ``model`` and its image token id (None for text-only models);
    ``info`` receives what was made (modalities, lengths, image token counts ...).

    Each input is built because the forward takes it (tokens, images, audio, decoder tokens; see
    :mod:`loopify.capture.modalities`), never because a model is assumed to read tokens; what
    cannot be built is named in the error with ``--inputs FILE`` as the way out.

    ``tokenizer``: the model's tokenizer when it has one (else one is loaded from ``path``);
    ``verify``: check precomputed layout inputs against the plain forward (off for a model whose
    weights are not loaded yet)."""
    from loopify.capture.hf import HFLoadError

    image_token_id = image_token_id_of(config)
    vc = getattr(config, "vision_config", None)
    is_vlm = vc is not None and image_token_id is not None and "pixel_values" in fwd_params
    vocab = _vocab(config)
    dtype = next(model.parameters()).dtype
    inputs: dict[str, torch.Tensor] = {}
    modalities_ = []
    if "input_ids" in fwd_params and vocab:
        modalities_.append("text")
        if not is_vlm and (tokenizer is not None or has_tokenizer(path)):
            inputs.update(tokenizer_inputs(path, fwd_params, seq_len, info, batch, tokenizer))
        else:
            _text_inputs(path, model, config, model_type, fwd_params, seq_len, info, batch, is_vlm,
                         image_token_id, inputs)
    if "pixel_values" in fwd_params and "pixel_values" not in inputs:
        inputs.update(_pixels(path, model, config, model_type, fwd_params, batch))
        if "pixel_values" in inputs:
            info["image_size"] = list(inputs["pixel_values"].shape[-2:])
    if "pixel_values" in inputs:
        modalities_.append("image")
    audio = modalities.audio_inputs(config, fwd_params, batch, dtype)
    if audio:
        modalities_.append("audio")
        inputs.update(audio)
    inputs.update(modalities.decoder_inputs(config, fwd_params, batch, vocab, special_ids(config)))
    try:  # packed vision encoders: their layout computed here, not in the program
        layout = varlen.precompute_layout(model, inputs, verify)
    except ValueError as e:
        raise HFLoadError(f"{path}: {e}") from None
    if layout:
        info["precomputed_layout"] = sorted(layout)
        inputs.update(layout)
    info["modalities"] = modalities_
    info["batch"] = int(batch)
    lacking = modalities.missing(model, fwd_params, inputs)
    if lacking:
        why = {"input_ids": "the config gives no vocab_size", "pixel_values": "the config gives no image_size"}
        detail = "; ".join(f"{n} ({why[n]})" if n in why else n for n in lacking)
        raise HFLoadError(f"{path}: cannot build the example input(s) {detail} of {type(model).__name__}; "
                          "pass them with --inputs FILE (a torch.save'd dict name -> tensor)")
    return _ordered(inputs, fwd_params), (int(image_token_id) if is_vlm and "input_ids" in inputs else None)


def _vocab(config) -> int:
    tc = text_config(config)
    return int(getattr(tc, "vocab_size", 0) or getattr(config, "vocab_size", 0) or 0)


def _text_inputs(path: Path, model, config, model_type: str, fwd_params, seq_len, info: dict, batch: int,
                 is_vlm: bool, image_token_id, inputs: dict) -> None:
    """Random token ids (with the image tokens of a vision-language model), the attention mask
    and token type ids, put into ``inputs``."""
    rows, bos = _token_rows(path, config, seq_len or DEFAULT_TEXT_LEN, batch)
    info["text"] = "random ids (seed 0)"
    if is_vlm:
        prefix_len = _image_inputs(path, model, config, model_type, rows, bos, int(image_token_id), batch,
                                   fwd_params, inputs, info)
    else:
        inputs["input_ids"] = torch.stack(rows)
        prefix_len = len(rows[0])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if is_vlm and "mm_token_type_ids" in fwd_params:  # as processors make them: 1 at image tokens
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == int(image_token_id)).long()
    if "token_type_ids" in fwd_params:
        tti = torch.zeros_like(inputs["input_ids"])
        if model_type in _PREFIX_LM:
            tti[:, prefix_len:] = 1
            info["prefix_len"] = int(prefix_len)
        inputs["token_type_ids"] = tti
    info["seq_len"] = int(inputs["input_ids"].shape[-1])
    info["text_len"] = int(len(rows[0]))


def load_tokenizer(path: Path):
    """The directory's own tokenizer (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenizer_inputs(path: Path, fwd_params: list[str], seq_len: int | None, info: dict, batch: int,
                     tokenizer=None) -> dict[str, torch.Tensor]:
    """A real English sentence (per row) through the model's tokenizer."""
    from loopify.capture.hf import HFLoadError, one_line

    try:
        tok = tokenizer if tokenizer is not None else load_tokenizer(path)
        texts_ = [t if seq_len is None else " ".join([t] * (seq_len // 8 + 1)) for t in _batch_texts(batch)]
        enc = tok(texts_[0], return_tensors="pt", truncation=seq_len is not None, max_length=seq_len)
        if batch > 1:  # every row at the first row's length: padded (masked) or truncated
            n = int(enc["input_ids"].shape[-1])
            if getattr(tok, "pad_token", None) is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            enc = tok(texts_, return_tensors="pt", padding="max_length", truncation=True, max_length=n)
    except Exception as e:
        raise HFLoadError(f"{path}: its tokenizer fails ({type(e).__name__}: {one_line(e)})") from None
    inputs = {k: v for k, v in enc.items() if k in fwd_params}
    if batch == 1 or "attention_mask" not in enc:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    else:
        inputs["attention_mask"] = enc["attention_mask"]
    if "token_type_ids" in fwd_params and "token_type_ids" not in inputs:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    info["text"] = "tokenizer"
    info["seq_len"] = int(inputs["input_ids"].shape[-1])
    info["batch"] = int(batch)
    return _ordered(inputs, fwd_params)


def _token_rows(path: Path, config, n_text: int, batch: int) -> tuple[list[torch.Tensor], int | None]:
    """``batch`` rows of BOS + random ids (fixed seed) avoiding every special id; row 0 is what
    batch 1 gets."""
    from loopify.capture.hf import HFLoadError

    tc = text_config(config)
    vocab = int(getattr(tc, "vocab_size", 0) or getattr(config, "vocab_size", 0) or 0)
    if not vocab:
        raise HFLoadError(f"{path}: the config gives no vocab_size; cannot build example token ids")
    avoid = special_ids(config)
    bos = getattr(tc, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    bos = bos if isinstance(bos, int) and 0 <= bos < vocab else None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        body = _random_ids(n_text - (1 if bos is not None else 0), vocab, avoid, gen)
        rows.append(torch.cat([torch.tensor([bos]), body]) if bos is not None else body)
    return rows, bos


def _image_inputs(path: Path, model, config, model_type: str, rows: list, bos, image_token_id: int, batch: int,
                  fwd_params, inputs: dict, info: dict) -> int:
    """Pixel values of one image per row and exactly as many image tokens as the model consumes,
    put into ``inputs``; returns the prefix length (prefix-LM families)."""
    from loopify.capture.hf import HFLoadError

    pixels = _pixels(path, model, config, model_type, fwd_params, batch)
    if not pixels:
        raise HFLoadError(f"{path}: cannot build pixel_values (the vision config gives no image_size); "
                          "pass the inputs with --inputs FILE")
    h, w = (int(x) for x in pixels["pixel_values"].shape[-2:])
    from_config = _image_token_count(config, model_type)
    measured = _measured_image_tokens(model, pixels, batch)
    n_img = measured if measured is not None else from_config
    if n_img is None:
        raise HFLoadError(f"{path}: cannot tell how many image tokens an image becomes for {model_type}")
    info.update(image_tokens_from_config=from_config, image_tokens_measured=measured, num_image_tokens=int(n_img),
                image_size=[h, w])
    img = torch.full((n_img,), image_token_id, dtype=torch.long)
    text = rows[0]
    if model_type in _IMAGE_FIRST:
        all_ids = [torch.cat([img, t]) for t in rows]
        prefix_len = n_img + max(1, (2 * len(text)) // 3)
    else:
        k = min(len(text), 1 + (1 if bos is not None else 0) + 2)  # BOS + a few prompt tokens
        all_ids = [torch.cat([t[:k], img, t[k:]]) for t in rows]
        prefix_len = len(all_ids[0])
    ids = all_ids[0]
    inputs["input_ids"] = torch.stack(all_ids)
    inputs.update(pixels)
    where = (ids == image_token_id).nonzero()
    info["image_token_positions"] = [int(where[0]), int(where[-1])]
    return prefix_len


def _pixels(path: Path, model, config, model_type: str, fwd_params, batch: int) -> dict[str, torch.Tensor]:
    """Pixel values of ``batch`` images (with their layout inputs when the forward takes them, see
    :mod:`loopify.capture.modalities`) in the model's dtype; empty when none can be made."""
    from loopify.capture.hf import HFLoadError

    dtype = next(model.parameters()).dtype
    pixels = {}
    if modalities.needs_processor(fwd_params):
        # Only families whose processor makes layout inputs need it (LLaVA's forward names
        # image_sizes but its processor makes none: plain pixels, as before).
        try:
            pixels = modalities.processor_pixels(path, config, model_type, fwd_params, batch)
        except HFLoadError:
            pixels = {}
        if not any(k in pixels for k in modalities.IMAGE_LAYOUT_INPUTS):
            pixels = {}
    if not pixels:
        pixels = {"pixel_values": modalities.plain_pixels(config, batch, dtype, model_type in _PIXELS_5D)}
    if pixels.get("pixel_values") is None:
        return {}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in pixels.items()}


def _ordered(inputs: dict, fwd_params: list[str]) -> dict:
    order = {n: i for i, n in enumerate(fwd_params)}
    return dict(sorted(inputs.items(), key=lambda kv: order.get(kv[0], len(order))))




def image_first(model_type: str) -> bool:
    """Whether the family puts the image tokens before BOS and the prompt (PaliGemma)."""
    return model_type in _IMAGE_FIRST


class ImageReader:
    """Images to pixel values of a model's input shape: through the directory's image processor
    when it has one (``preprocessor_config.json``), else resized to the input size and scaled to
    [-1, 1] (the note says so)."""

    def __init__(self, source: Path | None):
        self.source = Path(source) if source is not None else None
        self.proc = None

    def pixels(self, path: Path, like: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        try:
            from PIL import Image
        except ImportError:
            raise InputsError(f"{path}: reading images needs Pillow (pip install pillow)") from None
        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise InputsError(f"{path}: cannot read the image ({type(e).__name__})") from None
        h, w = like.shape[-2:]
        if self.proc is None and self.source is not None and (self.source / "preprocessor_config.json").is_file():
            try:
                from transformers import AutoImageProcessor

                self.proc = AutoImageProcessor.from_pretrained(str(self.source), local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise InputsError(f"{self.source}: cannot load its image processor ({type(e).__name__})") from None
        if self.proc is not None:
            px = self.proc(images=img, return_tensors="pt")["pixel_values"]
            if px.numel() != like.numel():
                raise InputsError(f"{path}: the image processor makes pixel values of shape {tuple(px.shape)}, the "
                                  f"model takes {tuple(like.shape)}")
            return px.reshape(like.shape).to(like.dtype), None
        img = img.resize((int(w), int(h)), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(int(h), int(w), 3)
        x = x.permute(2, 0, 1).float() / 127.5 - 1
        ch = like.shape[-3]
        if ch != 3:
            x = x.mean(0, keepdim=True).expand(ch, -1, -1)
        note = f"no image processor in {self.source}: images resized to {h}x{w} and scaled to [-1, 1]"
        return x.reshape(like.shape).to(like.dtype), note
