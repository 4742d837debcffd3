"""Compile: a model or a converted model -> a TVM artifact, validated against PyTorch.

``compile_model(MODEL, OUT_DIR, target=...)`` takes anything ``loopify convert`` takes, or its
output. A converted model is split into stages (:mod:`loopify.staging`): a prologue, one loop body
per loop and an epilogue sharing one set of weights, with the loop counts as run-time arguments.
After compiling for the host, the artifact is run against PyTorch on the example inputs at every
loop count and each output is listed as ok or not.

TVM is imported only here and in :mod:`loopify.backends.tvm` (never on the convert path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loopify.converted import is_converted  # noqa: F401 - part of this module's API
from loopify.errors import LoopifyError
from loopify.verify import ARTIFACT_RTOL, check_rows, flat_tensors

log = logging.getLogger(__name__)


@dataclass
class CompiledModel:
    path: Path
    manifest: dict
    checks: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


def loop_counts_to_check(loops: list[dict]) -> list[list[int]]:
    """Loop counts at which an artifact is validated: every count of every loop (1..max for
    compressed loops; 0..default+1 for deepen loops), varied together."""
    if not loops:
        return [[]]
    ranges = []
    for l in loops:
        hi = l["max"] if l.get("max") is not None else (l.get("default") or 1) + 1
        ranges.append(list(range(l.get("min", 1), hi + 1)))
    depth = max(len(r) for r in ranges)
    return [[r[min(i, len(r) - 1)] for r in ranges] for i in range(depth)]


def compile_model(model: str | Path, out: str | Path, *, target: str = "x86", arch: str | None = None,
                  mcpu: str | None = None, tune: bool = False, trials: int = 64, tuning_db: str | None = None,
                  rpc: str | None = None, schedule: str = "loopify", validate: bool = True,
                  capture_options: dict | None = None) -> CompiledModel:
    """Compile ``model`` for ``target`` into the artifact directory ``out`` (written atomically).

    Raises:
        LoopifyError: one line naming what failed (capture, staging, import, build, validation).
    """
    from loopify import capture
    from loopify.backends import tvm as tvm_backend
    from loopify.backends.tvm.build import CompileOptions
    from loopify.backends.tvm.targets import target_for
    from loopify.staging import Stage

    model = Path(model)
    options = CompileOptions(schedule=schedule, tune=tune, trials=trials, tuning_db=tuning_db, rpc=rpc)
    tgt = target_for(target, arch=arch, mcpu=mcpu) if target in ("x86", "arm64", "cuda") else target
    if is_converted(model):
        from loopify.convert import load_converted
        from loopify.nn import set_loops
        from loopify.staging import stages_of

        opts = capture_options or {}
        module, captured, _manifest = load_converted(model, seq_len=opts.get("seq_len"), batch=opts.get("batch"))
        stages = stages_of(module, captured)

        def reference(loops: list[int]):
            set_loops(module, loops if loops else None)
            with torch.no_grad():
                out_ = module(*captured.args, **captured.kwargs)
            set_loops(module, None)
            return out_
    else:
        captured = capture.load(model, **(capture_options or {}))
        stages = [Stage("straight", captured.program, name="model", example=tuple(captured.flat_inputs()))]

        def reference(loops: list[int]):
            return captured.run()

    from loopify.artifact import read_manifest
    from loopify.io import atomic_path

    out = Path(out)
    # Built and validated beside OUT; moved into place only when it matches PyTorch.
    with atomic_path(out, directory=True) as tmp:
        result = tvm_backend.compile_stages(stages, tgt, tmp, options=options)
        manifest = read_manifest(Path(result.path), verify=False)
        checks: list[dict] = []
        if validate and _runs_here(manifest):
            checks = validate_artifact(Path(result.path), reference, captured.flat_inputs(), manifest.get("loops", []))
            bad = next((c for c in checks if not c["ok"]), None)
            if bad is not None:
                raise LoopifyError(f"{out}: artifact does not match PyTorch at loops={bad['loops']}: output "
                                   f"{bad['output']} rel err {bad['rel_err']:.3g} > {ARTIFACT_RTOL:g}; nothing "
                                   "written (--no-validate keeps it)")
    compiled = CompiledModel(out, manifest)
    compiled.checks = checks
    return compiled


def _runs_here(manifest: dict) -> bool:
    t = manifest.get("target", {})
    if t.get("kind") != "llvm":
        return False
    triple = t.get("mtriple", "")
    import platform

    return not triple or triple.startswith(platform.machine())


def validate_artifact(path: Path, reference, inputs: list[torch.Tensor], loops: list[dict]) -> list[dict]:
    """Run the artifact at every loop count against ``reference(loops)``; one row per output."""
    from loopify import runtime

    art = runtime.load(path)
    rows = []
    for counts in loop_counts_to_check(loops):
        got = list(art(*inputs, loops=counts or None, output="numpy"))
        rows += check_rows(flat_tensors(reference(counts)), got, ARTIFACT_RTOL, loops=counts)
    return rows
