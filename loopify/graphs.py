"""Graph utilities over a flat torch.export graph: module scopes, layer op graphs, matching.

A *layer* is the set of call_function nodes whose ``nn_module_stack`` passes through the layer's
module path. Its op graph is a networkx DiGraph whose node labels are the op, the output
shapes/dtypes and the constant arguments, whose external inputs are labelled by what they are
(a parameter/buffer by its name relative to the layer and its shape; any other input by shape and
dtype), and whose edges carry the argument position. Two layers are interchangeable only if their
op graphs are isomorphic under these labels; the Weisfeiler-Lehman hash is a quick filter, the
VF2 matcher the proof.

Nothing here knows about any model family.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import torch
from networkx.algorithms.isomorphism import DiGraphMatcher

_INDEX = re.compile(r"^\d+$")


def record_values(gm: torch.fx.GraphModule, flat_inputs, names: set[str] | None = None) -> dict[str, Any]:
    """Run ``gm`` (an FX graph module, e.g. ``ExportedProgram.module()``) on its flat inputs and
    return the value of every node, or only of the nodes named in ``names``, by node name."""
    values: dict[str, Any] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if names is None or n.name in names:
                values[n.name] = out
            return out

    with torch.no_grad():
        Rec(gm).run(*flat_inputs)
    return values


def module_path(node: torch.fx.Node) -> str | None:
    """The innermost module path of a node (``""`` for the root), from ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def module_paths(node: torch.fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]


@dataclass
class ProgramIndex:
    """Lookups over an ExportedProgram's graph: which placeholder is which parameter/buffer."""

    program: torch.export.ExportedProgram
    param_of: dict[str, str] = field(default_factory=dict)  # placeholder name -> FQN
    buffer_of: dict[str, str] = field(default_factory=dict)
    constant_of: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, program: torch.export.ExportedProgram) -> "ProgramIndex":
        sig = program.graph_signature
        return cls(program, dict(sig.inputs_to_parameters), dict(sig.inputs_to_buffers),
                   dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {}))

    def state_name(self, node: torch.fx.Node) -> tuple[str, str] | None:
        """``(kind, fqn)`` for a lifted parameter/buffer/constant placeholder, else None."""
        if node.op != "placeholder":
            return None
        for kind, table in (("param", self.param_of), ("buffer", self.buffer_of), ("constant", self.constant_of)):
            if node.name in table:
                return kind, table[node.name]
        return None

    def state_tensor(self, kind: str, fqn: str) -> torch.Tensor:
        p = self.program
        if kind == "param":
            return p.state_dict[fqn]
        if kind == "buffer":
            return p.state_dict[fqn] if fqn in p.state_dict else p.constants[fqn]
        return p.constants[fqn]

    def all_module_paths(self) -> set[str]:
        """Every module path that owns a node or a parameter/buffer, with all its prefixes."""
        paths: set[str] = set()
        for node in self.program.graph.nodes:
            paths.update(module_paths(node))
        for fqn in list(self.param_of.values()) + list(self.buffer_of.values()):
            paths.add(fqn.rpartition(".")[0])
        closed = set()
        for p in paths:
            parts = p.split(".") if p else []
            for i in range(len(parts) + 1):
                closed.add(".".join(parts[:i]))
        return closed


def find_stacks(paths: set[str]) -> dict[str, list[str]]:
    """Module paths whose children are numbered 0..n-1 (ModuleList / Sequential), n >= 2.

    Returns stack path -> child paths in index order. A stack with a missing index keeps only
    the contiguous prefix.
    """
    closed = set()
    for p in paths:
        parts = p.split(".") if p else []
        closed.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    children: dict[str, set[int]] = {}
    for p in closed:
        parent, _, last = p.rpartition(".")
        if p and _INDEX.match(last):
            children.setdefault(parent, set()).add(int(last))
    stacks = {}
    for parent, idx in sorted(children.items()):
        n = 0
        while n in idx:
            n += 1
        if n >= 2:
            stacks[parent] = [f"{parent}.{i}" if parent else str(i) for i in range(n)]
    return stacks


