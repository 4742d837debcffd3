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
from loopify.verify import ARTIFACT_RTOL, HALF_ARTIFACT_RTOL, check_rows, flat_tensors

DTYPES = ("float32", "float16")


def artifact_rtol(dtype: str = "float32") -> float:
    """The validation tolerance of an artifact of ``dtype`` (:mod:`loopify.verify`; read from
    this module's globals at each call, so a test can tighten it)."""
    return HALF_ARTIFACT_RTOL if dtype in ("float16", "bfloat16") else ARTIFACT_RTOL

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


#: default gathered bucket of routed prefill steps (a fraction of the prompt's tokens)
ROUTE_BUCKET = 0.25


def compile_model(model: str | Path, out: str | Path, *, target: str = "x86", arch: str | None = None,
                  mcpu: str | None = None, tune: bool = False, trials: int = 64, tuning_db: str | None = None,
                  rpc: str | None = None, schedule: str = "loopify", validate: bool = True,
                  capture_options: dict | None = None, max_context: int | None = None,
                  kv_policy: str = "per-depth", lora_form: str = "auto", weights: str = "float32",
                  quantize_embeddings: bool = False, embedding_weights: str | None = None,
                  dtype: str = "float32", lora_weights: str = "float32",
                  route_bucket: float = ROUTE_BUCKET) -> CompiledModel:
    """Compile ``model`` for ``target`` into the artifact directory ``out`` (written atomically).

    ``max_context``: compile for generation instead (``prefill`` / ``decode`` entry points with a
    symbolic token count up to this many tokens, KV policy ``kv_policy``; see
    :func:`compile_generation`).

    ``lora_form``: how per-depth LoRA runs (``auto``, ``merged``, ``factored``; see
    :data:`loopify.nn.lora.FORMS`), recorded per matrix in the manifest's ``lora``.

    ``weights``: ``float32``, ``int8`` (per output channel), ``int4`` or ``int4asym`` (groups of 32): the
    linear weights are stored quantised and dequantised inside the matmul kernels
    (:mod:`loopify.nn.quant`); ``quantize_embeddings`` also the embeddings and a tied head, in the same scheme or in
    ``embedding_weights`` (a mixed scheme: e.g. int4asym matrices, an int8 table). The
    artifact is validated against the PyTorch model with the same dequantised weights.

    ``lora_weights``: ``int8`` also quantises the per-depth LoRA (merged matrices and factors,
    per output row; :func:`loopify.nn.quant.quantize_lora_`); needs ``weights``.

    ``route_bucket`` (generation, routed loops): a routed step's prefill gathers its kept
    tokens into ``max(2, ceil(T * route_bucket))`` rows when they fit there (its blocks then run
    on those rows only), else runs every token with the recursion-wise mask; 0: always the
    latter. See :func:`loopify.generate.export.export_step`.

    ``dtype``: ``float16`` converts the weights, activations and KV cache to half precision
    (float16 kernels with float32 accumulation in the matmuls; for CUDA, and arm64 CPUs with
    half arithmetic); validated against the same model in float16 PyTorch
    (:data:`loopify.verify.HALF_ARTIFACT_RTOL`). Converted models and generation artifacts.

    Raises:
        LoopifyError: one line naming what failed (capture, staging, import, build, validation).
    """
    from loopify.io import check_output

    check_output(out, directory=True, what="artifact")  # before the work, not after it
    qconfig = quant_config(weights, quantize_embeddings, target, embedding_weights, lora_weights)
    if dtype not in DTYPES:
        raise LoopifyError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_context is not None:
        return compile_generation(model, out, target=target, arch=arch, mcpu=mcpu, schedule=schedule,
                                  validate=validate, max_context=max_context, kv_policy=kv_policy,
                                  quant=qconfig, dtype=dtype, lora_form=lora_form, route_bucket=route_bucket)
    from loopify.backends import tvm as tvm_backend
    from loopify.backends.tvm.build import CompileOptions
    from loopify.backends.tvm.targets import target_for

    model = Path(model)
    options = CompileOptions(schedule=schedule, tune=tune, trials=trials, tuning_db=tuning_db, rpc=rpc)
    tgt = target_for(target, arch=arch, mcpu=mcpu) if target in ("x86", "arm64", "cuda") else target
    stages, reference, captured, extra, qplan = _forward_source(model, capture_options or {}, lora_form, qconfig, dtype)
    rtol = artifact_rtol(dtype)
    from loopify.artifact import read_manifest
    from loopify.io import atomic_path

    out = Path(out)
    # Built and validated beside OUT; moved into place only when it matches PyTorch.
    with atomic_path(out, directory=True) as tmp:
        result = tvm_backend.compile_stages(stages, tgt, tmp, options=options, extra=extra, quant=qplan)
        manifest = read_manifest(Path(result.path), verify=False)
        checks: list[dict] = []
        if validate and _runs_here(manifest):
            checks = validate_artifact(Path(result.path), reference, captured.flat_inputs(), manifest.get("loops", []),
                                       rtol)
            bad = next((c for c in checks if not c["ok"]), None)
            if bad is not None:
                raise LoopifyError(f"{out}: artifact does not match PyTorch at loops={bad['loops']}: output "
                                   f"{bad['output']} rel err {bad['rel_err']:.3g} > {rtol:g}; nothing "
                                   "written (--no-validate keeps it)")
    compiled = CompiledModel(out, manifest)
    compiled.checks = checks
    return compiled


