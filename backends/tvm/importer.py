"""Import a torch.export program into Relax, with the legalisation TVM's importer lacks.

Two layers:

* an FX pre-pass on a copy of the program (the caller's program is never touched) that removes
  run-time assertion nodes (``_assert_*``, ``sym_constrain_range*``) and then everything that only
  fed them (``item`` / ``sym_ite`` / ``_is_all_true`` chains that check shapes export already
  proved); and
* custom converters for the ops the example zoo still meets after that (``masked_scatter``,
  ``unfold``, ``_is_all_true``, ``sym_ite``, ``or_``, ``and_``, ``sym_not``; boolean-mask
  ``index.Tensor`` sized from the example inputs, see :func:`specialise_mask_counts`; float
  unary ops with torch's int-to-float promotion; static ``sym_size``), each tested alone
  against PyTorch in ``tests/test_tvm_import.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Ops removed by the pre-pass: run-time checks of facts that export already established.
ASSERTION_TARGETS = (
    "_assert_scalar",
    "_assert_async",
    "_assert_tensor_metadata",
    "_assert_tensor_metadata_default",
    "sym_constrain_range",
    "sym_constrain_range_for_size",
    "_functional_assert_async",
    "_functional_sym_constrain_range",
    "_functional_sym_constrain_range_for_size",
)


def _target_name(node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def strip_assertions(ep: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, int]:
    """A copy of ``ep`` without assertion nodes and the computations that only fed them.

    Returns ``(program, number_of_nodes_removed)``. Parameters and constants are shared with
    ``ep`` (not copied); only the graph is.
    """
    gm = copy.deepcopy(ep.graph_module)
    graph = gm.graph
    before = len(graph.nodes)
    for node in list(graph.nodes):
        if node.op == "call_function" and _target_name(node) in ASSERTION_TARGETS and not node.users:
            graph.erase_node(node)
    # Dead-code elimination: the item / sym_ite / comparison chains that fed the assertions.
    # Placeholders and outputs stay; so does anything impure.
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op == "call_function" and node.is_impure() and _target_name(node) not in (
                "item", "_local_scalar_dense"):
                continue
            graph.erase_node(node)
            changed = True
    graph.lint()
    gm.recompile()
    removed = before - len(graph.nodes)
    return ep._update(gm, ep.graph_signature), removed


# ---------------------------------------------------------------------------------------------
# converters: (node, importer) -> relax.Expr


def _masked_scatter(node, importer):
    """``out = input; out[mask] = source[:mask.sum()]`` in row-major order.

    The k-th true position of the (broadcast) mask takes the k-th element of the flattened
    source, i.e. ``take(source, cumsum(mask) - 1)`` selected by ``where``. Works with symbolic
    sizes of ``input`` (a prompt of any length holding the image tokens); ``source`` (the image
    features) has a static size.
    """
    import functools

    from tvm import relax

    bb = importer.block_builder
    x, mask, source = (importer.env[a] for a in node.args[:3])
    shape = list(x.ty.shape)
    numel = functools.reduce(lambda a, b: a * b, shape)
    src_numel = int(np.prod([int(s) for s in source.ty.shape]))
    mask = bb.emit(relax.op.broadcast_to(mask, relax.ShapeExpr(shape)))
    flat_mask = bb.emit(relax.op.reshape(mask, (numel,)))
    idx = bb.emit(relax.op.cumsum(relax.op.astype(flat_mask, "int64"), axis=0))
    idx = bb.emit(relax.op.subtract(idx, relax.const(1, "int64")))
    idx = bb.emit(relax.op.clip(idx, 0, max(src_numel - 1, 0)))
    flat_src = bb.emit(relax.op.reshape(source, (src_numel,)))
    gathered = bb.emit(relax.op.take(flat_src, idx, axis=0))
    flat_x = bb.emit(relax.op.reshape(x, (numel,)))
    out = bb.emit(relax.op.where(flat_mask, gathered, flat_x))
    return bb.emit(relax.op.reshape(out, relax.ShapeExpr(shape)))


def _unfold(node, importer):
    """``Tensor.unfold(dim, size, step)``: windows along ``dim`` as a new last axis."""
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    dim, size, step = (int(a) for a in node.args[1:4])
    shape = [int(s) for s in x.ty.shape]
    rank = len(shape)
    dim = dim % rank
    n = (shape[dim] - size) // step + 1
    index = (np.arange(n)[:, None] * step + np.arange(size)[None, :]).reshape(-1).astype("int64")
    taken = bb.emit(relax.op.take(x, relax.const(index, "int64"), axis=dim))
    # [..., n*size, ...] -> [..., n, size, ...] -> move size to the end
    split = shape[:dim] + [n, size] + shape[dim + 1:]
    taken = bb.emit(relax.op.reshape(taken, split))
    axes = list(range(dim + 1)) + list(range(dim + 2, rank + 1)) + [dim + 1]
    return bb.emit(relax.op.permute_dims(taken, axes))


def _is_all_true(node, importer):
    """``aten._is_all_true``: a 0-d bool tensor, true when every element is true."""
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    if isinstance(x, (bool, int)):
        return bool(x)
    as_int = bb.emit(relax.op.astype(x, "int32"))
    lowest = bb.emit(relax.op.min(as_int))
    return bb.emit(relax.op.equal(lowest, relax.const(1, "int32")))


def _as_tensor(importer, value, dtype=None):
    from tvm import relax

    if isinstance(value, relax.Expr):
        return value
    if dtype is None:
        dtype = "bool" if isinstance(value, bool) else ("int64" if isinstance(value, int) else "float32")
    return relax.const(value, dtype)


def _sym_ite(node, importer):
    """``torch.sym_ite(cond, a, b)``: Python when everything is static, else ``where``."""
    from tvm import relax

    cond, a, b = importer._retrieve_args(node.args)
    if not isinstance(cond, relax.Expr):
        return a if cond else b
    bb = importer.block_builder
    return bb.emit(relax.op.where(_as_tensor(importer, cond), _as_tensor(importer, a),
                                  _as_tensor(importer, b)))


def _logical(py_op: Callable, relax_name: str):
    def convert(node, importer):
        from tvm import relax

        args = importer._retrieve_args(node.args)
        if not any(isinstance(a, relax.Expr) for a in args):
            return py_op(*args)
        bb = importer.block_builder
        tensors = [bb.emit(relax.op.astype(_as_tensor(importer, a), "bool")) for a in args]
        return bb.emit(getattr(relax.op, relax_name)(*tensors))

    return convert


#: ``node.meta`` key holding the count a boolean mask had on the example inputs (see
#: :func:`specialise_mask_counts`).
MASK_COUNT = "loopify_mask_count"


def _bool_mask_index(node):
    """``(position, mask node)`` when ``node`` is ``aten.index.Tensor`` with one boolean index."""
    if node.op != "call_function" or node.target is not torch.ops.aten.index.Tensor:
        return None
    indices = list(node.args[1])
    masks = [(i, idx) for i, idx in enumerate(indices)
             if idx is not None and getattr(getattr(idx, "meta", {}).get("val"), "dtype", None) == torch.bool]
    if not masks:
        return None
    if len(masks) > 1 or any(idx is not None for i, idx in enumerate(indices) if i != masks[0][0]):
        return (-1, None)  # a boolean mask combined with other indices: not specialised
    return masks[0]


def _source_line(node) -> str:
    """``file.py:LINE: code`` of the innermost frame in the node's stack trace ("" if none)."""
    import re

    lines = node.meta.get("stack_trace", "").strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', lines[i])
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}: {code}"
    return ""


