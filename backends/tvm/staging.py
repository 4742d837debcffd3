"""Staged programs -> one Relax module with run-time loop counts and shared weights.

A converted model is a list of :class:`Stage`: each maps a flat tuple of tensors (the *carry*)
to a new one. A ``loop`` stage's program takes ``(step, *carry)`` (``step`` an int64 0-d
tensor, 0..n-1) and returns a carry of the same shapes and dtypes; it runs ``n`` times, ``n``
given at run time. The module built here::

    main(*inputs, n_0, n_1, ..., *params) -> tuple(outputs)   # attrs num_input = inputs + loops
      carry = stage_0(*inputs, *params_of_0)                  # straight stage
      carry = loop_1(0, n_0, *carry, *params_of_1)            # loop stage
      ...                                                     # (stages of one group share n_j)
    loop_1(step, n, *carry, *p):                              # recursive, relax.If on step < n
      if step < n: return loop_1(step + 1, n, *stage_1(step, *carry, *p), *p)
      else:        return carry

A multi-resolution loop (schedule of N positions, :mod:`loopify.nn.spiral`) is one stage per
position, each with its own static shapes (a coarse step's pooled sequence), called once from
``main`` when the count reaches it: ``if n >= N - j: carry = stage_j(j - N + min(n, N), *carry)``;
the full-resolution steps past the schedule (deepened loops) are ``loop_k(N, n, ...)``. Stages
of one program (the full-resolution positions) share one imported function.

Parameters are deduplicated across stages (by storage, then by identical bytes), so a weight
that two stages (or every iteration of a loop) use is one input of ``main`` and stored once, in
the layout :mod:`.layout` chose for it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from loopify.staging import Stage

from . import layout
from .errors import CompileError

log = logging.getLogger(__name__)

@dataclass
class ParamTable:
    """The deduplicated parameters of a staged module, in ``main``'s order."""

    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    #: total parameter references before deduplication (for reports)
    references: int = 0
    _by_storage: dict = field(default_factory=dict)
    _by_content: dict = field(default_factory=dict)
    _keys: dict = field(default_factory=dict)

    def key(self, t: torch.Tensor):
        """Content key of a tensor (dtype, shape, sha256), cached by storage."""
        t = t.detach()
        skey = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                tuple(t.stride()), t.dtype)
        if skey not in self._keys:
            c = t.contiguous()
            digest = hashlib.sha256(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"").hexdigest()
            self._keys[skey] = (str(c.dtype), tuple(c.shape), digest)
        return self._keys[skey]

    def add(self, name: str, t: torch.Tensor) -> int:
        """Index of ``t`` in the table, adding it if no identical tensor is there yet."""
        self.references += 1
        t = t.detach()
        skey = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                tuple(t.stride()), t.dtype) if t.device.type != "meta" else None
        if skey is not None and skey in self._by_storage:
            return self._by_storage[skey]
        c = t.contiguous()
        digest = hashlib.sha256(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"").hexdigest()
        ckey = (str(c.dtype), tuple(c.shape), digest)
        if ckey in self._by_content:
            idx = self._by_content[ckey]
        else:
            idx = len(self.tensors)
            unique = name
            n = 1
            while unique in self.names:
                unique = f"{name}.{n}"
                n += 1
            self.names.append(unique)
            self.tensors.append(c)
            self._by_content[ckey] = idx
        if skey is not None and self.tensors[idx] is t:
            # only storage the table holds: a temporary's address (a packed copy deduplicated by
            # content, then freed) is reused by the next temporary, which would match it here
            self._by_storage[skey] = idx
        return idx

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass
class StagedModule:
    """What :func:`build_module` returns."""

    mod: object  # tvm.IRModule
    params: ParamTable
    inputs: list[dict]   # [{"name", "shape", "dtype"}]
    outputs: list[dict]
    loops: list[dict]    # [{"stage", "min", "max", "default", "name"}]
    #: what the import assumed of the inputs (e.g. a boolean mask's count), for the manifest
    assumptions: list[dict] = field(default_factory=list)


def _tensor_types(ty) -> list:
    from tvm import relax

    if isinstance(ty, relax.TupleType):
        out = []
        for f in ty.fields:
            out.extend(_tensor_types(f))
        return out
    return [ty]


