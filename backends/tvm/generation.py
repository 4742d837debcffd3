"""Generation artifacts: the decode step compiled as ``prefill`` and ``decode`` entry points.

The step program (:func:`loopify.generate.export.export_step`: symbolic token count T and past
length P, KV tensors in and out, each loop's count an input) is imported once; two copies are
specialised by binding a symbolic size (``BindSymbolicVars``, in the step and in every ``cond``
branch it calls, whose heavy work it is):

* ``prefill``: T and P symbolic (a prompt of any length up to the maximum context, after any
  cached tokens; binding P = 0 would let constant folding make zero-size constants, which TVM
  0.27 saves into the library but cannot load back);
* ``decode``: T = 1, P symbolic (one token against a cache of any length): matrix-vector shaped.

Each is built into its own library (``prefill.so``, ``decode.so``) over one parameter file, so
the schedules see the shapes they serve.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import CompileError

LIBRARIES = {"prefill": "prefill.so", "decode": "decode.so", "prefill_image": "prefill_image.so"}


def symbol_names(ep: torch.export.ExportedProgram) -> tuple[str, str, str | None]:
    """(T, P, L): the symbols of the step's token count, past length and logit rows (None when
    the step has no ``logit_rows``), off its placeholders."""
    shapes = {n.name: n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder"}
    rows = shapes.get("logit_rows")
    return str(shapes["input_ids"][1]), str(shapes["past_k"][3]), str(rows[0]) if rows is not None else None


def specialise(mod, binds: dict):
    """A copy of ``mod`` with the symbolic sizes of ``binds`` (name -> value) bound in every
    Relax function (the step and its branches)."""
    import tvm
    from tvm import relax

    funcs = {}
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            f = relax.utils.copy_with_new_vars(f)
        funcs[gv] = f
    out = tvm.IRModule(funcs)
    for gv, f in list(out.functions.items()):
        if not isinstance(f, relax.Function):
            continue
        names = {str(v) for v in relax.analysis.defined_symbolic_vars(f)} | {
            str(v) for v in relax.analysis.free_symbolic_vars(f)}
        mine = {k: v for k, v in binds.items() if k in names}  # a branch need not see every size
        if mine:
            out = relax.transform.BindSymbolicVars(mine, gv.name_hint)(out)
    return out


def import_step(ep: torch.export.ExportedProgram, example=None, assumptions=None):
    """The step as a Relax module (``main`` and its ``cond`` branches) and its parameter names."""
    from .importer import import_program, parameter_names

    mod = import_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=False, example=example,
                         assumptions=assumptions)
    return bound_branches(mod), parameter_names(ep)


def bound_branches(mod):
    """``mod`` with ``main``'s bounds on its symbolic sizes (``tir_var_upper_bound`` /
    ``lower_bound``: T and P from the maximum context) given to every function that takes
    them: the importer bounds ``main`` only, and a ``cond`` branch without bounds (where a loop
    does its work) left the static memory planner nothing to plan with. Its buffers were
    allocated per call at each new past length: 175 storage allocations per decode step
    against the original's 77, and a pool that grew with every token (2.4 GB peak for the
    converted SmolLM2 against 1.4 GB for the original)."""
    import tvm
    from tvm import relax

    main = mod["main"]
    out = tvm.IRModule(dict(mod.functions.items()))
    for key in ("tir_var_upper_bound", "tir_var_lower_bound"):
        bounds = dict(main.attrs[key]) if main.attrs is not None and key in main.attrs else {}
        if not bounds:
            continue
        for gv, f in list(out.functions.items()):
            if not isinstance(f, relax.Function) or gv.name_hint == "main":
                continue
            mine = {str(v): bounds[str(v)] for v in relax.analysis.defined_symbolic_vars(f) if str(v) in bounds}
            if mine:
                out[gv] = f.with_attr(key, mine)
    return out


def transposed_activations(mod):
    """``mod`` with each ``matmul(a, permute_dims(b))`` whose ``b`` is an activation (attention's
    keys) given a materialised transpose: for prefill entries. ``FuseTransposeMatmul`` would
    make it an NT matmul reading the keys in place, which suits decode (one query row per head
    group: a GEMV over the cache) but not prefill, where the outer-product kernel on a
    transposed copy ran the scores of a 512-token prompt 6x faster than the NT dot kernel
    (whose 64-long rows spend as long in lane sums as in FMAs)."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    matmul, permute = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")

    @expr_functor.mutator
    class _Materialise(PyExprMutator):
        params: list = []

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(matmul)) or not isinstance(call.args[1], relax.Var):
                return call
            bound = self.lookup_binding(call.args[1])
            if (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.same_as(permute)
                    and not any(bound.args[0].same_as(p) for p in self.params)):
                dtype = call.args[1].ty.dtype
                kept = self.builder_.emit(relax.op.astype(call.args[1], dtype))  # (blocks the NT fusion)
                return relax.Call(call.op, [call.args[0], kept], call.attrs)
            return call

    rw = _Materialise(mod)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            rw.params = list(f.params)
            rw.builder_.update_func(gv, rw.visit_expr(f))
    return rw.builder_.get()


