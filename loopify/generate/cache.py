"""The eager KV cache of a converted model: a transformers ``Cache`` whose slots follow a loop
KV policy (:mod:`loopify.nn.kv`) instead of the layer index.

Attention modules call ``cache.update(keys, values, layer_idx)``; while a loop runs a depth,
:func:`loopify.nn.recursion.current_depth` says which, and the policy maps it to a slot (one per
executed depth position, or one per block). Layers outside loops keep their layer index. Every
slot is a transformers ``DynamicLayer``, so the base class's reordering and cropping work as for
a ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from loopify.nn import kv
from loopify.nn.recursion import current_depth


class LoopCache(Cache):
    """A KV cache for models with loops. ``policy``: per-depth (exact), share-first, last."""

    def __init__(self, policy: str = "per-depth"):
        if policy not in kv.POLICIES:
            raise ValueError(f"KV policy must be one of {', '.join(kv.POLICIES)}, not {policy!r}")
        super().__init__(layers=[])
        self.policy = policy
        self.index: dict[tuple, int] = {}

    def _layer(self, key: tuple) -> DynamicLayer:
        if key not in self.index:
            self.index[key] = len(self.layers)
            self.layers.append(DynamicLayer())
        return self.layers[self.index[key]]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        where = kv.slot(self.policy, current_depth(), layer_idx)
        layer = self._layer(where.key)
        if where.mode == "append" or not layer.is_initialized:
            return layer.update(key_states, value_states)
        if where.mode == "read":
            return layer.keys, layer.values
        t = key_states.shape[-2]  # replace: the current tokens' entries are the last t
        layer.keys = torch.cat([layer.keys[..., :-t, :], key_states], dim=-2)
        layer.values = torch.cat([layer.values[..., :-t, :], value_states], dim=-2)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached (every slot holds the same tokens between two forwards)."""
        return max((l.get_seq_length() for l in self.layers), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                   for l in self.layers if l.is_initialized)

    @property
    def slots(self) -> int:
        return len(self.layers)
