"""Quantised weights in a Relax module: ``W`` becomes its codes and scales, dequantised at each use.

The numerics (schemes, packing, the fake quantisation of the PyTorch model) are
:mod:`loopify.nn.quant`; here a module's float weights (``main``'s parameters after
``num_input``) whose content the registry holds are replaced by two parameters, the codes and
the scales. They are threaded through every function the weight is passed to (a loop's body,
its recursive call, a ``cond`` branch, a per-step ``if``), and at each use:

* ``matmul(x, permute_dims(w))`` (a linear layer, every use of the transpose a matmul) becomes
  one ``call_tir`` of a PrimFunc ``qmatmul_SCHEME_NxK`` holding a dequantisation block and the
  NT reduction. The schedule rules (:mod:`.sym_rules` on CPUs, DLight on CUDA) inline the
  dequantisation into the reduction (``compute_inline``), so the kernel reads the codes and
  never a float copy of the weight. (A separate dequantisation would not do: ``FuseOps`` fuses
  elementwise producers into injective or reduction consumers, not into a matmul.)
* any other allowed use (``take`` of an embedding table, by option; a transpose used otherwise)
  gets a ``dequant_SCHEME_NxK`` PrimFunc bound right before it, annotated ``op_pattern =
  kBroadcast`` so that ``FuseOps`` fuses it into that consumer (a gather then reads only its rows).

Weights with a use that is neither stay in float (with the reason in the manifest).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

GROUP = 32
KBROADCAST = 1  # tvm relax OpPatternKind


#: int4asym with float16 scales (CUDA): each group's scale and minimum are one int32 word (low
#: 16 bits the scale, high 16 the minimum), so that a kernel reads one element per group. As
#: ``[N, K/32, 2]`` float16 the pair is a region of extent 2, which DLight's GEMV analysis
#: refuses (``collect_block_iter_vars_used_in_access_region`` asserts point accesses).
PACKED_PAIR = "int32"


def packed_pair(scheme: str, scale_dtype: str) -> bool:
    """Whether ``scheme``'s (scale, min) pairs are stored as one int32 word (see PACKED_PAIR)."""
    return scheme == "int4asym" and scale_dtype == "float16"


def stored_scale(entry):
    """The scale tensor as the artifact stores it: ``[N, K/32]`` int32 words for int4asym with
    float16 scales (the float16 pair's bytes, little-endian: scale low, minimum high), else
    the entry's own."""
    import torch

    if packed_pair(entry.scheme, _tdt(entry.scale)):
        sc = entry.scale.contiguous()
        return sc.view(torch.int32).reshape(sc.shape[0], sc.shape[1])
    return entry.scale


#: int4 codes on CUDA (float16 scales): MLC-LLM's q4f16 words, eight codes per int32, element
#: j of each 8 in bits 4j..4j+3, so that a kernel's index into the codes is one split of the
#: reduction axis (``k // 8``, ``k % 8``). llama.cpp's order (``k // 32 * 16 + k % 16`` and a
#: shift by ``k % 32 // 16``) splits it twice, which DLight's GEMV normalisation cannot reorder
#: ("The loop no longer exists"): no int4 decode step built for CUDA before.
WORD_CODES = 8


def gpu_words(scheme: str, scale_dtype: str) -> bool:
    """Whether int4 codes are stored as int32 words (CUDA; see WORD_CODES)."""
    from loopify.nn.quant import INT4

    return scheme in INT4 and scale_dtype == "float16"


