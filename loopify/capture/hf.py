"""Load a Hugging Face model directory as an exportable module with example inputs.

``load_hf_dir(path)`` reads ``config.json``, builds the model class named in its
``"architectures"`` (looked up in ``transformers``, or in this module's small registry of
non-transformers architectures, see ``register_architecture``), loads ``model.safetensors``
with ``from_pretrained(..., local_files_only=True)``, and returns an ``HFModel``: an eval()
wrapper whose ``forward(**inputs)`` returns a tuple of plain tensors, plus example keyword
inputs built from the config (and from the directory's tokenizer, when it has one).

Example inputs are made by :mod:`loopify.capture.inputs` (its docstring has the conventions).

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
``loopify.capture.masks.mask_skip_changes_output``: for SDPA models we run the eager forward a second time with
masking_utils believing it is exporting (so it materialises every mask, as the export does);
if that changes the output, the mask-skip shortcut is not faithful for this model and we switch
to ``attn_implementation="eager"`` (recorded in ``HFModel.attn_implementation`` and
``info["attn_fallback"]``).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from loopify.capture.inputs import make_inputs, text_config
from loopify.capture.masks import mask_skip_changes_output

__all__ = ["HFLoadError", "HFModel", "is_hf_dir", "load_hf_dir", "register_architecture", "ExportWrapper"]

# Output fields returned by the wrapper, in order of preference.
# Which outputs to export: the first group whose first name the model returns; failing every group
# (dual encoders such as CLIP, detection heads ...), every tensor the output holds, in its order.
_OUTPUT_PREFERENCE = (("logits",), ("last_hidden_state", "pooler_output"),
                      ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"))


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
        #: set by insert-connectors: image positions (input_ids == this token) are the modality
        #: mask the loops' connectors read while the model runs
        self.modality_token: int | None = None

    def run_model(self, inputs: dict, **overrides):
        """The model's own output (a ModelOutput) for keyword ``inputs``, with the wrapper's flags
        (``overrides`` replace them: ``use_cache=True, cache=...`` for generation)."""
        from loopify.nn.connectors import modality

        flags = {**self.flags, **overrides}
        ids = inputs.get("input_ids")
        mask = None if self.modality_token is None or ids is None else ids == self.modality_token
        with modality(mask):
            return self.model(**inputs, **flags)

    def forward(self, **inputs):
        out = self.run_model(inputs)
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
        raise HFLoadError(f"{path}: config.json is not valid JSON ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise HFLoadError(f"{path}: config.json holds a {type(config).__name__}, not an object")
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise HFLoadError(f"{path}: config.json names no \"architectures\"; cannot tell which model class to build")
    arch = archs[0]
    check_config_against_weights(path, config, _check_weights(path))
    if seq_len is not None and seq_len < 2:
        raise HFLoadError(f"{path}: seq_len must be at least 2 (got {seq_len})")
    if batch is not None and batch < 1:
        raise HFLoadError(f"{path}: batch must be at least 1 (got {batch})")

    if arch in _REGISTRY:
        return _load_registered(path, arch, config, seq_len, batch or 1)
    return _load_transformers(path, arch, config, seq_len, attn_implementation, batch or 1)


# --------------------------------------------------------------------------------------------
# helpers

def one_line(e: BaseException | str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    s = lines[0] if not (lines[0].endswith(":") and len(lines) > 1) else f"{lines[0]} {lines[1]}"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _check_weights(path: Path) -> dict[str, list[int]]:
    """model.safetensors (or a sharded index) must exist and have a readable header and size;
    returns every tensor's shape from the headers (nothing is loaded)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except Exception as e:
            raise HFLoadError(f"{path}: model.safetensors.index.json is unreadable ({one_line(e)})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise HFLoadError(f"{path}: weight shard {f.name} listed in model.safetensors.index.json is missing")
    else:
        raise HFLoadError(f"{path}: no model.safetensors (weights missing)")
    shapes: dict[str, list[int]] = {}
    for f in files:
        header = _check_safetensors_file(path, f)
        shapes.update({k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__"})
    return shapes


#: Config keys that give a layer stack's length.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.")


def check_config_against_weights(path: Path, config: dict, shapes: dict[str, list[int]]) -> None:
    """Refuse, before any module is built, a config.json that asks for more layers than any
    stack in the weights holds (a config saying 10^6 layers beside 4-layer weights would be
    built first and fill the memory), and weights larger than the memory available."""
    stacks: dict[str, set[int]] = {}
    for name in shapes:
        m = _NUMBERED.match(name)
        if m:
            stacks.setdefault(m[1], set()).add(int(m[2]))
    longest = max((len(v) for v in stacks.values()), default=0)
    for where, cfg in _configs(config):
        groups = cfg.get("num_hidden_groups")  # ALBERT: N layers run from G groups of shared weights
        for key in _LAYER_KEYS:
            n = cfg.get(key)
            if isinstance(groups, int) and key == "num_hidden_layers":
                n = min(n, groups) if isinstance(n, int) else n
            if isinstance(n, int) and not isinstance(n, bool) and n > max(longest, 1):
                top = max(stacks, key=lambda k: len(stacks[k])) if stacks else None
                held = f"its longest layer stack is {top} with {longest}" if top else "it holds no numbered layers"
                raise HFLoadError(f"{path}: config.json{where} says {key}={n}, but model.safetensors does not hold "
                                  f"them ({held}); the config does not describe these weights")
    need = sum(_numel(s) for s in shapes.values()) * 4  # built in float32
    free = available_memory()
    if free is not None and need > free:
        raise HFLoadError(f"{path}: the model needs about {_size(need)} in float32, more than the {_size(free)} of "
                          "memory available")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_parameter_count(path: Path, arch: str, cls, config) -> None:
    """Build the model on the meta device (no memory) and refuse a config that makes more
    parameters than the weights hold (a hidden size or vocabulary the weights do not have):
    loading it would allocate the larger model before finding the mismatch."""
    try:
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception:  # noqa: BLE001 - the real build reports its own error
        return
    n = _num_params(model)
    held = sum(_numel(s) for s in _check_weights(path).values())
    if n > 1.01 * held + 4096:
        raise HFLoadError(f"{path}: config.json describes a {arch} of {n:,} parameters, model.safetensors holds "
                          f"{held:,}; the config does not describe these weights")


def _configs(config: dict, where: str = ""):
    yield where, config
    for k, v in config.items():
        if isinstance(v, dict) and k.endswith("config"):
            yield from _configs(v, f"{where}.{k}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def available_memory() -> int | None:
    """Bytes of memory this process can still get (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_safetensors_file(path: Path, f: Path) -> dict:
    from loopify.io import safetensors_header

    try:
        return safetensors_header(f)[0]
    except Exception as e:
        raise HFLoadError(f"{path}: {f.name} is truncated or corrupt ({one_line(e)})") from None


def _load_registered(path: Path, arch: str, config: dict, seq_len: int | None, batch: int = 1) -> HFModel:

    entry = _REGISTRY[arch]
    try:
        cls = _resolve(entry.cls)
        inputs_fn = _resolve(entry.inputs_fn)
    except (ImportError, AttributeError) as e:
        raise HFLoadError(f"{path}: architecture {arch} is registered but its code cannot be imported ({one_line(e)})") from None
    try:
        model = cls(config)
    except Exception as e:
        raise HFLoadError(f"{path}: config.json does not fit {arch} ({type(e).__name__}: {one_line(e)})") from None
    _load_registered_weights(path, arch, model)
    model.eval()
    inputs = _batched(inputs_fn(config, seq_len), batch)
    got = int(inputs["input_ids"].shape[-1]) if "input_ids" in inputs else None
    if seq_len is not None and got is not None and got != seq_len:  # the example builder clamped it (nanoGPT's block_size)
        raise HFLoadError(f"{path}: --seq-len {seq_len}: {arch} takes at most {got} tokens")
    wrapper = ExportWrapper(model, entry.output_names).eval()
    with torch.no_grad():
        try:
            outs = wrapper(**inputs)
        except Exception as e:
            raise HFLoadError(f"{path}: the {arch} model fails on its example inputs ({type(e).__name__}: {one_line(e)})") from None
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
        raise HFLoadError(f"{path}: model.safetensors does not fit {arch} ({one_line(e)})") from None
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


def _transformers_class(path: Path, arch: str):
    try:
        import transformers
    except ImportError:
        raise HFLoadError(f"{path}: loading Hugging Face models needs the 'transformers' package "
                          "(pip install 'loopify[hf]')") from None
    cls = getattr(transformers, arch, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        known = ", ".join(sorted(_REGISTRY))
        raise HFLoadError(f"{path}: unknown architecture {arch!r} (not a model class of transformers "
                          f"{transformers.__version__}, nor registered: {known})")
    return cls


def _transformers_config(path: Path, arch: str, cls):
    try:
        config = cls.config_class.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise HFLoadError(f"{path}: config.json does not make a {arch} config ({type(e).__name__}: {one_line(e)})") from None
    # Flags belong to the config (or the wrapper), never to the export inputs.
    for c in {id(c): c for c in (config, text_config(config))}.values():
        if hasattr(c, "use_cache"):
            c.use_cache = False
    use_batched_experts(config)
    return config


def use_batched_experts(config) -> None:
    """Mixture-of-experts layers (transformers' ``experts_implementation``) dispatch tokens with
    ``batched_mm``: each token-expert pair gathers its expert's weights and runs one batched
    matmul. The default ``grouped_mm`` sorts the pairs by expert and counts them with ``histc``
    into a grouped matmul that TVM cannot import (issue 15, class 6), and the ``eager`` loop over
    the experts a batch hits has a data-dependent trip count that torch.export cannot trace. The
    three compute the same sums. (The gather reads one expert's weights per token and top-k
    slot: right for these models' sizes, a cost for long prompts of large MoE models.) Set on
    the config, so it holds for every module built from it, the loops' blocks included."""
    if "_experts_implementation" in dir(type(config)):
        config._experts_implementation = "batched_mm"


def build_wrapper(path: Path, arch: str, attn_implementation: str, output_names, flags) -> ExportWrapper:
    """The model a config directory describes, in its wrapper, *without* weights (allocated,
    not initialised: the caller loads them). Used to rebuild converted models."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if arch in _REGISTRY:
        model = _resolve(_REGISTRY[arch].cls)(config)
    else:
        from transformers.initialization import no_init_weights

        cls = _transformers_class(path, arch)
        cfg = _transformers_config(path, arch, cls)
        with no_init_weights():
            model = cls._from_config(cfg, attn_implementation=attn_implementation)
    return ExportWrapper(model.eval(), output_names, flags).eval()


def example_inputs(path: Path, wrapper: ExportWrapper, arch: str, seq_len: int | None, batch: int,
                   info: dict) -> dict:
    """Example inputs for a (rebuilt) model, made as :func:`load_hf_dir` makes them."""
    if arch in _REGISTRY:
        config = json.loads((Path(path) / "config.json").read_text())
        return _batched(_resolve(_REGISTRY[arch].inputs_fn)(config, seq_len), batch)
    model = wrapper.model
    config = model.config
    model_type = str(getattr(config, "model_type", ""))
    inputs, _ = make_inputs(Path(path), model, config, model_type, _forward_params(model), seq_len, info, batch,
                            verify=False)  # built before its weights are loaded
    return {k: v for k, v in inputs.items() if k not in wrapper.flags}  # layout inputs fixed as flags


def _batched(inputs: dict, batch: int) -> dict:
    """Registered input builders make one example: repeat it."""
    if batch <= 1:
        return inputs
    return {k: v.repeat(batch, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() else v
            for k, v in inputs.items()}


def _load_transformers(path: Path, arch: str, config_dict: dict, seq_len: int | None,
                       attn_implementation: str | None, batch: int = 1) -> HFModel:
    cls = _transformers_class(path, arch)
    config = _transformers_config(path, arch, cls)
    _check_parameter_count(path, arch, cls, config)
    impl = attn_implementation or ("sdpa" if getattr(cls, "_supports_sdpa", False) else "eager")
    model = _from_pretrained(path, arch, cls, config, impl)
    return finish_model(path, arch, model, seq_len, attn_implementation, batch,
                        reload=lambda impl_: _from_pretrained(path, arch, cls, config, impl_))


def finish_model(path: Path, arch: str, model, seq_len: int | None, requested: str | None, batch: int,
                 reload=None, tokenizer=None, info: dict | None = None) -> HFModel:
    """Wrap a loaded transformers model for export: flags, example inputs (through ``tokenizer``
    or the directory's own), output names, and the SDPA mask guard (``reload(impl)`` loads the
    model again with another attention implementation when switching in place fails)."""
    config = model.config
    actual_impl = getattr(config, "_attn_implementation", None) or requested or "eager"
    model_type = str(getattr(config, "model_type", ""))
    fwd_params = _forward_params(model)
    flags = {}
    if "use_cache" in fwd_params:
        flags["use_cache"] = False
    if "return_dict" in fwd_params:
        flags["return_dict"] = True
    info = {**(info or {}), "num_parameters": _num_params(model),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "source": "transformers"}
    inputs, image_token_id = make_inputs(path, model, config, model_type, fwd_params, seq_len, info, batch, tokenizer)
    for k in [k for k, v in inputs.items() if not isinstance(v, torch.Tensor)]:
        flags[k] = inputs.pop(k)  # precomputed sizes (ints): constants of the program, like its shapes
    out = _eager_forward(path, arch, model, inputs, flags)
    output_names = _pick_outputs(out)
    if not output_names:
        raise HFLoadError(f"{path}: cannot tell which outputs of {arch} to export (got {type(out).__name__})")
    wrapper = ExportWrapper(model, output_names, flags).eval()
    # Guard against eager/export mask divergence (see module doc: the PaliGemma finding).
    if actual_impl == "sdpa" and requested is None:
        diff = mask_skip_changes_output(wrapper, inputs)
        if diff > 0.0:
            try:
                model.set_attn_implementation("eager")
            except Exception:
                if reload is None:
                    raise
                model = reload("eager")
                wrapper = ExportWrapper(model, output_names, flags).eval()
            actual_impl = getattr(model.config, "_attn_implementation", "eager")
            info["attn_fallback"] = (f"sdpa skips the attention mask in eager mode but not under torch.export, "
                                     f"which changed the outputs by {diff:.3g}; switched to eager attention")
    with torch.no_grad():
        outs = wrapper(**inputs)
    info["output_shapes"] = {n: list(o.shape) for n, o in zip(output_names, outs)}
    return HFModel(wrapper, inputs, output_names, arch, model_type, str(actual_impl), image_token_id, info)


def complete_user_inputs(path: Path, model: HFModel, kwargs: dict) -> dict:
    """Keyword inputs given by the user (``--inputs FILE``) with the layout of packed vision
    encoders added as the dummy inputs get it (:mod:`loopify.capture.varlen`), so that a file of
    what the processor makes (``input_ids``, ``pixel_values``, ``image_grid_thw`` ...) exports;
    inputs that already hold a precomputed layout are left as they are."""
    from loopify.capture import varlen

    if not isinstance(model.module, ExportWrapper) or any(k.endswith("cu_seqlens") for k in kwargs):
        return kwargs
    try:
        layout = varlen.precompute_layout(model.module.model, kwargs)
    except ValueError as e:
        raise HFLoadError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's inputs do not fit the model
        raise HFLoadError(f"{path}: the inputs file does not fit the model ({type(e).__name__}: {one_line(e)})") from None
    for k in [k for k, v in layout.items() if not isinstance(v, torch.Tensor)]:
        model.module.flags[k] = layout.pop(k)
    return {**kwargs, **layout}


def _eager_forward(path: Path, arch: str, model, inputs: dict, flags: dict):
    """One eager forward: checks the inputs (HF verifies the image-token count) and gives the
    outputs to name. Image-layout inputs (``image_sizes`` ...) move from ``inputs`` into ``flags``
    as Python lists when the model takes them so: the program is captured for that layout, as for
    the input shapes, since code that reads them (tile counts, unpadding) guards on their values,
    which torch.export cannot trace through a tensor input."""
    from loopify.capture.modalities import IMAGE_LAYOUT_INPUTS

    layout = {k: inputs[k].tolist() for k in IMAGE_LAYOUT_INPUTS if isinstance(inputs.get(k), torch.Tensor)}
    if layout:
        rest = {k: v for k, v in inputs.items() if k not in layout}
        try:
            with torch.no_grad():
                out = model(**rest, **flags, **layout)
        except Exception:  # the model needs them as tensors: keep them as inputs
            pass
        else:
            for k in layout:
                del inputs[k]
            flags.update(layout)
            return out
    try:
        with torch.no_grad():
            return model(**inputs, **flags)
    except Exception as e:
        raise HFLoadError(f"{path}: the {arch} model fails on its example inputs ({type(e).__name__}: {one_line(e)})") from None


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
        raise HFLoadError(f"{path}: cannot load {arch} ({type(e).__name__}: {one_line(e)})") from None
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


def _pick_outputs(out) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if not isinstance(out, dict):
        return []
    for group in _OUTPUT_PREFERENCE:
        names = [n for n in group if isinstance(out.get(n, None), torch.Tensor)]
        if names and names[0] == group[0]:
            return names
    return [n for n, v in out.items() if isinstance(v, torch.Tensor) and n != "loss"]


