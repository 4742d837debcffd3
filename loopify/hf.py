"""Load a Hugging Face model directory as an exportable module with example inputs.

``load_hf_dir(path)`` reads ``config.json``, builds the model class named in its
``"architectures"`` (looked up in ``transformers``, or in this module's small registry of
non-transformers architectures, see ``register_architecture``), loads ``model.safetensors``
with ``from_pretrained(..., local_files_only=True)``, and returns an ``HFModel``: an eval()
wrapper whose ``forward(**inputs)`` returns a tuple of plain tensors, plus example keyword
inputs built from the config (and from the directory's tokenizer, when it has one).

Input conventions (the only model-family knowledge here; everything else is read from the
config or from the model's forward signature):

====================  =======================================================================
input                 rule
====================  =======================================================================
input_ids             BOS (when the text config has one) + random ids drawn with a fixed seed
                      from the vocabulary minus every ``*_token_id`` / ``*_token_index`` of the
                      config. A directory with a tokenizer and no vision tower gets a real
                      English sentence instead. Default text length: 24 tokens.
attention_mask        always, all ones.
token_type_ids        when the forward takes them: zeros, except for the prefix-LM families in
                      ``_PREFIX_LM`` (PaliGemma) where image + prompt are the prefix (0) and the
                      last third of the text is the suffix (1), as the PaliGemma processor
                      writes them.
pixel_values          for models with a ``vision_config`` and an image token: one image of the
                      vision tower's ``image_size`` (``num_channels`` channels), values in
                      [-1, 1], fixed seed; 5-D (batch, images, C, H, W) for ``_PIXELS_5D``.
image tokens          exactly as many image tokens as the model consumes, after BOS and a
                      short text prefix (``_IMAGE_FIRST`` families: first, before BOS). The
                      count comes from the config (``_image_token_count``) and is checked
                      against ``model.get_image_features`` and by one eager forward.
====================  =======================================================================

Attention implementation and the PaliGemma finding
--------------------------------------------------
A tiny PaliGemma's torch.export program differed from its eager forward by ~0.17-0.19 max abs
with ``attn_implementation="sdpa"``. Cause (transformers 5.23, masking_utils): with SDPA and an
all-ones padding mask, ``create_causal_mask`` skips building the mask in eager mode
(``_ignore_causal_mask_sdpa`` returns True) and returns ``None``, trusting each attention
module's ``is_causal`` flag instead; but ``PaliGemmaConfig`` sets
``text_config.use_bidirectional_attention=True``, so the Gemma attention modules have
``is_causal=False`` and the eager model attends *bidirectionally over the whole sequence*
(text tokens see later text tokens). Under ``torch.export`` the skip is disabled
(``is_torchdynamo_exporting()``), the causal mask is materialised and the exported program is
causal: the two disagree. With ``attn_implementation="eager"`` no skip exists, hence the 2e-7
match. When ``token_type_ids`` are passed (which the PaliGemma processor always does),
``create_causal_mask`` gets ``block_sequence_ids`` and never skips, so eager and export build
the same prefix-LM mask (bidirectional prefix, causal suffix) with SDPA too: measured 0.0
difference. Fix here: (1) token_type_ids are always passed to models whose forward takes them,
with the prefix/suffix layout for prefix-LM families; (2) a generic guard,
``_mask_skip_changes_output``: for SDPA models we run the eager forward a second time with
masking_utils believing it is exporting (so it materialises every mask, as the export does);
if that changes the output, the mask-skip shortcut is not faithful for this model and we switch
to ``attn_implementation="eager"`` (recorded in ``HFModel.attn_implementation`` and
``info["attn_fallback"]``).
"""
from __future__ import annotations

import importlib
import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["HFLoadError", "HFModel", "is_hf_dir", "load_hf_dir", "register_architecture", "ExportWrapper"]

DEFAULT_TEXT_LEN = 24
SENTENCE = ("The quick brown fox jumps over the lazy dog, and loopify folds the repeated layers "
            "of a transformer into a loop with shared weights.")

