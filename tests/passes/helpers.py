"""Shared by the pass tests: running a spec after find-spans, comparing outputs, golden IR.

Tolerances: lossless rewrites (full-rank relax, connectors at zero, deepen x1, folding identical
layers) must match within 1e-5 relative (max abs error / max abs output): the only change is
float32 re-association (W + B@A instead of W), ~1e-7 measured. Lossy plans are checked for
structure, not for closeness.

Golden IR: ``describe(module)`` is the readable IR of a rewritten module (every FX graph, and
each loop's spec and per-depth tensors); :func:`check_golden` compares it with
``tests/passes/golden/NAME.txt`` (``LOOPIFY_UPDATE_GOLDEN=1`` rewrites the file instead).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from loopify.nn import recursions
from loopify.pipeline import State, module_ir, parse, run_pipeline

RTOL = 1e-5
GOLDEN = Path(__file__).parent / "golden"


def rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def run(cap, spec, form="graph"):
    """Run ``spec`` after find-spans (fold-loops' precondition) on the graph or module form."""
    module = cap.unflatten() if form == "graph" else cap.editable()
    return run_pipeline(parse("find-spans{similarity=false}," + spec), State(cap, module))


def out(cap, module):
    with torch.no_grad():
        return module(*cap.args, **cap.kwargs)[0]


def describe(module) -> str:
    parts = [module_ir(module)]
    for path, rec in recursions(module).items():
        parts.append(f"# loop {path}: {rec.extra_repr()}")
        for kind, d in (("depth", rec.depth_params), ("lora_A", rec.lora_A), ("lora_B", rec.lora_B)):
            for k, p in d.items():
                parts.append(f"#   {kind} {k}: {tuple(p.shape)}")
        if rec.connector is not None:
            parts.append(f"#   connector {rec.connector.config()}")
    return "\n".join(parts) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("LOOPIFY_UPDATE_GOLDEN") == "1" or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"IR differs from {path} (LOOPIFY_UPDATE_GOLDEN=1 to accept)"