def _describe(name: str, ty) -> dict:
    shape = [int(s) if hasattr(s, "value") or isinstance(s, int) else str(s) for s in ty.shape]
    shape = [int(getattr(s, "value", s)) if not isinstance(s, str) else s for s in shape]
    return {"name": name, "shape": shape, "dtype": str(ty.dtype)}


def _same(a, b) -> bool:
    return (str(a.dtype) == str(b.dtype) and len(a.shape) == len(b.shape)
            and all(str(x) == str(y) for x, y in zip(a.shape, b.shape)))


@dataclass
class _Imported:
    """One stage after import: its Relax function and what its parameters are."""

    func: object
    num_input: int
    pnames: list[str]
    state_dict: dict
    which: dict
    pack: dict


def _import_all(stages: list[Stage], params: "ParamTable", pretranspose: bool, pack_width: int | None,
                assumptions: list, raw_keys=frozenset()) -> tuple[list[_Imported], dict]:
    """Pass 1: import every stage and decide each weight's layout over all of them (the
    weights in ``raw_keys``, content keys of weights to quantise, stay in their own layout)."""
    from .importer import import_program, parameter_names

    imported, layouts, seen = [], {}, {}
    for i, st in enumerate(stages):
        if id(st.program) in seen:  # one program for several stages (a schedule's positions): one import
            imported.append(imported[seen[id(st.program)]])
            continue
        seen[id(st.program)] = i
        f = import_program(st.program, example=st.example, assumptions=assumptions)["main"]
        num_input = int(f.attrs["num_input"])
        pnames = parameter_names(st.program)
        if len(f.params) != num_input + len(pnames):
            raise CompileError(f"stage {i}: {len(f.params)} Relax inputs for {num_input} inputs and "
                               f"{len(pnames)} parameters (buffers must not be lifted as inputs)")
        f, pnames = _drop_unused(f, num_input, pnames)
        sd = st.program.state_dict
        which, pack = layout.stage_layouts(f, num_input, pretranspose, pack_width)
        for q, n in enumerate(pnames):
            for t in [sd[n]] + [t for _, t in st.step_params.get(n, ())]:  # every step's tensor, one layout
                key = params.key(t)
                layout.merge(layouts, key, "raw" if key in raw_keys else layout.want(num_input + q, which, pack))
        imported.append(_Imported(f, num_input, pnames, sd, which, pack))
    return imported, layouts


def _drop_unused(f, num_input: int, pnames: list[str]):
    """The function without the parameters its body never reads, and their names: a loop body
    is exported from the whole loop, so it lists every block's weights and, with merged LoRA,
    the shared matrices and factors that only the merged copies are made of (stored, they made
    the MiniLM rank-32 artifact 1.5x the original's size)."""
    from tvm import relax

    used = set(relax.analysis.free_vars(f.body))
    keep = [q for q in range(len(pnames)) if f.params[num_input + q] in used]
    if len(keep) == len(pnames):
        return f, pnames
    params = list(f.params[:num_input]) + [f.params[num_input + q] for q in keep]
    return relax.Function(params, f.body, f.ret_ty, f.is_pure, f.attrs), [pnames[q] for q in keep]


def _stage_function(i: int, st: Stage, imp: _Imported, layouts: dict, params: "ParamTable"):
    """Pass 2: one stage's function in its weights' final layouts; registers its parameters.
    Returns ``(global var, function, input types, param indices, output types, input names)``."""
    import tvm
    from tvm import relax

    from .importer import user_input_names

    f, num_input, sd = imp.func, imp.num_input, imp.state_dict
    lay = {num_input + q: layouts[params.key(sd[n])] for q, n in enumerate(imp.pnames)}
    which = {k: v for k, v in imp.which.items() if lay[k] != "raw"}
    pack = {k: v for k, v in imp.pack.items() if lay[k] == "panels"}
    if which:
        f = layout.rewrite(f, which, pack)
    idx = [params.add(*layout.stored(n, sd[n], num_input + q, which, pack)) for q, n in enumerate(imp.pnames)]
    step_idx = _step_indices(st, imp, idx, which, pack, params)
    idx = idx + sorted({k for ks in step_idx for k in ks} - set(idx))  # what the stage's caller passes
    in_types = [p.ty for p in f.params[:num_input]]
    out_types = _tensor_types(f.ret_ty)
    func = relax.Function(list(f.params), f.body, f.ret_ty, f.is_pure)
    func = relax.transform.CanonicalizeBindings()(tvm.IRModule({"f": func}))["f"]
    gv = relax.GlobalVar(f"stage_{i}")
    relax.expr._update_type(gv, func.ty)
    if st.kind == "loop":
        carry_in = in_types[1:]
        step = in_types[0] if in_types else None
        if step is None or str(step.dtype) != "int64" or len(step.shape) != 0:
            raise CompileError(f"stage {i} is a loop: its first input must be the int64 0-d "
                               f"step tensor, got {step}")
        if len(carry_in) != len(out_types) or not all(map(_same, carry_in, out_types)):
            raise CompileError(f"stage {i} is a loop but its outputs "
                               f"{[str(t) for t in out_types]} differ from its carry inputs "
                               f"{[str(t) for t in carry_in]}")
    return gv, func, in_types, idx, out_types, user_input_names(st.program), step_idx


