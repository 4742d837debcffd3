"""Putting recorded loops back into a freshly built model (how a converted model is rebuilt).

A loop's skeleton (:meth:`loopify.nn.recursion.Recursion.skeleton`) holds everything but the
weights. :func:`install_all` clones each loop's blocks from the layers they were built from, puts
the loop where its layers were (module form: the module-list entries; graph form: the call
nodes, with the connector's modality mask threaded again), and leaves the weights to be loaded.
"""

from __future__ import annotations

from torch import nn

from loopify.hierarchy import (ModuleSite, clone, install_in_graph, install_in_modules, is_graph_form, locate_calls,
                               thread_modality)
from loopify.nn.recursion import Recursion, group_inputs
from loopify.pipeline import mark_node

#: what rebuilt nodes record as their maker
REBUILD = "rebuild"


def install_all(root: nn.Module, skeletons: dict[str, dict]) -> None:
    """Install every loop of ``skeletons`` (path -> skeleton) into ``root``, in place.

    Loops later in a module list go first (a loop takes one entry, so installing it moves the
    layers after it), as fold-loops folds them.
    """
    ordered = sorted(skeletons.values(), key=lambda s: (s["spec"]["stack"], -s["spec"]["start"]))
    graph = is_graph_form(root)
    for skel in ordered:
        spec = skel["spec"]
        blocks = [clone(root.get_submodule(p)) for p in spec["block_sources"]]
        rec = Recursion.from_skeleton(blocks, skel)
        span = list(spec["span_layers"])
        if graph:
            site = locate_calls(root, span, rec.spec.period)
            leaf = spec["stack"].rpartition(".")[2] or "layers"
            path = install_in_graph(root, site, f"{leaf}_loop", rec, span,
                                    lambda node, origin: mark_node(node, REBUILD, origin), rec.spec.period)
            if rec.n_extra and rec.modality_token is not None:
                rec.n_extra = 0
                thread_modality(root, path, rec.modality_token, lambda node, origin: mark_node(node, REBUILD, origin))
        else:
            site = ModuleSite(spec["stack"], list(range(spec["start"], spec["start"] + len(span))),
                              spec["state_arg"], spec.get("state_name", ""))
            install_in_modules(root, site, spec["start"], len(span), rec, group_inputs(rec))
