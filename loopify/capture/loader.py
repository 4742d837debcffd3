"""Capture: load a model file or directory as a torch.export program with its example inputs.

Formats, told apart by content rather than by file name:

* a torch.export archive (``.pt2``, or ``.pt`` written by ``torch.export.save``): loaded safely,
  its example inputs come with it;
* a Hugging Face directory (``config.json`` + weights): built with its transformers class,
  dummy inputs made from its config, exported, and checked against the eager model;
* a pickled ``nn.Module`` written by ``torch.save``: unpickling runs code from the file, so it
  is refused unless the caller passes ``trust_pickle=True``; it then needs an inputs file;
* TorchScript archives, state dicts, and anything else: refused with the reason.

Nothing here is specific to one model family: after loading, every format is an
:class:`torch.export.ExportedProgram` plus example inputs.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from loopify.capture.captured import Captured, ExportCheck
from loopify.capture.inputs import load_inputs
from loopify.errors import CaptureError, ExportMismatchError
from loopify.verify import EXPORT_RTOL, compare

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Format detection


def sniff(path: Path) -> str:
    """Tell what a model path holds, by content.

    Returns one of ``hf-dir``, ``gguf``, ``export-archive``, ``torchscript``, ``torch-save``,
    ``legacy-pickle``; raises :class:`CaptureError` for anything else.
    """
    if not path.exists():
        raise CaptureError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf-dir"
        raise CaptureError(f"{path}: directory has no config.json (not a Hugging Face model directory)")
    if path.stat().st_size == 0:
        raise CaptureError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        if not _zip_ends_whole(path):
            raise CaptureError(f"{path}: truncated or corrupt zip archive (its end record is missing: the file was cut short, "
                               "e.g. by an interrupted copy or download)")
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CaptureError(f"{path}: truncated or corrupt archive ({e})") from None
        if bad is not None:
            raise CaptureError(f"{path}: corrupt archive (bad CRC in {bad})")
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names) or any(
            "/models/" in n and n.endswith(".json") for n in names
        ):
            return "export-archive"
        if any("/code/__torch__" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-save"
        raise CaptureError(f"{path}: zip archive that is neither a torch.export archive nor a torch.save file")
    if head[:1] == b"\x80":
        return "legacy-pickle"
    if head == b"GGUF":
        return "gguf"
    raise CaptureError(f"{path}: unrecognised file format (expected a torch.export archive, a GGUF file, a torch.save file or a Hugging Face directory)")


# ----------------------------------------------------------------------------------------------
# Export


def lower_vmap(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with functorch transforms traced away, when it holds any.

    transformers builds some masks with ``torch.vmap`` over a mask function (Gemma3's
    bidirectional image mask): torch.export keeps that as ``_vmap_increment_nesting`` /
    ``_add_batch_dim`` ... nodes around a ``flat_apply`` of the function. Such a program runs once,
    but an interpreter that keeps intermediate values (find-spans' activation statistics) fails
    ("tensor may have escaped from inside a function being vmapped") and ``torch.export.save``
    cannot serialise ``flat_apply`` (issue 15, class 3). ``run_decompositions`` traces the program
    again at the ATen level, where vmap is executed, not recorded: plain ops, the same values."""
    def transformed(n):
        mod = getattr(n.target, "__module__", "") or ""
        return n.op == "call_function" and (mod.startswith("torch._functorch") or "flat_apply" in str(n.target))
    if not any(transformed(n) for n in program.graph.nodes):
        return program
    return program.run_decompositions()


