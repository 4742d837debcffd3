"""route: put a Mixture-of-Recursions router on every loop (:mod:`loopify.nn.routing`).

``expert`` (expert-choice: per recursion step the router keeps some of the tokens still active,
a capacity fraction per step) or ``token`` (token-choice: the router gives each token its number
of recursions at the first step). Routers start neutral (zero weights, thresholds ``-inf``):
every token takes every step and the model is unchanged, so a lossless plan still verifies.

Routers run in the module form only (a Hugging Face source): a routed step runs its blocks on
the active tokens, fewer than the captured sequence, and the graph form's layers hold the
captured shapes. Connectors and routers are not combined (a connector mixes the whole previous
step, which tokens that stopped did not take).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from loopify.hierarchy import clone, hidden_shapes, is_graph_form
from loopify.nn.recursion import recursions
from loopify.nn.routing import Router, RouterSpec, default_capacity
from loopify.pipeline import Pass, PassResult, State, require


@dataclass(frozen=True)
class Route(Pass):
    """Add a router to every loop.

    Precondition: a loop (fold-loops), in module form.

    Attributes:
        kind: expert (expert-choice) or token (token-choice).
        capacity: expert: fraction of the tokens kept at each recursion step, one value per step
            (empty: MoR's (N - r) / N). It is the target of top-k selection and of the router's
            training and calibration; at insertion every token passes.
        activation: sigmoid or tanh (the score's update scale: 2 sigmoid(z) or 1 + tanh(z)).
        hidden: 0 for a linear router, else the hidden width of a two-layer MLP router.
    """

    name: ClassVar[str] = "route"
    requires: ClassVar[tuple[str, ...]] = ("loops",)
    kind: Literal["expert", "token"] = "expert"
    capacity: tuple[float, ...] = ()
    activation: Literal["sigmoid", "tanh"] = "sigmoid"
    hidden: int = 0

    def __post_init__(self):
        if self.hidden < 0:
            raise ValueError("hidden must be >= 0")
        if any(not 0 < c <= 1 for c in self.capacity):
            raise ValueError("capacities must be in (0, 1]")

    def run(self, state: State) -> PassResult:
        if not require(self, state):
            return PassResult(state, False, {"note": "fold-loops made no loop: nothing to route"})
        if is_graph_form(state.module):
            raise ValueError("routers need the module form (a Hugging Face source): a routed step runs on "
                             "fewer tokens than the captured shapes the graph form's layers hold")
        loops = recursions(state.module)
        have = {r.router.kind for r in loops.values() if r.router is not None}
        if have:
            if have != {self.kind}:
                raise ValueError(f"the loops already have {'/'.join(sorted(have))} routers")
            return PassResult(state, False, {"kind": self.kind, "note": f"already routed ({self.kind})"})
        for path, r in loops.items():
            if r.connector is not None:
                raise ValueError(f"{path} has a connector: routers and connectors are not combined")
        module = clone(state.module)
        shapes = hidden_shapes(module, state.captured)
        report = []
        for path, rec in recursions(module).items():
            steps = rec.spec.max_loops
            capacity = tuple(self.capacity) or default_capacity(steps)
            if len(capacity) != steps:
                raise ValueError(f"{path}: capacity needs one value per recursion step ({steps}), "
                                 f"got {len(capacity)}")
            spec = RouterSpec(self.kind, steps, int(shapes[path][0][-1]), self.activation, self.hidden,
                              capacity if self.kind == "expert" else tuple([1.0] * steps))
            rec.router = Router(spec)
            report.append({"loop": path, "kind": self.kind, "steps": steps, "capacity": list(spec.capacity),
                           "activation": self.activation, "hidden": self.hidden,
                           "params": sum(p.numel() for p in rec.router.parameters())})
        return PassResult(state.replace(module=module), True, {"kind": self.kind, "loops": report})
