"""Weight layouts for CPU matmuls: a phase of the build pipeline (see build.py).

The importer spells ``nn.Linear`` as ``matmul(x, permute_dims(W))``. A weight whose every use is
that transpose is stored transposed (``[in, out]``), so no transpose runs per call; a weight whose
every use is such a matmul of a 2-D activation is stored as contiguous column panels
``[N / NJ, K, NJ]`` (NJ = the width of the NN matmul kernel's tile, `sym_rules.MatmulLike`), so a matmul tile streams one
panel without TLB or cache-set conflicts (a power-of-two row stride such as a vocabulary of 8192
otherwise causes them). A weight used in several layouts (by several stages) is stored once, in
the most general layout every use can take.

:func:`plan` decides per weight (over every stage), :func:`apply` rewrites one stage's function
and gives the tensor to store.
"""

from __future__ import annotations

import torch

#: the order of generality: a raw weight serves every use
RANK = {"panels": 0, "T": 1, "raw": 2}


def transposed_params(func, first_param: int) -> dict:
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


def matmul_users(func, which: dict) -> dict:
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


def rewrite(func, which: dict, pack: dict | None = None):
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


def pack_tensor(w: torch.Tensor, nj: int) -> torch.Tensor:
    """[N, K] weight -> [N / NJ, K, NJ] column panels of its transpose."""
    n, k = w.shape
    return w.reshape(n // nj, nj, k).permute(0, 2, 1).contiguous()




def stage_layouts(func, num_input: int, pretranspose: bool, pack_width: int | None) -> tuple[dict, dict]:
    """What one stage's function allows: ``(which, pack)`` = the transposed-only parameters
    (index -> transpose bindings) and those that may be packed (index -> panel width)."""
    which = transposed_params(func, num_input) if pretranspose else {}
    pack = {}
    if which and pack_width:
        users = matmul_users(func, which)
        pack = {k: pack_width for k, u in users.items() if u and int(func.params[k].ty.shape[0]) % pack_width == 0}
    return which, pack


def want(k: int, which: dict, pack: dict) -> str:
    return "panels" if k in pack else ("T" if k in which else "raw")


def merge(layouts: dict, key, layout: str) -> None:
    """Keep the most general layout a weight is wanted in (it is stored once)."""
    layouts[key] = max(layouts.get(key, layout), layout, key=RANK.get)


def stored(name: str, tensor: torch.Tensor, k: int, which: dict, pack: dict) -> tuple[str, torch.Tensor]:
    """The name and tensor a weight is stored as under the stage's final ``which`` / ``pack``."""
    if k in pack:
        return f"{name}.panels{pack[k]}", pack_tensor(tensor, pack[k])
    if k in which:
        return f"{name}.T", tensor.t()
    return name, tensor
