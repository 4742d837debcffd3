"""Index inputs and the ranges their values must stay in.

A token id past the vocabulary makes an embedding read outside its table: PyTorch raises an
IndexError; TVM's default gather reads foreign memory (loopify compiles gathers in clip mode,
which clamps the index instead: safe, but silently wrong). So
the inputs that index a table are found in the exported program (followed through views,
slices and integer casts to the ``embedding`` / ``index_select`` / ``gather`` / ``index`` that
uses them), their ranges recorded in the artifact's manifest, and every call checks the values
first: out of range is one line naming the input, the value and the range.

Only :func:`check_inputs` runs at load / call time; it imports nothing (numpy arrays and torch
tensors both work), so the runtime stays free of torch.export.
"""

from __future__ import annotations

from loopify.errors import LoopifyError


class IndexRangeError(LoopifyError):
    """An index input (token ids ...) holds a value outside the table it indexes."""


#: Ops whose output holds the same integer values as their first argument (rearranged).
_SAME_VALUES = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "slice", "select",
                "clone", "contiguous", "alias", "permute", "transpose", "t", "flatten", "_to_copy", "to",
                "lift_fresh_copy", "detach", "repeat", "cat", "narrow", "unbind", "split", "getitem"}


def index_ranges(program) -> dict[int, tuple[int, int]]:
    """``{flat user-input position: (low, high)}`` (high exclusive) for the inputs that index a
    table in ``program`` (a ``torch.export.ExportedProgram``); the tightest bound when an input
    indexes several tables."""
    from torch.export.graph_signature import InputKind

    graph = program.graph_module.graph
    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    out: dict[int, tuple[int, int]] = {}
    for pos, name in enumerate(users):
        node = placeholders.get(name)
        if node is None or not _is_integer(node):
            continue
        bound = _table_size(node)
        if bound is not None:
            out[pos] = (0, bound)
    return out


def _is_integer(node) -> bool:
    val = node.meta.get("val")
    return getattr(val, "dtype", None) is not None and not val.dtype.is_floating_point and \
        not val.dtype.is_complex and str(val.dtype) != "torch.bool"


def _table_size(start) -> int | None:
    """The smallest table size among the gathers that ``start``'s values reach as indices."""
    seen, todo, best = set(), [start], None
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            size = _indexed_size(user, node)
            if size is not None:
                best = size if best is None else min(best, size)
            elif _op_name(user) in _SAME_VALUES and _is_first_data_arg(user, node):
                todo.append(user)
    return best


def _op_name(node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _is_first_data_arg(user, node) -> bool:
    args = user.args
    if _op_name(user) == "cat":
        return bool(args) and node in (args[0] or [])
    return bool(args) and args[0] is node


def _shape(node, dim: int) -> int | None:
    val = getattr(node, "meta", {}).get("val")
    try:
        return int(val.shape[dim])
    except (AttributeError, IndexError, TypeError, ValueError):  # symbolic or absent
        return None


def _indexed_size(user, idx) -> int | None:
    """Rows of the table ``user`` gathers from with ``idx`` as its index argument, else None."""
    name, args = _op_name(user), user.args
    if name == "embedding" and len(args) > 1 and args[1] is idx:
        return _shape(args[0], 0)
    if name in ("index_select", "gather") and len(args) > 2 and args[2] is idx:
        return _shape(args[0], int(args[1]))
    if name == "index" and len(args) > 1 and isinstance(args[1], (list, tuple)) and idx in args[1]:
        return _shape(args[0], list(args[1]).index(idx))
    return None


def check_inputs(ranges: dict, values: list, names: list[str], where: str) -> None:
    """Refuse, in one line, an index input holding a value outside its range.

    Args:
        ranges: ``{position: (low, high)}`` (high exclusive), as :func:`index_ranges` gives or as
            the manifest records (string keys are accepted).
        values: the flat inputs (numpy arrays or torch tensors).
        names: their names, for the message.
        where: the model or artifact, for the message.
    """
    for key, (lo, hi) in ranges.items():
        i = int(key)
        if i >= len(values) or values[i] is None or getattr(values[i], "size", 1) == 0:
            continue
        x = values[i]
        if getattr(x, "numel", None) is not None and x.numel() == 0:
            continue
        low, high = int(x.min()), int(x.max())
        if low < lo or high >= hi:
            bad = high if high >= hi else low
            name = names[i] if i < len(names) else f"input {i}"
            raise IndexRangeError(f"{where}: input {i} ({name}) holds {bad}, outside [{lo}, {hi - 1}] (the "
                                  f"{hi} rows of the table it indexes, e.g. the vocabulary); nothing was run")