def specialise_mask_counts(ep: torch.export.ExportedProgram, example) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """Give every boolean-mask ``x[mask]`` the static size it has on the example inputs.

    ``x[mask]`` has as many rows as ``mask`` has true elements: a data-dependent size that a
    static-shape artifact cannot express. Idefics3 does this to drop padding images
    (``pixel_values[real_images_inds]``); with an artifact's fixed input shapes every image is
    real, so the count is the example's. The count is recorded on the node (the converter then
    gathers exactly those positions) and returned as an *assumption* for the manifest. At run
    time a mask with another count makes the (float) selection NaN, so a violated assumption
    shows in the outputs (and :mod:`loopify.runtime` reports it) instead of passing silently.

    Returns ``(program, assumptions)``; the program is ``ep`` itself with node metadata added.
    """
    from .errors import CompileError

    found = {}
    for node in ep.graph_module.graph.nodes:
        hit = _bool_mask_index(node)
        if hit is None:
            continue
        if hit[1] is None:
            raise CompileError(f"node {node.name}: boolean-mask indexing combined with other indices has a "
                               "data-dependent result size that loopify cannot make static")
        found[node.name] = (node, hit)
    if not found:
        return ep, []
    if example is None:
        raise CompileError(
            f"node {next(iter(found))}: boolean-mask indexing (aten.index.Tensor with a bool mask) has a "
            "data-dependent result size; making it static needs the example inputs")
    names = {hit[1].name for _, hit in found.values()}
    from loopify.graphs import record_values

    try:
        values = record_values(ep.module(), example, names)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"running the program on its example inputs to size boolean masks failed: "
                           f"{str(e).splitlines()[0][:200]}") from e
    assumptions = []
    for name, (node, (pos, mask)) in found.items():
        if mask.name not in values:
            raise CompileError(f"node {name}: the boolean mask {mask.name} was not computed on the example inputs")
        m = values[mask.name]
        count = int(m.sum())
        node.meta[MASK_COUNT] = count
        assumptions.append({"node": name, "kind": "mask-count", "mask_shape": list(m.shape),
                            "count": count, "source": _source_line(node)})
        log.info("boolean mask %s at %s: %d of %d true on the example inputs; specialised", mask.name, name,
                 count, m.numel())
    return ep, assumptions


