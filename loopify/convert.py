"""Convert: capture -> passes -> verify -> save.

``convert(path, config, out)`` folds a model's spans into loops according to a
:class:`ConvertConfig`, checks the result against the original on the example inputs, and writes
``OUT.pt2`` (torch.export archive of the converted model at its default depth; shared weights are
stored once) and ``OUT.json`` (the manifest) atomically. A lossless plan that does not reproduce
the original within :data:`LOSSLESS_RTOL` writes nothing.

``load_converted(OUT.pt2)`` gives the converted model back as a trainable eager module whose loop
count can be changed (:func:`loopify.nn.recursion.set_loops`), rebuilt from the converted model's
own files (:mod:`loopify.converted`): the source model is not read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from loopify import converted
from loopify.config import fields_from_dict
from loopify.converted import read_manifest  # noqa: F401 - part of this module's API
from loopify.errors import LoopifyError
from loopify.io import sha256_path
from loopify.nn import recursions, set_loops
from loopify.pipeline import Pipeline, State, parse, run_pipeline
from loopify.verify import LOSSLESS_RTOL, report as verify_report
from loopify.versions import versions

log = logging.getLogger(__name__)

CONFIG_VERSION = 1


class ConvertError(LoopifyError):
    """The conversion could not be done or did not verify."""


@dataclass(frozen=True)
class ConvertConfig:
    """What to convert and how. Serialises to and from a dict (stored in the manifest).

    Attributes:
        blocks: unique blocks per run (0: halve the run).
        loops: loops per run instead of blocks (0: not given).
        sharing: cycle, sequence, middle-cycle, middle-sequence.
        init: stepwise, average, lower, upper.
        rank: LoRA rank of the per-depth relaxation, or "full" (reproduces the original).
        connector: none, identity, recursive, embedding.
        mode: compress (tie layers) or deepen (loop the span with its own weights).
        repeat: deepen mode: default loop count.
        stacks: only these stacks (module paths); empty: every stack with a run.
        norms: shared or per-depth.
        subsample: keep evenly spaced layers when blocks do not divide a run.
        image_token_id: overrides the image token id used for the connector's modality mask.
        router: none, expert or token: a Mixture-of-Recursions router on every loop (neutral at
            insertion; module form only).
        capacity: expert router: fraction of the tokens kept per recursion step (empty: (N-r)/N).
        schedule: multi-resolution loops: pooling factor of each recursion step, coarse to fine
            (empty: none; see the multi-resolution pass). In deepen mode no connector is added.
        pipeline: a full pipeline spec; when given, the options above are not used.
    """

    version: int = CONFIG_VERSION
    blocks: int = 0
    loops: int = 0
    sharing: Literal["cycle", "sequence", "middle-cycle", "middle-sequence"] = "cycle"
    init: Literal["stepwise", "average", "lower", "upper"] = "average"
    rank: int | Literal["full"] = 0
    connector: Literal["none", "identity", "recursive", "embedding"] = "none"
    mode: Literal["compress", "deepen"] = "compress"
    repeat: int = 2
    stacks: tuple[str, ...] = ()
    norms: Literal["shared", "per-depth"] = "shared"
    subsample: bool = False
    image_token_id: int = -1
    router: Literal["none", "expert", "token"] = "none"
    capacity: tuple[float, ...] = ()
    schedule: tuple[int, ...] = ()
    pipeline: str | None = None

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ConvertError(f"config version {self.version} is not supported (this loopify reads version {CONFIG_VERSION})")
        if self.mode == "deepen" and self.rank not in (0,):
            raise ConvertError("--rank applies to compress mode; deepen mode keeps every layer's own weights")
        if self.blocks and self.loops:
            raise ConvertError("give --blocks or --loops, not both")
        if self.capacity and self.router != "expert":
            raise ConvertError("--capacity applies to --router expert")
        # The passes validate the rest when the pipeline is built.

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stacks"] = list(self.stacks)
        d["capacity"] = list(self.capacity)
        d["schedule"] = list(self.schedule)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConvertConfig":
        return cls(**fields_from_dict(cls, d, ConvertError))

    def to_pipeline(self) -> Pipeline:
        """The pipeline this config stands for."""
        if self.pipeline:
            return parse(self.pipeline)
        parts = ["find-spans{similarity=false}"]
        fold = {}
        if self.mode == "deepen":
            fold = {"mode": "deepen", "repeat": self.repeat}
        else:
            for k in ("blocks", "loops"):
                if getattr(self, k):
                    fold[k] = getattr(self, k)
            if self.sharing != "cycle":
                fold["sharing"] = self.sharing
            if self.init != "average":
                fold["init"] = self.init
            if self.norms != "shared":
                fold["norms"] = self.norms
            if self.subsample:
                fold["subsample"] = "true"
        if self.stacks:
            fold["stacks"] = ":".join(self.stacks)
        parts.append("fold-loops" + ("{" + ",".join(f"{k}={v}" for k, v in fold.items()) + "}" if fold else ""))
        if self.rank != 0:
            parts.append(f"relax{{rank={self.rank}}}")
        connector = self.connector
        if connector == "none" and self.mode == "deepen" and not self.schedule:
            connector = "recursive"  # RecursiveVLM: deepening goes with connectors
        if connector != "none":
            opts = [f"kind={connector}"]
            if self.image_token_id >= 0:
                opts.append(f"image_token_id={self.image_token_id}")
            parts.append("insert-connectors{" + ",".join(opts) + "}")
        if self.router != "none":
            opts = [f"kind={self.router}"] + ([f"capacity={':'.join(map(str, self.capacity))}"] if self.capacity else [])
            parts.append("route{" + ",".join(opts) + "}")
        if self.schedule:
            opts = [f"schedule={':'.join(map(str, self.schedule))}"]
            if self.image_token_id >= 0:
                opts.append(f"image_token_id={self.image_token_id}")
            parts.append("multi-resolution{" + ",".join(opts) + "}")
        try:
            return parse(",".join(parts))
        except LoopifyError as e:
            raise ConvertError(str(e)) from None

    def lossless(self) -> bool:
        """Whether the plan reproduces the original exactly by construction."""
        if self.pipeline:
            return False
        if self.schedule:  # gates at zero: the full-resolution steps alone (see loopify.nn.spiral)
            return self.mode == "deepen" and self.schedule.count(1) == 1
        if self.mode == "deepen":
            return self.repeat == 1
        return self.rank == "full" and not self.subsample


# ----------------------------------------------------------------------------------------------
# Sizes


def unique_params(module_or_state) -> tuple[int, int]:
    """(parameter count, bytes) counting each storage once (shared weights once)."""
    tensors = module_or_state.values() if isinstance(module_or_state, dict) else \
        [p for _, p in module_or_state.named_parameters(remove_duplicate=False)]
    seen, count, nbytes = set(), 0, 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    return count, nbytes


# ----------------------------------------------------------------------------------------------
# Convert


@dataclass
class ConvertResult:
    module: torch.nn.Module
    manifest: dict
    records: list = field(default_factory=list)
    program: torch.export.ExportedProgram | None = None


def verify(reference, candidate, output_names: list[str] | None = None) -> dict:
    """Per-output max abs error, relative error, cosine; KL for logits (see :mod:`loopify.verify`)."""
    try:
        return verify_report(reference, candidate, output_names)
    except ValueError as e:
        raise ConvertError(f"the converted model's outputs do not match the original's: {e}") from None


def convert_captured(captured, config: ConvertConfig, *, progress=None, **runner_options) -> ConvertResult:
    """Run the config's pipeline on a captured model and verify the result (writes nothing)."""
    pipeline = config.to_pipeline()
    t0 = time.perf_counter()
    result = run_pipeline(pipeline, State(captured, captured.editable()), progress=progress, **runner_options)
    module = result.state.module
    loops = recursions(module)
    if not loops:
        spans = result.state.analyses.get("spans")
        shared = getattr(spans, "shared", None)
        if shared:
            sh = shared[0]
            raise ConvertError(f"{captured.source}: nothing to convert: the model already shares its layers "
                               f"({sh.module} runs {sh.calls} times with the same weights, a loop as it is)")
        raise ConvertError(f"{captured.source}: nothing to convert: no span of interchangeable layers was found"
                           " (see `loopify inspect`)")
    for r in loops.values():
        check_ties(r)
    ref = captured.run()
    with torch.no_grad():
        out = module(*captured.args, **captured.kwargs)
    plan = {r.name: r.report for r in result.records}
    lossless = config.lossless() or bool(plan.get("relax", {}).get("lossless") and not config.subsample
                                          and config.mode == "compress" and not config.pipeline
                                          and not config.schedule)
    report = verify(ref, out, captured.info.get("output_names"))
    report["lossless_plan"] = lossless
    report["ok"] = (report["rel_err"] <= LOSSLESS_RTOL) if lossless else True
    orig_n, orig_b = unique_params(captured.program.state_dict)
    conv_n, conv_b = unique_params(module)
    manifest = {
        "format": converted.FORMAT, "version": converted.VERSION,
        "source": {"path": str(Path(captured.source).resolve()), "format": captured.format,
                   "sha256": sha256_path(Path(captured.source)),
                   **{k: v for k, v in captured.info.items() if isinstance(v, (str, int, float, bool, list, type(None)))}},
        "config": config.to_dict(), "pipeline": str(pipeline),
        "plan": _plan_summary(plan, loops),
        "params": {"original": orig_n, "converted": conv_n, "ratio": conv_n / max(orig_n, 1)},
        "bytes": {"original": orig_b, "converted": conv_b},
        "verify": report,
        "loops": [{"module": p, "stack": r.spec.stack, "min": 0 if r.deepen else 1, "max": None if r.deepen else r.spec.max_loops,
                   "default": r.spec.max_loops, "mode": r.spec.mode,
                   **({"router": r.router.kind} if r.router is not None else {}),
                   **({"schedule": list(r.spiral.spec.schedule)} if r.spiral is not None else {})}
                  for p, r in loops.items()],
        "skeletons": {p: r.skeleton() for p, r in loops.items()},
        "wrapper": {"modality_token": getattr(module, "modality_token", None)},
        "inputs": _describe(captured),
        "passes": [{"name": r.name, "spec": r.spec, "modified": r.modified, "seconds": r.seconds} for r in result.records],
        "seconds": time.perf_counter() - t0,
    }
    return ConvertResult(module, manifest, result.records)