def stored_types(entry) -> tuple[tuple[list, str], tuple[list, str]]:
    """``((shape, dtype), (shape, dtype))`` of the codes and scales as stored (:func:`stored_codes`,
    :func:`stored_scale`), without packing them: what a function parameter's type needs."""
    n, k = entry.shape
    words = gpu_words(entry.scheme, _tdt(entry.scale))
    codes = ([n, k // WORD_CODES], "int32") if words else (list(entry.q.shape), _tdt(entry.q))
    pair = packed_pair(entry.scheme, _tdt(entry.scale))
    scales = ([n, k // GROUP], PACKED_PAIR) if pair else (list(entry.scale.shape), _tdt(entry.scale))
    return codes, scales


def stored_codes(entry):
    """The codes as the artifact stores them: ``[N, K/8]`` int32 words on CUDA (see
    WORD_CODES), else the entry's own (``[N, K/2]`` bytes in llama.cpp's order, or int8)."""
    import torch

    if not gpu_words(entry.scheme, _tdt(entry.scale)):
        return entry.q
    n, k = entry.shape
    b = entry.q.reshape(n, k // GROUP, GROUP // 2)
    codes = torch.cat([b & 15, b >> 4], dim=2).reshape(n, k // WORD_CODES, WORD_CODES).to(torch.int64)
    words = sum(codes[..., j] << (4 * j) for j in range(WORD_CODES))          # [N, K/8] in [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same 32 bits


def dequant_func(scheme: str, n: int, k: int, scale_dtype: str = "float32", out_dtype: str = "float32"):
    """TIR PrimFunc ``(q, scale) -> W [n, k]`` (see :mod:`loopify.nn.quant` for the layout)."""
    from tvm import te

    if scheme == "int8":
        q = te.placeholder((n, k), "int8", name="q")
        s = te.placeholder((n,), scale_dtype, name="scale")
    elif packed_pair(scheme, scale_dtype):
        q = te.placeholder((n, k // WORD_CODES), "int32", name="q")
        s = te.placeholder((n, k // GROUP), PACKED_PAIR, name="scale")
    elif gpu_words(scheme, scale_dtype):
        q = te.placeholder((n, k // WORD_CODES), "int32", name="q")
        s = te.placeholder((n, k // GROUP), scale_dtype, name="scale")
    elif scheme == "int4asym":  # (scale, min) per group
        q = te.placeholder((n, k // 2), "uint8", name="q")
        s = te.placeholder((n, k // GROUP, 2), scale_dtype, name="scale")
    else:
        q = te.placeholder((n, k // 2), "uint8", name="q")
        s = te.placeholder((n, k // GROUP), scale_dtype, name="scale")
    w = _te_dequant(q, s, scheme, n, k, out_dtype)
    f = te.create_prim_func([q, s, w])
    return f.with_attr("op_pattern", KBROADCAST).with_attr("global_symbol", f"dequant_{scheme}_{n}x{k}")


def _te_dequant(q, s, scheme: str, n: int, k: int, out_dtype: str):
    from tvm import te, tirx

    if scheme == "int8":
        return te.compute((n, k), lambda i, j: q[i, j].astype(out_dtype) * s[i].astype(out_dtype), name="dequant")
    half = GROUP // 2

    def value(i, j):
        if q.dtype == "int32":  # CUDA words: element j % 8 of word j // 8
            word = q[i, j // WORD_CODES]
            code = tirx.bitwise_and(tirx.shift_right(word, (j % WORD_CODES * 4).astype("int32")),
                                    tirx.const(15, "int32")).astype(out_dtype)
        else:
            byte = q[i, (j // GROUP) * half + j % half]
            shift = ((j % GROUP) // half * 4).astype("uint8")
            code = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8")).astype(out_dtype)
        if scheme == "int4asym" and len(s.shape) == 2:  # packed pair: one int32 word per group
            word = s[i, j // GROUP]
            lo = tirx.bitwise_and(word, tirx.const(0xFFFF, PACKED_PAIR)).astype("uint16")
            hi = tirx.bitwise_and(tirx.shift_right(word, tirx.const(16, PACKED_PAIR)),
                                  tirx.const(0xFFFF, PACKED_PAIR)).astype("uint16")
            return (code * tirx.reinterpret("float16", lo).astype(out_dtype)
                    + tirx.reinterpret("float16", hi).astype(out_dtype))
        if scheme == "int4asym":
            g = j // GROUP
            return code * s[i, g, 0].astype(out_dtype) + s[i, g, 1].astype(out_dtype)
        return (code - tirx.const(8, out_dtype)) * s[i, j // GROUP].astype(out_dtype)

    return te.compute((n, k), value, name="dequant")


def _te_qmatmul(x, q, s, *, scheme: str, n: int, k: int, out_dtype: str, acc_dtype: str | None = None):
    """``y[.., j] = sum_k x[.., k] * W[j, k]``, W dequantised in the same PrimFunc: one kernel
    whose only reads of the weight are its codes and scales (the rules inline the dequant
    block into the reduction). ``out_dtype``: the weight's dtype; ``acc_dtype``: the result's,
    in which W is dequantised and the sum accumulates (float32 for a float16 model, as in the
    matmul it replaces; W then skips the float16 rounding of the fake-quantised PyTorch weight,
    a difference of at most 2^-11 relative, inside the float16 validation tolerance)."""
    from tvm import te

    acc = acc_dtype or out_dtype
    w = _te_dequant(q, s, scheme, n, k, acc)
    r = te.reduce_axis((0, k), name="k")
    shape = list(x.shape[:-1]) + [n]
    return te.compute(shape, lambda *i: te.sum(x[tuple(i[:-1]) + (r,)].astype(acc) * w[i[-1], r], axis=r),
                      name="NT_matmul")


# --- which weights: union of the parameter slots a weight flows through ----------------------------

class _Slots:
    """Union-find over (function name, parameter index)."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def _is_op(call, name: str) -> bool:
    from tvm import relax
    from tvm.ir import Op

    return isinstance(call, relax.Call) and isinstance(call.op, Op) and call.op.same_as(Op.get(name))


def _leaf_use(call, var, allow_take: bool) -> bool:
    """Is ``call`` a use a dequantised weight may feed: ``permute_dims(w, [1, 0])`` (a linear's
    weight), or ``take(w, ids, axis=0)`` (an embedding) when ``allow_take``."""
    if _is_op(call, "relax.permute_dims") and call.args[0].same_as(var):
        axes = call.attrs.axes
        return axes is None or [int(x) for x in axes] == [1, 0]
    if allow_take and _is_op(call, "relax.take") and call.args[0].same_as(var) and not any(
            a.same_as(var) for a in call.args[1:]):
        return call.attrs.axis is not None and int(call.attrs.axis) == 0
    return False


def _walk(mod, allow_take: bool):
    """(slots, bad): the parameter slots joined by calls, and the slots with a use that cannot
    take a dequantised weight."""
    from tvm import relax

    slots, bad = _Slots(), set()
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
    for fname, f in funcs.items():
        params = {p: (fname, i) for i, p in enumerate(f.params)}

        def mark_free(expr):
            for v in relax.analysis.free_vars(expr):
                if v in params:
                    bad.add(params[v])

        def visit(value):
            if isinstance(value, relax.If):
                mark_free(value.cond)
                visit_seq(value.true_branch)
                visit_seq(value.false_branch)
            elif isinstance(value, relax.SeqExpr):
                visit_seq(value)
            elif isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar) and \
                    value.op.name_hint in funcs:
                for a, arg in enumerate(value.args):
                    callee = (value.op.name_hint, a)
                    if isinstance(arg, relax.Var) and arg in params:
                        slots.union(params[arg], callee)
                    else:
                        mark_free(arg)
                        bad.add(callee)  # takes a computed value somewhere
            elif isinstance(value, relax.Call):
                for arg in value.args:
                    if isinstance(arg, relax.Var) and arg in params and _leaf_use(value, arg, allow_take):
                        continue
                    mark_free(arg)
            else:
                mark_free(value)

        def visit_seq(seq):
            for block in seq.blocks:
                for b in block.bindings:
                    visit(b.value)
            mark_free(seq.body)

        body = f.body
        if isinstance(body, relax.SeqExpr):
            visit_seq(body)
        else:
            mark_free(body)
    return slots, bad, funcs


def plan(mod, candidates: dict[int, object], allow_take: bool) -> tuple[dict[int, object], dict[int, str]]:
    """Of ``candidates`` (weight index -> registry entry), those that can be quantised: every
    parameter slot the weight reaches uses it only as a linear weight (or embedding table), and
    every weight sharing a slot with it (one loop body serving several steps' weights) is
    quantised the same way. Returns ``(chosen, refused: index -> reason)``."""
    slots, bad, _funcs = _walk(mod, allow_take)
    main = mod["main"]
    n = int(main.attrs["num_input"])
    classes: dict = {}
    for fname_i in list(slots.parent):
        classes.setdefault(slots.find(fname_i), set()).add(fname_i)
    chosen, refused = {}, {}
    members_of = {}
    for w in range(len(main.params) - n):
        root = slots.find(("main", n + w))
        members_of.setdefault(root, []).append(w)
    for w, entry in candidates.items():
        root = slots.find(("main", n + w))
        cls = classes.get(root, {("main", n + w)})
        if any(c in bad for c in cls):
            refused[w] = "used other than as a linear weight" + (" or embedding table" if allow_take else "")
            continue
        others = [o for o in members_of.get(root, [w]) if o != w]
        if any(o not in candidates or _sig(candidates[o]) != _sig(entry) for o in others):
            refused[w] = "shares a loop body's parameter with a weight that is not quantised alike"
            continue
        chosen[w] = entry
    return chosen, refused


def _sig(entry) -> tuple:
    return (entry.scheme, tuple(entry.shape), str(entry.scale.dtype), tuple(entry.q.shape), entry.dtype)


# --- the rewrite ----------------------------------------------------------------------------------

def rewrite(mod, chosen: dict[int, object]):
    """``mod`` with each chosen weight of ``main`` (index -> registry entry) replaced by its codes and
    scales, threaded through every function it reaches, dequantised before each use."""
    return _Rewrite(mod, chosen).module()


def _tdt(t) -> str:
    return str(t.dtype).replace("torch.", "")


class _Rewrite:
    """One :func:`rewrite`: which parameter of which function holds a chosen weight, the new
    GlobalVars of the functions whose signature changes (a typed one cannot be retyped), and the
    dequantisation / fused-matmul PrimFuncs made on the way (one BlockBuilder gives each a typed
    GlobalVar)."""

    def __init__(self, mod, chosen: dict[int, object]):
        from tvm import relax

        self.mod = mod
        slots, _bad, self.funcs = _walk(mod, True)
        n = int(mod["main"].attrs["num_input"])
        roots = {slots.find(("main", n + w)): entry for w, entry in chosen.items()}
        self.entries = {fname: {i: roots[slots.find((fname, i))] for i in range(len(f.params))
                                if slots.find((fname, i)) in roots}
                        for fname, f in self.funcs.items()}
        self.gvmap = {fname: relax.GlobalVar(fname) for fname, e in self.entries.items() if e}
        self.deq_bb = relax.BlockBuilder()
        self.deq_gvs: dict = {}

    def deq_gv(self, entry):
        key = _sig(entry)
        if key not in self.deq_gvs:
            nn_, kk = entry.shape
            f = dequant_func(entry.scheme, nn_, kk, _tdt(entry.scale), entry.dtype)
            self.deq_gvs[key] = self.deq_bb.add_func(f, f"dequant_{entry.scheme}_{nn_}x{kk}_{_tdt(entry.scale)}")
        return self.deq_gvs[key]

    def function(self, fname: str):
        """The function with each weight parameter split into codes and scales (None when it
        takes none)."""
        from tvm import relax

        f, entries = self.funcs[fname], self.entries[fname]
        if not entries:
            return None
        params, self.split = [], {}
        for i, p in enumerate(f.params):
            if i in entries:
                e = entries[i]
                (qs, qt), (ss, stype) = stored_types(e)  # the packing itself runs once, for the params
                vq = relax.Var(f"{p.name}_q", relax.TensorType(qs, qt))
                vs = relax.Var(f"{p.name}_s", relax.TensorType(ss, stype))
                params += [vq, vs]
                self.split[p] = (vq, vs, e)
            else:
                params.append(p)
        self.fused = _fusable_transposes(f, self.split)
        return relax.Function(params, self.seq(f.body), f.ret_ty, f.is_pure, f.attrs, f.span)

    def args_of(self, args) -> list:
        from tvm import relax

        out = []
        for a in args:
            out += list(self.split[a][:2]) if isinstance(a, relax.Var) and a in self.split else [a]
        return out

    def seq(self, seq):
        from tvm import relax

        blocks = []
        for block in seq.blocks:
            mk = relax.DataflowVar if isinstance(block, relax.DataflowBlock) else relax.Var
            bindings = []
            for b in block.bindings:
                bindings += self.binding(b, mk)
            blocks.append(type(block)(bindings))
        return relax.SeqExpr(blocks, seq.body)

    def binding(self, b, mk) -> list:
        """What one binding becomes: calls of rewritten functions get codes and scales, a
        weight's transpose into a matmul becomes one fused dequant-matmul, other uses of a
        weight read a dequantised copy."""
        from tvm import relax

        v, split = b.value, self.split
        if isinstance(v, relax.If):
            return [relax.VarBinding(b.var, relax.If(v.cond, self.seq(v.true_branch), self.seq(v.false_branch)))]
        if isinstance(v, relax.Call) and isinstance(v.op, relax.GlobalVar) and v.op.name_hint in self.funcs:
            return [relax.VarBinding(b.var, relax.Call(self.gvmap.get(v.op.name_hint, v.op), self.args_of(v.args),
                                                       v.attrs, v.ty_args))]
        if b.var in self.fused:
            return []  # the transpose of a weight every use of which is a fused matmul
        if _is_op(v, "relax.matmul") and v.args[1] in self.fused:
            vq, vs, e = split[self.fused[v.args[1]]]
            acc = str(b.var.ty.dtype) if getattr(b.var.ty, "dtype", None) is not None else e.dtype
            call = self.deq_bb.call_te(_te_qmatmul, v.args[0], vq, vs, scheme=e.scheme, n=e.shape[0], k=e.shape[1],
                                       out_dtype=e.dtype, acc_dtype=acc,
                                       primfunc_name_hint=f"qmatmul_{e.scheme}_{e.shape[0]}x{e.shape[1]}")
            return [relax.VarBinding(b.var, call)]
        if isinstance(v, relax.Call) and len(v.args) and isinstance(v.args[0], relax.Var) and v.args[0] in split:
            vq, vs, e = split[v.args[0]]
            d = mk(f"{v.args[0].name}_dq", relax.TensorType(list(e.shape), e.dtype))
            call = relax.call_tir(self.deq_gv(e), [vq, vs], relax.TensorType(list(e.shape), e.dtype))
            return [relax.VarBinding(d, call),
                    relax.VarBinding(b.var, relax.Call(v.op, [d] + list(v.args[1:]), v.attrs, v.ty_args))]
        return [b]

    def module(self):
        import tvm
        from tvm import relax

        new = {fname: self.function(fname) for fname in self.funcs}
        for fname, nf in new.items():
            if nf is not None:
                relax.expr._update_type(self.gvmap[fname], relax.FuncType([p.ty for p in nf.params], nf.ret_ty,
                                                                          nf.is_pure))
        out = {}
        for gv, f in self.mod.functions.items():
            nf = new.get(gv.name_hint)
            out[self.gvmap.get(gv.name_hint, gv)] = nf if nf is not None else f
        for gv, f in self.deq_bb.get().functions.items():  # dequantisations and fused matmuls
            out[gv] = f
        mod = tvm.IRModule(out, attrs=self.mod.attrs) if self.mod.attrs is not None else tvm.IRModule(out)
        return relax.transform.Normalize()(mod)


def _fusable_transposes(f, split: dict) -> dict:
    """``{wt: w}`` for each binding ``wt = permute_dims(w)`` of a split weight whose every use is
    ``matmul(x, wt)`` (x not 1-D): these matmuls become one fused dequantise-matmul kernel."""
    from tvm import relax

    perm, uses_ok = {}, {}

    def scan(seq):
        for block in seq.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.If):
                    for u in relax.analysis.free_vars(v.cond):
                        uses_ok[u] = False
                    scan(v.true_branch)
                    scan(v.false_branch)
                    continue
                if _is_op(v, "relax.permute_dims") and v.args[0] in split and _leaf_use(v, v.args[0], False):
                    perm[b.var] = v.args[0]
                    continue
                mm = _is_op(v, "relax.matmul") and len(v.args) == 2
                for a_i, a in enumerate(v.args if isinstance(v, relax.Call) else []):
                    for u in relax.analysis.free_vars(a):
                        ok = mm and a_i == 1 and a.same_as(u) and not v.args[0].same_as(u) and \
                            len(v.args[0].ty.shape) >= 2
                        uses_ok[u] = uses_ok.get(u, True) and ok
                if not isinstance(v, relax.Call):
                    for u in relax.analysis.free_vars(v):
                        uses_ok[u] = False
        for u in relax.analysis.free_vars(seq.body):
            uses_ok[u] = False

    if isinstance(f.body, relax.SeqExpr):
        scan(f.body)
    return {wt: w for wt, w in perm.items() if uses_ok.get(wt, False)}


def quantize_weights(mod, tensors: list, names: list[str], registry: dict, allow_take: bool):
    """Quantise the weights of ``mod``'s ``main`` (``tensors`` / ``names``: its parameters after
    ``num_input``, in order) that the registry holds.

    Returns ``(mod, names, tensors, report)``: the new module and its parameter list (each
    quantised weight's pair ``NAME.q4`` / ``NAME.scale`` in its place) and the manifest's
    ``tensors`` and ``float`` entries."""
    from loopify.nn.quant import INT4, content_key

    candidates = {}
    for w, t in enumerate(tensors):
        if t.dim() == 2 and t.dtype.is_floating_point:
            e = registry.get(content_key(t))
            if e is not None:
                candidates[w] = e
    chosen, refused = plan(mod, candidates, allow_take)
    report = {"tensors": {}, "float": {}}
    for w, why in refused.items():
        report["float"][names[w]] = why
    if not chosen:
        return mod, list(names), list(tensors), report
    mod = rewrite(mod, chosen)
    new_names, new_tensors = [], []
    tag = {"int8": "q8", "int4": "q4", "int4asym": "q4a"}
    for w, (name, t) in enumerate(zip(names, tensors)):
        if w in chosen:
            e = chosen[w]
            qn, sn = f"{name}.{tag[e.scheme]}", f"{name}.scale"
            new_names += [qn, sn]
            new_tensors += [stored_codes(e).contiguous(), stored_scale(e).contiguous()]
            int4 = e.scheme in INT4
            report["tensors"][name] = {"scheme": e.scheme, "group_size": GROUP if int4 else None,
                                       "granularity": "group" if int4 else "output channel",
                                       "shape": list(e.shape), "codes": qn, "scales": sn, "role": e.role,
                                       "scale_dtype": str(e.scale.dtype).replace("torch.", ""),
                                       **({"scale_packing": "int32 [N, K/32]: float16 scale in the low 16 bits, "
                                                            "float16 minimum in the high 16"}
                                          if packed_pair(e.scheme, _tdt(e.scale)) else {}),
                                       **({"code_packing": "int32 [N, K/8]: element j of each 8 in bits 4j..4j+3 "
                                                           "(MLC-LLM q4f16)"}
                                          if gpu_words(e.scheme, _tdt(e.scale)) else {}),
                                       "modules": list(e.names),
                                       "bytes": e.q.numel() * e.q.element_size() + e.scale.numel() * e.scale.element_size(),
                                       "float32_bytes": e.shape[0] * e.shape[1] * 4}
        else:
            new_names.append(name)
            new_tensors.append(t)
    return mod, new_names, new_tensors, report


def scheduled(mod, target, options):
    """``mod`` after the front passes (dispatch, legalise, fuse) and the schedule rules, before
    lowering: the PrimFuncs the library's kernels are made of (for inspection and tests)."""
    import tvm

    from . import build, schedules

    tgt = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    with tgt:
        m = tvm.transform.Sequential(build.front_passes(tgt, options))(mod)
        return tvm.transform.Sequential(schedules.schedule_passes(tgt, options))(m)


def weight_copies(mod, shapes) -> list[tuple[str, str]]:
    """``(function, buffer)`` for every float buffer a PrimFunc of ``mod`` allocates in a quantised
    weight's shape (``shapes``: their ``(N, K)``; also transposed or flat), and every standalone
    dequantisation left unfused: none means each kernel reads the codes, never a float copy of
    the weight. (TVM 0.27's Python API has no TIR visitor; the allocations are read off the
    printed TIR, where float32 is the dtype left unsaid.)"""
    import re

    from tvm import tirx

    want = {(int(n), int(k)) for n, k in shapes} | {(int(k), int(n)) for n, k in shapes} | {
        (int(n) * int(k),) for n, k in shapes}
    found = []
    for gv, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        if gv.name_hint.startswith("dequant"):
            found.append((gv.name_hint, "its output (a dequantisation not fused into its consumer)"))
            continue
        for line in f.script().splitlines():
            m = re.match(r"\s*(\w+) = T\.(?:sblock_)?alloc_buffer\(\((.*)$", line)
            if not m:
                continue
            rest, depth, dims = m.group(2), 1, ""
            for pos, ch in enumerate(rest):  # the shape tuple: up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    dims, rest = rest[:pos], rest[pos + 1:]
                    break
            parts = [d.strip() for d in dims.split(",") if d.strip()]
            ints = [re.fullmatch(r"(?:T\.int64\()?(\d+)\)?", d) for d in parts]
            if not parts or not all(ints):
                continue  # a symbolic extent: not a weight's size
            shape = [int(x.group(1)) for x in ints]
            while len(shape) > 1 and shape[0] == 1:
                shape = shape[1:]
            dt = re.search(r'"(u?int\d+|float\d+|bfloat16|bool)"', rest)
            if (dt.group(1) if dt else "float32").startswith("float") and tuple(shape) in want:
                found.append((gv.name_hint, m.group(1)))
    return found
