"""loopify's passes, one per file, imported lazily by name.

Installed as ``loopify.passes`` (package-dir mapping in pyproject.toml). Nothing here imports a
backend.
"""

from __future__ import annotations

import importlib

#: pass name -> "module:Class", imported on first use.
REGISTRY: dict[str, str] = {
    "find-spans": "loopify.passes.find_spans:FindSpans",
    "fold-loops": "loopify.passes.fold_loops:FoldLoops",
    "relax": "loopify.passes.relax:Relax",
    "insert-connectors": "loopify.passes.insert_connectors:InsertConnectors",
    "route": "loopify.passes.route:Route",
    "multi-resolution": "loopify.passes.multi_resolution:MultiResolution",
}


def load_pass(name: str):
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
