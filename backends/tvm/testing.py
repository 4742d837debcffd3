"""Small models and hand-made stage splits for tests and benchmarks of the TVM backend.

Nothing here is needed to compile or run an artifact; tests and ``tests/bench`` scripts use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .staging import Stage


def tiny_llama(*, vocab=256, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2,
               seed=0, attn="eager"):
    """A random LlamaForCausalLM (eval mode, fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=512, use_cache=False)
    cfg._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


class LogitsOnly(torch.nn.Module):
    """Wraps an HF causal LM so that export sees plain tensors: (input_ids, mask) -> (logits,)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return (self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,)


def llama_inputs(model, batch=1, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    return ids, torch.ones(batch, seq, dtype=torch.int64)


def export(module, args) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, tuple(args), strict=False)


# --- the embed / loop(layer) / head split of a Llama --------------------------------------------

class _Embed(torch.nn.Module):
    """ids, mask -> hidden [B,S,H], cos, sin [B,S,D], additive mask [B,1,S,S]."""

    def __init__(self, llama):
        super().__init__()
        self.embed_tokens = llama.model.embed_tokens
        self.rotary_emb = llama.model.rotary_emb

    def forward(self, input_ids, attention_mask):
        h = self.embed_tokens(input_ids)
        s = input_ids.shape[1]
        pos = torch.arange(s).unsqueeze(0)
        cos, sin = self.rotary_emb(h, pos)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        return h, cos, sin, mask


class _Body(torch.nn.Module):
    """(step, hidden, cos, sin, mask) -> (layer(hidden), cos, sin, mask): ONE shared layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, step, h, cos, sin, mask):
        out = self.layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        if isinstance(out, tuple):
            out = out[0]
        return out, cos, sin, mask


class _Head(torch.nn.Module):
    def __init__(self, llama):
        super().__init__()
        self.norm = llama.model.norm
        self.lm_head = llama.lm_head

    def forward(self, h, cos, sin, mask):
        return (self.lm_head(self.norm(h)),)


@dataclass
class LlamaSplit:
    model: torch.nn.Module
    stages: list[Stage]
    inputs: tuple
    reference: Callable  # (loops: int, *inputs) -> tuple of tensors


def llama_loop_split(model=None, *, seq=8, max_loops=5, min_loops=0, **kw) -> LlamaSplit:
    """Stage 0 = embeddings (+ rotary cos/sin and the additive mask in the carry), stage 1 =
    layer 0 of ``model`` as a loop body (the same layer object every iteration), stage 2 =
    norm + lm_head. ``reference(k, ids, mask)`` runs the same thing in PyTorch."""
    model = model if model is not None else tiny_llama(**kw)
    embed, body, head = _Embed(model), _Body(model.model.layers[0]), _Head(model)
    ids, mask = llama_inputs(model, seq=seq)
    with torch.no_grad():
        carry = embed(ids, mask)
    step = torch.tensor(0, dtype=torch.int64)
    stages = [
        Stage("straight", export(embed, (ids, mask)), name="embed"),
        Stage("loop", export(body, (step, *carry)), min_loops=min_loops, max_loops=max_loops,
              default_loops=max_loops, name="layers"),
        Stage("straight", export(head, carry), name="head"),
    ]

    def reference(k, input_ids, attention_mask):
        with torch.no_grad():
            c = embed(input_ids, attention_mask)
            for i in range(k):
                c = body(torch.tensor(i), *c)
            return head(*c)

    return LlamaSplit(model, stages, (ids, mask), reference)


def tiny_bert(*, vocab=256, hidden=64, layers=2, heads=4, intermediate=128, seed=0):
    """A random MiniLM-shaped BertModel (eval) wrapped to return (last_hidden_state, pooler)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate,
                     max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = BertModel(cfg).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            o = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return o.last_hidden_state, o.pooler_output

    return Wrapped().eval()
