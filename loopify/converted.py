"""A converted model on disk, self-contained: nothing is read from the model it came from.

``loopify convert MODEL -o OUT.pt2`` writes::

    OUT.pt2            torch.export program of the converted model at its default depth (any
                       torch user can load and run it; loopify does not need it to rebuild)
    OUT.safetensors    every weight of the converted model, each storage once; the tie map
                       (alias -> canonical name) in the metadata under "loopify.ties"
    OUT.assets/        the architecture: for a Hugging Face source its config.json and the
                       tokenizer / processor / generation files; for an export-archive source
                       the original program with its parameters stripped (source.pt2)
    OUT.json           the manifest (written last): plan, loop skeletons, architecture, verify
                       report, and the sha256 of every other file

The manifest is the commit point: every other file is written (each atomically) before it, and
loading checks every file against the sha256 the manifest records, so a write killed at any
moment leaves either the previous bundle or one that is refused in one line.

:func:`rebuild` gives the converted model back in eager, trainable form, at any text length or
batch for Hugging Face sources: it builds the architecture (weights allocated, not initialised),
puts each loop's skeleton where its layers were, and loads the weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loopify.errors import LoopifyError
from loopify.io import atomic_path, check_output, check_space, read_manifest_json, sha256_file, write_json

FORMAT = "loopify-converted"
VERSION = 2
TIES_KEY = "loopify.ties"
#: Files of a Hugging Face directory that describe the model besides its weights.
ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
               "processor_config.json", "video_preprocessor_config.json")
SOURCE_PROGRAM = "source.pt2"


class ConvertedError(LoopifyError):
    """A converted model's files are missing, inconsistent or of an unsupported version."""


@dataclass(frozen=True)
class Bundle:
    """The files of one converted model."""

    program: Path    # OUT.pt2
    manifest: Path   # OUT.json
    weights: Path    # OUT.safetensors
    assets: Path     # OUT.assets/

    @classmethod
    def of(cls, out: str | Path) -> "Bundle":
        out = Path(out)
        return cls(out, out.with_suffix(".json"), out.with_suffix(".safetensors"), out.with_suffix(".assets"))

    def files(self) -> dict[str, Path]:
        """Every file the manifest hashes, by its name relative to the bundle's directory."""
        out = {self.program.name: self.program, self.weights.name: self.weights}
        if self.assets.is_dir():
            for f in sorted(self.assets.rglob("*")):
                if f.is_file():
                    out[f.relative_to(self.program.parent).as_posix()] = f
        return out


# ----------------------------------------------------------------------------------------------
# Weights with a tie map


def storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def unique_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each storage once, and the tie map (alias -> canonical name)."""
    return dedupe(module.state_dict(keep_vars=True).items())


def dedupe(named) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(name, tensor)`` pairs with each storage once (contiguous), and the tie map."""
    tensors, ties, seen = {}, {}, {}
    for name, t in named:
        k = storage_key(t)
        if k in seen:
            ties[name] = seen[k]
            continue
        seen[k] = name
        tensors[name] = t.detach().contiguous()
    return tensors, ties