def _step_indices(st: Stage, imp: _Imported, idx: list[int], which: dict, pack: dict,
                  params: "ParamTable") -> list[list[int]]:
    """For a loop stage with per-step parameters (:attr:`Stage.step_params`): the stage's
    parameter indices at each step (step i's tensors in place of the program's); else []."""
    from .importer import parameter_names

    if not st.step_params:
        return []
    unknown = set(st.step_params) - set(parameter_names(st.program))
    if unknown:
        raise CompileError(f"stage {st.name}: per-step parameters {sorted(unknown)[:3]} are not parameters of its program")
    steps = {len(v) for v in st.step_params.values()}
    if len(steps) != 1:
        raise CompileError(f"stage {st.name}: per-step parameters disagree on the step count ({sorted(steps)})")
    out = []
    for i in range(steps.pop()):
        row = list(idx)
        for q, n in enumerate(imp.pnames):
            if n in st.step_params:
                row[q] = params.add(*layout.stored(*st.step_params[n][i], imp.num_input + q, which, pack))
        out.append(row)
    return out


def _check_chain(stages: list[Stage], info: list) -> None:
    """Each stage takes what the one before it returns."""
    for i in range(1, len(stages)):
        prev_out = info[i - 1][4]
        cur_in = info[i][2][1:] if stages[i].kind == "loop" else info[i][2]
        if len(prev_out) != len(cur_in) or not all(map(_same, prev_out, cur_in)):
            raise CompileError(f"stage {i} takes {[str(t) for t in cur_in]} but stage {i - 1} "
                               f"returns {[str(t) for t in prev_out]}")


class _Emitter:
    """Bindings of one function body."""

    def __init__(self, bb):
        self.bb, self.bindings = bb, []

    def __call__(self, expr, name):
        from tvm import relax

        expr = self.bb.normalize(expr)
        v = relax.Var(name, expr.ty)
        self.bindings.append(relax.VarBinding(v, expr))
        return v

    def seq(self, result):
        from tvm import relax

        return relax.SeqExpr([relax.BindingBlock(self.bindings)], result)


def _unpack(result_var, types):
    from tvm import relax

    if isinstance(result_var.ty, relax.TupleType):
        return [relax.TupleGetItem(result_var, j) for j in range(len(types))]
    return [result_var]


def _loop_function(bb, i: int, info, param_vars):
    """``loop_i(step, n, *carry, *p)``: if step < n, one step and the recursive call, else the carry."""
    from tvm import relax

    gv_stage, _func, in_types, idx, out_types, _, step_idx = info
    step = relax.Var("step", relax.TensorType([], "int64"))
    n = relax.Var("n", relax.TensorType([], "int64"))
    carry = [relax.Var(f"c{j}", t) for j, t in enumerate(in_types[1:])]
    ps = [relax.Var(f"p_{k}", param_vars[k].ty) for k in idx]
    ret_ty = relax.TupleType([c.ty for c in carry])
    gv = relax.GlobalVar(f"loop_{i}")
    relax.expr._update_type(gv, relax.FuncType([step.ty, n.ty] + [c.ty for c in carry] + [p.ty for p in ps],
                                               ret_ty, True))
    then = _Emitter(bb)
    r = _step_call(bb, then, gv_stage, step, carry, ps, idx, step_idx)
    new_carry = [then(e, f"nc{j}") if isinstance(e, relax.TupleGetItem) else e
                 for j, e in enumerate(_unpack(r, out_types))]
    nxt = then(relax.op.add(step, relax.const(1, "int64")), "next")
    rec = then(relax.Call(gv, [nxt, n] + new_carry + ps), "rest")
    other = _Emitter(bb)
    done = other(relax.Tuple(carry), "done")
    cond = _Emitter(bb)
    more = cond(relax.op.less(step, n), "more")
    out = cond(relax.If(more, then.seq(rec), other.seq(done)), "out")
    return gv, relax.Function([step, n] + carry + ps, cond.seq(out), ret_ty, True)


