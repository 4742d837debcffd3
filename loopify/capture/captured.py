"""A captured model: an exported program, its example inputs, and the eager model it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopify.verify import EXPORT_RTOL, Diff


#: Sources whose eager model is rewritten directly (their class can be rebuilt from a config).
MODULE_FORM_FORMATS = ("hf-dir", "gguf")


@dataclass
class ExportCheck:
    """Export compared with eager on the example inputs."""

    diffs: list[Diff]
    rtol: float = EXPORT_RTOL

    @property
    def ok(self) -> bool:
        return all(d.rel_err <= self.rtol for d in self.diffs)

    @property
    def max_abs_err(self) -> float:
        return max((d.max_abs_err for d in self.diffs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((d.rel_err for d in self.diffs), default=0.0)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "rtol": self.rtol, "max_abs_err": self.max_abs_err,
                "max_rel_err": self.max_rel_err, "outputs": [d.to_dict() for d in self.diffs]}


@dataclass
class Captured:
    """A captured model: the exported program, its example inputs and where it came from.

    A rebuilt converted model (``format`` "converted") has no program until one is exported:
    ``program`` is None and ``eager`` is the model."""

    program: torch.export.ExportedProgram | None
    args: tuple
    kwargs: dict
    source: Path
    format: str  # "export-archive" | "hf-dir" | "gguf" | "pickle" | "converted"
    eager: torch.nn.Module | None = None
    export_check: ExportCheck | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def module(self) -> torch.nn.Module:
        """The exported program as a runnable (flat) GraphModule (the eager model if none)."""
        return self.program.module() if self.program is not None else self.eager

    def unflatten(self):
        """The module hierarchy of the program (one FX GraphModule per submodule)."""
        return torch.export.unflatten(self.program)

    def editable(self) -> torch.nn.Module:
        """The form of the model that passes rewrite: for a Hugging Face source a copy of the
        eager model (the *module form*: its code stays, so it runs at any length and keeps its
        cache handling); for any other source the unflattened program (the *graph form*)."""
        if self.format in MODULE_FORM_FORMATS and self.eager is not None:
            from loopify.hierarchy import clone

            return clone(self.eager)
        return self.unflatten()

    def run(self, module: torch.nn.Module | None = None):
        """Run ``module`` (default: the exported program) on the example inputs."""
        module = module if module is not None else self.module()
        with torch.no_grad():
            return module(*self.args, **self.kwargs)

    def flat_inputs(self) -> list:
        """The example inputs flattened as the program's placeholders take them (without a
        program: positional inputs, then keyword inputs in their order, as export orders them)."""
        if self.program is None:
            import torch.utils._pytree as pytree

            return pytree.tree_leaves((tuple(self.args), dict(self.kwargs)))
        return flat_inputs(self.program, self.args, self.kwargs)

    def describe(self) -> dict:
        d = {"source": str(self.source), "format": self.format, **self.info,
             "inputs": describe_inputs(self.args, self.kwargs)}
        if self.export_check is not None:
            d["export_check"] = self.export_check.to_dict()
        return d


def flat_inputs(program: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> list:
    """The inputs as the program's flat placeholders take them (keyword inputs in export order)."""
    import torch.utils._pytree as pytree
    from torch.export._tree_utils import reorder_kwargs

    return pytree.tree_leaves((tuple(args), reorder_kwargs(dict(kwargs), program.call_spec.in_spec)))


def describe_inputs(args: tuple, kwargs: dict) -> list[dict]:
    """Names, shapes and dtypes of example inputs (positional ones are named ``arg<i>``)."""
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            if isinstance(v, torch.Tensor) else {"name": k, "value": repr(v)} for k, v in items]
