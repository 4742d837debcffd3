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



# ----------------------------------------------------------------------------------------------
# Where a run of layers is called, and putting a loop in its place, in both forms of a model:
# the graph form (an unflattened torch.export hierarchy: layers are call_module nodes) and the
# module form (an eager model: layers are entries of a ModuleList that the model's own code
# iterates).


def is_graph_form(root: nn.Module) -> bool:
    """Whether ``root`` is an unflattened export hierarchy (its layers are called from FX graphs)."""
    return isinstance(getattr(root, "graph", None), torch.fx.Graph)


@dataclass
class ModuleSite:
    """Where a run of layers sits in an eager model: entries ``indices`` of the ModuleList
    ``stack``, each called with the hidden state at ``state_arg`` (or keyword ``state_name``)."""

    stack: str
    indices: list[int]
    state_arg: int
    state_name: str


def _same(a, b) -> bool:
    if isinstance(a, (torch.Tensor, tuple, list, dict, nn.Module)) or isinstance(b, (torch.Tensor, tuple, list, dict)):
        return a is b
    return a == b


def locate_module_calls(root: nn.Module, layer_paths: list[str], run) -> ModuleSite:
    """Check by one run of the model (``run()``) that ``layer_paths`` are called once each, in
    order, from one ModuleList, each taking the previous one's output as its hidden state and the
    very same other arguments; returns the site.

    Raises:
        ValueError: naming the layer whose call breaks the chain.
    """
    stack_path = layer_paths[0].rpartition(".")[0]
    if any(p.rpartition(".")[0] != stack_path for p in layer_paths):
        raise ValueError("the layers of a run are not entries of one module list")
    stack = root.get_submodule(stack_path)
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{stack_path} is a {type(stack).__name__}, not a ModuleList or Sequential")
    indices = [int(p.rpartition(".")[2]) for p in layer_paths]
    if indices != list(range(indices[0], indices[0] + len(indices))):
        raise ValueError("the layers of a run are not consecutive entries of their module list")
    calls: dict[int, list] = {i: [] for i in range(len(layer_paths))}
    handles = []
    for i, p in enumerate(layer_paths):
        def hook(mod, args, kwargs, out, _i=i):
            calls[_i].append((args, kwargs, out))
        handles.append(root.get_submodule(p).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    for i, p in enumerate(layer_paths):
        if len(calls[i]) != 1:
            raise ValueError(f"layer {p} is called {len(calls[i])} times in one forward, not once")
    state = None
    for i in range(1, len(layer_paths)):
        (pa, pk, pout), (ca, ck, _) = calls[i - 1][0], calls[i][0]
        prev = pout[0] if isinstance(pout, tuple) else pout
        where = [("arg", j) for j, a in enumerate(ca) if a is prev] + [("kw", k) for k, v in ck.items() if v is prev]
        if len(where) != 1:
            raise ValueError(f"{layer_paths[i]} does not take {layer_paths[i - 1]}'s output as its hidden state")
        if state is not None and where[0] != state:
            raise ValueError("the hidden state changes argument position along the run")
        state = where[0]
        others_a = [(j, a) for j, a in enumerate(ca) if ("arg", j) != state]
        others_k = {k: v for k, v in ck.items() if ("kw", k) != state}
        if len(ca) != len(pa) or set(ck) != set(pk) or any(not _same(a, pa[j]) for j, a in others_a) or any(
                not _same(v, pk[k]) for k, v in others_k.items()):
            raise ValueError(f"{layer_paths[i]} is called with other side arguments than {layer_paths[i - 1]}")
    if state is None:  # a run of one layer: the first positional argument
        state = ("arg", 0) if calls[0][0][0] else ("kw", next(iter(calls[0][0][1]), ""))
    import inspect

    params = list(inspect.signature(root.get_submodule(layer_paths[0]).forward).parameters)
    if state[0] == "arg":
        return ModuleSite(stack_path, indices, state[1], params[state[1]] if state[1] < len(params) else "")
    return ModuleSite(stack_path, indices, params.index(state[1]) if state[1] in params else len(params), state[1])


def install_in_modules(root: nn.Module, site: ModuleSite, start: int, length: int, loop: nn.Module) -> str:
    """Replace entries ``start .. start+length-1`` of the site's module list by ``loop`` (one
    entry, called as the layers were); returns the loop's module path."""
    stack = root.get_submodule(site.stack)
    entries = list(stack)
    new = entries[:start] + [loop] + entries[start + length:]
    parent_path, _, leaf = site.stack.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, type(stack)(*new) if isinstance(stack, nn.Sequential) else nn.ModuleList(new))
    return f"{site.stack}.{start}"