def _floats_to(v, dtype: str):
    """``v`` in ``dtype`` when it is a floating tensor (pixel values), else ``v``."""
    return v.to(getattr(torch, dtype)) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _half_inputs(captured, dtype: str = "float16"):
    """``captured`` with its floating inputs (pixel values) in ``dtype``."""
    import dataclasses

    return dataclasses.replace(captured, args=tuple(_floats_to(a, dtype) for a in captured.args),
                               kwargs={k: _floats_to(v, dtype) for k, v in captured.kwargs.items()})


def _forward_source(model: Path, opts: dict, lora_form: str, qconfig, dtype: str = "float32"):
    """What a forward artifact is built from: (stages, reference(loops) -> PyTorch outputs,
    the capture, the manifest's extra sections, the quantisation plan). A converted model is
    rebuilt from its own files and staged around its loops; any other model is one straight
    stage of its capture. ``dtype`` float16: the converted model in half precision."""
    from loopify import capture
    from loopify.staging import Stage

    if is_converted(model):
        from loopify.convert import load_converted
        from loopify.nn import set_loops
        from loopify.staging import stages_of

        module, captured, _manifest = load_converted(model, seq_len=opts.get("seq_len"), batch=opts.get("batch"))
        refuse_routers(module, model)
        extra = lora_manifest(module, lora_form)
        if dtype != "float32":
            module.to(getattr(torch, dtype))
            captured = _half_inputs(captured, dtype)
            extra["dtype"] = dtype
        qplan = _plan(qconfig, model, module=module)

        def reference(loops: list[int]):
            set_loops(module, loops if loops else None)
            with torch.no_grad():
                out_ = module(*captured.args, **captured.kwargs)
            set_loops(module, None)
            return out_
        return stages_of(module, captured), reference, captured, extra, qplan
    if dtype != "float32":
        raise LoopifyError(f"{model}: --dtype {dtype} compiles a converted model or a generation artifact "
                           "(--max-context); a forward artifact of an original is its float32 export (convert it "
                           "first: `loopify convert MODEL --rank full` keeps it exact)")
    captured = capture.load(model, **opts)
    qplan = _plan(qconfig, model, program=captured.program)

    def reference(loops: list[int]):
        return captured.run()
    return [Stage("straight", captured.program, name="model", example=tuple(captured.flat_inputs()))], reference, \
        captured, {}, qplan


def quant_config(weights: str, embeddings: bool, target: str, embedding_weights: str | None = None,
                 lora_weights: str | None = None):
    """The :class:`loopify.nn.quant.QuantConfig` of ``--weights`` (None for float32): float16
    scales on CUDA, float32 on CPUs. Bad values are one line."""
    from loopify.nn.quant import QuantConfig

    from loopify.nn.quant import needs_weights

    lora = None if lora_weights in (None, "float32") else lora_weights
    if weights in (None, "float32"):
        flag = needs_weights(embeddings, embedding_weights, lora)
        if flag:
            raise LoopifyError(f"{flag} needs --weights int8, int4 or int4asym")
        return None
    try:
        return QuantConfig(weights, embeddings=embeddings, scale_dtype="float16" if target == "cuda" else "float32",
                           embedding_weights=embedding_weights, lora=lora)
    except ValueError as e:
        raise LoopifyError(str(e)) from None


def _plan(config, model, module=None, program=None):
    """Fake-quantise the model's weights in place (it is then the reference the artifact is
    validated against) and return the codes and scales (:class:`loopify.nn.quant.QuantPlan`)."""
    if config is None:
        return None
    from loopify.nn import quant

    if program is not None and config.lora:
        raise LoopifyError(f"{model}: --lora-weights int8: the model has no per-depth LoRA (convert with --rank R)")
    try:
        plan = quant.plan_module(module, config) if module is not None else quant.plan_program(program, config)
    except ValueError as e:
        raise LoopifyError(f"{model}: {e}") from None
    if not plan.registry:
        why = "; ".join(f"{n}: {r}" for n, r in list(plan.skipped.items())[:3])
        raise LoopifyError(f"{model}: --weights {config.weights}: no weight to quantise "
                           + (f"({why})" if why else "(no nn.Linear weights; a graph-form converted model "
                                                      "has none, convert the Hugging Face source instead)"))
    return plan