def export_module(module: torch.nn.Module, args: tuple, kwargs: dict, *, source: Path) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) with the failure reported as one line (vmap traced away:
    :func:`lower_vmap`)."""
    try:
        with torch.no_grad():
            return lower_vmap(torch.export.export(module, tuple(args), dict(kwargs), strict=False))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(f"{source}: torch.export failed: {type(e).__name__}: {msg[:300]}") from e


def check_export(eager: torch.nn.Module, program: torch.export.ExportedProgram, args: tuple, kwargs: dict,
                 rtol: float = EXPORT_RTOL) -> ExportCheck:
    """Run the eager model and the exported program on the same inputs and compare outputs."""
    with torch.no_grad():
        ref = eager(*args, **kwargs)
        out = program.module()(*args, **kwargs)
    return ExportCheck(compare(ref, out), rtol)


def _finish_check(captured: Captured, allow_mismatch: bool) -> Captured:
    chk = captured.export_check
    if chk is not None:
        log.info("export vs eager: max abs %.3g, max rel %.3g (%s)", chk.max_abs_err, chk.max_rel_err,
                 "ok" if chk.ok else "MISMATCH")
        if not chk.ok and not allow_mismatch:
            attn = captured.info.get("attn_implementation")
            raise ExportMismatchError(
                f"{captured.source}: exported program differs from the eager model by {chk.max_abs_err:.3g} max abs "
                f"({chk.max_rel_err:.3g} relative > {chk.rtol:g})"
                + (f" with attn_implementation={attn}" if attn else "")
                + "; pass --allow-export-mismatch to continue anyway")
    return captured


#: Extra file in archives written by loopify: the model's info (output names, image token id ...).
INFO_FILE = "loopify_info.json"


def read_archive(path: Path) -> tuple[torch.export.ExportedProgram, dict]:
    try:
        extra = {INFO_FILE: ""}
        with open(path, "rb") as f:
            program = torch.export.load(f, extra_files=extra)
        try:
            info = json.loads(extra[INFO_FILE]) if extra.get(INFO_FILE) else {}
        except json.JSONDecodeError:
            info = {}
        return program, info if isinstance(info, dict) else {}
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(f"{path}: cannot load torch.export archive: {type(e).__name__}: {msg[:200]}") from None


def load(path: str | Path, *, inputs: str | Path | None = None, trust_pickle: bool = False,
         allow_export_mismatch: bool = False, seq_len: int | None = None,
         attn_implementation: str | None = None, batch: int | None = None) -> Captured:
    """Load and capture a model.

    Args:
        path: a torch.export archive, a Hugging Face directory, or (with ``trust_pickle``) a
            pickled ``nn.Module``.
        inputs: a ``torch.save``d tuple or dict of tensors that replaces the example inputs.
        trust_pickle: allow unpickling a module file (this runs code from the file).
        allow_export_mismatch: keep going when the export does not reproduce eager.
        seq_len: text length of the dummy inputs made for Hugging Face directories.
        attn_implementation: override the attention implementation of Hugging Face models.
        batch: batch size of the dummy inputs made for Hugging Face directories (default 1).

    Raises:
        CaptureError: with a one-line message naming the file and the reason.
    """
    path = Path(path)
    kind = sniff(path)
    user_inputs = load_inputs(inputs) if inputs is not None else None
    if batch is not None and batch != 1 and (kind not in ("hf-dir", "gguf") or user_inputs is not None):
        raise CaptureError(f"{path}: a batch size applies to the dummy inputs loopify builds for Hugging Face "
                           "directories; for other models give batched example inputs with --inputs")

    if kind == "export-archive":
        program, info = read_archive(path)
        if user_inputs is not None:
            args, kwargs = user_inputs
        elif program.example_inputs is not None:
            args, kwargs = program.example_inputs
        else:
            raise CaptureError(f"{path}: the archive carries no example inputs; pass --inputs FILE")
        return Captured(program, tuple(args), dict(kwargs), path, "export-archive", info=info)

    if kind in ("hf-dir", "gguf"):
        return _load_hf(path, kind, user_inputs, seq_len, attn_implementation, batch, allow_export_mismatch)
    if kind == "torchscript":
        raise CaptureError(f"{path}: TorchScript archives are not supported; export the model with torch.export.save (or give its Hugging Face directory)")
    return _load_pickle(path, user_inputs, trust_pickle, allow_export_mismatch)


def _load_hf(path: Path, kind: str, user_inputs, seq_len, attn_implementation, batch, allow_export_mismatch) -> Captured:
    """A Hugging Face directory or GGUF file: built, given example inputs, exported, checked."""
    from loopify.capture import hf  # transformers is imported only for these

    try:
        if kind == "gguf":
            from loopify.capture import gguf

            model = gguf.load(path, seq_len=seq_len, attn_implementation=attn_implementation, batch=batch)
        else:
            model = hf.load_hf_dir(path, seq_len=seq_len, attn_implementation=attn_implementation, batch=batch)
    except hf.HFLoadError as e:
        raise CaptureError(str(e)) from None
    args, kwargs = user_inputs if user_inputs is not None else ((), dict(model.inputs))
    if user_inputs is not None and not args:
        try:
            kwargs = hf.complete_user_inputs(path, model, kwargs)
        except hf.HFLoadError as e:
            raise CaptureError(str(e)) from None
    program = export_module(model.module, args, kwargs, source=path)
    info = {"architecture": model.architecture, "model_type": model.model_type,
            "attn_implementation": model.attn_implementation, "output_names": list(model.output_names),
            "image_token_id": model.image_token_id, **model.info}
    cap = Captured(program, tuple(args), dict(kwargs), path, kind, eager=model.module, info=info)
    cap.export_check = check_export(model.module, program, cap.args, cap.kwargs)
    return _finish_check(cap, allow_export_mismatch)


def _zip_ends_whole(path: Path) -> bool:
    """Whether the zip's end-of-central-directory record is where it must be, at the end of the
    file. A truncated archive can still open in ``zipfile``, which then finds the end record of a
    zip *stored inside it* (an export archive holds torch.save zips) and reads that instead."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65557))
        tail = f.read()
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + 22 > len(tail):
        return False
    comment = int.from_bytes(tail[pos + 20:pos + 22], "little")
    return pos + 22 + comment == len(tail)


