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

Parameters are deduplicated across stages (by storage, then by identical bytes), so a weight
that two stages (or every iteration of a loop) use is one input of ``main`` and stored once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from .errors import CompileError

log = logging.getLogger(__name__)

STAGE_KINDS = ("straight", "loop")


@dataclass(frozen=True)
class Stage:
    """One stage of a converted model.

    Attributes:
        kind: ``"straight"`` (runs once) or ``"loop"`` (runs ``n`` times, ``n`` given at run time).
        program: the stage's torch.export program. A loop stage's first input is the int64
            0-d ``step`` tensor; its outputs have the shapes and dtypes of its other inputs.
        min_loops / max_loops / default_loops: the loop-count range recorded in the artifact
            manifest and enforced at run time (loop stages only; ``max_loops`` None: no limit).
        name: a label for reports and the manifest.
    """

    kind: str
    program: torch.export.ExportedProgram
    min_loops: int = 1
    max_loops: int | None = None
    default_loops: int | None = None
    name: str = ""
    #: the program's flat example inputs, for the few imports that must look at values
    #: (boolean-mask sizes, see ``importer.specialise_mask_counts``)
    example: tuple | None = None
    #: loop stages with the same group share one run-time count (e.g. the per-block loops of a
    #: sequence-shared span); None: the stage has its own count
    group: str | None = None

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise CompileError(f"stage kind must be one of {STAGE_KINDS}, got {self.kind!r}")


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
        if skey is not None:
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


def _transposed_params(func, first_param: int) -> dict:
    """Parameters whose every use is ``permute_dims(p, [1, 0])`` (how the importer spells the
    weight of ``nn.Linear``): ``{param index: [binding vars bound to the transpose]}``."""
    from tvm import relax
    from tvm.ir import Op

    permute = Op.get("relax.permute_dims")
    params = list(func.params)[first_param:]
    ids = {p: k + first_param for k, p in enumerate(params)}
    good: dict[int, list] = {}
    bad: set[int] = set()
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return {}
    for block in body.blocks:
        for b in block.bindings:
            v = b.value
            if (isinstance(b, relax.VarBinding) and isinstance(v, relax.Call) and v.op.same_as(permute)
                    and isinstance(v.args[0], relax.Var) and v.args[0] in ids
                    and len(v.args[0].ty.shape) == 2
                    and (v.attrs.axes is None or [int(x) for x in v.attrs.axes] == [1, 0])):
                good.setdefault(ids[v.args[0]], []).append(b.var)
                continue
            for u in relax.analysis.free_vars(v):
                if u in ids:
                    bad.add(ids[u])
    for u in relax.analysis.free_vars(body.body):
        if u in ids:
            bad.add(ids[u])
    return {k: vs for k, vs in good.items() if k not in bad}


def _matmul_users(func, which: dict) -> dict:
    """For each transposed parameter, the ``matmul(a, w_t)`` bindings using it (a 2-D, w_t the
    rhs), or None when some use is anything else (then it is only transposed, not packed)."""
    from tvm import relax
    from tvm.ir import Op

    matmul = Op.get("relax.matmul")
    alias = {v: k for k, vs in which.items() for v in vs}
    users: dict[int, list | None] = {k: [] for k in which}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            used = [u for u in relax.analysis.free_vars(v) if u in alias]
            if not used:
                continue
            ok = (isinstance(v, relax.Call) and v.op.same_as(matmul) and len(v.args) == 2
                  and v.args[1] in alias and not (v.args[0] in alias)
                  and len(v.args[0].ty.shape) == 2)
            for u in used:
                k = alias[u]
                if ok and users[k] is not None:
                    users[k].append(b)
                else:
                    users[k] = None
    for u in relax.analysis.free_vars(func.body.body):
        if u in alias:
            users[alias[u]] = None
    return users