def refuse_routers(module, model) -> None:
    """Routed loops (the route pass) compile into generation artifacts (``--max-context``), where
    a token's depth is decided per token; a forward artifact (fixed shapes, stages) of a routed
    model is not built: its staged loop bodies run every token."""
    from loopify.nn import recursions

    routed = [p for p, r in recursions(module).items() if r.router is not None]
    if routed:
        raise LoopifyError(f"{model}: {routed[0]} has a Mixture-of-Recursions router: compile it for generation "
                           "(--max-context N), where each token takes its own depth; a forward artifact of a routed "
                           "model is not built")


def lora_manifest(module, lora_form: str) -> dict:
    """Fix the LoRA form of every relaxed matrix of ``module`` (:func:`loopify.nn.deploy_lora`)
    and describe it for the manifest: ``{"lora": {"policy", "max_factored_overhead", "loops":
    {loop: {matrix: {"form", "rank", "shape", "overhead"}}}}}`` ({} without LoRA)."""
    from loopify.nn import deploy_lora, lora

    try:
        report = deploy_lora(module, lora_form)
    except ValueError as e:
        raise LoopifyError(str(e)) from None
    if not report:
        return {}
    return {"lora": {"policy": lora_form, "max_factored_overhead": lora.FACTORED_MAX_OVERHEAD, "loops": report}}


def _runs_here(manifest: dict) -> bool:
    t = manifest.get("target", {})
    if t.get("kind") != "llvm":
        return False
    triple = t.get("mtriple", "")
    import platform

    return not triple or triple.startswith(platform.machine())


def validate_artifact(path: Path, reference, inputs: list[torch.Tensor], loops: list[dict],
                      rtol: float | None = None) -> list[dict]:
    """Run the artifact at every loop count against ``reference(loops)``; one row per output."""
    from loopify import runtime

    art = runtime.load(path)
    rows = []
    for counts in loop_counts_to_check(loops):
        got = list(art(*inputs, loops=counts or None, output="numpy"))
        rows += check_rows(flat_tensors(reference(counts)), got, artifact_rtol() if rtol is None else rtol,
                           loops=counts)
    return rows


def _generation_source(model: Path):
    """(wrapper, example inputs, assets directory, source description) of a model to generate from."""
    if is_converted(model):
        from loopify.convert import load_converted

        module, inputs, manifest = load_converted(model)
        if manifest.get("architecture", {}).get("kind") != "hf":
            raise LoopifyError(f"{model}: generation needs a converted Hugging Face model (this one came from an "
                               "export archive, a fixed-shape graph without a KV cache)")
        src = manifest["source"]
        return module, inputs.kwargs, Path(inputs.info["assets_dir"]), {
            "path": str(model), "kind": "converted", "image_token_id": src.get("image_token_id"),
            "model_type": src.get("model_type", "")}
    from loopify.capture.loader import load_source

    m = load_source(model, "generation needs a Hugging Face directory, a GGUF file or a converted .pt2")
    return m.module, m.inputs, Path(m.info.get("assets_dir") or model), {
        "path": str(model), "kind": "original", "image_token_id": m.image_token_id, "model_type": m.model_type}