def _load_pickle(path: Path, user_inputs, trust_pickle: bool, allow_export_mismatch: bool) -> Captured:
    """A torch.save file or legacy pickle: find out whether it is plain data before anything runs."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        obj = None  # holds objects beyond tensors: a pickled module (or worse)
    except Exception as e:
        raise CaptureError(f"{path}: truncated or corrupt torch.save file ({type(e).__name__})") from None
    if obj is not None:
        what = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CaptureError(f"{path}: holds {what}, not a model; loopify needs the model itself (a torch.export archive or a Hugging Face directory)")
    if not trust_pickle:
        raise CaptureError(
            f"{path}: pickled nn.Module; loading it runs arbitrary code from the file. "
            "Re-save it with torch.export.save, or pass --trust-pickle (with --inputs FILE) if you trust its source")
    if user_inputs is None:
        raise CaptureError(f"{path}: a pickled module carries no example inputs; pass --inputs FILE")
    try:
        module = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:
        raise CaptureError(f"{path}: cannot unpickle module: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"{path}: unpickled a {type(module).__name__}, not an nn.Module")
    module.eval()
    args, kwargs = user_inputs
    program = export_module(module, args, kwargs, source=path)
    cap = Captured(program, tuple(args), dict(kwargs), path, "pickle", eager=module,
                   info={"architecture": type(module).__name__})
    cap.export_check = check_export(module, program, cap.args, cap.kwargs)
    return _finish_check(cap, allow_export_mismatch)


def json_info(info: dict) -> dict:
    """The JSON-able part of a Captured.info."""
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def save_program(program: torch.export.ExportedProgram, path: str | Path, info: dict | None = None) -> Path:
    """Write a torch.export archive atomically (temporary file, then rename), with the model's
    info (output names, image token id ...) as an extra file so that the archive describes itself."""
    from loopify.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        write_program(program, tmp, info)
    return path


def write_program(program: torch.export.ExportedProgram, path: Path, info: dict | None = None) -> None:
    # Serialised in memory, then written from Python: torch's zip writer aborts the process
    # (std::terminate in its destructor) when the disk fills under it; a Python write raises.
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={INFO_FILE: json.dumps(json_info(info or {}))})
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def load_source(path: Path, refusal: str, error=None):
    """A Hugging Face directory or a GGUF file loaded in module form (generation, eval and the
    generation compile all need a real model class, not a graph); anything else is refused with
    ``error(f"{path}: {refusal}")`` and a loading failure re-raised as ``error`` (one line)."""
    from loopify.capture import hf
    from loopify.errors import LoopifyError

    error = error or LoopifyError
    kind = sniff(path)
    try:
        if kind == "gguf":
            from loopify.capture import gguf

            return gguf.load(path)
        if kind == "hf-dir":
            return hf.load_hf_dir(path)
    except hf.HFLoadError as e:
        raise error(str(e)) from None
    raise error(f"{path}: {refusal}")
