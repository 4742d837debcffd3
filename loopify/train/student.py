"""The student at a depth: running every loop k times, and which parameters train."""

from __future__ import annotations

import torch
from torch import nn

from loopify.train.config import GROUPS, TrainError


def max_depth(module: nn.Module) -> int:
    """N: the largest loop count over the model's loops (their default in deepen mode)."""
    from loopify.nn import recursions

    loops = recursions(module)
    if not loops:
        raise TrainError("the model has no loops: nothing to train at several depths")
    return max(r.spec.max_loops for r in loops.values())


def set_depth(module: nn.Module, k: int | None) -> None:
    """Run every loop with ``min(k, its maximum)`` loops (``None``: every loop at its default)."""
    from loopify.nn import recursions, set_loops

    if k is None:
        set_loops(module, None)
        return
    set_loops(module, [min(k, r.spec.max_loops) for r in recursions(module).values()])


class DepthRunner(nn.Module):
    """One forward = the student's first output at each of ``depths`` (one DDP forward per step)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        #: per depth of the last forward: the routers' losses summed over loops ({"aux", "z"})
        self.router_losses: list[dict] = []

    def forward(self, inputs: dict, depths: list[int]) -> list[torch.Tensor]:
        from loopify.nn.routing import router_losses, routers

        outs, self.router_losses = [], []
        try:
            for k in depths:
                set_depth(self.student, k)
                outs.append(_first(self.student(**inputs)))
                total: dict = {}
                for r in routers(self.student).values():
                    for name, v in router_losses(r).items():
                        total[name] = total.get(name, 0) + v
                self.router_losses.append(total)
        finally:
            set_depth(self.student, None)
        return outs


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------
# Data




def parameter_groups(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group: [(name, parameter)]}`` for base, lora, connector, router and spiral, in ``named_parameters`` order."""
    from loopify.nn import recursions

    ids: dict[int, str] = {}
    for r in recursions(module).values():
        for p in r.blocks.parameters():
            ids[id(p)] = "base"
        for d in (r.lora_A, r.lora_B, r.depth_params):
            for p in d.parameters():
                ids[id(p)] = "lora"
        if r.connector is not None:
            for p in r.connector.parameters():
                ids[id(p)] = "connector"
        if r.router is not None:
            for p in r.router.parameters():
                ids[id(p)] = "router"
        if r.spiral is not None:
            for p in r.spiral.parameters():
                ids[id(p)] = "spiral"
    out: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in module.named_parameters():
        g = ids.get(id(p))
        if g is not None:
            out[g].append((name, p))
    return out


# ----------------------------------------------------------------------------------------------
# Distributed