def _apply_transposes(func, which: dict, pack: dict | None = None):
    """``func`` with parameter k (in ``which``) replaced by its transpose ``[K, N]``, and each
    ``permute_dims(p)`` binding by the new parameter itself.

    ``pack``: ``{k: NJ}`` for parameters stored as column panels ``[N / NJ, K, NJ]`` instead
    (each panel contiguous: a matmul tile streams it without TLB or cache-set conflicts, which
    a power-of-two row stride such as a vocabulary of 8192 otherwise causes); their
    ``matmul(a, w_t)`` becomes ``reshape(permute(matmul(a, panels), [1, 0, 2]), [M, N])``.
    """
    from tvm import relax

    pack = pack or {}
    bb = relax.BlockBuilder()
    new_params = list(func.params)
    alias = {}
    packed = {}
    for k in which:
        p = new_params[k]
        n, kk = (int(x) for x in p.ty.shape)
        if k in pack:
            nj = pack[k]
            q = relax.Var(f"{p.name}_p", relax.TensorType([n // nj, kk, nj], p.ty.dtype))
            packed[k] = (q, n, kk, nj)
        else:
            q = relax.Var(f"{p.name}_t", relax.TensorType([kk, n], p.ty.dtype))
        new_params[k] = q
        for v in which[k]:
            alias[v] = (k, q)
    blocks = []
    for block in func.body.blocks:
        bindings = []
        dataflow = isinstance(block, relax.DataflowBlock)
        mk = relax.DataflowVar if dataflow else relax.Var
        for b in block.bindings:
            if isinstance(b, relax.VarBinding) and b.var in alias:
                k, q = alias[b.var]
                if k not in packed:
                    bindings.append(relax.VarBinding(b.var, q))
                continue  # packed: the matmul below reads the panels directly
            v = b.value
            if (isinstance(b, relax.VarBinding) and isinstance(v, relax.Call) and len(v.args) == 2
                    and v.args[1] in alias and alias[v.args[1]][0] in packed):
                q, n, kk, nj = packed[alias[v.args[1]][0]]
                m = int(v.args[0].ty.shape[0])
                e1 = bb.normalize(relax.op.matmul(v.args[0], q, out_dtype=v.attrs.out_dtype))
                t1 = mk(f"{b.var.name}_panels", e1.ty)
                e2 = bb.normalize(relax.op.permute_dims(t1, [1, 0, 2]))
                t2 = mk(f"{b.var.name}_mpn", e2.ty)
                bindings += [relax.VarBinding(t1, e1), relax.VarBinding(t2, e2),
                             relax.VarBinding(b.var, relax.op.reshape(t2, [m, n]))]
                continue
            bindings.append(b)
        blocks.append(type(block)(bindings))
    return relax.Function(new_params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                          func.is_pure, func.attrs)


def _pack_tensor(w: torch.Tensor, nj: int) -> torch.Tensor:
    """[N, K] weight -> [N / NJ, K, NJ] column panels of its transpose."""
    n, k = w.shape
    return w.reshape(n // nj, nj, k).permute(0, 2, 1).contiguous()


def build_module(stages: list[Stage], *, pretranspose: bool = True,
                 pack_width: int | None = None) -> StagedModule:
    """Import every stage and chain them into one Relax module (see the module docstring)."""
    import tvm
    from tvm import relax

    from .importer import import_program, parameter_names, user_input_names

    if not stages:
        raise CompileError("no stages to compile")
    params = ParamTable()
    bb = relax.BlockBuilder()
    funcs = {}
    stage_info = []  # (gv, user input vars types, param indices, output types)
    # Pass 1: import every stage and find its linear weights (used only transposed).
    imported = []
    layouts: dict = {}  # tensor key -> "raw" | "T" | "panels"
    rank = {"panels": 0, "T": 1, "raw": 2}
    assumptions: list[dict] = []
    for i, st in enumerate(stages):
        mod = import_program(st.program, example=st.example, assumptions=assumptions)
        f = mod["main"]
        num_input = int(f.attrs["num_input"])
        pnames = parameter_names(st.program)
        if len(f.params) != num_input + len(pnames):
            raise CompileError(f"stage {i}: {len(f.params)} Relax inputs for {num_input} inputs and "
                               f"{len(pnames)} parameters (buffers must not be lifted as inputs)")
        sd = st.program.state_dict
        which = _transposed_params(f, num_input) if pretranspose else {}
        pack = {}
        if which and pack_width:
            users = _matmul_users(f, which)
            pack = {k: pack_width for k, u in users.items()
                    if u and int(f.params[k].ty.shape[0]) % pack_width == 0}
        for q, n in enumerate(pnames):
            k = num_input + q
            want = "panels" if k in pack else ("T" if k in which else "raw")
            key = params.key(sd[n])
            # a weight used in two layouts keeps the most general one: stored once
            layouts[key] = max(layouts.get(key, want), want, key=rank.get)
        imported.append((f, num_input, pnames, sd, which, pack))

    # Pass 2: store each weight once, in the layout every use of it can take.
    for i, st in enumerate(stages):
        f, num_input, pnames, sd, which, pack = imported[i]
        lay = {num_input + q: layouts[params.key(sd[n])] for q, n in enumerate(pnames)}
        which = {k: v for k, v in which.items() if lay[k] != "raw"}
        pack = {k: v for k, v in pack.items() if lay[k] == "panels"}
        # Linear weights are stored transposed ([in, out]) or as column panels so that matmuls
        # read them with the output dimension contiguous and no transpose runs per call.
        if which:
            f = _apply_transposes(f, which, pack)

        def stored(q, n):
            k = num_input + q
            if k in pack:
                return f"{n}.panels{pack[k]}", _pack_tensor(sd[n], pack[k])
            if k in which:
                return f"{n}.T", sd[n].t()
            return n, sd[n]

        idx = [params.add(*stored(q, n)) for q, n in enumerate(pnames)]
        in_types = [p.ty for p in f.params[:num_input]]
        out_types = _tensor_types(f.ret_ty)
        func = relax.Function(list(f.params), f.body, f.ret_ty, f.is_pure)
        func = relax.transform.CanonicalizeBindings()(tvm.IRModule({"f": func}))["f"]
        gv = relax.GlobalVar(f"stage_{i}")
        relax.expr._update_type(gv, func.ty)
        funcs[gv] = func
        in_names = user_input_names(st.program)
        stage_info.append((gv, in_types, idx, out_types, in_names))
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

    # carry compatibility between consecutive stages
    for i in range(1, len(stages)):
        prev_out = stage_info[i - 1][3]
        cur_in = stage_info[i][1][1:] if stages[i].kind == "loop" else stage_info[i][1]
        if len(prev_out) != len(cur_in) or not all(map(_same, prev_out, cur_in)):
            raise CompileError(f"stage {i} takes {[str(t) for t in cur_in]} but stage {i - 1} "
                               f"returns {[str(t) for t in prev_out]}")

    param_vars = [relax.Var(f"p_{k}", relax.TensorType([int(s) for s in t.shape],
                                                       str(t.dtype).replace("torch.", "")))
                  for k, t in enumerate(params.tensors)]
    # Param types must be exactly those the stages expect.
    one = relax.const(1, "int64")

    def unpack(result_var, types):
        from tvm import relax as R

        if isinstance(result_var.ty, R.TupleType):
            return [R.TupleGetItem(result_var, j) for j in range(len(types))]
        return [result_var]

    loops = []
    loop_gvs = {}
    loop_of_stage: dict[int, int] = {}  # loop stage -> index of its run-time count
    groups: dict = {}
    for i, st in enumerate(stages):
        if st.kind != "loop":
            continue
        gv_stage, in_types, idx, out_types, _ = stage_info[i]
        step = relax.Var("step", relax.TensorType([], "int64"))
        n = relax.Var("n", relax.TensorType([], "int64"))
        carry = [relax.Var(f"c{j}", t) for j, t in enumerate(in_types[1:])]
        ps = [relax.Var(f"p_{k}", param_vars[k].ty) for k in idx]
        ret_ty = relax.TupleType([c.ty for c in carry])
        gv = relax.GlobalVar(f"loop_{i}")
        relax.expr._update_type(gv, relax.FuncType([step.ty, n.ty] + [c.ty for c in carry]
                                                   + [p.ty for p in ps], ret_ty, True))
        # then-branch: one step and the recursive call
        then_bindings = []

        def emit(expr, name, bindings=then_bindings):
            expr = bb.normalize(expr)
            v = relax.Var(name, expr.ty)
            bindings.append(relax.VarBinding(v, expr))
            return v

        r = emit(relax.Call(gv_stage, [step] + carry + ps), "body")
        new_carry = [emit(e, f"nc{j}") if isinstance(e, relax.TupleGetItem) else e
                     for j, e in enumerate(unpack(r, out_types))]
        nxt = emit(relax.op.add(step, one), "next")
        rec = emit(relax.Call(gv, [nxt, n] + new_carry + ps), "rest")
        then_seq = relax.SeqExpr([relax.BindingBlock(then_bindings)], rec)
        else_bindings = []
        done = emit(relax.Tuple(carry), "done", else_bindings)
        else_seq = relax.SeqExpr([relax.BindingBlock(else_bindings)], done)
        cond_bindings = []
        cond = emit(relax.op.less(step, n), "more", cond_bindings)
        out = emit(relax.If(cond, then_seq, else_seq), "out", cond_bindings)
        body = relax.SeqExpr([relax.BindingBlock(cond_bindings)], out)
        func = relax.Function([step, n] + carry + ps, body, ret_ty, True)
        funcs[gv] = func
        loop_gvs[i] = gv
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
        loop_of_stage[i] = groups[key]

    # main
    input_types = stage_info[0][1][1:] if stages[0].kind == "loop" else stage_info[0][1]
    input_names = stage_info[0][4][1:] if stages[0].kind == "loop" else stage_info[0][4]
    inputs = [relax.Var(nm, t) for nm, t in zip(input_names, input_types)]
    counts = [relax.Var(f"loops_{j}", relax.TensorType([], "int64")) for j in range(len(loops))]
    main_bindings = []

    def memit(expr, name):
        expr = bb.normalize(expr)
        v = relax.Var(name, expr.ty)
        main_bindings.append(relax.VarBinding(v, expr))
        return v

    carry = list(inputs)
    for i, st in enumerate(stages):
        gv_stage, in_types, idx, out_types, _ = stage_info[i]
        ps = [param_vars[k] for k in idx]
        if st.kind == "loop":
            zero = memit(relax.const(0, "int64"), f"zero_{i}")
            r = memit(relax.Call(loop_gvs[i], [zero, counts[loop_of_stage[i]]] + carry + ps), f"s{i}")
            carry = [memit(relax.TupleGetItem(r, q), f"s{i}_{q}") for q in range(len(out_types))]
        else:
            r = memit(relax.Call(gv_stage, carry + ps), f"s{i}")
            carry = [memit(e, f"s{i}_{q}") if isinstance(e, relax.TupleGetItem) else e
                     for q, e in enumerate(unpack(r, out_types))]
    result = memit(relax.Tuple(carry), "outputs")
    main_params = inputs + counts + param_vars
    main = relax.Function(main_params, relax.SeqExpr([relax.BindingBlock(main_bindings)], result),
                          result.ty, True)
    main = main.with_attr("num_input", len(inputs) + len(counts)).with_attr("global_symbol", "main")
    gv_main = relax.GlobalVar("main")
    relax.expr._update_type(gv_main, main.ty)
    funcs[gv_main] = main
    mod = tvm.IRModule(funcs)
    mod = relax.transform.Normalize()(mod)

    outputs = [_describe(f"output_{q}", c.ty) for q, c in enumerate(carry)]
    in_desc = [_describe(nm, v.ty) for nm, v in zip(input_names, inputs)]
    log.info("staged module: %d stages, %d loops, %d params (%d references, %.1f MB)",
             len(stages), len(loops), len(params.tensors), params.references, params.nbytes / 1e6)
    return StagedModule(mod=mod, params=params, inputs=in_desc, outputs=outputs, loops=loops,
                        assumptions=assumptions)
