"""Decoding with a compiled generation artifact: its ``prefill`` and ``decode`` entry points, the
loop count a run-time input, the KV cache held here between calls.

The cache is two numpy arrays ``[S, B, H, P, D]`` (keys, values) laid out as the manifest's
``generation.layout`` says; each call returns the new tokens' entries ``[S, B, H, T, D]``, which
are appended. Prefill runs one prompt row at a time (the artifact is built for batch 1); a batch
of prompts is served row by row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loopify.generate.engine import GenerateError


class TVMDecoder:
    """``prefill(batch, last=False)`` returns the logits of every prompt position [B, T, V] (what
    :mod:`loopify.fidelity` scores), else of the last one [B, V]."""

    def __init__(self, art, policy: str, loops):
        gen = art.gen
        if policy != gen["kv_policy"]:
            raise GenerateError(f"{art.path}: built for KV policy {gen['kv_policy']}, not {policy} (compile with "
                                f"--kv-policy {policy})")
        self.art, self.gen = art, gen
        counts = [l["default"] for l in art.loops] if loops is None else (
            [loops] * len(art.loops) if isinstance(loops, int) else list(loops))
        self.loops = counts
        self.k = self.v = None
        from loopify.runtime import KVPool

        self.pool = KVPool()  # the cache's buffers, reused from call to call
        self.state = None  # multi-resolution loops' decode state (None without)
        self.valid = None  # routed loops: each slot's validity per cached token (None without)
        self.depths: dict[str, list[np.ndarray]] = {k: [] for k in art.routed}

    def _call(self, entry: str, ids, mask, pos, types=None, pixels=None, last: bool = True):
        logits, self.k, self.v, *rest = self.art.step(entry, ids, mask, pos, self.k, self.v, self.loops, types,
                                                       pixels, last, state=self.state, valid=self.valid,
                                                       pool=self.pool)
        self.state = rest.pop(0) if self.state is not None else None
        if self.valid is not None:
            self.valid, depth = rest
            real = np.asarray(mask)[:, -depth.shape[-1]:] > 0
            for key, d in zip(self.art.routed, depth):
                self.depths[key].append(d[real])
        return logits[:, -1] if last else logits

    def depth_stats(self) -> dict[str, dict] | None:
        """Per routed loop: average recursion depth per token and its distribution (prompt and
        decoded tokens), as :meth:`loopify.generate.eager.EagerDecoder.depth_stats`."""
        if not self.depths:
            return None
        import torch

        from loopify.nn.routing import depth_stats

        counts = dict(zip([l["key"] for l in self.art.loops], self.loops))
        return {k: depth_stats(torch.from_numpy(np.concatenate(v)) if v else torch.zeros(0, dtype=torch.long),
                               int(counts.get(k, 0)))
                for k, v in self.depths.items()}

    def prefill(self, batch: dict, last: bool = True):
        import torch

        if batch["input_ids"].shape[0] != 1:
            raise GenerateError(f"{self.art.path}: this artifact serves one prompt at a time (batch 1)")
        extra = set(batch) - {"input_ids", "attention_mask", "position_ids", "pixel_values", "token_type_ids"}
        if extra:
            raise GenerateError(f"{self.art.path}: this artifact takes no {sorted(extra)[0]}")
        pixels = batch.get("pixel_values")
        if pixels is not None and "prefill_image" not in self.gen["entries"]:
            raise GenerateError(f"{self.art.path}: a text-only model takes no --image")
        self.k, self.v = self.art.empty_cache()
        self.state = self.art.empty_state()
        self.valid = self.art.empty_valid()
        self.depths = {k: [] for k in self.art.routed}
        entry = "prefill" if pixels is None else "prefill_image"
        return torch.from_numpy(self._call(entry, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                           batch.get("token_type_ids"), pixels, last).copy())

    def decode(self, ids, attention_mask, position_ids):
        import torch

        types = np.ones(np.asarray(ids).shape, dtype="int64")  # generated tokens: the suffix of prefix-LMs
        return torch.from_numpy(self._call("decode", ids, attention_mask, position_ids, types).copy())

    def kv_bytes(self) -> int:
        return 0 if self.k is None else int(self.k.nbytes + self.v.nbytes)


def open_artifact(path: Path, *, threads: int | None = None):
    from loopify import runtime
    from loopify.generate.model import Generator, _json, _text_config, _tokenizer

    art = runtime.load(path, num_threads=threads)
    if not isinstance(art, runtime.GenerationArtifact):
        raise GenerateError(f"{path}: not compiled for generation (compile with --max-context N)")
    assets = path / "assets"
    cfg = _json(assets, "config.json")
    gen = art.gen
    image = gen.get("image") or {}
    return Generator(path, "artifact", lambda policy, loops: TVMDecoder(art, policy, loops),
                     _tokenizer(assets) if assets.is_dir() else None, _text_config(cfg), assets if assets.is_dir() else None,
                     art.loops, policies=(gen["kv_policy"],), image_token_id=image.get("image_token_id"),
                     image_tokens=image.get("tokens"), pixel_shape=tuple(image["pixel_shape"]) if image else None,
                     model_type=image.get("model_type", ""), max_context=gen["max_context"])
