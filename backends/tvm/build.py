"""Compile staged programs to artifacts: Relax pipeline per target, link, write the directory.

Pipeline (each target exposes the same phases, as TVM's own backends do)::

    import (stages -> one Relax module, params deduplicated)      staging.build_module
    prepare  : vector exp / sigmoid / tanh / erf (CPU)            schedules.prepare_passes
    dispatch + legalise + fuse                                    TVM's cpu_generic / cuda phases
    tune     : optional MetaSchedule on exactly this module       tuning.tune / apply_database
    schedule : DLight GPU rules (cuda) / loopify CPU rules (llvm) schedules.schedule_passes
    lower + finalise                                              TVM's phases
    export   : lib.so (host cc / aarch64-linux-gnu-gcc; CUDA device code by nvcc, fatbin)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loopify import artifact as _artifact

from . import targets as _targets
from .errors import CompileError
from .staging import Stage, StagedModule, build_module

log = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    """Options of :func:`compile_stages` (recorded in the manifest).

    Attributes:
        schedule: CPU schedule rules: ``"loopify"`` (loopify's matmul / reduction / elementwise
            rules, the default), ``"dlight"`` (TVM's DLight CPU rules only) or ``"none"``
            (TVM's default CPU pipeline: no schedule at all; for comparisons).
        tune: run MetaSchedule before building (CPU and GPU).
        trials: MetaSchedule trials in total.
        tuning_db: directory of a MetaSchedule JSON database: reused when present (records
            already there are not re-measured), extended by tuning, copied into the artifact.
        rpc: ``"host:port:key"`` of a TVM RPC tracker: measure candidates on the remote device
            (arm64 boards) instead of this machine.
        num_threads: the CPU thread count the schedules and tuning assume (default: all cores).
        weights: ``float32``, or ``int8`` / ``int4`` when the module carries quantised weights
            (their dequantisation is fused into the matmuls; see :mod:`.quant`).
        fast_math: on CPUs, exp / sigmoid / tanh / erf as vector polynomials (:mod:`.fastmath`,
            within ~1e-6 relative); False keeps libm's (one call per element).
    """

    schedule: str = "loopify"
    tune: bool = False
    trials: int = 64
    tuning_db: str | None = None
    rpc: str | None = None
    num_threads: int | None = None
    weights: str = "float32"
    fast_math: bool = True

    def to_dict(self) -> dict:
        return {"schedule": self.schedule, "tune": self.tune, "trials": self.trials,
                "tuning_db": self.tuning_db, "rpc": self.rpc, "num_threads": self.num_threads,
                "weights": self.weights, "fast_math": self.fast_math}


@dataclass
class CompileResult:
    path: Path | None
    manifest: dict
    executable: object = None  # tvm.relax.Executable
    timings: dict = field(default_factory=dict)


def _as_target(target) -> tuple[dict, str]:
    if isinstance(target, str):
        t = _targets.target_for(target)
        return t, target
    if isinstance(target, dict):
        return dict(target), _targets.target_name(target)
    raise CompileError(f"target must be a name ({', '.join(_targets.TARGET_NAMES)}) or a TVM "
                       f"target dict, got {type(target).__name__}")


def _backend(target):
    from tvm import relax

    return relax.backend.cuda.pipeline if target.kind.name == "cuda" else relax.backend.cpu_generic.pipeline


def front_passes(target, options: CompileOptions, dataflow: bool = True) -> list:
    """prepare + library dispatch + legalise + fuse: the module MetaSchedule tunes."""
    from . import schedules

    return (schedules.prepare_passes(target, options)
            + _backend(target).library_dispatch_passes(target)
            + schedules.legalize_passes(target, dataflow, fuse_transpose=options.weights != "float32"))


def back_pipeline(target, options: CompileOptions):
    """schedule + lower + finalise, as the ``relax_pipeline`` of ``tvm.compile``."""
    import tvm

    from . import schedules

    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=0, name="LoopifyBackPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(schedules.schedule_passes(target, options)
                                           + backend.dataflow_lower_passes(target)
                                           + backend.finalize_passes(target))
            return seq(mod)

    return _pipeline


def build_executable(staged: StagedModule, target: dict, options: CompileOptions,
                     work_dir: Path | None = None, timings: dict | None = None, device_record=None):
    """Compile a staged Relax module to a ``tvm.relax.Executable`` (see :func:`build_executable_module`)."""
    return build_executable_module(staged.mod, target, options, work_dir, timings)


def build_executable_module(mod, target: dict, options: CompileOptions, work_dir: Path | None = None,
                            timings: dict | None = None):
    """Compile a Relax module to a ``tvm.relax.Executable``.

    The front passes run first and, with ``tune``, MetaSchedule tunes exactly their result and
    its database is applied to that same module (outside any pass: a build nested in a running
    pass context hangs); then ``tvm.compile`` schedules what is left and lowers.
    """
    import tvm

    timings = timings if timings is not None else {}
    _targets.check_toolchain(target)
    tgt = tvm.target.Target(target)
    try:
        with tgt:
            try:
                front = tvm.transform.Sequential(front_passes(tgt, options))(mod)
            except Exception as e:  # noqa: BLE001 - TVM's FuseTIR on dataflow-converted branches
                why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                front, skipped = _front_skipping_dataflow(mod, tgt, options)
                log.info("front passes failed (%s); again without ConvertToDataflow in %s", why[:120],
                         ", ".join(skipped) if skipped else "any function")
                timings["dataflow_fallback"] = {"error": why, "without_dataflow": skipped or "all"}
            mod = front
        if options.tune:
            from . import tuning

            t = time.time()
            mod = tuning.tune_and_apply(mod, tgt, options, work_dir)
            timings["tune_s"] = round(time.time() - t, 1)
        return tvm.compile(mod, tgt, relax_pipeline=back_pipeline(tgt, options))
    except CompileError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM build for {target} failed: {type(e).__name__}: "
                           f"{msg[-1] if msg else ''}") from e


def _front_skipping_dataflow(mod, tgt, options: CompileOptions):
    """The front passes with ``ConvertToDataflow`` applied to every Relax function but one
    (tried in turn: the branches first, ``main`` last), or to none when each try fails:
    ``(module, names left without dataflow)``. TVM 0.27's FuseTIR fails on some fused groups
    of a dataflow-converted function (a Gemma decoder; a multi-resolution decode step's dense
    coarse branch: "VarRemapGet(source) == nullptr"); dropping dataflow for the whole module
    then also dropped the fused transpose of every weight in every other function (the
    converted SmolLM2's prefill transposed each weight on every call: 2.8x slower)."""
    import tvm
    from tvm import relax

    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    names.sort(key=lambda n: n == "main")
    plain = tvm.transform.Sequential(front_passes(tgt, options, dataflow=False))
    for skip in names:
        funcs = {}
        for gv, f in mod.functions.items():
            if isinstance(f, relax.Function) and gv.name_hint != skip:
                f = relax.transform.ConvertToDataflow()(tvm.IRModule({gv: f}))[gv.name_hint]
            funcs[gv] = f
        try:
            return plain(tvm.IRModule(funcs, attrs=mod.attrs)), [skip]
        except Exception:  # noqa: BLE001 - the next function
            continue
    return plain(mod), []


def _pack_width(target: dict, options: CompileOptions) -> int | None:
    """Column-panel width for linear weights on CPUs (two SIMD registers of float32), matching
    the NN matmul kernel's tile (`sym_rules.MatmulLike`); None (plain transpose) elsewhere."""
    if target.get("kind") != "llvm" or options.schedule != "loopify":
        return None
    import tvm

    from .cpu_rules import vector_bits

    return 2 * vector_bits(tvm.target.Target(target)) // 32


def _x86_flags(target: dict) -> list[str]:
    """/proc/cpuinfo flags the generated x86 code needs (so a too-old CPU is refused at load
    instead of dying of SIGILL)."""
    import tvm

    has = tvm.get_global_func("target.llvm_cpu_has_feature")
    tgt = tvm.target.Target(target)
    flags = []
    for feat, flag in (("avx512f", "avx512f"), ("avx2", "avx2"), ("fma", "fma"), ("avx", "avx")):
        try:
            if has(feat, tgt):
                flags.append(flag)
        except Exception:  # noqa: BLE001
            pass
    return flags


def resolve_options(options: CompileOptions | None, kw: dict) -> CompileOptions:
    if options is not None and kw:
        raise CompileError("pass either options= or keyword options, not both")
    if options is None:
        try:
            options = CompileOptions(**kw)
        except TypeError as e:
            raise CompileError(f"unknown compile option: {e}; valid: "
                               f"{', '.join(CompileOptions.__dataclass_fields__)}") from None
    if options.schedule not in ("loopify", "dlight", "none"):
        raise CompileError(f"schedule must be loopify, dlight or none, got {options.schedule!r}")
    return options


def resolve_target(target, options: CompileOptions) -> tuple[dict, str]:
    target, name = _as_target(target)
    if options.tune and target.get("kind") == "llvm" and "num-cores" not in target:
        # MetaSchedule sizes its parallel loops by the target's core count.
        target["num-cores"] = int(options.num_threads or os.cpu_count() or 1)
    return target, name


def target_manifest(target: dict, name: str, options: CompileOptions, timings: dict) -> dict:
    """The manifest fields every artifact has (target, versions, options, timings)."""
    from loopify.versions import versions

    m = {"target": target, "target_name": name, "versions": versions("torch", "tvm", "tvm_ffi", "loopify"),
         "options": options.to_dict(), "timings": timings}
    if name == "x86":
        m["requires_cpu_flags"] = _x86_flags(target)
    return m


def link(ex, path: Path, target: dict, name: str, timings: dict, manifest: dict, device_record: dict) -> None:
    """Export one executable as a shared library (cross-linked for arm64; CUDA device code as an
    nvcc fatbin inside it, recorded in the manifest)."""
    t = time.time()
    kw = {}
    if target.get("kind") == "cuda":
        from .cuda_pack import make_fpack_imports

        kw["fpack_imports"] = make_fpack_imports(target.get("arch", "sm_90"), device_record)
    try:
        ex.export_library(str(path), fcompile=_targets.fcompile_for(target), **kw)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"linking {path.name} for {name} failed: {e}") from e
    timings[f"link_{path.stem}_s"] = round(time.time() - t, 1)
    if device_record.get("fatbins"):
        manifest["device_code"] = {
            "format": "fatbin", "arch": target.get("arch"), "compiler": "nvcc",
            "modules": [{"bytes": len(fb), "sha256": hashlib.sha256(fb).hexdigest()} for fb in device_record["fatbins"]]}


def compile_stages(stages: list[Stage], target="x86", out=None, *, options: CompileOptions | None = None,
                   extra: dict | None = None, quant=None, **kw) -> CompileResult:
    """Compile a staged model (see :class:`Stage`) for ``target`` and write the artifact to ``out``.

    Args:
        stages: the stages; the first takes the model inputs, the last returns its outputs.
        target: ``"x86"``, ``"arm64"``, ``"cuda"`` or a TVM target dict.
        out: the artifact directory (written atomically); None: build only, keep the executable.
        options: a :class:`CompileOptions`; or pass its fields as keywords
            (``tune=True, trials=64, tuning_db=..., rpc="host:port:key", schedule=...``).
        extra: more manifest fields (the LoRA forms of a converted model).
        quant: a :class:`loopify.nn.quant.QuantPlan`: the weights it holds are stored as codes
            and scales and dequantised inside the matmuls (manifest ``quantization``).

    Returns:
        A :class:`CompileResult` with the artifact path, its manifest and the executable.
    """
    options = resolve_options(options, kw)
    target, name = resolve_target(target, options)
    timings = {}
    t = time.time()
    staged = build_module(stages, pack_width=_pack_width(target, options),
                          raw_keys=frozenset(quant.registry) if quant else frozenset())
    quant_info = None
    if quant is not None:
        from .quant import quantize_weights

        staged.mod, staged.params.names, staged.params.tensors, report = quantize_weights(
            staged.mod, staged.params.tensors, staged.params.names, quant.registry, quant.config.embeddings)
        quant_info = quant.manifest(report, staged.params.nbytes)
        options.weights = quant.config.weights
    timings["import_s"] = round(time.time() - t, 1)
    work = Path(tempfile.mkdtemp(prefix="loopify-build-"))
    device_record: dict = {}
    try:
        t = time.time()
        ex = build_executable(staged, target, options, work, timings, device_record)
        timings["build_s"] = round(time.time() - t, 1)
        manifest = {**_stages_manifest(staged, stages, target, name, options, timings), **(extra or {})}
        if quant_info is not None:
            manifest["quantization"] = quant_info
        if out is None:
            return CompileResult(None, manifest, ex, timings)

        def populate(tmp: Path):
            from safetensors.torch import save_file

            link(ex, tmp / _artifact.LIBRARY, target, name, timings, manifest, device_record)
            save_file({n: t.contiguous() for n, t in zip(staged.params.names, staged.params.tensors)},
                      str(tmp / _artifact.PARAMS))
            _save_example_inputs(stages[0].example, staged.inputs, tmp / _artifact.EXAMPLE_INPUTS)
            db = Path(options.tuning_db) if options.tuning_db else work / "tuning"
            if options.tune and db.is_dir():
                (tmp / "tuning").mkdir()
                for f in ("database_workload.json", "database_tuning_record.json"):
                    if (db / f).is_file():
                        shutil.copy2(db / f, tmp / "tuning" / f)

        path = _artifact.write(out, populate, manifest)
        log.info("wrote %s", path)
        return CompileResult(path, manifest, ex, timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_example_inputs(example, specs: list[dict], path: Path) -> None:
    """The first stage's example inputs by input name (skipped unless they are exactly the
    artifact's tensor inputs, e.g. a stage built without examples)."""
    from safetensors.torch import save_file

    if not example or len(example) != len(specs) or not all(isinstance(t, torch.Tensor) for t in example):
        return
    save_file({s["name"]: t.detach().cpu().contiguous() for s, t in zip(specs, example)}, str(path))


def _stages_manifest(staged, stages, target, name, options, timings) -> dict:
    manifest = {
        **target_manifest(target, name, options, timings),
        "inputs": _with_ranges(staged.inputs, stages[0]), "outputs": staged.outputs, "loops": staged.loops,
        "assumptions": staged.assumptions, "params": staged.params.names,
        "stages": [{"kind": s.kind, "name": s.name or f"stage{i}",
                    **({"position": list(s.position)} if s.position is not None else {})} for i, s in enumerate(stages)],
        "tuning": {"tuned": options.tune, "trials": options.trials if options.tune else 0,
                   "database": "tuning" if options.tune else None, "rpc": options.rpc,
                   "functions": getattr(options, "_tuning_report", [])},
        "params_info": {"unique": len(staged.params.tensors), "references": staged.params.references,
                        "bytes": staged.params.nbytes},
    }
    if len(staged.loops) == 1:
        lp = staged.loops[0]
        manifest["loop"] = {"min": lp["min"], "max": lp["max"], "default": lp["default"]}
    return manifest


def _with_ranges(inputs: list[dict], first: Stage) -> list[dict]:
    """The input descriptions with each index input's valid range (``"range": [low, high)``), which
    the runtime checks before every call (see :mod:`loopify.bounds`)."""
    from loopify.bounds import index_ranges

    ranges = index_ranges(first.program) if first.kind == "straight" else {}
    return [dict(d, range=list(ranges[i])) if i in ranges else d for i, d in enumerate(inputs)]


def compile_program(ep: torch.export.ExportedProgram, target="x86", out=None, *, example=None,
                    **kw) -> CompileResult:
    """Compile one plain program (a single straight stage). See :func:`compile_stages`.

    ``example``: the program's flat example inputs, needed only by programs with boolean-mask
    indexing (their count is taken from the example and recorded as an assumption)."""
    return compile_stages([Stage("straight", ep, example=None if example is None else tuple(example))],
                          target, out, **kw)