# Families whose inputs follow a convention the config does not spell out (see module doc).
_PREFIX_LM = {"paligemma"}           # token_type_ids: 0 = prefix (image + prompt), 1 = suffix
_IMAGE_FIRST = {"paligemma"}         # image tokens come first, then BOS and the prompt
_PIXELS_5D = {"idefics2", "idefics3", "smolvlm"}  # pixel_values: (batch, images, C, H, W)
_CLS_TOWERS = {"clip_vision_model"}  # vision towers that prepend a class token to the patches

# Output fields returned by the wrapper, in order of preference.
_OUTPUT_PREFERENCE = (("logits",), ("last_hidden_state", "pooler_output"))


class HFLoadError(Exception):
    """A Hugging Face directory cannot be loaded; the message is one line naming the directory."""


@dataclass
class HFModel:
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    output_names: list[str]
    architecture: str
    model_type: str
    attn_implementation: str
    image_token_id: int | None = None
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# registry of non-transformers architectures

@dataclass
class _Arch:
    cls: Any            # class or "module:attr"; called as cls(config_dict)
    inputs_fn: Any      # callable or "module:attr"; called as inputs_fn(config_dict, seq_len)
    output_names: tuple[str, ...]
    attn_implementation: str


_REGISTRY: dict[str, _Arch] = {}


def register_architecture(name: str, cls: type | str, inputs_fn: Callable | str,
                          output_names: tuple[str, ...] | list[str] = ("logits",),
                          attn_implementation: str = "sdpa") -> None:
    """Make ``load_hf_dir`` recognise ``config.json`` ``"architectures": [name]``.

    ``cls(config_dict)`` builds the module (weights then come from model.safetensors, strict);
    ``inputs_fn(config_dict, seq_len)`` returns the example keyword inputs; the module's forward
    returns a tensor or a tuple of tensors named ``output_names``. Either callable may be given
    as a lazy ``"package.module:attr"`` string.
    """
    _REGISTRY[name] = _Arch(cls, inputs_fn, tuple(output_names), attn_implementation)


def _resolve(obj):
    if isinstance(obj, str):
        mod, _, attr = obj.partition(":")
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    return obj


register_architecture("NanoGPT", "loopify.examples.nanogpt:NanoGPT",
                      "loopify.examples.nanogpt:example_inputs", ("logits",), "sdpa")


# --------------------------------------------------------------------------------------------
# wrapper

class ExportWrapper(torch.nn.Module):
    """eval() wrapper around an HF model: ``forward(**inputs)`` -> tuple of plain tensors.

    The model is the attribute ``model``; constant flags (``use_cache=False``,
    ``return_dict=True``) are passed here, never as export inputs.
    """

    def __init__(self, model: torch.nn.Module, output_names: list[str] | tuple[str, ...],
                 flags: dict | None = None):
        super().__init__()
        self.model = model
        self.output_names = list(output_names)
        self.flags = dict(flags or {})

    def forward(self, **inputs):
        out = self.model(**inputs, **self.flags)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, dict):  # ModelOutput is an OrderedDict
            return tuple(out[n] for n in self.output_names)
        return tuple(out[: len(self.output_names)])


# --------------------------------------------------------------------------------------------
# public API