def used_weights(mod) -> set[int]:
    """Indices (into the weights: ``main``'s inputs after ``num_input``) that ``main`` uses."""
    from tvm import relax

    main = mod["main"]
    n = int(main.attrs["num_input"])
    free = set(relax.analysis.free_vars(main.body))
    return {i for i, v in enumerate(main.params[n:]) if v in free}


def keep_weights(mod, keep: list[int]):
    """``mod`` with ``main`` taking only the weights at ``keep`` (in that order)."""
    import tvm
    from tvm import relax

    main = mod["main"]
    n = int(main.attrs["num_input"])
    params = list(main.params[:n]) + [main.params[n + i] for i in keep]
    f = relax.Function(params, main.body, main.ret_ty, main.is_pure, main.attrs, main.span)
    out = tvm.IRModule(dict(mod.functions.items()))
    out["main"] = f
    return out


def _build(name: str, mod, target: dict, options, timings: dict):
    from .build import build_executable_module

    t = time.time()
    try:  # (its own timings: a dataflow fallback is recorded per entry in the manifest)
        sub: dict = {}
        ex = build_executable_module(mod, target, options, timings=sub)
        if "dataflow_fallback" in sub:
            timings[f"{name}_dataflow_fallback"] = sub["dataflow_fallback"]
    except CompileError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"building {name} failed: {type(e).__name__}: {str(e).splitlines()[-1][:300]}") from e
    timings[f"{name}_build_s"] = round(time.time() - t, 1)
    return ex


def build_entries(exported, target: dict, options, timings: dict, quant=None):
    """({entry: tvm.relax.Executable}, parameter names, assumptions, {name: tensor}, manifest
    ``quantization`` or None) for prefill and decode (and prefill_image for a vision-language
    model: its own program over the same weights). ``quant``: a
    :class:`loopify.nn.quant.QuantPlan` (its weights stored as codes and scales)."""
    ep = exported.program
    mod, pnames = import_step(ep)
    t_sym, p_sym, l_sym = symbol_names(ep)
    assumptions: list = []
    img = None
    if exported.image is not None:
        flat = [x for x in exported.image_example if x is not None]
        img, inames = import_step(exported.image, example=flat, assumptions=assumptions)
        if inames != pnames:
            raise CompileError("the image prefill step takes other weights than the text step")
    # weights no entry reads stay out of the artifact (a LoRA'd matrix's base and factors once
    # the step holds its per-depth merges: Step.premerge)
    used = used_weights(mod) | (used_weights(img) if img is not None else set())
    keep = sorted(used)
    if len(keep) < len(pnames):
        mod = keep_weights(mod, keep)
        img = keep_weights(img, keep) if img is not None else None
        pnames = [pnames[i] for i in keep]
    sd = ep.state_dict
    tensors = [sd[n] for n in pnames]
    qinfo, qnames = None, list(pnames)
    entries = [("prefill", mod, {}), ("decode", mod, {t_sym: 1, **({l_sym: 1} if l_sym else {})})] + ([("prefill_image", img, None)] if img is not None else [])
    out = {}
    for name, m, binds in entries:
        # prefill keeps P symbolic (it also serves a prompt after a cached one): bound to 0,
        # constant folding makes zero-size constants, which TVM 0.27 saves but cannot load back
        m = specialise(m, binds) if binds is not None else m
        if name != "decode":
            m = transposed_activations(m)
        if quant is not None:
            # after specialising: each entry's fused dequantise-matmul kernels get its shapes
            # (decode's are GEMVs, M = 1), not the symbolic prefill's
            from .quant import quantize_weights

            m, names, qtensors, report = quantize_weights(m, [sd[n] for n in qnames], qnames, quant.registry,
                                                          quant.config.embeddings)
            if qinfo is None:
                pnames, tensors = names, qtensors
                options.weights = quant.config.weights
                qinfo = quant.manifest(report, sum(t.numel() * t.element_size()
                                                   for t in {id(t): t for t in tensors}.values()))
            elif names != pnames:
                raise CompileError(f"the {name} entry quantises other weights than prefill")
        out[name] = _build(name, m, target, options, timings)
    return out, pnames, assumptions, dict(zip(pnames, tensors)), qinfo


