"""The eager KV cache of a converted model: a transformers ``Cache`` whose slots follow a loop
KV policy (:mod:`loopify.nn.kv`) instead of the layer index.

Attention modules call ``cache.update(keys, values, layer_idx)``; while a loop runs a depth,
:func:`loopify.nn.recursion.current_depth` says which, and the policy maps it to a slot (one per
executed depth position, or one per block). Layers outside loops keep their layer index. Every
slot is a transformers ``DynamicLayer``, so the base class's reordering and cropping work as for
a ``DynamicCache``.

Routed loops (:mod:`loopify.nn.routing`): a routed depth writes only the tokens active there
(recursion-wise KV caching), so its slot also records each entry's absolute token index and
whether it is a real token; the loop builds its attention mask from them (:meth:`routed_keys`).
``routed`` counts the tokens each routed loop has seen (its slots may hold fewer).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from loopify.nn import kv
from loopify.nn.recursion import current_depth
from loopify.nn.routing import current_routed


class LoopCache(Cache):
    """A KV cache for models with loops. ``policy``: per-depth (exact), share-first, last."""

    def __init__(self, policy: str = "per-depth"):
        if policy not in kv.POLICIES:
            raise ValueError(f"KV policy must be one of {', '.join(kv.POLICIES)}, not {policy!r}")
        super().__init__(layers=[])
        self.policy = policy
        self.index: dict[tuple, int] = {}
        self.routed: dict[str, int] = {}  # routed loop -> tokens it has seen
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # routed slot -> (index, valid) [B, n]

    def _layer(self, key: tuple) -> DynamicLayer:
        if key not in self.index:
            self.index[key] = len(self.layers)
            self.layers.append(DynamicLayer())
        return self.layers[self.index[key]]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        where = kv.slot(self.policy, current_depth(), layer_idx)
        layer = self._layer(where.key)
        routed = current_routed()
        if routed is not None and self.policy == "last":
            raise ValueError("KV policy 'last' replaces the current tokens' entries, which a routed depth "
                             "does not hold for every token: use per-depth or share-first")
        if where.mode == "append" or not layer.is_initialized:
            if routed is not None:
                self.entries[where.key] = self._joined(where.key, *routed)
            return layer.update(key_states, value_states)
        if where.mode == "read":
            return layer.keys, layer.values
        t = key_states.shape[-2]  # replace: the current tokens' entries are the last t
        layer.keys = torch.cat([layer.keys[..., :-t, :], key_states], dim=-2)
        layer.values = torch.cat([layer.values[..., :-t, :], value_states], dim=-2)
        return layer.keys, layer.values

    def _joined(self, key: tuple, index: torch.Tensor, valid: torch.Tensor):
        held = self.entries.get(key)
        if held is None:
            return index, valid
        return torch.cat([held[0], index], -1), torch.cat([held[1], valid], -1)

    def routed_keys(self, depth, index: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(absolute index, valid) [B, keys] of the keys a routed depth will attend to: its slot's
        entries, with the current tokens (``index``, ``valid``) appended unless the slot is only
        read (share-first's later recursions)."""
        where = kv.slot(self.policy, depth, 0)
        if where.mode == "append" or where.key not in self.entries:
            return self._joined(where.key, index, valid)
        return self.entries[where.key]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached (every unrouted slot holds every token between two forwards; a routed
        loop counts the tokens it has seen)."""
        return max([l.get_seq_length() for l in self.layers] + list(self.routed.values()), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                   for l in self.layers if l.is_initialized)

    @property
    def slots(self) -> int:
        return len(self.layers)
