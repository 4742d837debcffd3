"""The compiled step's grouped-query attention and the runtime's cache buffers.

* :func:`loopify.generate.attention.grouped_sdpa` must compute what transformers' ``sdpa``
  attention computes (it replaces it in every exported text step): the same outputs for grouped
  and ungrouped heads, bool and additive masks, a prompt after cached tokens, and rows whose
  every key is masked (zeros, as torch's SDPA gives). Tolerance: float32 sums over at most 64
  keys reordered (two products instead of one fused kernel), 2e-6 absolute on outputs of scale 1.
* :class:`loopify.runtime.KVPool` appends in two reused aligned buffers: the cache after each call
  equals ``np.concatenate`` of the one before and the new entries, alternates between the two
  buffers (no fresh allocation per token once grown), and a CPU artifact's input made from it
  shares its memory (no copy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopify.generate.attention import grouped, grouped_sdpa


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _inputs(h, hk, t, s, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, h, d, generator=g).transpose(1, 2)  # as the models make it: a transposed view
    k = torch.randn(1, hk, s, d, generator=g)
    v = torch.randn(1, hk, s, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("h,hk", [(6, 2), (4, 4)], ids=["grouped", "one-per-head"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_grouped_attention_computes_what_sdpa_computes(h, hk, kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t, s = 5, 9  # a prompt of 5 after 4 cached tokens
    q, k, v = _inputs(h, hk, t, s)
    causal = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    causal[1, :] = False  # a row that sees no key at all
    mask = causal[None, None]
    if kind == "additive":
        mask = torch.zeros(1, 1, t, s).masked_fill(~mask, float("-inf"))
    mod = _Attn(h // hk)
    want, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)
    got, _ = grouped_sdpa(mod, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (1, t, h, 16)
    assert torch.count_nonzero(got[0, 1]) == 0  # the dead row: zeros
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_what_the_grouped_form_does_not_cover_runs_sdpa_unchanged(monkeypatch):
    """No mask, soft-capping, a layer without key/value groups: transformers' own function."""
    import transformers.integrations.sdpa_attention as sa

    calls = []
    real = sa.sdpa_attention_forward
    monkeypatch.setattr(sa, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs(4, 2, 3, 3)
    grouped_sdpa(_Attn(2), q, k, v, None)
    grouped_sdpa(_Attn(2), q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), softcap=None, s_aux=torch.zeros(4))
    q2, k2, v2 = _inputs(2, 2, 3, 3)  # (a vision tower's attention: no key/value groups)
    grouped_sdpa(torch.nn.Module(), q2, k2, v2, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    assert len(calls) == 3


def test_the_switch_is_undone_and_touches_only_sdpa():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want = model(ids).logits
        with grouped(model):
            assert model.config._attn_implementation == "loopify_grouped_sdpa"
            got = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    eager = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "_attn_implementation": "eager"})).eval()
    with grouped(eager):
        assert eager.config._attn_implementation == "eager"


def test_the_cache_pool_appends_in_two_reused_aligned_buffers():
    from loopify.runtime import KVPool

    pool = KVPool()
    rng = np.random.default_rng(0)
    k = np.zeros((3, 1, 2, 0, 4), np.float32)
    homes = []
    for step in range(12):
        new = rng.standard_normal((3, 1, 2, 1 if step else 5, 4)).astype(np.float32)
        want = np.concatenate([k, new], axis=3)
        k = pool.append("k", k, new, 3)
        np.testing.assert_array_equal(k, want)
        assert k.flags.c_contiguous and k.ctypes.data % KVPool.ALIGN == 0
        homes.append(next(i for i, b in enumerate(pool._bufs["k"]) if b is not None and np.may_share_memory(k, b)))
    assert homes[4:] == [homes[4], 1 - homes[4]] * 4  # alternating between the two buffers
    sizes = {b.size for b in pool._bufs["k"]}
    assert max(sizes) < 3 * 2 * 4 * 40  # grown geometrically, not per token


def test_an_aligned_cache_reaches_a_cpu_artifact_without_a_copy():
    pytest.importorskip("tvm")
    import tvm

    from loopify.runtime import GenerationArtifact, KVPool

    art = GenerationArtifact.__new__(GenerationArtifact)
    art.device = tvm.runtime.cpu(0)
    k = KVPool().append("k", np.zeros((2, 1, 1, 0, 8), np.float32), np.ones((2, 1, 1, 3, 8), np.float32), 3)
    t = art.tensor(k)
    k[0, 0, 0, 0, 0] = 7.0  # the artifact's input is the cache's memory
    assert t.numpy()[0, 0, 0, 0, 0] == 7.0
    plain = np.ones((2, 3), np.float32)[:, :2]  # not contiguous: copied
    assert art.tensor(plain).numpy().shape == (2, 2)