def compile_generation(model: str | Path, out: str | Path, *, target: str = "x86", arch: str | None = None,
                       mcpu: str | None = None, schedule: str = "loopify", validate: bool = True,
                       max_context: int = 512, kv_policy: str = "per-depth", quant=None,
                       dtype: str = "float32", lora_form: str = "auto",
                       route_bucket: float = ROUTE_BUCKET) -> CompiledModel:
    """Compile a causal LM (original or converted) for generation: ``prefill`` and ``decode``
    entry points over one set of weights, every prompt length up to ``max_context``, the loop
    count a run-time input. Validated on the host: prefill logits and a few greedy decode steps
    against the eager model with the same KV policy. ``lora_form``: each relaxed matrix merged
    per depth or factored (``auto``: the decode rule of :func:`loopify.generate.export.deploy`),
    recorded in the manifest's ``lora``."""
    from loopify.backends.tvm.build import CompileOptions
    from loopify.backends.tvm.generation import compile_generation as build
    from loopify.backends.tvm.targets import target_for
    from loopify.generate.export import export_step
    from loopify.io import atomic_path
    from loopify.nn import kv

    from loopify.io import check_output

    check_output(out, directory=True, what="artifact")
    if kv_policy not in kv.POLICIES:
        raise LoopifyError(f"--kv-policy must be one of {', '.join(kv.POLICIES)}")
    if max_context < 2:
        raise LoopifyError("--max-context must be at least 2")
    if not 0 <= route_bucket < 1:
        raise LoopifyError(f"--route-bucket must be in [0, 1) (a fraction of the prompt's tokens), got {route_bucket:g}")
    model, out = Path(model), Path(out)
    tgt = target_for(target, arch=arch, mcpu=mcpu)  # bad target options before the work
    wrapper, inputs, assets, source = _generation_source(model)
    if dtype != "float32":
        wrapper.to(getattr(torch, dtype))
        inputs = {k: _floats_to(v, dtype) for k, v in inputs.items()}
    from loopify.generate.export import deploy
    try:
        deploy(wrapper, lora_form)  # before quantising: merged matrices are weights like any other
    except ValueError as e:
        raise LoopifyError(str(e)) from None
    qplan = _plan(quant, model, module=wrapper)
    try:
        exported = export_step(wrapper, inputs, kv_policy, max_context, source.get("image_token_id"), lora_form,
                               route_bucket=route_bucket)
    except NotImplementedError as e:
        raise LoopifyError(f"{model}: {e}") from None
    with atomic_path(out, directory=True) as tmp:
        result = build(exported, tgt, tmp, options=CompileOptions(schedule=schedule), assets=assets, source=source,
                       quant=qplan)
        checks = []
        if validate and _runs_here(result.manifest):
            checks = validate_generation(Path(result.path), wrapper, inputs, kv_policy, rtol=artifact_rtol(dtype))
            bad = next((c for c in checks if not c["ok"]), None)
            if bad is not None:
                raise LoopifyError(f"{out}: artifact does not match PyTorch ({bad['what']} at loops={bad['loops']}: "
                                   f"{bad['detail']}); nothing written (--no-validate keeps it)")
    compiled = CompiledModel(out, result.manifest)
    compiled.checks = checks
    return compiled


def validate_generation(path: Path, wrapper, inputs: dict, policy: str, new_tokens: int = 4,
                        rtol: float | None = None) -> list[dict]:
    """At every loop count: prefill logits within ``rtol`` of the eager model's, and the same
    greedy tokens for ``new_tokens`` decode steps."""
    from loopify.generate import Sampling
    from loopify.generate.compiled import TVMDecoder
    from loopify.generate.eager import EagerDecoder
    from loopify.generate.engine import run
    from loopify.nn import set_loops
    from loopify import runtime
    from loopify.verify import diff

    art = runtime.load(path)
    rtol = artifact_rtol() if rtol is None else rtol
    prompt = [int(i) for i in inputs["input_ids"][0][:12]]
    image = art.gen.get("image")
    if image:  # with the example image: its prompt (image tokens where the model expects them)
        prompt = [int(i) for i in inputs["input_ids"][0]]
    extra = {"pixel_values": inputs["pixel_values"][:1]} if image else {}
    rows = []
    s = Sampling(max_new_tokens=new_tokens)
    for counts in loop_counts_to_check(art.loops):
        set_loops(wrapper, counts or None)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = EagerDecoder(wrapper, policy).prefill({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                         "position_ids": torch.arange(len(prompt))[None], **extra})
        dec = TVMDecoder(art, policy, counts or None)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(len(prompt))[None],
                 **extra}
        got = dec.prefill(batch)
        d = diff(ref, got)
        rows.append({"what": "prefill logits", "loops": counts, "ok": d.rel_err <= rtol,
                     "max_abs_err": d.max_abs_err, "rel_err": d.rel_err, "detail": f"rel err {d.rel_err:.3g}"})
        a = run(EagerDecoder(wrapper, policy), [prompt], s, extra=extra)
        b = run(TVMDecoder(art, policy, counts or None), [prompt], s, extra=extra)
        rows.append({"what": "greedy tokens", "loops": counts, "ok": a.tokens[0] == b.tokens[0],
                     "detail": f"{b.tokens[0]} vs eager {a.tokens[0]}", "max_abs_err": 0.0, "rel_err": 0.0})
        if a.depth:  # routed loops: every token took the depth it takes in PyTorch
            rows.append({"what": "depths", "loops": counts, "ok": a.depth == b.depth,
                         "detail": f"{b.depth} vs eager {a.depth}", "max_abs_err": 0.0, "rel_err": 0.0})
    set_loops(wrapper, None)
    return rows
