"""Packed (variable-length) vision encoders without data-dependent code in the captured program.

Encoders that pack several images (or windows of one image) into one sequence -- Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, GLM-4V ... -- derive their layout from ``image_grid_thw`` inside the
forward: patch positions, window permutations and the segment bounds ``cu_seqlens`` are made
with ``.tolist()``, ``nonzero`` and Python loops, and the attention (any implementation but flash)
splits the sequence by ``cu_seqlens.tolist()``. torch.export cannot trace any of it
(GuardOnDataDependentSymNode: the sizes are values of a tensor). Two general changes make the
program free of it:

1. **The layout is computed outside the program** with transformers' own precompute helpers
   (``transformers.exporters.utils.precompute_export_inputs``, dispatched on ``grid_thw``, the
   functions the encoder itself calls), and passed to the model as precomputed keyword inputs
   (``image_cu_seqlens``, ``image_position_ids``, ``image_window_index`` ...; the encoder pops
   them instead of computing them). Tensors become inputs of the program, the two maximum
   segment lengths (Python ints) constants, like the input shapes.
2. **The segmented attention becomes one masked attention.** transformers sends the whole packed
   sequence with ``cu_seq_lens_q/k`` to any attention implementation whose name says flash; the
   implementation registered here (:data:`VARLEN_ATTENTION`) builds the block-diagonal mask from
   the segment bounds with comparisons and a sum (no data-dependent shapes) and runs SDPA with it:
   position i attends to j iff both lie in the same segment, which is what attention per segment
   computes (masked scores get probability 0). It is set on the encoder's config only.

Both are checked: the model with the precomputed inputs must reproduce the plain eager forward
(:func:`precompute_layout` raises otherwise).
"""

from __future__ import annotations

import inspect

import torch

#: The attention implementation for packed encoders (the name must say "flash" for transformers
#: to route the packed sequence with its segment bounds to it, see the module doc).
VARLEN_ATTENTION = "loopify_flash_varlen_sdpa"
#: Layout inputs with the encoder modality whose precompute helpers they drive.
_GRID_INPUTS = {"image_grid_thw": "image", "video_grid_thw": "video"}
_registered = False
#: The precomputed layout and masked attention must reproduce the plain forward to this relative
#: error (they change only the order of float32 sums; measured 0 on Qwen2.5-VL).
LAYOUT_RTOL = 1e-5


def varlen_sdpa(module, query, key, value, attention_mask=None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kw):
    """SDPA over a packed sequence with a block-diagonal mask from the segment bounds."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for k in ("max_length_q", "max_length_k"):
        kw.pop(k, None)
    if cu_seq_lens_q is not None:
        mask = same_segment(cu_seq_lens_q, cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
                            query.shape[-2], key.shape[-2])[None, None]
        attention_mask = mask if attention_mask is None else attention_mask & mask
    return sdpa_attention_forward(module, query, key, value, attention_mask=attention_mask, **kw)


def same_segment(cu_q: torch.Tensor, cu_k: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """(n_q, n_k) bool: query i and key j lie in the same segment of the packed sequence
    (segment of a position = how many segment ends lie at or before it)."""
    seg_q = (torch.arange(n_q, device=cu_q.device)[:, None] >= cu_q[None, 1:]).sum(-1)
    seg_k = (torch.arange(n_k, device=cu_k.device)[:, None] >= cu_k[None, 1:]).sum(-1)
    return seg_q[:, None] == seg_k[None, :]


def register() -> None:
    """Register :data:`VARLEN_ATTENTION` with transformers (once)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa)
        _registered = True


def packed_encoder(model, modality: str):
    """The model's ``modality`` encoder when it packs its inputs by ``cu_seqlens``, else None."""
    get = getattr(model, "get_encoder", None)
    enc = get(modality=modality) if get is not None else None
    if enc is None or enc is model or "grid_thw" not in _params(enc.forward):
        return None
    if not any("cu_seqlens" in _params(m.forward) for m in enc.modules() if m is not enc):
        return None
    return enc


def _params(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def takes_any_keyword(model) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def precompute_layout(model, inputs: dict, verify: bool = True) -> dict:
    """The precomputed layout inputs (prefixed by modality: ``image_cu_seqlens`` ...) of the
    packed encoders fed by ``inputs``' grids, and :data:`VARLEN_ATTENTION` set on those encoders.
    Tensors go in as inputs, ints (maximum segment lengths) as constants. Empty when the model
    has no packed encoder. ``verify``: raise ``ValueError`` when the model with them does not
    reproduce its plain forward (the encoders' attention is then left as it was); off for a
    model rebuilt before its weights are loaded (verified when it was captured)."""
    from transformers.exporters.utils import precompute_export_inputs

    found = [(f"{modality}_", enc, inputs[name]) for name, modality in _GRID_INPUTS.items()
             if isinstance(inputs.get(name), torch.Tensor) and (enc := packed_encoder(model, modality)) is not None]
    if not takes_any_keyword(model):
        found = []
    rope = rope_positions(model, inputs)
    if not found and rope is None:
        return {}
    register()
    if verify:
        with torch.no_grad():
            want = _first_tensor(model(**inputs))
    before = [enc.config._attn_implementation for _, enc, _ in found]
    out: dict = {}
    for prefix, enc, grid in found:
        enc.config._attn_implementation = VARLEN_ATTENTION
        pre = {"grid_thw": grid}
        with torch.no_grad():  # the encoder's own helpers (maximum lengths as its attention reads them)
            precompute_export_inputs(enc, pre)
        out.update({prefix + k: v for k, v in pre.items() if k != "grid_thw" and v is not None})
    if rope is not None:
        out["position_ids"] = rope
    if not verify:
        return out
    with torch.no_grad():
        got = _first_tensor(model(**inputs, **out))
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not err <= LAYOUT_RTOL:
        for (_, enc, _), impl in zip(found, before):
            enc.config._attn_implementation = impl
        raise ValueError(f"the precomputed image layout changes the model's outputs by {err:.2g} relative")
    return out


def rope_positions(model, inputs: dict) -> torch.Tensor | None:
    """Multimodal rotary positions (Qwen-VL's 3-D (t, h, w) positions) made by the model's own
    ``get_rope_index`` from the token ids, modality types and grids, when the forward takes
    ``position_ids`` and would otherwise make them itself, from the values of its inputs."""
    fn = next((getattr(m, "get_rope_index") for m in (model, getattr(model, "model", None))
               if hasattr(m, "get_rope_index")), None)
    if fn is None or "position_ids" not in _params(model.forward) or "position_ids" in inputs:
        return None
    params = _params(fn)
    if "mm_token_type_ids" in params and "mm_token_type_ids" not in inputs:
        return None  # the model makes plain positions then, in the program
    with torch.no_grad():
        return fn(**{k: v for k, v in inputs.items() if k in params})[0]


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    return next(v for v in values if isinstance(v, torch.Tensor))
