"""insert-connectors: put a connector between the recursion steps of every loop.

Kinds (see :mod:`loopify.connectors`): ``recursive`` (RecursiveVLM's Recursive Connector with
modality-specific projections), ``identity``, ``embedding`` (per-step vector). All are exactly
neutral at insertion, so the converted model's outputs do not change.

The modality mask for vision-language models is found automatically: when the model has an
image token id (from its config, or ``image_token_id=``) and an ``input_ids`` input whose
sequence length equals the loop's hidden-state sequence length, the positions holding the image
token are image positions. In the graph form the mask is computed from ``input_ids`` in the graph
and threaded down to the loop; in the module form the model's wrapper computes it from its
``input_ids`` and the loop reads it while it runs (:func:`loopify.nn.connectors.modality`).
Otherwise the loop has one modality (text-only models, vision towers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from loopify.hierarchy import TOKEN_INPUT, clone, hidden_shapes, is_graph_form, thread_modality
from loopify.nn.connectors import EmbeddingConnector, IdentityConnector, RecursiveConnector
from loopify.nn.recursion import Recursion, recursions
from loopify.pipeline import Pass, PassResult, State, mark_node, require



@dataclass(frozen=True)
class InsertConnectors(Pass):
    """Insert a connector before every recursion step after the first.

    Precondition: a loop (fold-loops).

    Attributes:
        kind: recursive, identity or embedding.
        taps: recursive: hidden states tapped at evenly spaced depths of the previous step.
        image_token_id: token id marking image positions (-1: from the model's config).
        max_steps: embedding: number of per-step vectors (steps beyond reuse the last).
    """

    name: ClassVar[str] = "insert-connectors"
    requires: ClassVar[tuple[str, ...]] = ("loops",)
    kind: Literal["recursive", "identity", "embedding"] = "recursive"
    taps: int = 2
    image_token_id: int = -1
    max_steps: int = 16

    def __post_init__(self):
        if self.taps < 1:
            raise ValueError("taps must be >= 1")
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")

    def run(self, state: State) -> PassResult:
        if not require(self, state):
            return PassResult(state, False, {"note": "fold-loops made no loop: nothing to connect"})
        have = [r.connector for r in recursions(state.module).values() if r.connector is not None]
        if have:
            kinds = {c.kind for c in have}
            if kinds != {self.kind}:
                raise ValueError(f"the loops already have {'/'.join(sorted(kinds))} connectors")
            return PassResult(state, False, {"kind": self.kind, "note": f"already connected ({self.kind})"})
        module = clone(state.module)
        token_id = self.image_token_id if self.image_token_id >= 0 else state.captured.info.get("image_token_id")
        hidden = None if is_graph_form(module) else hidden_shapes(module, state.captured)
        report = []
        for path, rec in recursions(module).items():
            report.append(self._insert(module, path, rec, token_id, hidden))
        return PassResult(state.replace(module=module), True, {"kind": self.kind, "loops": report})

    def _insert(self, root, path: str, rec: Recursion, token_id, hidden_shapes) -> dict:
        if rec.connector is not None:
            raise ValueError(f"{path} already has a connector")
        steps = rec.steps()
        if len(steps) < 2 and not rec.deepen and rec.spec.max_loops < 2:
            return {"loop": path, "skipped": "one recursion step: nothing to connect"}
        if not rec.deepen and rec.spec.sharing != "cycle":
            raise ValueError(f"{path}: connectors sit between recursion steps, which exist for cycle sharing "
                             f"and deepen mode, not {rec.spec.sharing}")
        if hidden_shapes is None:
            dim, modalities, mask_note = self._graph_modalities(root, path, rec, token_id)
        else:
            dim, modalities, mask_note = self._module_modalities(root, path, rec, token_id, hidden_shapes)
        self._attach(rec, dim, modalities)
        return {"loop": path, "kind": self.kind, "modalities": modalities, "mask": mask_note,
                "taps": getattr(rec.connector, "positions", []),
                "params": sum(p.numel() for p in rec.connector.parameters())}

    def _attach(self, rec: Recursion, dim: int, modalities: int) -> None:
        if self.kind == "recursive":
            rec.connector = RecursiveConnector(dim, rec.step_len, self.taps, modalities)
        elif self.kind == "identity":
            rec.connector = IdentityConnector()
        else:
            rec.connector = EmbeddingConnector(dim, self.max_steps)

    def _module_modalities(self, root, path, rec, token_id, hidden_shapes) -> tuple[int, int, str]:
        shape, ids_shape = hidden_shapes[path]
        if self.kind != "recursive" or token_id is None:
            return shape[-1], 1, "one modality"
        if len(shape) == 3 and ids_shape is not None and tuple(ids_shape) == tuple(shape[:2]):
            rec.modality_token = int(token_id)
            root.modality_token = int(token_id)  # the wrapper computes the mask from its input_ids
            return shape[-1], 2, f"image positions: {TOKEN_INPUT} == {token_id}"
        return shape[-1], 1, f"one modality (hidden sequence {tuple(shape[:-1])} is not aligned with {TOKEN_INPUT})"

    def _graph_modalities(self, root, path, rec, token_id) -> tuple[int, int, str]:
        caller_path, _, attr = path.rpartition(".")
        caller = root.get_submodule(caller_path) if caller_path else root
        call = next(n for n in caller.graph.nodes if n.op == "call_module" and n.target == attr)
        hidden = call.args[rec.spec.state_arg].meta.get("val")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
            raise ValueError(f"{path}: the hidden state has no known shape")
        dim = hidden.shape[-1]
        modalities, mask_note = 1, "one modality"
        if self.kind == "recursive" and token_id is not None:
            ids_val = next((n.meta.get("val") for n in root.graph.nodes
                            if n.op == "placeholder" and n.target == TOKEN_INPUT), None)
            static = isinstance(ids_val, torch.Tensor) and all(isinstance(d, int) for d in (*ids_val.shape, *hidden.shape))
            if static and hidden.dim() == 3 and tuple(ids_val.shape) == tuple(hidden.shape[:2]):
                thread_modality(root, path, int(token_id), lambda node, origin: mark_node(node, self.name, origin))
                modalities = 2
                mask_note = f"image positions: {TOKEN_INPUT} == {token_id}"
            elif not static:
                mask_note = "one modality (the hidden sequence length is data-dependent; give image positions by aligning shapes)"
            else:
                mask_note = f"one modality (hidden sequence {tuple(hidden.shape[:-1])} is not aligned with {TOKEN_INPUT})"
        call.meta[f"{self.name}"] = self.kind
        return dim, modalities, mask_note
