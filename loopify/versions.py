"""Versions of loopify and the libraries that made an output (recorded in every manifest)."""

from __future__ import annotations

import importlib.metadata as md

PACKAGES = {"loopify": "loopify", "torch": "torch", "transformers": "transformers", "tvm": "apache-tvm",
            "tvm_ffi": "apache-tvm-ffi"}


def versions(*names: str) -> dict:
    """``{name: version}`` for the named packages (default: all of PACKAGES) that are installed."""
    out = {}
    for name in names or tuple(PACKAGES):
        try:
            out[name] = md.version(PACKAGES.get(name, name))
        except md.PackageNotFoundError:
            continue
    return out