def compile_generation(exported, target="x86", out=None, *, options=None, assets: Path | None = None,
                       source: dict | None = None, quant=None, **kw):
    """Compile a decode step (:class:`loopify.generate.export.Exported`) into a generation
    artifact at ``out``: ``prefill.so``, ``decode.so``, ``params.safetensors`` (raw layout, each
    weight once), the architecture's tokenizer and config files under ``assets/``, and the
    manifest's ``generation`` section (entries, KV layout and shapes, loops, maximum context)."""
    import shutil

    from loopify import artifact as _artifact

    from .build import CompileResult, link, resolve_options, resolve_target, target_manifest

    options = resolve_options(options, kw)
    target, name = resolve_target(target, options)
    timings: dict = {}
    exes, pnames, assumptions, sd, qinfo = build_entries(exported, target, options, timings, quant)
    manifest = {**target_manifest(target, name, options, timings),
                "kind": "generation", "params": pnames, "loops": exported.loops, "source": source or {},
                "assumptions": assumptions,
                "generation": {"entries": {k: LIBRARIES[k] for k in exes}, "max_context": exported.max_context,
                               "token_types": exported.token_types, "logit_rows": exported.logit_rows,
                               "image": None if exported.image is None else {
                                   "tokens": exported.image_tokens, "pixel_shape": exported.pixel_shape,
                                   "image_token_id": (source or {}).get("image_token_id"),
                                   "model_type": (source or {}).get("model_type", "")},
                               "kv_policy": exported.layout.policy, "layout": exported.layout.to_dict(),
                               "kv_heads": exported.heads, "head_dim": exported.head_dim, "vocab": exported.vocab,
                               "dtype": exported.dtype,
                               "inputs": ["input_ids", "attention_mask", "position_ids", "past_k", "past_v", "loops"]
                               + (["spiral_state"] if exported.layout.spiral else [])
                               + (["route_valid"] if exported.layout.routed else [])
                               + [f"route_rows{j}" for j in range(exported.route_levels)],
                               "outputs": ["logits", "new_k", "new_v"] + (["spiral_state"] if exported.layout.spiral else [])
                               + (["new_valid", "depth"] if exported.layout.routed else []),
                               **({"spiral_dim": exported.spiral_dim} if exported.layout.spiral else {}),
                               **({"route_bucket": exported.route_bucket, "route_levels": exported.route_levels}
                                  if exported.route_levels else {})}}
    if exported.lora:
        manifest["lora"] = exported.lora
    if qinfo is not None:
        manifest["quantization"] = qinfo
    if out is None:
        return CompileResult(None, manifest, exes, timings)

    def populate(tmp: Path):
        from safetensors.torch import save_file

        for entry, ex in exes.items():
            link(ex, tmp / LIBRARIES[entry], target, name, timings, manifest, {})
        from loopify.converted import dedupe

        unique, ties = dedupe((n, sd[n]) for n in pnames)  # tied weights (one storage, two names) once
        manifest["param_ties"] = ties
        save_file(unique, str(tmp / _artifact.PARAMS))
        if assets is not None and Path(assets).is_dir():  # the architecture's files, never its weights
            from loopify.converted import ASSET_FILES

            (tmp / "assets").mkdir()
            for f in ASSET_FILES:
                if (Path(assets) / f).is_file():
                    shutil.copy2(Path(assets) / f, tmp / "assets" / f)

    path = _artifact.write(out, populate, manifest)
    return CompileResult(path, manifest, exes, timings)