def write_weights(module: nn.Module, path: Path) -> tuple[int, dict[str, str]]:
    """Write the weights atomically; returns (bytes of tensor data, tie map)."""
    from safetensors.torch import save_file

    tensors, ties = unique_state(module)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={TIES_KEY: json.dumps(ties, sort_keys=True), "format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values()), ties


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            ties = json.loads((f.metadata() or {}).get(TIES_KEY, "{}"))
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file is one line for the user
        raise ConvertedError(f"{path}: unreadable weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    for alias, canonical in ties.items():
        state[alias] = state[canonical]
    return state, ties


def load_weights(module: nn.Module, path: Path) -> None:
    """Load every weight (strictly: none missing, none unexpected) and restore the ties, so that
    tied names are one parameter object again (training them keeps them tied)."""
    state, ties = read_weights(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConvertedError(f"{path}: the weights do not fit the rebuilt model ({' '.join(first[:2])[:300]})") from None
    params = dict(module.named_parameters(remove_duplicate=False))
    for alias, canonical in ties.items():
        if alias in params and params[alias] is not params[canonical]:
            parent, _, leaf = alias.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, params[canonical])


# ----------------------------------------------------------------------------------------------
# Architecture


def write_assets(captured, assets: Path) -> dict:
    """The architecture's files into ``assets`` (replaced); returns the manifest's description."""
    if assets.exists():
        shutil.rmtree(assets)
    if captured.format == "converted":  # a rebuilt converted model (training's output): the same architecture
        shutil.copytree(captured.info["bundle_assets"], assets)
        return dict(captured.info["architecture_record"])
    assets.mkdir(parents=True)
    if captured.format in ("hf-dir", "gguf"):
        wrapper = captured.eager
        src = Path(captured.info.get("assets_dir") or captured.source)
        for name in ASSET_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, assets / name)
        return {"kind": "hf", "class": captured.info["architecture"],
                "attn_implementation": captured.info.get("attn_implementation"),
                "output_names": list(wrapper.output_names), "flags": dict(wrapper.flags)}
    from loopify.capture import write_program

    write_program(strip_parameters(captured.program), assets / SOURCE_PROGRAM, captured.info)
    return {"kind": "graph", "program": SOURCE_PROGRAM}


def strip_parameters(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A copy of ``program`` whose parameters are one zero each, broadcast to their shapes (the
    archive then stores one float per parameter); buffers and constants are kept."""
    import copy

    ep = copy.copy(program)
    kind = torch.export.graph_signature.InputKind.PARAMETER
    names = {s.target for s in program.graph_signature.input_specs if s.kind is kind}
    sd = dict(program.state_dict)
    for n in names:
        t = sd[n]
        sd[n] = nn.Parameter(torch.zeros((), dtype=t.dtype).expand(t.shape), requires_grad=False)
    ep._state_dict = sd
    return ep


# ----------------------------------------------------------------------------------------------
# Save


def save(module: nn.Module, captured, manifest: dict, out: str | Path, program_writer) -> Bundle:
    """Write the bundle of a converted model: weights, assets, program (``program_writer(tmp)``
    writes OUT.pt2 to a temporary path), then the manifest with every file's sha256."""
    b = Bundle.of(out)
    if b.program.suffix != ".pt2":
        raise ConvertedError(f"{out}: the output must end in .pt2")
    check_bundle_output(b)
    # The weights file and the program (which holds the weights too), before anything is written.
    check_space(b.program, 2 * sum(t.numel() * t.element_size() for t in unique_state(module)[0].values()))
    try:
        weight_bytes, ties = write_weights(module, b.weights)
        with atomic_path(b.assets, directory=True) as tmp:
            manifest["architecture"] = write_assets(captured, tmp)
        with atomic_path(b.program) as tmp:
            program_writer(tmp)
    except BaseException:
        # Part of the bundle is new, part old: remove it all, so no manifest describes files it
        # does not match (a kill -9 here leaves such a mix; loading then refuses it by sha256).
        discard(b)
        raise
    manifest.update(format=FORMAT, version=VERSION)
    manifest["ties"] = ties
    manifest["bytes"]["converted_file"] = b.weights.stat().st_size
    manifest["bytes"]["program_file"] = b.program.stat().st_size
    manifest["files"] = {name: sha256_file(p) for name, p in b.files().items()}
    write_json(b.manifest, manifest)
    return b


def discard(b: Bundle) -> None:
    """Remove every file of a bundle (a write of it failed half-way)."""
    for p in (b.manifest, b.program, b.weights):
        p.unlink(missing_ok=True)
    shutil.rmtree(b.assets, ignore_errors=True)


def check_bundle_output(b: Bundle) -> None:
    """Every path of the bundle can be written (checked before any work starts)."""
    for p in (b.program, b.manifest, b.weights):
        check_output(p)
    check_output(b.assets, directory=True)


# ----------------------------------------------------------------------------------------------
# Load


def is_converted(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix == ".pt2" and p.with_suffix(".json").is_file()


def read_manifest(path: str | Path, *, verify: bool = False) -> dict:
    """The manifest of a converted model (``verify``: check every file's sha256 too).

    Raises:
        ConvertedError: missing, unreadable, of another format or version, or files that do not
            match it.
    """
    b = Bundle.of(path)
    if not b.manifest.is_file():
        raise ConvertedError(f"{path}: no manifest {b.manifest.name} beside it (is this a loopify convert output?)")
    manifest = read_manifest_json(b.manifest, FORMAT, ConvertedError)
    if manifest.get("version") != VERSION:
        raise ConvertedError(f"{path}: converted-model format {manifest.get('version')!r}, this loopify reads "
                             f"format {VERSION} (older files rebuilt the model from its source); convert it again")
    if verify:
        verify_files(b, manifest)
    return manifest


def verify_files(b: Bundle, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or b.weights.name not in files:
        raise ConvertedError(f"{b.manifest}: lists no weights file")
    root = b.program.parent.resolve()
    for name, digest in files.items():
        p = (root / name).resolve()
        if Path(name).is_absolute() or root not in p.parents:
            raise ConvertedError(f"{b.manifest}: file entry {name!r} is not inside the model's directory")
        if not p.is_file():
            raise ConvertedError(f"{b.program}: {name} is missing (the bundle is incomplete)")
        if sha256_file(p) != digest:
            raise ConvertedError(f"{b.program}: {name} does not match the sha256 in {b.manifest.name} (corrupt, "
                                 "replaced, or its write was interrupted); convert again")


@dataclass
class Loaded:
    """A rebuilt converted model: the eager module and example inputs (as a Captured)."""

    module: nn.Module
    inputs: object  # loopify.capture.Captured, program None until exported
    manifest: dict
    bundle: Bundle


def source_text_len(src: dict) -> int | None:
    """The text length the source was captured at (the manifest's ``source``): ``text_len``
    (without image tokens) where recorded, else ``seq_len`` when the text came from a tokenizer
    (a text-only sentence records only that), else None (the default length)."""
    return src.get("text_len") or (src.get("seq_len") if src.get("text") == "tokenizer" else None)


def rebuild(path: str | Path, *, seq_len: int | None = None, batch: int | None = None) -> Loaded:
    """The converted model at ``path`` as an eager module with adjustable loop counts, and
    example inputs (recorded ones, or made at ``seq_len`` / ``batch`` for Hugging Face sources)."""
    from loopify.skeleton import install_all

    b = Bundle.of(path)
    manifest = read_manifest(path, verify=True)
    arch = manifest.get("architecture") or {}
    if arch.get("kind") == "hf":
        module, inputs = _hf_module(b, manifest, seq_len, batch)
    elif arch.get("kind") == "graph":
        for flag, value in (("--seq", seq_len), ("--batch", batch)):
            if value is not None:
                raise ConvertedError(f"{path}: {flag} needs a Hugging Face source (this one is an export "
                                     "archive with fixed shapes)")
        module, inputs = _graph_module(b, manifest)
    else:
        raise ConvertedError(f"{b.manifest}: no architecture recorded; convert again")
    install_all(module, manifest["skeletons"])
    load_weights(module, b.weights)
    inputs.info.update(bundle_assets=str(b.assets), architecture_record=arch)
    from loopify.nn.recursion import set_loops

    set_loops(module, None)
    module.eval()
    return Loaded(module, inputs, manifest, b)


def _hf_module(b: Bundle, manifest: dict, seq_len, batch):
    from loopify.capture import Captured
    from loopify.capture.hf import HFLoadError, build_wrapper, example_inputs

    arch = manifest["architecture"]
    src = manifest["source"]
    try:
        wrapper = build_wrapper(b.assets, arch["class"], arch.get("attn_implementation") or "eager",
                                arch["output_names"], arch.get("flags", {}))
    except HFLoadError as e:
        raise ConvertedError(str(e).replace(str(b.assets), str(b.program))) from None
    wrapper.modality_token = manifest.get("wrapper", {}).get("modality_token")
    info = {k: v for k, v in src.items() if k not in ("path", "sha256", "format")}
    n_text = seq_len or source_text_len(src)
    with torch.no_grad():
        kwargs = example_inputs(b.assets, wrapper, arch["class"], n_text, batch or src.get("batch") or 1, info)
    info["assets_dir"] = str(b.assets)
    return wrapper, Captured(None, (), kwargs, b.program, "converted", eager=wrapper, info=info)


def _materialise(module: nn.Module) -> None:
    """Give every (stripped, broadcast) parameter its own storage, so weights can be loaded into it."""
    fresh: dict[int, nn.Parameter] = {}
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) not in fresh:
            fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype))  # trainable, as convert left it
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, fresh[id(p)])


def _graph_module(b: Bundle, manifest: dict):
    from loopify.capture import Captured, read_archive

    program, info = read_archive(b.assets / SOURCE_PROGRAM)
    args, kwargs = program.example_inputs or ((), {})
    module = torch.export.unflatten(program)
    _materialise(module)
    return module, Captured(None, tuple(args), dict(kwargs), b.program, "converted", eager=module,
                            info={**manifest["source"], **info})