def _step_call(bb, emit, gv_stage, step, carry, ps, idx, step_idx):
    """Bind the body call of one iteration in ``emit``. With per-step parameters: ``if step == 0:
    stage(.., p@0) elif step == 1: ...`` (one compiled body; each step's weights are their own
    parameters of ``main``, laid out like the rest at load)."""
    from tvm import relax

    if not step_idx:
        return emit(relax.Call(gv_stage, [step] + carry + ps), "body")
    var_of = dict(zip(idx, ps))

    def at(i, e):
        call = relax.Call(gv_stage, [step] + carry + [var_of[k] for k in step_idx[i]])
        if i == len(step_idx) - 1:
            return e(call, f"at{i}")
        hit = e(relax.op.equal(step, relax.const(i, "int64")), f"is{i}")
        yes, no = _Emitter(bb), _Emitter(bb)
        return e(relax.If(hit, yes.seq(yes(call, f"at{i}")), no.seq(at(i + 1, no))), f"pick{i}")

    return at(0, emit)


def _position_call(bb, emit, i: int, position: tuple[int, int], info, n, carry: list, ps: list) -> list:
    """Schedule position j of N (a multi-resolution loop's stage): ``if n >= N - j: stage(j - N +
    min(n, N), *carry) else carry``."""
    from tvm import relax

    gv_stage, _f, _in, idx, out_types, _names, step_idx = info
    j, total = position
    runs = emit(relax.op.greater_equal(n, relax.const(total - j, "int64")), f"runs_{i}")
    upto = emit(relax.op.minimum(n, relax.const(total, "int64")), f"upto_{i}")
    step = emit(relax.op.subtract(upto, relax.const(total - j, "int64")), f"step_{i}")
    then = _Emitter(bb)
    r = _step_call(bb, then, gv_stage, step, carry, ps, idx, step_idx)
    new = [then(e, f"nc{i}_{q}") if isinstance(e, relax.TupleGetItem) else e
           for q, e in enumerate(_unpack(r, out_types))]
    done_then = then(relax.Tuple(new), f"ran_{i}")
    other = _Emitter(bb)
    done_else = other(relax.Tuple(carry), f"kept_{i}")
    out = emit(relax.If(runs, then.seq(done_then), other.seq(done_else)), f"s{i}")
    return [emit(relax.TupleGetItem(out, q), f"s{i}_{q}") for q in range(len(out_types))]


def _loop_entries(stages: list[Stage]) -> tuple[list[dict], dict[int, int]]:
    """The run-time counts (one per group of loop stages) and which count drives each loop stage."""
    loops, groups, of_stage = [], {}, {}
    for i, st in enumerate(stages):
        if st.kind != "loop":
            continue
        default = st.default_loops if st.default_loops is not None else (
            st.max_loops if st.max_loops is not None else max(st.min_loops, 1))
        entry = {"stage": i, "stages": [i], "name": st.group or st.name or f"stage{i}",
                 "min": int(st.min_loops), "max": None if st.max_loops is None else int(st.max_loops),
                 "default": int(default)}
        key = st.group if st.group is not None else ("stage", i)
        if key in groups:
            first = loops[groups[key]]
            if any(first[f] != entry[f] for f in ("min", "max", "default")):
                raise CompileError(f"loop stages of group {st.group!r} disagree on their count range")
            first["stages"].append(i)
        else:
            groups[key] = len(loops)
            loops.append(entry)
        of_stage[i] = groups[key]
    return loops, of_stage