def _index_with_slices(node, importer):
    """``x[:, :, i, j]``-style advanced indexing (several index tensors beside full slices, as
    ``F.unfold`` decomposes). TVM's converter broadcasts the slices' aranges against the index
    tensors from the left, which is wrong for these (Mistral3's patch merger failed to import).
    Here: the indexed axes are moved to the front, indexed jointly with ``index_tensor``
    (broadcast index shapes first, then the other axes in order: PyTorch's result when the
    indexed axes are apart), then the broadcast axes move to where the first indexed axis stood
    when the indexed axes are adjacent (PyTorch's rule)."""
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    indices = list(node.args[1])
    ndim = len(x.ty.shape)
    adv = [i for i, idx in enumerate(indices) if idx is not None]
    rest = [i for i in range(ndim) if i not in adv]
    moved = bb.emit(relax.op.permute_dims(x, adv + rest))
    out = bb.emit(relax.op.index_tensor(moved, [importer.env[indices[i]] for i in adv]))
    nb = len(node.meta["val"].shape) - len(rest)  # broadcast index dims
    if adv == list(range(adv[0], adv[-1] + 1)) and adv[0] > 0:
        k = adv[0]
        order = list(range(nb, nb + k)) + list(range(nb)) + list(range(nb + k, nb + len(rest)))
        out = bb.emit(relax.op.permute_dims(out, order))
    return out


def _index_tensor(node, importer):
    """``aten.index.Tensor``; a boolean mask sized by :func:`specialise_mask_counts` becomes a
    static gather of its true positions (row-major), else TVM's own converter."""
    from tvm import relax

    from .errors import CompileError

    hit = _bool_mask_index(node)
    if hit is None:
        indices = node.args[1]
        if any(i is None for i in indices) and sum(i is not None for i in indices) > 1:
            return _index_with_slices(node, importer)
        return importer._index_tensor(node)
    if MASK_COUNT not in node.meta:
        raise CompileError(
            f"node {node.name}: boolean-mask indexing (aten.index.Tensor with a bool mask) has a "
            "data-dependent result size; TVM's static-shape import cannot express it without example inputs")
    pos, _ = hit
    count = int(node.meta[MASK_COUNT])
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    mask = importer.env[node.args[1][pos]]
    shape = [int(s) for s in x.ty.shape]
    mdims = len(mask.ty.shape)
    m = int(np.prod(shape[pos:pos + mdims]))
    merged = bb.emit(relax.op.reshape(x, shape[:pos] + [m] + shape[pos + mdims:]))
    flat = bb.emit(relax.op.astype(relax.op.reshape(mask, (m,)), "int64"))
    # the k-th true position = the number of positions whose inclusive cumsum is <= k
    csum = bb.emit(relax.op.cumsum(flat, axis=0))
    ks = relax.const(np.arange(count, dtype="int64").reshape(count, 1))
    below = bb.emit(relax.op.astype(relax.op.less_equal(relax.op.reshape(csum, (1, m)), ks), "int64"))
    idx = bb.emit(relax.op.clip(relax.op.sum(below, axis=[1]), 0, max(m - 1, 0)))
    out = bb.emit(relax.op.take(merged, idx, axis=pos))
    if "float" in str(x.ty.dtype):
        ok = bb.emit(relax.op.equal(relax.op.sum(flat), relax.const(count, "int64")))
        out = bb.emit(relax.op.where(ok, out, relax.const(float("nan"), str(x.ty.dtype))))
    return out


