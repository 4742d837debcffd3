"""Editing the unflattened module hierarchy (torch.export.unflatten): locate the call sites of
layers, replace them, thread a root input down to a submodule, keep the modules consistent."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


def clone(module: nn.Module) -> nn.Module:
    """Deep copy of a module hierarchy that shares graph metadata instead of copying it.

    Node metadata holds fake tensors (``meta["val"]``) and symbolic shapes, which cannot be
    deep-copied; they describe values and are never mutated, so the copy shares them.
    """
    memo: dict[int, object] = {}

    def share(obj, depth=0):
        if depth > 6:
            return
        if isinstance(obj, torch.Tensor) or type(obj).__module__.startswith(("torch.fx.experimental", "sympy")):
            memo[id(obj)] = obj
        elif isinstance(obj, dict):
            for v in obj.values():
                share(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                share(v, depth + 1)
        elif isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            memo[id(obj)] = obj

    for mod in module.modules():
        share(getattr(mod, "meta", None) if isinstance(getattr(mod, "meta", None), dict) else None)
        graph = getattr(mod, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for n in graph.nodes:
                share(n.meta)
    return copy.deepcopy(module, memo)


def own(module: nn.Module) -> nn.Module:
    """Point a module's graph back at the module (a deepcopy leaves it on the cached GraphModule)."""
    graph = getattr(module, "graph", None)
    if isinstance(graph, torch.fx.Graph) and graph.owning_module is not module:
        graph.owning_module = module
    return module


def refresh(module: nn.Module) -> None:
    """Re-generate code and argument names after editing an unflattened module's graph."""
    graph = getattr(module, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        graph.lint()
        if hasattr(module, "finalize"):
            module.finalize()
        elif isinstance(module, torch.fx.GraphModule):
            module.recompile()


def graph_nodes(root: nn.Module):
    """Every node of every FX graph in the hierarchy, as ``(module path prefix, node)``; the
    prefix ("a.b." or "") turns a node's target into a path from ``root``."""
    for path, mod in root.named_modules():
        graph = getattr(mod, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            prefix = f"{path}." if path else ""
            for n in graph.nodes:
                yield prefix, n


@dataclass
class CallSite:
    caller_path: str          # module whose graph holds the call nodes
    caller: nn.Module
    nodes: list[torch.fx.Node]  # one call_module node per layer, in order
    state_arg: int            # position of the hidden state among the call arguments


def locate_calls(root: nn.Module, layer_paths: list[str]) -> CallSite:
    """Find the call_module nodes that run ``layer_paths`` (full module paths) in order.

    Raises:
        ValueError: if the layers are not called once each from one graph, or their calls do
            not chain (layer i+1 must get layer i's output in one argument position and the
            same values in all others).
    """
    wanted = {p: i for i, p in enumerate(layer_paths)}
    found: dict[int, tuple[str, nn.Module, torch.fx.Node]] = {}
    for prefix, n in graph_nodes(root):
        if n.op == "call_module" and (prefix + n.target) in wanted:
            i = wanted[prefix + n.target]
            if i in found:
                raise ValueError(f"layer {layer_paths[i]} is called more than once")
            path = prefix[:-1]
            found[i] = (path, root.get_submodule(path) if path else root, n)
    missing = [layer_paths[i] for i in range(len(layer_paths)) if i not in found]
    if missing:
        raise ValueError(f"no call of {missing[0]} in the unflattened graph")
    callers = {found[i][0] for i in found}
    if len(callers) != 1:
        raise ValueError(f"layers are called from several modules: {sorted(callers)}")
    caller_path, caller, _ = found[0]
    own(caller)
    nodes = [found[i][2] for i in range(len(layer_paths))]
    state_arg = None
    for prev, cur in zip(nodes, nodes[1:]):
        if cur.kwargs or prev.kwargs or len(cur.args) != len(prev.args):
            raise ValueError(f"calls of {prev.target} and {cur.target} take different arguments")
        diff = [j for j, (a, b) in enumerate(zip(prev.args, cur.args)) if a is not b]
        if len(diff) != 1 or cur.args[diff[0]] is not prev:
            raise ValueError(f"{cur.target} does not take {prev.target}'s output as its only changed argument")
        if state_arg is not None and diff[0] != state_arg:
            raise ValueError("the hidden state changes argument position along the run")
        state_arg = diff[0]
        if any(u is not cur for u in prev.users):
            raise ValueError(f"the output of {prev.target} is used outside the run")
    if state_arg is None:  # a run of one layer: take the first tensor argument that is not shared
        state_arg = 0
    return CallSite(caller_path, caller, nodes, state_arg)


def unique_name(module: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        i += 1
        name = f"{base}{i}"
    return name


def remove_submodule(root: nn.Module, path: str) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    delattr(parent, leaf)


def thread_input(root: nn.Module, root_input: str, target_path: str) -> torch.fx.Node:
    """Make the root placeholder ``root_input`` available inside the graph of ``target_path``.

    Every module on the way gets a new trailing placeholder and each of its call sites passes
    the value down. Returns the placeholder node in the target module's graph.
    """
    src = next((n for n in root.graph.nodes if n.op == "placeholder" and n.target == root_input), None)
    if src is None:
        names = [n.target for n in root.graph.nodes if n.op == "placeholder"]
        raise ValueError(f"the model has no input named {root_input!r} (inputs: {', '.join(names)})")
    return _descend(root, src, src, "", target_path)


def _descend(root: nn.Module, src: torch.fx.Node, value: torch.fx.Node, cur_path: str, target_path: str) -> torch.fx.Node:
    if cur_path == target_path:
        return value
    cur = root.get_submodule(cur_path) if cur_path else root
    parts = (target_path[len(cur_path) + 1:] if cur_path else target_path).split(".")
    for j in range(len(parts), 0, -1):  # the call may name a nested path (unflatten skips call-less levels)
        rel = ".".join(parts[:j])
        calls = [n for n in cur.graph.nodes if n.op == "call_module" and n.target == rel]
        if not calls:
            continue
        child_path = f"{cur_path}.{rel}" if cur_path else rel
        child = own(root.get_submodule(child_path))
        own(cur)
        name = f"_loopify_{src.target}"
        ph = next((n for n in child.graph.nodes if n.op == "placeholder" and n.target == name), None)
        if ph is None:
            last = [n for n in child.graph.nodes if n.op == "placeholder"][-1]
            with child.graph.inserting_after(last):
                ph = child.graph.placeholder(name)
            ph.meta["val"] = src.meta.get("val")
            for c in calls:
                c.args = tuple(c.args) + (value,)
            refresh(cur)
            refresh(child)
        return _descend(root, src, ph, child_path, target_path)
    raise ValueError(f"{target_path} is not called from {cur_path or '<root>'}")