def _main_function(bb, stages, info, loop_gvs, loops, of_stage, param_vars):
    """``main(*inputs, *counts, *params)``: every stage in order; returns (function, carry, inputs, names)."""
    from tvm import relax

    first_in = info[0][2][1:] if stages[0].kind == "loop" else info[0][2]
    names = info[0][5][1:] if stages[0].kind == "loop" else info[0][5]
    inputs = [relax.Var(nm, t) for nm, t in zip(names, first_in)]
    counts = [relax.Var(f"loops_{j}", relax.TensorType([], "int64")) for j in range(len(loops))]
    emit = _Emitter(bb)
    carry = list(inputs)
    for i, st in enumerate(stages):
        gv_stage, _f, _in, idx, out_types, *_ = info[i]
        ps = [param_vars[k] for k in idx]
        if st.kind == "loop" and st.position is not None and st.position[0] >= 0:
            carry = _position_call(bb, emit, i, st.position, info[i], counts[of_stage[i]], carry, ps)
        elif st.kind == "loop":
            first_step = 0 if st.position is None else st.position[1]  # (-1, N): steps N..n-1
            start = emit(relax.const(first_step, "int64"), f"start_{i}")
            r = emit(relax.Call(loop_gvs[i], [start, counts[of_stage[i]]] + carry + ps), f"s{i}")
            carry = [emit(relax.TupleGetItem(r, q), f"s{i}_{q}") for q in range(len(out_types))]
        else:
            r = emit(relax.Call(gv_stage, carry + ps), f"s{i}")
            carry = [emit(e, f"s{i}_{q}") if isinstance(e, relax.TupleGetItem) else e
                     for q, e in enumerate(_unpack(r, out_types))]
    result = emit(relax.Tuple(carry), "outputs")
    main = relax.Function(inputs + counts + param_vars, emit.seq(result), result.ty, True)
    main = main.with_attr("num_input", len(inputs) + len(counts)).with_attr("global_symbol", "main")
    return main, carry, inputs, names


def build_module(stages: list[Stage], *, pretranspose: bool = True,
                 pack_width: int | None = None, raw_keys=frozenset()) -> StagedModule:
    """Import every stage and chain them into one Relax module (see the module docstring).
    ``raw_keys``: content keys of weights kept in their PyTorch layout (to be quantised)."""
    import tvm
    from tvm import relax

    if not stages:
        raise CompileError("no stages to compile")
    params = ParamTable()
    assumptions: list[dict] = []
    imported, layouts = _import_all(stages, params, pretranspose, pack_width, assumptions, raw_keys)
    info, first = [], {}
    for i, st in enumerate(stages):  # stages of one program share its function
        k = first.setdefault(id(st.program), i)
        info.append(info[k] if k != i else _stage_function(i, st, imported[i], layouts, params))
    _check_chain(stages, info)
    funcs = {gv: func for gv, func, *_ in info}
    param_vars = [relax.Var(f"p_{k}", relax.TensorType([int(s) for s in t.shape], str(t.dtype).replace("torch.", "")))
                  for k, t in enumerate(params.tensors)]
    bb = relax.BlockBuilder()
    loops, of_stage = _loop_entries(stages)
    loop_gvs = {}
    for i, st in enumerate(stages):
        if st.kind == "loop" and (st.position is None or st.position[0] < 0):
            gv, func = _loop_function(bb, i, info[i], param_vars)
            funcs[gv] = func
            loop_gvs[i] = gv
    main, carry, inputs, names = _main_function(bb, stages, info, loop_gvs, loops, of_stage, param_vars)
    gv_main = relax.GlobalVar("main")
    relax.expr._update_type(gv_main, main.ty)
    funcs[gv_main] = main
    mod = relax.transform.Normalize()(tvm.IRModule(funcs))
    outputs = [_describe(f"output_{q}", c.ty) for q, c in enumerate(carry)]
    in_desc = [_describe(nm, v.ty) for nm, v in zip(names, inputs)]
    log.info("staged module: %d stages, %d loops, %d params (%d references, %.1f MB)",
             len(stages), len(loops), len(params.tensors), params.references, params.nbytes / 1e6)
    return StagedModule(mod=mod, params=params, inputs=in_desc, outputs=outputs, loops=loops,
                        assumptions=assumptions)
