"""Import a torch.export program into Relax, with the legalisation TVM's importer lacks.

Two layers:

* an FX pre-pass on a copy of the program (the caller's program is never touched) that removes
  run-time assertion nodes (``_assert_*``, ``sym_constrain_range*``) and then everything that only
  fed them (``item`` / ``sym_ite`` / ``_is_all_true`` chains that check shapes export already
  proved); and
* custom converters for the ops the example zoo still meets after that (``masked_scatter``,
  ``unfold``, ``_is_all_true``, ``sym_ite``, ``or_``, ``and_``, ``sym_not``), each tested alone
  against PyTorch in ``tests/test_tvm_import.py``.
"""

from __future__ import annotations

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

    Static shapes: the k-th true position of the (broadcast) mask takes the k-th element of the
    flattened source, i.e. ``take(source, cumsum(mask) - 1)`` selected by ``where``.
    """
    from tvm import relax

    bb = importer.block_builder
    x, mask, source = (importer.env[a] for a in node.args[:3])
    shape = [int(s) for s in x.ty.shape]
    numel = int(np.prod(shape))
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
    return bb.emit(relax.op.reshape(out, shape))


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


def _index_tensor(node, importer):
    """``aten.index.Tensor``: refuse boolean-mask indices (data-dependent result size) clearly,
    else TVM's own converter."""
    from .errors import CompileError

    for idx in node.args[1]:
        val = getattr(idx, "meta", {}).get("val") if idx is not None else None
        if val is not None and getattr(val, "dtype", None) == torch.bool:
            raise CompileError(
                f"node {node.name}: boolean-mask indexing (aten.index.Tensor with a bool mask) has a "
                "data-dependent result size; TVM's static-shape import cannot express it (rewrite "
                "the model to index with a static number of positions)")
    return importer._index_tensor(node)


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
    }


def parameter_names(ep: torch.export.ExportedProgram) -> list[str]:
    """State-dict names of the lifted parameters, in the order Relax's ``main`` takes them."""
    kind = torch.export.graph_signature.InputKind.PARAMETER
    return [s.target for s in ep.graph_signature.input_specs if s.kind is kind]


def user_input_names(ep: torch.export.ExportedProgram) -> list[str]:
    kind = torch.export.graph_signature.InputKind.USER_INPUT
    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind is kind]


def import_program(ep: torch.export.ExportedProgram, *, keep_params_as_input: bool = True,
                   unwrap_unit_return_tuple: bool = True, func_name: str = "main"):
    """Import ``ep`` as a Relax IRModule, with loopify's legalisation.

    Args:
        ep: the program (not modified).
        keep_params_as_input: parameters become trailing inputs of ``main`` (after the user
            inputs; ``main.attrs["num_input"]`` says how many user inputs there are), in the
            order of :func:`parameter_names`. Buffers and constants are bound as constants.
        unwrap_unit_return_tuple: a single output is returned bare rather than as a 1-tuple.
        func_name: the name of the imported function in the returned module.

    Raises:
        loopify.backends.tvm.errors.CompileError: an op the importer (with loopify's converters) cannot handle.
    """
    from tvm.relax.frontend.torch import from_exported_program

    from .errors import CompileError

    ep, removed = strip_assertions(ep)
    log.debug("removed %d assertion nodes", removed)
    try:
        mod = from_exported_program(ep, keep_params_as_input=keep_params_as_input,
                                    unwrap_unit_return_tuple=unwrap_unit_return_tuple,
                                    custom_convert_map=custom_convert_map())
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