def _describe(captured) -> list[dict]:
    from loopify.capture import describe_inputs

    return describe_inputs(captured.args, captured.kwargs)


def _plan_summary(plan: dict, loops) -> dict:
    out = {}
    fold = plan.get("fold-loops", {})
    out["loops"] = fold.get("loops", [])
    if "relax" in plan:
        rel = plan["relax"]
        out["relax"] = {"rank": rel.get("rank"), "lossless": rel.get("lossless"), "loops": [
            {k: v for k, v in l.items() if k != "per_matrix"} for l in rel.get("loops", [])]}
    if "insert-connectors" in plan:
        out["connectors"] = plan["insert-connectors"]
    if "route" in plan:
        out["router"] = plan["route"]
    if "multi-resolution" in plan:
        out["spiral"] = plan["multi-resolution"]
    return out


def check_ties(rec) -> None:
    """Every depth must see its block's very parameter objects (overrides aside)."""
    for depth in range(rec.spec.layers):
        block = rec.blocks[rec.block_for_depth(depth)]
        own = dict(block.named_parameters())
        seen = rec.params_at(depth)
        overridden = rec.depth_overrides(depth)
        for name, p in own.items():
            if name in overridden:
                continue
            if seen[name] is not p:
                raise ConvertError(f"tie broken: depth {depth} does not use block parameter {name}")


