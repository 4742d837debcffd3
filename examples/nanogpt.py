"""A nanoGPT-style GPT in one readable file (after Karpathy's nanoGPT).

token + position embedding -> N Blocks (LayerNorm, causal self-attention, LayerNorm, MLP, both
residual) -> final LayerNorm -> lm head (tied to the token embedding).

Shapes: B = batch, T = sequence length, C = n_embd, H = n_head, D = C // H, V = vocab_size.

Two optional per-layer knobs exist only so that the example zoo can build *negative* models for
span detection (layers that look alike but are not interchangeable):
- ``mlp_widths``: a list with one MLP hidden width per layer (default 4 * n_embd everywhere);
- ``attn_windows``: a list with one causal attention window per layer (0 = unlimited).

It decodes with a KV cache the way Hugging Face models do: ``forward(..., cache=C, use_cache=True)``
with any object that has ``update(keys, values, layer_idx) -> (all keys, all values)`` and
``get_seq_length()`` (a transformers Cache, or loopify's loop cache).

The model is not a transformers model. ``loopify.capture.hf`` knows it by the architecture name
"NanoGPT" (see ``loopify.capture.hf.register_architecture``): a directory with a config.json
``{"architectures": ["NanoGPT"], ...}`` and a model.safetensors loads like any HF directory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 64  # longest sequence (size of the position table)
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 64
    bias: bool = True
    layer_norm_eps: float = 1e-5
    mlp_widths: list[int] | None = None  # per-layer MLP hidden width; None = 4 * n_embd each
    attn_windows: list[int] | None = None  # per-layer causal window; None / 0 = full causal
    architectures: list[str] = field(default_factory=lambda: ["NanoGPT"])
    model_type: str = "nanogpt"

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def mlp_width(self, layer: int) -> int:
        return self.mlp_widths[layer] if self.mlp_widths else 4 * self.n_embd

    def attn_window(self, layer: int) -> int:
        return self.attn_windows[layer] if self.attn_windows else 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, window: int = 0, layer_idx: int = 0):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.layer_idx = layer_idx  # the cache slot of this layer
        self.window = window  # 0: attend to every earlier token; w > 0: only the last w tokens
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, C = x.shape                                    # x: (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)             # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:                                # past keys and values: (B, H, P + T, D)
            k, v = cache.update(k, v, self.layer_idx)
        S = k.shape[2]                                       # keys: the P cached ones, then these T
        i = torch.arange(T, device=x.device)                 # query positions (after the P cached)
        j = torch.arange(S, device=x.device)
        if S != T:
            i = i + (S - T)
        allowed = j[None, :] <= i[:, None]                   # (T, S) causal: key j <= query i
        if self.window > 0:
            allowed = allowed & (i[:, None] - j[None, :] < self.window)  # (T, S) local window
        mask = allowed[None, None] & pad_mask[:, None, None, :]          # (B, 1, T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)      # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)     # (B, T, C)
        return self.c_proj(y)                                # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, width: int):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)    # (B, T, C) -> (B, T, W)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)  # (B, T, W) -> (B, T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, cfg.attn_window(layer), layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg, cfg.mlp_width(layer))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pad_mask, cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))             # (B, T, C)
        return x


class NanoGPT(nn.Module):
    """forward(input_ids (B, T) int64, attention_mask (B, P+T) 0/1, position_ids (B, T), cache) ->
    logits (B, T, V); P tokens are in the cache (0 without one)."""

    def __init__(self, config: GPTConfig | dict):
        super().__init__()
        cfg = config if isinstance(config, GPTConfig) else GPTConfig.from_dict(config)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding (V, C)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position embedding (T_max, C)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        cache = cache if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones((B, past + T), dtype=torch.long, device=input_ids.device)
        pad_mask = attention_mask.bool()                       # (B, P + T)
        if position_ids is None:
            pos = torch.arange(T, device=input_ids.device)     # (T,)
            if past:
                pos = pos + past
            pos = pos[None]                                    # (1, T)
        else:
            pos = position_ids                                 # (B, T)
        x = self.wte(input_ids) + self.wpe(pos)                # (B, T, C)
        for block in self.h:
            x = block(x, pad_mask, cache)                      # (B, T, C)
        x = self.ln_f(x)                                       # (B, T, C)
        return self.lm_head(x)                                 # (B, T, V)


def example_inputs(config: dict, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Example keyword inputs for ``NanoGPT``: random token ids (seed 0) and an all-ones mask."""
    cfg = GPTConfig.from_dict(config)
    T = min(seq_len or 24, cfg.block_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
