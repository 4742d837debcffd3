"""Fidelity of a converted text encoder on real sentences: cosine between the original's and the
converted model's sentence embeddings (mean pooling over the attention mask, L2-normalised, as
sentence-transformers does for all-MiniLM-L6-v2)."""

from __future__ import annotations

from pathlib import Path

import torch

from loopify.errors import LoopifyError


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


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, D], [B, S] -> [B, D], L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(module: torch.nn.Module, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings [N, D] from a module whose first output is the last hidden state."""
    rows = []
    for kw in inputs:
        out = module(**kw)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        rows.append(mean_pooled(hidden, kw["attention_mask"]))
    return torch.cat(rows)


def sentence_cosines(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per-sentence cosine between two sets of normalised embeddings."""
    return (reference * candidate).sum(-1)
