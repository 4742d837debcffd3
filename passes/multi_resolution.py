"""multi-resolution: give every loop a resolution schedule (SpiralFormer, :mod:`loopify.nn.spiral`).

``multi-resolution{schedule=4:2:1}``: recursion step i of each loop runs on the sequence
mean-pooled by factor r_i (coarse to fine), its update unpooled by repeat and added with a gate
that starts at zero, so the model is unchanged at insertion and a lossless plan still verifies.

A separate pass after fold-loops, not a fold-loops option: fold-loops decides which weights are
shared (a structural rewrite of the layers); the schedule decides how a loop *executes* its
steps and adds parameters (the gates) that start neutral, as ``route`` and
``insert-connectors`` do. As its own pass it composes with any fold (compress or deepen) and
with ``relax``, prints in the pipeline spec, and carries its own preconditions (the module form,
like routers: a coarse step runs on fewer tokens than the graph form's captured shapes).

Causality (``causal=auto``), per loop: a loop is causal when its blocks' attention modules say so
(``is_causal``), or when its hidden sequence runs along ``input_ids`` and changing the last
input token leaves the first position's output unchanged (probed on the example inputs: this
catches a prefix-LM such as PaliGemma, whose flag is False but whose text is causal). A vision
tower of a VLM (its sequence is image patches, its attention bidirectional) is not causal.
``true`` / ``false`` force it for every loop.
Image positions of a VLM (``input_ids`` == the image token) are a modality of their own: no group
mixes image and text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from loopify.hierarchy import TOKEN_INPUT, clone, hidden_shapes, is_graph_form
from loopify.nn.recursion import recursions
from loopify.nn.spiral import Spiral, SpiralSpec
from loopify.pipeline import Pass, PassResult, State, require


@dataclass(frozen=True)
class MultiResolution(Pass):
    """Add a resolution schedule to every loop.

    Precondition: a loop (fold-loops) with recursion steps (cycle sharing or deepen mode), in
    module form, without routers or connectors.

    Attributes:
        schedule: pooling factor of each recursion step, coarse to fine (one per step of the
            loop's full count; 1: full resolution), e.g. ``4:2:1``.
        causal: auto (probe the model), true or false.
        image_token_id: image token for the modality segments (-1: from the config).
    """

    name: ClassVar[str] = "multi-resolution"
    requires: ClassVar[tuple[str, ...]] = ("loops",)
    schedule: tuple[int, ...] = ()
    causal: Literal["auto", "true", "false"] = "auto"
    image_token_id: int = -1

    def __post_init__(self):
        if not self.schedule:
            raise ValueError("multi-resolution needs a schedule, e.g. schedule=2:1")
        if any(r < 1 for r in self.schedule):
            raise ValueError(f"schedule {':'.join(map(str, self.schedule))}: pooling factors must be >= 1")

    def run(self, state: State) -> PassResult:
        if not require(self, state):
            return PassResult(state, False, {"note": "fold-loops made no loop: nothing to schedule"})
        if is_graph_form(state.module):
            raise ValueError("multi-resolution needs the module form (a Hugging Face source): a coarse step runs "
                             "on fewer tokens than the captured shapes the graph form's layers hold")
        if all(r.spiral is not None for r in recursions(state.module).values()):
            return PassResult(state, False, {"note": "already scheduled"})
        module = clone(state.module)
        shapes = hidden_shapes(module, state.captured)
        probed = probe_causal(module, state.captured) if self.causal == "auto" else None
        token = self.image_token_id if self.image_token_id >= 0 else state.captured.info.get("image_token_id")
        report = [self._attach(module, path, rec, shapes[path], self._causal(rec, shapes[path], probed), token)
                  for path, rec in recursions(module).items()]
        return PassResult(state.replace(module=module), True, {"schedule": list(self.schedule), "loops": report})

    def _attach(self, root, path: str, rec, shape, causal: bool, token) -> dict:
        steps = rec.spec.max_loops
        if rec.router is not None or rec.connector is not None:
            raise ValueError(f"{path} has a {'router' if rec.router is not None else 'connector'}: "
                             "multi-resolution loops are not combined with routers or connectors")
        if not rec.stepwise or rec.spec.period > 1:
            raise ValueError(f"{path}: a resolution schedule needs recursion steps (cycle sharing or deepen mode, "
                             f"one layer per group), not {rec.spec.sharing} sharing with period {rec.spec.period}")
        if len(self.schedule) != steps:
            raise ValueError(f"{path}: schedule {':'.join(map(str, self.schedule))} has {len(self.schedule)} "
                             f"factors for a loop of {steps} recursion steps")
        hidden, ids_shape = shape
        rec.spiral = Spiral(SpiralSpec(tuple(self.schedule), int(hidden[-1]), causal))
        modality = "one modality"
        if token is not None and ids_shape is not None and tuple(ids_shape) == tuple(hidden[:2]):
            rec.modality_token = int(token)
            root.modality_token = int(token)  # the wrapper computes the image mask from its input_ids
            modality = f"image positions ({TOKEN_INPUT} == {token}) pooled apart from text"
        return {"loop": path, "schedule": list(self.schedule), "causal": causal, "modality": modality,
                "params": rec.spiral.gate.numel()}

    def _causal(self, rec, shape, probed: bool | None) -> bool:
        if self.causal != "auto":
            return self.causal == "true"
        hidden, ids_shape = shape
        aligned = ids_shape is not None and tuple(ids_shape) == tuple(hidden[:2])
        flag = any(bool(getattr(m, "is_causal", False)) for m in rec.blocks.modules())
        return flag or bool(aligned and probed)


def probe_causal(module, captured) -> bool | None:
    """Whether changing the last input token leaves the first position's output as it is (None
    when the model has no ``input_ids`` or no output along the sequence)."""
    ids = captured.kwargs.get(TOKEN_INPUT)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        return None
    image = captured.info.get("image_token_id")
    last = int(ids[0, -1])
    others = [int(v) for v in ids.unique().tolist() if int(v) not in (last, image)]
    if not others:
        return None
    changed = ids.clone()
    changed[:, -1] = others[0]
    with torch.no_grad():
        a = module(*captured.args, **captured.kwargs)
        b = module(*captured.args, **{**captured.kwargs, TOKEN_INPUT: changed})
    a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))
    if not isinstance(a, torch.Tensor) or a.dim() < 2 or a.shape[1] != ids.shape[1]:
        return None
    diff = float((a[:, 0] - b[:, 0]).abs().max())
    return diff <= 1e-6 * max(float(a.abs().max()), 1e-12)