def export_converted(module: torch.nn.Module, captured) -> torch.export.ExportedProgram:
    """torch.export of the converted model at its current loop counts (vmap traced away, see
    :func:`loopify.capture.loader.lower_vmap`)."""
    from loopify.capture.loader import lower_vmap

    try:
        with torch.no_grad():
            return lower_vmap(torch.export.export(module, tuple(captured.args), dict(captured.kwargs), strict=False))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"exporting the converted model failed: {first[:300]}") from e


def save(result: ConvertResult, captured, out: str | Path) -> tuple[Path, Path]:
    """Write the converted model's files (see :mod:`loopify.converted`); returns (OUT.pt2, OUT.json)."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise ConvertError(f"{out}: the output must end in .pt2")
    program = result.program or export_converted(result.module, captured)
    from loopify.capture import write_program

    result.manifest["bytes"]["original_file"] = source_bytes(Path(captured.source))
    result.manifest["versions"] = versions("loopify", "torch", "transformers")
    b = converted.save(result.module, captured, result.manifest, out,
                       lambda tmp: write_program(program, tmp, captured.info))
    return b.program, b.manifest


def source_bytes(path: Path) -> int:
    """Bytes of a model on disk: its safetensors for a directory (else every file), or the file."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
            f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def convert(path: str | Path, config: ConvertConfig, out: str | Path | None, *, dry_run: bool = False,
            capture_options: dict | None = None, on_captured: Callable | None = None,
            on_converted: Callable | None = None, **runner_options) -> ConvertResult:
    """Capture ``path``, convert it, verify, and (unless ``dry_run``) save to ``out``.

    ``on_captured(captured)`` and ``on_converted(result)`` are called as each step finishes (the
    CLI prints there); a lossless plan that does not verify raises before anything is written.
    """
    from loopify import capture

    if not dry_run:
        if out is None:
            raise ConvertError("give -o OUT.pt2 (or --dry-run)")
        if Path(out).suffix != ".pt2":
            raise ConvertError(f"{out}: the output must end in .pt2")
        converted.check_bundle_output(converted.Bundle.of(out))
    captured = capture.load(path, **(capture_options or {}))
    if on_captured is not None:
        on_captured(captured)
    result = convert_captured(captured, config, **runner_options)
    if on_converted is not None:
        on_converted(result)
    rep = result.manifest["verify"]
    if not rep["ok"]:
        raise ConvertError(
            f"{path}: the lossless plan does not reproduce the original: max relative error {rep['rel_err']:.3g} > "
            f"{LOSSLESS_RTOL:g} (max abs {rep['max_abs_err']:.3g}); nothing written")
    if not dry_run:
        save(result, captured, out)
    result.captured = captured  # type: ignore[attr-defined]
    return result