def _in_scope(node: torch.fx.Node, path: str) -> bool:
    return path in module_paths(node)


def _const_repr(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return "%"
    if isinstance(a, (list, tuple)):
        return "[" + ",".join(_const_repr(x) for x in a) + "]"
    if isinstance(a, float):
        return f"{a:.6g}"
    if isinstance(a, torch.SymInt):
        return "sym"
    return str(a)


def _val_label(node: torch.fx.Node) -> str:
    val = node.meta.get("val")

    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
        if isinstance(v, (list, tuple)):
            return "(" + ",".join(one(x) for x in v) + ")"
        return type(v).__name__ if v is not None else "-"

    return one(val)


def _flat_nodes(args: Any) -> Iterator[tuple[str, torch.fx.Node]]:
    """Node arguments with a position key ("0", "1.2", "k:dim")."""

    def walk(a, key):
        if isinstance(a, torch.fx.Node):
            yield key, a
        elif isinstance(a, (list, tuple)):
            for i, x in enumerate(a):
                yield from walk(x, f"{key}.{i}")
        elif isinstance(a, dict):
            for k, x in a.items():
                yield from walk(x, f"{key}.{k}")

    for i, a in enumerate(args[0]):
        yield from walk(a, str(i))
    for k, a in args[1].items():
        yield from walk(a, f"k:{k}")


@dataclass
class LayerGraph:
    """One layer's op graph and its interface to the rest of the program."""

    path: str
    nodes: list[torch.fx.Node]                   # call_function nodes of the layer, in graph order
    graph: nx.DiGraph
    inputs: list[torch.fx.Node]                  # external non-state inputs (activations, masks ...)
    state: dict[str, tuple[str, str]]            # relative name -> (kind, fqn) of params/buffers used
    outputs: list[torch.fx.Node]                 # nodes used outside the layer, in graph order
    wl_hash: str = ""

    @property
    def num_ops(self) -> int:
        return len(self.nodes)


def layer_graph(index: ProgramIndex, path: str, nodes: list[torch.fx.Node] | None = None) -> LayerGraph:
    """Build the labelled op graph of the layer at module path ``path``."""
    if nodes is None:
        nodes = [n for n in index.program.graph.nodes if n.op == "call_function" and _in_scope(n, path)]
    inside = set(nodes)
    g = nx.DiGraph()
    inputs: list[torch.fx.Node] = []
    state: dict[str, tuple[str, str]] = {}
    prefix = path + "." if path else ""
    for n in nodes:
        target = getattr(n.target, "__name__", str(n.target))
        if hasattr(n.target, "name") and callable(n.target.name):
            target = n.target.name()
        consts = _const_repr((n.args, n.kwargs))
        g.add_node(n.name, label=f"{target}|{_val_label(n)}|{consts}")
        for key, a in _flat_nodes((n.args, n.kwargs)):
            if a in inside:
                g.add_edge(a.name, n.name, pos=key)
                continue
            st = index.state_name(a)
            if st is not None:
                kind, fqn = st
                rel = fqn[len(prefix):] if fqn.startswith(prefix) else f"<outside>{fqn}"
                if kind == "constant":
                    rel = _constant_key(index, fqn, rel.rpartition(".")[0])
                state[rel] = (kind, fqn)
                label = f"{kind}:{rel}:{_val_label(a)}"
            else:
                if a not in inputs:
                    inputs.append(a)
                label = f"input:{_val_label(a)}"
            ext = f"ext::{a.name}"
            g.add_node(ext, label=label, external=True)
            g.add_edge(ext, n.name, pos=key)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    for n in outputs:
        g.nodes[n.name]["label"] += "|out"
    lg = LayerGraph(path, nodes, g, inputs, state, outputs)
    with warnings.catch_warnings():  # networkx notes that its directed hashes changed in 3.5
        warnings.simplefilter("ignore", UserWarning)
        lg.wl_hash = nx.weisfeiler_lehman_graph_hash(g, node_attr="label", edge_attr="pos", iterations=3)
    return lg


def _constant_key(index: ProgramIndex, fqn: str, owner: str) -> str:
    """A lifted tensor constant's name in layer graphs: its value, not its FQN. torch.export
    numbers the constants a forward creates program-wide (``self_attention.lifted_tensor_0`` in
    layer 0, ``_2`` in layer 1), so equal constants of identical layers never share a name; the
    key is the owning module's relative path ``owner`` plus a digest of dtype, shape and bytes."""
    import hashlib

    t = index.state_tensor("constant", fqn).detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{owner + '.' if owner else ''}<constant {tuple(t.shape)} #{h.hexdigest()[:8]}>"


def isomorphisms(a: LayerGraph, b: LayerGraph, limit: int = 16) -> Iterator[dict[str, str]]:
    """Exact label- and position-preserving isomorphisms from ``a``'s graph to ``b``'s."""
    if a.graph.number_of_nodes() != b.graph.number_of_nodes() or a.graph.number_of_edges() != b.graph.number_of_edges():
        return
    m = DiGraphMatcher(a.graph, b.graph,
                       node_match=lambda x, y: x["label"] == y["label"],
                       edge_match=lambda x, y: x["pos"] == y["pos"])
    for i, mapping in enumerate(m.isomorphisms_iter()):
        if i >= limit:
            return
        yield mapping


def explain_difference(a: LayerGraph, b: LayerGraph) -> str:
    """A short human reason why two layers' op graphs are not the same."""
    sa = {r: index_shape(a, r) for r in a.state}
    sb = {r: index_shape(b, r) for r in b.state}
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in {a.path.rpartition('.')[2]}: {', '.join(only_a[:3])}")
        if only_b:
            parts.append(f"only in {b.path.rpartition('.')[2]}: {', '.join(only_b[:3])}")
        return "different parameters (" + "; ".join(parts) + ")"
    shape_diff = [r for r in sorted(sa) if sa[r] != sb[r]]
    if shape_diff:
        listed = "; ".join(f"{r}: {sa[r]} vs {sb[r]}" for r in shape_diff[:3])
        more = f"; {len(shape_diff) - 3} more" if len(shape_diff) > 3 else ""
        return f"different parameter shapes ({listed}{more})"
    la = _label_counts(a)
    lb = _label_counts(b)
    ops_a = _op_counts(a)
    ops_b = _op_counts(b)
    if ops_a != ops_b:
        diff = sorted(set(ops_a) ^ set(ops_b)) or sorted(k for k in ops_a if ops_a[k] != ops_b.get(k))
        k = diff[0]
        return f"different op graph ({k}: {ops_a.get(k, 0)} vs {ops_b.get(k, 0)})"
    if la != lb:
        k = sorted(set(la) ^ set(lb), key=str)[0] if set(la) ^ set(lb) else next(k for k in la if la[k] != lb.get(k))
        what = k.split("|")
        return f"different shapes or constants ({what[0]} {what[1] if len(what) > 1 else ''})".strip()
    return "different op graph (same ops, different wiring)"


def index_shape(lg: LayerGraph, rel: str) -> str:
    for n, d in lg.graph.nodes(data=True):
        if d.get("external") and d["label"].startswith(("param:", "buffer:", "constant:")):
            kind, name, shape = d["label"].split(":", 2)
            if name == rel:
                return shape
    return "?"


def _label_counts(lg: LayerGraph) -> dict[str, int]:
    out: dict[str, int] = {}
    for _n, d in lg.graph.nodes(data=True):
        out[d["label"]] = out.get(d["label"], 0) + 1
    return out


def _op_counts(lg: LayerGraph) -> dict[str, int]:
    out: dict[str, int] = {}
    for _n, d in lg.graph.nodes(data=True):
        if not d.get("external"):
            op = d["label"].split("|", 1)[0]
            out[op] = out.get(op, 0) + 1
    return out