def install_in_graph(root: nn.Module, site: CallSite, attr_base: str, loop: nn.Module, layer_paths: list[str],
                     mark) -> str:
    """Replace the call nodes of ``site`` by one call of ``loop`` (added to the caller as a new
    attribute named after ``attr_base``) and drop the layers ``layer_paths``; ``mark(node)``
    records the pass on the new node. Returns the loop's module path."""
    caller = site.caller
    attr = unique_name(caller, attr_base)
    caller.add_module(attr, loop)
    first, last = site.nodes[0], site.nodes[-1]
    with caller.graph.inserting_before(first):
        new = caller.graph.call_module(attr, tuple(first.args))
    new.meta = {k: v for k, v in last.meta.items() if k in ("val", "tensor_meta")}
    mark(new, [n.target for n in site.nodes])
    last.replace_all_uses_with(new)
    for n in reversed(site.nodes):
        caller.graph.erase_node(n)
    refresh(caller)
    for p in layer_paths:
        remove_submodule(root, p)
    return f"{site.caller_path}.{attr}".lstrip(".")


#: Name of the model input that carries token ids (the convention of HF models and most others).
TOKEN_INPUT = "input_ids"


def thread_modality(root: nn.Module, loop_path: str, token_id: int, mark) -> None:
    """Graph form: compute the image-position mask ``input_ids == token_id`` next to the loop's
    call (threading ``input_ids`` down to its caller) and pass it as the loop's trailing argument."""
    caller_path, _, attr = loop_path.rpartition(".")
    caller = root.get_submodule(caller_path) if caller_path else root
    call = next(n for n in caller.graph.nodes if n.op == "call_module" and n.target == attr)
    ids_val = next((n.meta.get("val") for n in root.graph.nodes
                    if n.op == "placeholder" and n.target == TOKEN_INPUT), None)
    ids = thread_input(root, TOKEN_INPUT, caller_path)
    with caller.graph.inserting_before(call):
        mask = caller.graph.call_function(torch.ops.aten.eq.Scalar, (ids, int(token_id)))
    mark(mask, f"{TOKEN_INPUT} == {token_id}")
    if isinstance(ids_val, torch.Tensor):
        mask.meta["val"] = ids_val == int(token_id)
    call.args = tuple(call.args) + (mask,)
    loop = caller.get_submodule(attr)
    loop.n_extra = 1
    loop.modality_token = int(token_id)
    refresh(caller)


def hidden_shapes(root, captured) -> dict[str, tuple]:
    """Module form: each loop's hidden-state shape on the example inputs, with the shape of the
    model's ``input_ids`` (one run with hooks)."""
    from loopify.nn.recursion import recursions

    shapes, handles = {}, []
    for path, rec in recursions(root).items():
        def hook(mod, args, kwargs, _p=path):
            where, s = mod._state(list(args), kwargs)
            shapes[_p] = tuple((args[s] if where == "arg" else kwargs[s]).shape)
        handles.append(rec.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            root(*captured.args, **captured.kwargs)
    finally:
        for h in handles:
            h.remove()
    ids = captured.kwargs.get(TOKEN_INPUT)
    return {p: (shape, None if ids is None else tuple(ids.shape)) for p, shape in shapes.items()}
