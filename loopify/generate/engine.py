"""The decoding loop: prefill a batch of prompts, then one token per step with a KV cache.

The loop is the same for every backend; a *decoder* runs the model:

* ``decoder.prefill(batch) -> logits [B, V]`` runs the prompt (left-padded: ``batch`` holds
  ``input_ids``, ``attention_mask``, ``position_ids`` and any image inputs) and keeps the cache;
* ``decoder.decode(ids [B, 1], attention_mask [B, S], position_ids [B, 1]) -> logits [B, V]``
  runs one new token per row against the cache;
* ``decoder.kv_bytes()`` is what its cache holds.

Greedy when ``temperature == 0``; otherwise softmax at that temperature, nucleus (``top_p``)
filtering, and a draw from a generator seeded with ``seed`` (the same seed gives the same tokens).
A row stops at an end-of-sequence token or when its text ends with a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loopify.errors import LoopifyError


class GenerateError(LoopifyError):
    """A generation request that cannot be served (prompt too long, bad option ...)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when a row stops."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerateError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise GenerateError("--temperature must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerateError("--top-p must be in (0, 1]")


def choose(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] next tokens."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / s.temperature, -1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


@dataclass
class Result:
    """What one request produced: tokens and text per row, and how fast."""

    tokens: list[list[int]]
    texts: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    ttft_s: float = 0.0           # prefill + the first token
    decode_s: float = 0.0         # every later token
    decoded: int = 0              # tokens decoded after the first (all rows)
    kv_bytes: int = 0
    finish: list[str] = field(default_factory=list)
    #: routed models: per loop, average recursion depth per token and its distribution
    depth: dict | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decoded / self.decode_s if self.decode_s > 0 else float("nan")

    def kv_bytes_per_token(self, batch: int) -> float:
        total = sum(self.prompt_tokens) + sum(len(t) for t in self.tokens)
        return self.kv_bytes / max(total, 1) if batch else float("nan")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "texts": self.texts, "prompt_tokens": self.prompt_tokens,
                "ttft_s": self.ttft_s, "decode_s": self.decode_s, "decoded": self.decoded,
                "decode_tokens_per_s": self.decode_tokens_per_s, "kv_bytes": self.kv_bytes, "finish": self.finish, "depth": self.depth}


def left_pad(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Rows of different lengths, padded on the left, with their attention mask and positions."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def run(decoder, prompts: list[list[int]], s: Sampling, *, pad: int = 0, extra: dict | None = None,
        detok=None, stream=None, max_context: int | None = None) -> Result:
    """Generate for ``prompts`` (token ids per row).

    Args:
        decoder: see the module docstring.
        extra: further prefill inputs (pixel values ...), batched like the prompts.
        detok: ids -> text (for stop strings, streaming and the result's texts).
        stream: ``stream(row, text)`` with each row's new text as it is decoded.
        max_context: refuse a prompt longer than this; stop a row that reaches it.
    """
    if not prompts or any(not p for p in prompts):
        raise GenerateError("an empty prompt: give at least one token")
    longest = max(len(p) for p in prompts)
    if max_context is not None and longest >= max_context:
        raise GenerateError(f"the prompt is {longest} tokens, past the maximum context of {max_context} "
                            "(prompt and generated tokens together)")
    gen = torch.Generator().manual_seed(s.seed) if s.temperature > 0 else None
    batch = {**left_pad(prompts, pad), **(extra or {})}
    res = Result([[] for _ in prompts], prompt_tokens=[len(p) for p in prompts], finish=[""] * len(prompts))
    shown = [""] * len(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = decoder.prefill(batch)
        nxt = choose(logits, s, gen)
        res.ttft_s = time.perf_counter() - t0
        mask, pos = batch["attention_mask"], batch["position_ids"][:, -1:]
        budget = s.max_new_tokens if max_context is None else min(s.max_new_tokens, max_context - longest)
        t1 = time.perf_counter()
        for step in range(budget):
            _accept(res, nxt, s, detok, stream, shown, step == budget - 1)
            if all(res.finish):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            logits = decoder.decode(nxt.unsqueeze(-1), mask, pos)
            nxt = choose(logits, s, gen)
            res.decoded += sum(1 for f in res.finish if not f)
        res.decode_s = time.perf_counter() - t1
    res.kv_bytes = decoder.kv_bytes()
    res.depth = decoder.depth_stats() if hasattr(decoder, "depth_stats") else None
    if detok is not None:
        res.texts = [_trim(detok(t), s.stop) for t in res.tokens]
    return res


def _accept(res: Result, nxt: torch.Tensor, s: Sampling, detok, stream, shown: list[str], last: bool) -> None:
    for i, tok in enumerate(nxt.tolist()):
        if res.finish[i]:
            continue
        if tok in s.eos:
            res.finish[i] = "eos"
            continue
        res.tokens[i].append(int(tok))
        if detok is not None and (stream is not None or s.stop):
            text = detok(res.tokens[i])
            if stream is not None and text.startswith(shown[i]) and len(text) > len(shown[i]):
                stream(i, text[len(shown[i]):])
                shown[i] = text
            if any(st in text for st in s.stop):
                res.finish[i] = "stop"
                continue
        if last:
            res.finish[i] = "length"


def _trim(text: str, stop: tuple[str, ...]) -> str:
    for st in stop:
        if st in text:
            text = text[:text.index(st)]
    return text