def is_hf_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_hf_dir(path, *, seq_len: int | None = None, attn_implementation: str | None = None,
                batch: int | None = None) -> HFModel:
    """Load a Hugging Face directory for export; raises ``HFLoadError`` with a one-line reason.

    ``seq_len``: text length of the example inputs; ``batch``: their batch size (default 1;
    each row is a different text / image)."""
    path = Path(path)
    if not path.exists():
        raise HFLoadError(f"{path}: no such directory")
    if not path.is_dir():
        raise HFLoadError(f"{path}: not a directory (a Hugging Face model is a directory with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFLoadError(f"{path}: config.json is not valid JSON ({_one_line(e)})") from None
    if not isinstance(config, dict):
        raise HFLoadError(f"{path}: config.json holds a {type(config).__name__}, not an object")
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise HFLoadError(f"{path}: config.json names no \"architectures\"; cannot tell which model class to build")
    arch = archs[0]
    _check_weights(path)
    if seq_len is not None and seq_len < 2:
        raise HFLoadError(f"{path}: seq_len must be at least 2 (got {seq_len})")
    if batch is not None and batch < 1:
        raise HFLoadError(f"{path}: batch must be at least 1 (got {batch})")

    if arch in _REGISTRY:
        return _load_registered(path, arch, config, seq_len, batch or 1)
    return _load_transformers(path, arch, config, seq_len, attn_implementation, batch or 1)


# --------------------------------------------------------------------------------------------
# helpers

def _one_line(e: BaseException | str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    s = lines[0] if not (lines[0].endswith(":") and len(lines) > 1) else f"{lines[0]} {lines[1]}"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _check_weights(path: Path) -> None:
    """model.safetensors (or a sharded index) must exist and have a readable header and size."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except Exception as e:
            raise HFLoadError(f"{path}: model.safetensors.index.json is unreadable ({_one_line(e)})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise HFLoadError(f"{path}: weight shard {f.name} listed in model.safetensors.index.json is missing")
    else:
        raise HFLoadError(f"{path}: no model.safetensors (weights missing)")
    for f in files:
        _check_safetensors_file(path, f)


def _check_safetensors_file(path: Path, f: Path) -> None:
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"file is {size} bytes, its header needs {8 + n + end}")
    except Exception as e:
        raise HFLoadError(f"{path}: {f.name} is truncated or corrupt ({_one_line(e)})") from None


def _load_registered(path: Path, arch: str, config: dict, seq_len: int | None, batch: int = 1) -> HFModel:

    entry = _REGISTRY[arch]
    try:
        cls = _resolve(entry.cls)
        inputs_fn = _resolve(entry.inputs_fn)
    except (ImportError, AttributeError) as e:
        raise HFLoadError(f"{path}: architecture {arch} is registered but its code cannot be imported ({_one_line(e)})") from None
    try:
        model = cls(config)
    except Exception as e:
        raise HFLoadError(f"{path}: config.json does not fit {arch} ({type(e).__name__}: {_one_line(e)})") from None
    _load_registered_weights(path, arch, model)
    model.eval()
    inputs = inputs_fn(config, seq_len)
    if batch > 1:  # registered input builders make one example: repeat it
        inputs = {k: v.repeat(batch, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() else v
                  for k, v in inputs.items()}
    wrapper = ExportWrapper(model, entry.output_names).eval()
    with torch.no_grad():
        try:
            outs = wrapper(**inputs)
        except Exception as e:
            raise HFLoadError(f"{path}: the {arch} model fails on its example inputs ({type(e).__name__}: {_one_line(e)})") from None
    info = {"modalities": ["text"], "seq_len": int(inputs["input_ids"].shape[-1]) if "input_ids" in inputs else None,
            "batch": int(batch), "num_parameters": _num_params(model), "source": "registry",
            "output_shapes": {n: list(o.shape) for n, o in zip(entry.output_names, outs)}}
    return HFModel(wrapper, inputs, list(entry.output_names), arch, str(config.get("model_type", arch.lower())),
                   entry.attn_implementation, None, info)


def _load_registered_weights(path: Path, arch: str, model: torch.nn.Module) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_model

    f = path / "model.safetensors"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(f), framework="pt") as fh:
        for k in fh.keys():
            shape = tuple(fh.get_slice(k).get_shape())
            if k in expected and expected[k] != shape:
                raise HFLoadError(f"{path}: model.safetensors does not fit {arch}: {k} has shape {list(shape)}, "
                                  f"the config.json model needs {list(expected[k])}")
    try:
        missing, unexpected = load_model(model, str(f), strict=False)
    except Exception as e:
        raise HFLoadError(f"{path}: model.safetensors does not fit {arch} ({_one_line(e)})") from None
    if missing:
        raise HFLoadError(f"{path}: model.safetensors does not fit {arch}: lacks {len(missing)} weight(s), e.g. {sorted(missing)[0]}")
    if unexpected:
        raise HFLoadError(f"{path}: model.safetensors does not fit {arch}: {len(unexpected)} unexpected weight(s), e.g. {sorted(unexpected)[0]}")


def _num_params(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _load_transformers(path: Path, arch: str, config_dict: dict, seq_len: int | None,
                       attn_implementation: str | None, batch: int = 1) -> HFModel:
    try:
        import transformers
    except ImportError:
        raise HFLoadError(f"{path}: loading Hugging Face models needs the 'transformers' package (pip install loopify[hf])") from None
    cls = getattr(transformers, arch, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        known = ", ".join(sorted(_REGISTRY))
        raise HFLoadError(f"{path}: unknown architecture {arch!r} (not a model class of transformers "
                          f"{transformers.__version__}, nor registered: {known})")
    try:
        config = cls.config_class.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise HFLoadError(f"{path}: config.json does not make a {arch} config ({type(e).__name__}: {_one_line(e)})") from None
    # Flags belong to the config (or the wrapper), never to the export inputs.
    for c in {id(c): c for c in (config, _text_config(config))}.values():
        if hasattr(c, "use_cache"):
            c.use_cache = False

    requested = attn_implementation
    impl = requested or ("sdpa" if getattr(cls, "_supports_sdpa", False) else "eager")
    model = _from_pretrained(path, arch, cls, config, impl)
    actual_impl = getattr(model.config, "_attn_implementation", None) or impl

    model_type = str(getattr(config, "model_type", config_dict.get("model_type", "")))
    fwd_params = _forward_params(model)
    flags = {}
    if "use_cache" in fwd_params:
        flags["use_cache"] = False
    if "return_dict" in fwd_params:
        flags["return_dict"] = True

    info: dict[str, Any] = {"num_parameters": _num_params(model), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                            "source": "transformers"}
    inputs, image_token_id = _make_inputs(path, model, config, model_type, fwd_params, seq_len, info, batch)

    # One eager forward: checks the inputs (HF verifies the image-token count) and names the outputs.
    try:
        with torch.no_grad():
            out = model(**inputs, **flags)
    except Exception as e:
        raise HFLoadError(f"{path}: the {arch} model fails on its example inputs ({type(e).__name__}: {_one_line(e)})") from None
    output_names = _pick_outputs(out)
    if not output_names:
        raise HFLoadError(f"{path}: cannot tell which outputs of {arch} to export (got {type(out).__name__})")
    wrapper = ExportWrapper(model, output_names, flags).eval()

    # Guard against eager/export mask divergence (see module doc: the PaliGemma finding).
    if actual_impl == "sdpa" and requested is None:
        diff = _mask_skip_changes_output(wrapper, inputs)
        if diff > 0.0:
            try:
                model.set_attn_implementation("eager")
            except Exception:
                model = _from_pretrained(path, arch, cls, config, "eager")
                wrapper = ExportWrapper(model, output_names, flags).eval()
            actual_impl = getattr(model.config, "_attn_implementation", "eager")
            info["attn_fallback"] = (f"sdpa skips the attention mask in eager mode but not under torch.export, "
                                     f"which changed the outputs by {diff:.3g}; switched to eager attention")
    with torch.no_grad():
        outs = wrapper(**inputs)
    info["output_shapes"] = {n: list(o.shape) for n, o in zip(output_names, outs)}
    return HFModel(wrapper, inputs, output_names, arch, model_type, str(actual_impl), image_token_id, info)


def _from_pretrained(path: Path, arch: str, cls, config, impl: str):
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, loading = cls.from_pretrained(str(path), config=config, attn_implementation=impl,
                                             local_files_only=True, output_loading_info=True,
                                             ignore_mismatched_sizes=True)  # reported below, one line
    except Exception as e:
        raise HFLoadError(f"{path}: cannot load {arch} ({type(e).__name__}: {_one_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    missing = list(loading.get("missing_keys") or [])
    mismatched = list(loading.get("mismatched_keys") or [])
    if missing:
        raise HFLoadError(f"{path}: model.safetensors lacks {len(missing)} weight(s) of {arch}, e.g. {sorted(missing)[0]}")
    if mismatched:
        k, *shapes = mismatched[0] if isinstance(mismatched[0], (tuple, list)) else (mismatched[0],)
        detail = f" ({k}: file {list(shapes[0])}, config {list(shapes[1])})" if len(shapes) == 2 else f" (e.g. {k})"
        raise HFLoadError(f"{path}: model.safetensors does not fit config.json: {len(mismatched)} weight(s) of the wrong shape for {arch}{detail}")
    return model.eval()


def _forward_params(model) -> list[str]:
    return [n for n, p in inspect.signature(model.forward).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _text_config(config):
    try:
        return config.get_text_config()
    except Exception:
        return getattr(config, "text_config", None) or config


def _special_ids(config) -> set[int]:
    ids: set[int] = set()

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(k, str) and k.endswith(("_token_id", "_token_index", "_token_ids")):
                for x in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(x, int) and not isinstance(x, bool):
                        ids.add(x)

    walk(config.to_dict())
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
    tc = _text_config(config)
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


def _measured_image_tokens(model, pixel_values) -> int | None:
    """Image tokens as the model's own ``get_image_features`` makes them (None if it has none)."""
    fn = getattr(model, "get_image_features", None) or getattr(getattr(model, "model", None), "get_image_features", None)
    if fn is None:
        return None
    try:
        with torch.no_grad():
            feats = fn(pixel_values=pixel_values)
    except Exception:
        return None
    if isinstance(feats, dict):  # ModelOutput: features are the pooler_output
        feats = feats.get("pooler_output", None)
        if feats is None:
            return None
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    try:
        return int(sum(f.numel() // f.shape[-1] for f in feats))
    except Exception:
        return None


def _random_ids(n: int, vocab: int, avoid: set[int], gen: torch.Generator) -> torch.Tensor:
    allowed = torch.tensor([i for i in range(vocab) if i not in avoid], dtype=torch.long)
    return allowed[torch.randint(0, len(allowed), (n,), generator=gen)]


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model"))


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


def _make_inputs(path: Path, model, config, model_type: str, fwd_params: list[str], seq_len: int | None,
                 info: dict, batch: int = 1) -> tuple[dict[str, torch.Tensor], int | None]:
    tc = _text_config(config)
    vocab = int(getattr(tc, "vocab_size", 0) or getattr(config, "vocab_size", 0) or 0)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    vc = getattr(config, "vision_config", None)
    is_vlm = vc is not None and image_token_id is not None and "pixel_values" in fwd_params
    gen = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    n_text = seq_len or DEFAULT_TEXT_LEN
    info["modalities"] = ["text", "image"] if is_vlm else ["text"]

    if not is_vlm and _has_tokenizer(path) and "input_ids" in fwd_params:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            texts_ = [t if seq_len is None else " ".join([t] * (seq_len // 8 + 1)) for t in _batch_texts(batch)]
            enc = tok(texts_[0], return_tensors="pt", truncation=seq_len is not None, max_length=seq_len)
            if batch > 1:  # every row at the first row's length: padded (masked) or truncated
                n = int(enc["input_ids"].shape[-1])
                if getattr(tok, "pad_token", None) is None:
                    tok.pad_token = tok.eos_token or tok.unk_token
                enc = tok(texts_, return_tensors="pt", padding="max_length", truncation=True, max_length=n)
        except Exception as e:
            raise HFLoadError(f"{path}: its tokenizer fails ({type(e).__name__}: {_one_line(e)})") from None
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
        return _ordered(inputs, fwd_params), None

    if not vocab:
        raise HFLoadError(f"{path}: the config gives no vocab_size; cannot build example token ids")
    avoid = _special_ids(config)
    bos = getattr(tc, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    bos = bos if isinstance(bos, int) and 0 <= bos < vocab else None
    rows = []
    for _ in range(batch):  # row 0 is what batch 1 gets
        body = _random_ids(n_text - (1 if bos is not None else 0), vocab, avoid, gen)
        rows.append(torch.cat([torch.tensor([bos]), body]) if bos is not None else body)
    text = rows[0]
    info["text"] = "random ids (seed 0)"

    n_img = 0
    if is_vlm:
        h, w = _image_size(vc)
        ch = int(getattr(vc, "num_channels", 3) or 3)
        shape = (batch, 1, ch, h, w) if model_type in _PIXELS_5D else (batch, ch, h, w)
        pixel_values = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        dtype = next(model.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        from_config = _image_token_count(config, model_type)
        measured = _measured_image_tokens(model, pixel_values[:1])
        n_img = measured if measured is not None else from_config
        if n_img is None:
            raise HFLoadError(f"{path}: cannot tell how many image tokens an image becomes for {model_type}")
        info["image_tokens_from_config"] = from_config
        info["image_tokens_measured"] = measured
        info["num_image_tokens"] = int(n_img)
        info["image_size"] = [h, w]
        img = torch.full((n_img,), int(image_token_id), dtype=torch.long)
        if model_type in _IMAGE_FIRST:
            all_ids = [torch.cat([img, t]) for t in rows]
            prefix_len = n_img + max(1, (2 * len(text)) // 3)
        else:
            k = min(len(text), 1 + (1 if bos is not None else 0) + 2)  # BOS + a few prompt tokens
            all_ids = [torch.cat([t[:k], img, t[k:]]) for t in rows]
            prefix_len = len(all_ids[0])
        ids = all_ids[0]
        inputs["input_ids"] = torch.stack(all_ids)
        inputs["pixel_values"] = pixel_values
        info["image_token_positions"] = [int((ids == image_token_id).nonzero()[0]), int((ids == image_token_id).nonzero()[-1])]
    else:
        inputs["input_ids"] = torch.stack(rows)
        prefix_len = len(text)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "token_type_ids" in fwd_params:
        tti = torch.zeros_like(inputs["input_ids"])
        if model_type in _PREFIX_LM:
            tti[:, prefix_len:] = 1
            info["prefix_len"] = int(prefix_len)
        inputs["token_type_ids"] = tti
    info["seq_len"] = int(inputs["input_ids"].shape[-1])
    info["text_len"] = int(len(text))
    info["batch"] = int(batch)
    return _ordered(inputs, fwd_params), (int(image_token_id) if is_vlm else None)


def _ordered(inputs: dict, fwd_params: list[str]) -> dict:
    order = {n: i for i, n in enumerate(fwd_params)}
    return dict(sorted(inputs.items(), key=lambda kv: order.get(kv[0], len(order))))


def _pick_outputs(out) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if not isinstance(out, dict):
        return []
    for group in _OUTPUT_PREFERENCE:
        names = [n for n in group if isinstance(out.get(n, None), torch.Tensor)]
        if names and names[0] == group[0]:
            return names
    return []


@contextmanager
def _masks_as_under_export():
    """Make transformers' mask builders behave as under torch.export (never skip a mask)."""
    from transformers import masking_utils

    saved = masking_utils.is_torchdynamo_exporting
    masking_utils.is_torchdynamo_exporting = lambda: True
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = saved


def _mask_skip_changes_output(wrapper: torch.nn.Module, inputs: dict) -> float:
    """Max abs change of the outputs when the eager SDPA mask-skip shortcut is disabled."""
    try:
        with torch.no_grad():
            a = wrapper(**inputs)
            with _masks_as_under_export():
                b = wrapper(**inputs)
    except Exception:
        return 0.0
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
