"""Decoding in PyTorch: the model's own code with loopify's loop cache.

Works for an original Hugging Face model (its layers keep their index slots) and for a converted
one in module form (each executed depth of a loop gets its slot by the KV policy).
"""

from __future__ import annotations

import inspect

import torch

from loopify.generate.cache import LoopCache


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out[0]


class EagerDecoder:
    """``prefill`` / ``decode`` / ``kv_bytes`` (see :mod:`loopify.generate.engine`) for a wrapped
    model (:class:`loopify.capture.hf.ExportWrapper`)."""

    def __init__(self, wrapper, policy: str = "per-depth", prepack: bool = False):
        self.wrapper = wrapper
        if prepack:  # oneDNN-packed linear weights (loopify.nn.prepack): faster, last-bit float differences
            from loopify.nn.prepack import prepack as _prepack

            _prepack(wrapper)
        self.policy = policy
        self.cache: LoopCache | None = None
        from loopify.nn import recursions

        self.routed = {r.key: r for r in recursions(wrapper).values() if r.router is not None}
        self.depths: dict[str, list[torch.Tensor]] = {k: [] for k in self.routed}
        params = inspect.signature(wrapper.model.forward).parameters
        self.takes = set(params)
        self.token_types = "token_type_ids" in self.takes

    def _run(self, inputs: dict) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if k in self.takes}
        with torch.no_grad():  # a decoder serves tokens: no autograd graph kept across steps
            out = self.wrapper.run_model(inputs, use_cache=True, cache=self.cache)
        if self.routed:  # the depth each real token took
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            real = mask[:, -ids.shape[1]:].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            for key, rec in self.routed.items():
                if rec.router.last_depth is not None and rec.router.last_depth.shape == real.shape:
                    self.depths[key].append(rec.router.last_depth[real])
        return _logits(out)[:, -1]

    def depth_stats(self) -> dict[str, dict] | None:
        """Per routed loop: average recursion depth per token and its distribution (prompt and
        decoded tokens), or None for a model without routers."""
        from loopify.nn.routing import depth_stats

        if not self.routed:
            return None
        # (a loop that ran over no text token, a vision tower's, has no depth per token to report)
        return {k: depth_stats(torch.cat(v), self.routed[k].loops) for k, v in self.depths.items() if v}

    def prefill(self, batch: dict) -> torch.Tensor:
        self.cache = LoopCache(self.policy)
        self.depths = {k: [] for k in self.routed}
        if self.token_types and "token_type_ids" not in batch:
            batch = {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}
        return self._run(batch)

    def decode(self, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.token_types:  # generated tokens are the suffix of prefix-LM models
            inputs["token_type_ids"] = torch.ones_like(ids)
        return self._run(inputs)

    def kv_bytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0