# ----------------------------------------------------------------------------------------------
# Load back


def load_converted(path: str | Path, *, loops: int | list[int] | None = None, seq_len: int | None = None,
                   batch: int | None = None):
    """Load a converted model as a trainable eager module with adjustable loop counts.

    Rebuilt from the converted model's own files (architecture, loop skeletons, weights; every
    file checked against the manifest's sha256); the source model is not read. ``seq_len``
    rebuilds it for another text length (Hugging Face sources: the weights do not depend on it);
    ``batch`` likewise for another batch size. Returns ``(module, inputs, manifest)``: ``inputs``
    is a :class:`~loopify.capture.Captured` holding the example inputs (no program).
    """
    loaded = converted.rebuild(path, seq_len=seq_len, batch=batch)
    try:
        set_loops(loaded.module, loops)
    except ValueError as e:
        raise ConvertError(f"--loops: {e}") from None
    return loaded.module, loaded.inputs, loaded.manifest


def format_summary(m: dict) -> str:
    """The plan, a before/after table per stack and the verify report, for the terminal."""
    lines = []
    rows = [("stack", "layers", "blocks x loops", "sharing", "init", "params before", "params after")]
    for l in m["plan"].get("loops", []):
        rows.append((l["stack"], str(l["layers"]), f"{l['blocks']} x {l['loops']}", l["sharing"], l["init"],
                     f"{l['params_before']:,}", f"{l['params_after']:,}"))
    rows.append(("whole model", "", "", "", "", f"{m['params']['original']:,}", f"{m['params']['converted']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    b = m["bytes"]
    lines.append(f"parameters: {m['params']['original']:,} -> {m['params']['converted']:,} "
                 f"({m['params']['ratio']:.1%}); parameter bytes {b['original']:,} -> {b['converted']:,}")
    relax = m["plan"].get("relax")
    if relax:
        for l in relax["loops"]:
            if "max_recon_error" in l:
                lines.append(f"relax rank {relax['rank']} on {l['loop']}: {l['params_added']:,} params, max weight "
                             f"reconstruction error {l['max_recon_error']:.3g} (= dropped singular energy)")
                if l.get("clamped"):
                    lines.append(f"  note: rank {relax['rank']} is above the full rank of {len(l['clamped'])} "
                                 f"matri{'x' if len(l['clamped']) == 1 else 'ces'}, clamped to it (effective rank "
                                 f"{l.get('effective_rank')}{'; a lossless plan' if l.get('full_rank') else ''})")
    conn = m["plan"].get("connectors")
    if conn:
        for l in conn["loops"]:
            lines.append(f"connector {conn['kind']} on {l['loop']}: " + (l.get("skipped") or f"{l['mask']}, {l['params']:,} params"))
    routed = m["plan"].get("router")
    if routed:
        for l in routed.get("loops", []):
            cap = ", capacity " + ":".join(f"{c:g}" for c in l["capacity"]) if l["kind"] == "expert" else ""
            lines.append(f"router {l['kind']} on {l['loop']}: {l['steps']} steps{cap}, {l['params']:,} params "
                         "(neutral: every token takes every step until trained)")
    for l in (m["plan"].get("spiral") or {}).get("loops", []):
        lines.append(f"multi-resolution on {l['loop']}: schedule {':'.join(map(str, l['schedule']))}, "
                     f"{'causal (coarse updates shifted by one group)' if l['causal'] else 'not causal'}, "
                     f"{l['modality']}, {l['params']:,} gate params (zero: coarse steps add nothing until trained)")
    v = m["verify"]
    kl = f", KL {v['kl']:.3g}" if v.get("kl") is not None else ""
    status = ("OK (lossless plan within 1e-5 relative)" if v["ok"] else "FAILED") if v["lossless_plan"] else "lossy plan"
    lines.append(f"verify vs original: max abs err {v['max_abs_err']:.3g}, rel {v['rel_err']:.3g}, "
                 f"cosine {v['cosine']:.6f}{kl}: {status}")
    for o in v["outputs"]:
        okl = f", KL {o['kl']:.3g}, top-1 agreement {o['top1_agreement']:.3f}, top-5 overlap " \
              f"{o['top5_overlap']:.3f}" if "kl" in o else ""
        lines.append(f"  {o['name']:<20} {str(tuple(o['shape'])):<18} max abs {o['max_abs_err']:.3g}  cosine {o['cosine']:.6f}{okl}")
    if v.get("kl") is not None:
        lines.append("  (on the example inputs only; `loopify eval OUT.pt2 --data FILE` measures perplexity and "
                     "agreement on real text)")
    return "\n".join(lines)
