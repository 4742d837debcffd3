"""Grouped-query attention as the compiled decode step computes it.

Transformers' ``sdpa`` attention, exported, repeats each key/value head for its query heads
(``repeat_kv``: expand + reshape) and torch's SDPA decomposition scales a transposed copy of the
keys; both are copies of the whole cache, made per layer per step. In the SmolLM2 artifact at a
512-token context they took 9 of a decode step's 34 ms (the transposed scaled keys 5.4 ms, the
repeats 3.6 ms; 1 thread). Here the query heads of a group are stacked as rows instead,
``q [B, Hkv, G*T, D]`` against ``k [B, Hkv, S, D]`` as it is cached: the scores are one matmul
per key/value head reading the keys in place (the compiler's ``NT`` matmul: both operands
contiguous along D), the scale is applied to the query, and nothing of the cache is copied.

:func:`grouped` switches a model's decoder attention to it for the length of an export; anything
the rewrite does not cover (no mask, dropout, soft-capping, position bias, attention sinks,
attention weights requested, a layer without key/value groups such as a vision tower) runs
transformers' own ``sdpa`` function unchanged.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "loopify_grouped_sdpa"
_registered = False


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 is_causal=None, position_bias=None, **kwargs):
    """Transformers' attention-function signature: ``query [B, H, T, D]``, ``key`` / ``value``
    ``[B, Hkv, S, D]``, a 4-D mask (bool: attend; float: added); returns ``([B, T, H, D], None)``.
    Rows whose every key is masked give zeros, as torch's SDPA does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", None)
    if (groups is None or attention_mask is None or dropout or position_bias is not None
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or kwargs.get("output_attentions") or query.shape[-1] != value.shape[-1]
            or query.shape[1] != key.shape[1] * groups):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    b, h, t, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    # 3-D products (``bmm``): torch's 4-D ``matmul`` decomposes through expand + reshape, which
    # hid the keys' transpose from the compiler's NT matmul (a transposed copy again); ``view``
    # through the group axis (a direct ``reshape`` made export guard on T's strides)
    q = (query * scale).contiguous().view(b * hk, groups * t, d)
    scores = torch.bmm(q, key.reshape(b * hk, s, d).transpose(1, 2)).view(b, hk, groups, t, s).view(b, h, t, s)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
        dead = attention_mask.sum(-1, keepdim=True) == 0
    else:
        scores = scores + attention_mask
        dead = attention_mask.amax(-1, keepdim=True) == float("-inf")
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(dead, torch.zeros((), dtype=probs.dtype), probs)
    out = torch.bmm(probs.view(b * hk, groups * t, s), value.reshape(b * hk, s, d))
    out = out.view(b, hk, groups, t, d).view(b, h, t, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :data:`NAME` with transformers' attention and mask functions (once)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, grouped_sdpa)
        # the masks ``sdpa`` gets (an implementation without a mask function gets no mask at all)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


@contextlib.contextmanager
def grouped(model):
    """Within the block, every config of ``model`` (and its sub-models) that selects ``sdpa``
    selects :func:`grouped_sdpa` instead; restored on exit."""
    register()
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", None) == "sdpa"}
    for c in configs.values():
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = "sdpa"