def _sym_size_int(node, importer):
    """``aten.sym_size.int``: a Python int when the dimension is static (as every dimension is
    once boolean masks are sized), so shape arguments built from it stay static."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = importer.shape_of(x)
    if shape is not None and hasattr(shape[dim], "value"):
        return int(shape[dim].value)
    return importer._sym_size_int(node)


def _float_unary(relax_name: str | None):
    """A float unary op (``None``: reciprocal) with torch's promotion: an integer or bool input
    is cast to the result's float dtype first. TVM's converters keep the input dtype, so
    ``reciprocal`` of an int64 count (Idefics3's patch positions) became integer division."""

    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        want = node.meta.get("val")
        dtype = str(x.ty.dtype)
        if want is not None and want.dtype.is_floating_point and "float" not in dtype:
            dtype = str(want.dtype).replace("torch.", "")
            x = bb.emit(relax.op.astype(x, dtype))
        if relax_name is None:
            return bb.emit(relax.op.divide(relax.const(1.0, dtype), x))
        return bb.emit(getattr(relax.op, relax_name)(x))

    return convert


def _float_binary(relax_name: str, py_op):
    """``add / sub / mul / div`` with torch's promotion when an integer tensor meets a float:
    the integer operand is cast to the result's float dtype first. TVM's converter makes a
    Python float operand a constant of the *tensor's* dtype, so ``w_coords + 0.5`` on int64
    coordinates added 0 (GLM-4V's position-embedding grid was off by half a patch). Other
    cases go to TVM's own converter."""

    def convert(node, importer):
        from tvm import relax

        want = node.meta.get("val")
        args = [importer.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[:2]]
        integer = [isinstance(a, relax.Expr) and "float" not in str(a.ty.dtype) for a in args]
        if node.kwargs or want is None or not want.dtype.is_floating_point or not any(integer):
            return importer._binary_op(getattr(relax.op, relax_name), py_op)(node)
        bb = importer.block_builder
        dtype = str(want.dtype).replace("torch.", "")
        lhs, rhs = (bb.emit(relax.op.astype(a, dtype)) if isinstance(a, relax.Expr) and str(a.ty.dtype) != dtype
                    else a if isinstance(a, relax.Expr) else relax.const(a, dtype) for a in args)
        return bb.emit(getattr(relax.op, relax_name)(lhs, rhs))

    return convert


def _int_scalar(node, importer, relax_name: str):
    """``relax_name(tensor, int)`` with the constant in the integer tensor's dtype, or None when
    the operands are not an integer tensor and a Python int."""
    from tvm import relax

    args = [importer.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[:2]]
    tensors = [a for a in args if isinstance(a, relax.Expr)]
    if len(tensors) != 1 or "int" not in str(tensors[0].ty.dtype) or \
            not all(isinstance(a, relax.Expr) or (isinstance(a, int) and not isinstance(a, bool)) for a in args):
        return None
    dtype = str(tensors[0].ty.dtype)
    lhs, rhs = (a if isinstance(a, relax.Expr) else relax.const(a, dtype) for a in args)
    return importer.block_builder.emit(getattr(relax.op, relax_name)(lhs, rhs))


def _int_binary(relax_name: str, py_op):
    """``floor_divide`` / ``remainder`` of an integer tensor by a Python int: the constant in the
    tensor's dtype (TVM's converter makes it int32, which Relax refuses against int64 positions:
    the multi-resolution pooling's ``position // factor``). Other cases go to TVM's converter."""

    def convert(node, importer):
        from tvm import relax

        out = None if node.kwargs else _int_scalar(node, importer, relax_name)
        return out if out is not None else importer._binary_op(getattr(relax.op, relax_name), py_op)(node)

    return convert


def _int_clamp(node, importer):
    """``clamp(x, min, max)`` of an integer tensor with Python-int bounds, one of them None:
    ``maximum`` / ``minimum`` with constants in x's dtype. TVM's converter puts +-inf for the
    missing bound, which the build cannot cast to an integer ("Cannot convert infinity to
    BigInt": the multi-resolution pooling's ``anchor.clamp(min=0)``)."""
    from tvm import relax

    x = importer.env.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if x is None or "int" not in str(x.ty.dtype) or any(b is not None and (not isinstance(b, int) or isinstance(b, bool))
                                                       for b in (lo, hi)):
        return importer._clamp(node)
    bb, dtype = importer.block_builder, str(x.ty.dtype)
    if lo is not None:
        x = bb.emit(relax.op.maximum(x, relax.const(lo, dtype)))
    if hi is not None:
        x = bb.emit(relax.op.minimum(x, relax.const(hi, dtype)))
    return x


def _div_mode(node, importer):
    """``div(x, c, rounding_mode="floor")`` (what ``//`` decomposes to) of an integer tensor by a
    Python int: :func:`_int_binary`'s floor division; other modes and operands go to TVM's."""
    out = _int_scalar(node, importer, "floor_divide") if node.kwargs.get("rounding_mode") == "floor" else None
    return out if out is not None else importer._div(node)


HALF = ("float16", "bfloat16")


def _torch_dtype(node) -> str | None:
    want = node.meta.get("val")
    return str(want.dtype).replace("torch.", "") if isinstance(want, torch.Tensor) else None


def _half_result(make: Callable):
    """A matmul-like op (``matmul``, ``mm``, ``bmm``) whose torch result is float16 / bfloat16:
    TVM's converters fix ``out_dtype="float32"``, so a half model's hidden state became float32
    after its first projection (and a loop body's carry changed dtype). The op still
    accumulates in float32; its result is cast to torch's dtype (the cast fuses into the
    kernel's epilogue). Float32 models are unchanged. ``make``: importer -> TVM's own converter."""

    def convert(node, importer):
        from tvm import relax

        out = make(importer)(node)
        dtype = _torch_dtype(node)
        if dtype in HALF and str(out.ty.dtype) != dtype:
            out = importer.block_builder.emit(relax.op.astype(out, dtype))
        return out

    return convert


def _linear(node, importer):
    """``aten.linear`` of a half model: ``x @ W.T`` accumulated in float32, the bias added in
    float32, the result cast to torch's dtype (TVM's converter added a half bias to its float32
    product, which Relax refuses). Other dtypes: TVM's converter."""
    from tvm import relax

    dtype = _torch_dtype(node)
    if dtype not in HALF:
        return importer._linear(node)
    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, w, bias = args[0], args[1], args[2] if len(args) > 2 else None
    out = bb.emit(relax.op.linear(x, w, None, "float32"))
    if bias is not None:
        out = bb.emit(relax.op.add(out, bb.emit(relax.op.astype(bias, "float32"))))
    return bb.emit(relax.op.astype(out, dtype))


def _addmm(node, importer):
    """``aten.addmm(bias, a, b, beta=, alpha=)`` of a half model (a decomposed linear): the
    product accumulated in float32, the bias added in float32, the result cast to torch's
    dtype (TVM's converter adds the half bias to a float32 product, which Relax refuses)."""
    from tvm import relax

    dtype = _torch_dtype(node)
    if dtype not in HALF:
        return importer._addmm(node)
    bb = importer.block_builder
    bias, a, b = (importer.env[x] for x in node.args[:3])
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    out = bb.emit(relax.op.matmul(a, b, out_dtype="float32"))
    if alpha != 1:
        out = bb.emit(relax.op.multiply(out, relax.const(alpha, "float32")))
    if beta != 0:
        c = bb.emit(relax.op.astype(bias, "float32"))
        if beta != 1:
            c = bb.emit(relax.op.multiply(c, relax.const(beta, "float32")))
        out = bb.emit(relax.op.add(out, c))
    return bb.emit(relax.op.astype(out, dtype))


def _in_float32(method: str):
    """An op TVM converts with float32 assumptions (the convolutions: ``out_dtype="float32"``,
    then a half bias added) run on float32 copies of its half inputs, its result cast back to
    torch's dtype. For the convolutions of vision towers' patch embeddings, whose weights are
    small; the big matmuls take :func:`_linear` / :func:`_half_result`."""

    def convert(node, importer):
        from tvm import relax

        fn = getattr(importer, method)
        dtype = _torch_dtype(node)
        if dtype not in HALF:
            return fn(node)
        bb, saved = importer.block_builder, {}
        for a in node.all_input_nodes:
            v = importer.env.get(a)
            if isinstance(v, relax.Expr) and getattr(v.ty, "dtype", None) is not None and str(v.ty.dtype) in HALF:
                saved[a] = v
                importer.env[a] = bb.emit(relax.op.astype(v, "float32"))
        try:
            out = fn(node)
        finally:
            importer.env.update(saved)
        return bb.emit(relax.op.astype(out, dtype))

    return convert


def _matmul_f32(importer):
    """TVM's own ``matmul`` / ``mm`` / ``bmm`` converter."""
    from functools import partial

    from tvm import relax

    return importer._binary_op(partial(relax.op.linear_algebra.matmul, out_dtype="float32"), operator.matmul)


def _where(node, importer):
    """``where(cond, x, y)`` with torch's type promotion: both branches cast to the result's
    dtype. TVM's converter requires one dtype (Gemma3's token-type positions mix an int32
    tensor and a 0-d int64 one, int32 in torch)."""
    from tvm import relax

    bb = importer.block_builder
    cond, x, y = (importer.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[:3])
    want = node.meta.get("val")
    dtype = str(want.dtype).replace("torch.", "") if want is not None else None

    def cast(v):
        if not isinstance(v, relax.Expr):
            return relax.const(v, dtype)
        return v if dtype is None or str(v.ty.dtype) == dtype else bb.emit(relax.op.astype(v, dtype))

    return bb.emit(relax.op.where(cond, cast(x), cast(y)))


def _constant_pad_nd(node, importer):
    """``aten.constant_pad_nd`` whose pad widths may be symbolic sizes (a mask padded to the
    symbolic cache length: PaliGemma's prefix mask); TVM's converter takes static widths only.
    Symbolic widths become concatenations with blocks of ``value``."""
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    pads = [importer.env[p] if isinstance(p, torch.fx.Node) else p for p in node.args[1]]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    value = 0.0 if value is None else value
    ndim = x.ty.ndim
    if all(isinstance(p, int) for p in pads):
        width = [0] * (2 * ndim)
        pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
        flat = [v for pair in reversed(pairs) for v in pair]
        width[-len(flat):] = flat
        return bb.emit(relax.op.nn.pad(x, width, "constant", value))
    out = x
    for i in range(len(pads) // 2):
        dim = ndim - 1 - i
        parts = []
        for j, width in enumerate(pads[2 * i:2 * i + 2]):
            if isinstance(width, int) and width == 0:
                continue
            if isinstance(width, int) and width < 0:
                raise ValueError("negative symbolic padding (a crop) is not supported")
            shape = list(out.ty.shape)
            shape[dim] = width
            dtype = str(x.ty.dtype)
            if value in (0, 1):  # no constant: a bool constant in the library does not load back
                make = relax.op.zeros if value == 0 else relax.op.ones
                block = bb.emit(make(relax.ShapeExpr(shape), dtype))
            else:
                block = bb.emit(relax.op.full(relax.ShapeExpr(shape), relax.const(value, dtype), dtype))
            parts.append((j, block))
        if parts:
            seq = [b for j, b in parts if j == 0] + [out] + [b for j, b in parts if j == 1]
            out = bb.emit(relax.op.concat(seq, axis=dim))
    return out


def _sym_sum(node, importer):
    """``torch.sym_sum(sizes)``: the sum of symbolic (or static) sizes, as the importer's ``add``
    of sizes gives it."""
    vals = [importer.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[0]]
    total = vals[0]
    for v in vals[1:]:
        total = total + v
    return total


def _grid_sampler_2d(node, importer):
    """``aten.grid_sampler_2d``: torch's grid is (N, H, W, 2), TVM's ``image.grid_sample`` reads
    (N, 2, H, W); TVM's own converter passes torch's as it is (wrong output shape: GLM-4V's
    position-embedding resampling failed to import)."""
    from tvm import relax

    bb = importer.block_builder
    args = importer.retrieve_args(node)
    interp = {0: "bilinear", 1: "nearest", 2: "bicubic"}[args[2] if len(args) > 2 else 0]
    pad = {0: "zeros", 1: "border", 2: "reflection"}[args[3] if len(args) > 3 else 0]
    grid = bb.emit(relax.op.permute_dims(args[1], [0, 3, 1, 2]))
    return bb.emit(relax.op.image.grid_sample(args[0], grid, method=interp, layout="NCHW", padding_mode=pad,
                                              align_corners=bool(args[4]) if len(args) > 4 else False))


def _reduce(name: str):
    """``aten.amin`` / ``aten.amax`` (dims, keepdim): TVM's importer has no converter for them
    (the multi-resolution pooling takes each group's last real token with ``amax``)."""
    def convert(node, importer):
        from tvm import relax

        args = importer.retrieve_args(node)
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim", [])
        keep = bool(args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
        if isinstance(dims, int):
            dims = [dims]
        axis = list(dims) if dims else None
        return importer.block_builder.emit(getattr(relax.op, name)(args[0], axis=axis, keepdims=keep))
    return convert


def custom_convert_map() -> dict[str, Callable]:
    """Converters loopify adds to ``from_exported_program`` (keyed as the importer keys ops)."""
    return {
        "masked_scatter.default": _masked_scatter,
        "unfold.default": _unfold,
        "_is_all_true.default": _is_all_true,
        "sym_ite": _sym_ite,
        "or_": _logical(operator.or_, "logical_or"),
        "and_": _logical(operator.and_, "logical_and"),
        "sym_not": _logical(operator.not_, "logical_not"),
        "index.Tensor": _index_tensor,
        "grid_sampler_2d.default": _grid_sampler_2d,
        "floor_divide.default": _int_binary("floor_divide", operator.floordiv),
        "div.Tensor_mode": _div_mode,
        "clamp.default": _int_clamp,
        "remainder.Scalar": _int_binary("floor_mod", operator.mod),
        "amin.default": _reduce("min"),
        "amax.default": _reduce("max"),
        **{f"{op}.Tensor": _float_binary(name, fn) for op, name, fn in (
            ("add", "add", operator.add), ("sub", "subtract", operator.sub), ("mul", "multiply", operator.mul),
            ("div", "divide", operator.truediv))},
        "sym_size.int": _sym_size_int,
        "sym_sum": _sym_sum,
        "constant_pad_nd.default": _constant_pad_nd,
        "where.self": _where,
        "linear.default": _linear,
        "addmm.default": _addmm,
        **{f"{op}.default": _half_result(_matmul_f32) for op in ("matmul", "mm", "bmm")},
        **{f"{op}.default": _in_float32(f"_{op}") for op in ("conv1d", "conv2d", "convolution")},
        "reciprocal.default": _float_unary(None),
        **{f"{op}.default": _float_unary(op) for op in ("exp", "log", "sin", "cos", "tanh", "sigmoid", "rsqrt")},
    }


def _wrap_negative(x, indices, axis):
    """``indices + n`` where negative, ``n`` the gathered axis' size (TVM's ``take`` clips or
    reads out of bounds where torch counts from the end). Constant non-negative indices and
    float inputs pass unchanged. A symbolic size is added as its size variable (before, ``x[:, -1]``
    over a symbolic token count read index 0)."""
    from tvm import relax

    try:
        shape = list(x.ty.shape)
        n = shape[axis] if axis is not None else None
    except Exception:  # noqa: BLE001 - no static info: leave TVM's behaviour
        return indices
    if n is None:
        return indices
    size_value = int(n) if getattr(n, "value", None) is not None else None
    value = getattr(indices, "value", None)  # a constant (tvm.ir.GenericConst) holds its tensor
    if value is not None and hasattr(value, "numpy"):
        data = value.numpy()
        if data.dtype.kind != "i" or (data >= 0).all():
            return indices
        if size_value is not None:
            return relax.const(np.where(data < 0, data + size_value, data).astype(data.dtype))
    dtype = str(getattr(indices.ty, "dtype", "")) if value is None else str(value.numpy().dtype)
    if not dtype.startswith("int"):
        return indices
    if size_value is not None:
        zero, size = relax.const(0, dtype), relax.const(size_value, dtype)
    else:  # a symbolic size: the variable itself (fusable; shape_to_tensor broke TVM's FuseTIR)
        if dtype != "int64":  # shape variables are int64
            indices = relax.op.astype(indices, "int64")
        zero, size = relax.const(0, "int64"), relax.prim_value(n)
    return relax.op.where(relax.op.less(indices, zero), relax.op.add(indices, size), indices)


@contextlib.contextmanager
def _importer_patches():
    """What loopify changes in TVM 0.27's importer while it runs:

    * gathers (``take``: embeddings, ``index_select``) are imported in ``clip`` mode, not the
      default ``fast`` mode that reads out of bounds for an out-of-range index (a token id past
      the vocabulary crashed the process; the runtime also refuses such ids in one line) and
      printed a warning per gather at every build; negative indices count from the end, as in
      torch (``clip`` made Falcon's ``qkv[..., [-2]]`` read index 0: rel err 0.94), see
      :func:`_wrap_negative`;
    * ``cond`` branches are imported with loopify's converters (TVM calls them with the wrong
      signature there) and with fresh symbolic sizes substituted everywhere (see
      :func:`_branch_params`).
    """
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter as EPI

    take = relax.op.take

    def _take(x, indices, axis=None, mode="clip"):
        return take(x, _wrap_negative(x, indices, axis), axis, "clip" if mode == "fast" else mode)

    translate, update = EPI._translate_fx_graph, EPI.update_convert_map

    def _update(self, custom):
        self._loopify_custom = set(custom)
        return update(self, custom)

    def _translate(self, gm, nodes, inputs_vars, custom_ops=None):
        return translate(self, gm, nodes, inputs_vars, custom_ops or getattr(self, "_loopify_custom", None))

    branch = EPI._import_branch_subgraph
    EPI.update_convert_map, EPI._translate_fx_graph = _update, _translate
    EPI._import_branch_subgraph = _import_branch
    relax.op.take = _take
    try:
        yield
    finally:
        EPI.update_convert_map, EPI._translate_fx_graph = update, translate
        EPI._import_branch_subgraph = branch
        relax.op.take = take


def _branch_params(operands, placeholders):
    """Relax parameters of a ``cond`` branch: the operands' types with fresh symbolic variables,
    substituted everywhere they occur (TVM 0.27 refreshes only the sizes that are bare
    variables, so a size such as ``P + T`` kept the caller's variables and the build failed
    with "PrimExpr P + T is not computed")."""
    import tvm
    from tvm import relax

    fresh: dict = {}
    for operand in operands:
        ty = getattr(operand, "ty", None)
        if isinstance(ty, relax.TensorType) and ty.shape is not None:
            for d in ty.shape:
                if tvm.ir.is_prim_var(d) and d not in fresh:
                    fresh[d] = tvm.ir.Var(d.name, d.ty)
    params = []
    for ph, operand in zip(placeholders, operands):
        ty = getattr(operand, "ty", None)
        if isinstance(ty, relax.TensorType) and ty.shape is not None:
            ty = relax.TensorType([_substitute(d, fresh) for d in ty.shape], ty.dtype)
        elif ty is None:
            ty = relax.AnyType()
        params.append(relax.Var(ph.name, ty))
    return params


def _substitute(e, vmap: dict):
    """``e`` (an integer size expression) with the variables of ``vmap`` replaced."""
    import tvm
    from tvm import tirx

    if tvm.ir.is_prim_var(e):
        return vmap.get(e, e)
    binary = (tirx.Add, tirx.Sub, tirx.Mul, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max, tirx.Div, tirx.Mod)
    if isinstance(e, binary):
        return type(e)(_substitute(e.a, vmap), _substitute(e.b, vmap))
    return e


def _import_branch(self, graph_module, operands, name_hint):
    """A ``cond`` branch as a Relax function of the module being built (see :func:`_branch_params`)."""
    from tvm import relax

    cache = self.__dict__.setdefault("_branch_cache", {})
    if id(graph_module) in cache:
        return cache[id(graph_module)]
    count = self.__dict__.setdefault("_branch_counter", 0)
    self._branch_counter = count + 1
    name = f"{name_hint}_{count}"
    nodes = list(graph_module.graph.nodes)
    params = _branch_params(operands, [n for n in nodes if n.op == "placeholder"])
    saved = self.env
    self.env = dict(zip([n for n in nodes if n.op == "placeholder"], params))
    try:
        with self.block_builder.function(name=name, params=params, pure=not self._has_assert_async(graph_module)):
            inner = self._translate_fx_graph(graph_module, nodes, {})
            if isinstance(inner, (tuple, list)):
                out = self.block_builder.emit(inner[0]) if len(inner) == 1 else relax.Tuple(
                    [self.block_builder.emit(v) for v in inner])
            else:
                out = self.block_builder.emit(inner)
            self.block_builder.emit_func_output(out)
    finally:
        self.env = saved
    gv = self.block_builder.get().get_global_var(name)
    cache[id(graph_module)] = gv
    return gv


def parameter_names(ep: torch.export.ExportedProgram) -> list[str]:
    """State-dict names of the lifted parameters, in the order Relax's ``main`` takes them."""
    kind = torch.export.graph_signature.InputKind.PARAMETER
    return [s.target for s in ep.graph_signature.input_specs if s.kind is kind]


def user_input_names(ep: torch.export.ExportedProgram) -> list[str]:
    kind = torch.export.graph_signature.InputKind.USER_INPUT
    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind is kind]


def import_program(ep: torch.export.ExportedProgram, *, keep_params_as_input: bool = True,
                   unwrap_unit_return_tuple: bool = True, func_name: str = "main", example=None,
                   assumptions: list | None = None):
    """Import ``ep`` as a Relax IRModule, with loopify's legalisation.

    Args:
        ep: the program (not modified).
        keep_params_as_input: parameters become trailing inputs of ``main`` (after the user
            inputs; ``main.attrs["num_input"]`` says how many user inputs there are), in the
            order of :func:`parameter_names`. Buffers and constants are bound as constants.
        unwrap_unit_return_tuple: a single output is returned bare rather than as a 1-tuple.
        func_name: the name of the imported function in the returned module.
        example: the program's flat user inputs; needed only to give boolean-mask indexing a static
            size (:func:`specialise_mask_counts`).
        assumptions: a list that receives what the import assumed of the inputs (for the manifest).

    Raises:
        loopify.backends.tvm.errors.CompileError: an op the importer (with loopify's converters) cannot handle.
    """
    from tvm.relax.frontend.torch import from_exported_program

    from .errors import CompileError

    # Decompose here (as the importer would) so that the sizes recorded on nodes survive; the
    # re-trace re-inserts run-time assertions, so strip after it.
    ep = ep.run_decompositions()
    ep, removed = strip_assertions(ep)
    log.debug("removed %d assertion nodes", removed)
    ep, assumed = specialise_mask_counts(ep, example)
    if assumptions is not None:
        assumptions.extend(assumed)
    try:
        with _importer_patches():
            mod = from_exported_program(ep, keep_params_as_input=keep_params_as_input,
                                        unwrap_unit_return_tuple=unwrap_unit_return_tuple,
                                        custom_convert_map=custom_convert_map(),
                                        run_ep_decomposition=False)
    except CompileError:
        raise
    except AssertionError as e:  # the importer reports unsupported ops by assertion
        raise CompileError(f"TVM import failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - any importer failure is one user-facing line
        raise CompileError(f"TVM import failed: {type(e).__name__}: {e}") from e
    if func_name != "main":
        func = mod["main"]
        mod = type(mod)({func_name: func.with_attr("global_symbol", func_name)})
    return mod
