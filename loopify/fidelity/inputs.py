"""Text as model inputs for fidelity: tokenizers, token windows for causal LMs, sentences at a
captured program's static shapes for encoders."""

from __future__ import annotations

from pathlib import Path

import torch

from loopify.errors import LoopifyError
from loopify.fidelity.metrics import mean_pooled


def tokenizer_for(model_dir: str | Path):
    """The model's own tokenizer (offline)."""
    from loopify.capture.inputs import load_tokenizer

    try:
        return load_tokenizer(Path(model_dir))
    except Exception as e:  # noqa: BLE001
        raise LoopifyError(f"{model_dir}: cannot load a tokenizer ({type(e).__name__}); "
                           "sentence fidelity needs a model directory with tokenizer files") from None


def batch_inputs(tokenizer, sentences: list[str], template: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Tokenise each sentence to the captured program's input shapes (its sequence length is
    static): padded or truncated to that length, one call per sentence."""
    seq = template["input_ids"].shape[-1]
    out = []
    for s in sentences:
        enc = tokenizer(s, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        out.append({k: enc[k].to(template[k].dtype) if k in enc else torch.zeros_like(template[k])
                    for k in template})
    return out


@torch.no_grad()
def embed(module: torch.nn.Module, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings [N, D] from a module whose first output is the last hidden state."""
    rows = []
    for kw in inputs:
        out = module(**kw)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        rows.append(mean_pooled(hidden, kw["attention_mask"]))
    return torch.cat(rows)


def windows(ids: list[int], length: int, limit: int | None) -> list[list[int]]:
    """The token stream cut into consecutive windows of at most ``length`` tokens (a last window
    of fewer than 2 tokens predicts nothing and is dropped), then at most ``limit`` of them,
    evenly spaced over the stream so every part of the file is sampled."""
    out = [ids[i:i + length] for i in range(0, len(ids), length)]
    return evenly([w for w in out if len(w) >= 2], limit)


def evenly(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced (deterministic)."""
    if limit is None or len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
