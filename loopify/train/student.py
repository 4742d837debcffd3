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
    """One forward = the student's first output at each of ``depths`` (one DDP forward per step).

    Shared prefix (``shared_prefix``, on by default): a cycle or deepen loop at depth k runs
    the first k recursion steps of the same loop at the largest depth, so the largest depth runs
    once, recording each loop's state after k steps, and every other depth replays it through
    the rest of the model (embeddings, layers outside the loops, head) instead of running the
    blocks again: 3 x 2 blocks trained at depths 1 and 2 run 6 block calls instead of 9, 7 x 4
    at depths 1-4 run 28 instead of 70, forward and backward. The outputs and gradients are the
    same as running each depth on its own (up to float re-association; dropout draws other
    masks). Loops that cannot share (routers, multi-resolution, sequence and middle-* sharing, a
    loop called twice in one forward, collected hidden states) run each depth in full."""

    def __init__(self, student: nn.Module, shared_prefix: bool = True):
        super().__init__()
        self.student = student
        self.shared_prefix = shared_prefix
        #: per depth of the last forward: the routers' losses summed over loops ({"aux", "z"})
        self.router_losses: list[dict] = []
        #: whether the last forward shared its prefix
        self.shared_last = False

    def forward(self, inputs: dict, depths: list[int]) -> list[torch.Tensor]:
        from loopify.nn.recursion import recursions
        from loopify.nn.routing import routers

        self.shared_last = False
        if (self.shared_prefix and len(depths) > 1 and not routers(self.student)
                and any(r.stepwise and r.spiral is None for r in recursions(self.student).values())):
            return self._shared(inputs, depths)
        return self._each(inputs, depths)

    def _shared(self, inputs: dict, depths: list[int]) -> list[torch.Tensor]:
        """The largest depth recorded, the others replayed; a depth whose replay could not be
        trusted (:attr:`PrefixRun.ok`) runs in full afterwards."""
        from loopify.nn.recursion import prefix_run

        top = max(depths)
        got: dict[int, torch.Tensor] = {}
        try:
            with prefix_run(depths) as run:
                set_depth(self.student, top)
                got[top] = _first(self.student(**inputs))
                for k in sorted(set(depths) - {top}):
                    if not run.ok:
                        break
                    run.replay, run.calls = k, {}
                    set_depth(self.student, k)
                    out = _first(self.student(**inputs))
                    if run.ok:
                        got[k] = out
            for k in sorted(set(depths) - set(got)):
                set_depth(self.student, k)
                got[k] = _first(self.student(**inputs))
        finally:
            set_depth(self.student, None)
        self.shared_last = run.ok and run.replayed > 0
        self.router_losses = [{} for _ in depths]
        return [got[k] for k in depths]

    def _each(self, inputs: dict, depths: list[int]) -> list[torch.Tensor]:
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
