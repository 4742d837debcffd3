"""The SDPA mask guard (the PaliGemma finding, see :mod:`loopify.capture.hf`).

With SDPA and an all-ones padding mask, transformers skips building the attention mask in eager
mode but not under torch.export. :func:`mask_skip_changes_output` runs the eager model a second
time as if exporting; a difference means the shortcut is not faithful for this model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def masks_as_under_export():
    """Make transformers' mask builders behave as under torch.export (never skip a mask)."""
    from transformers import masking_utils

    saved = masking_utils.is_torchdynamo_exporting
    masking_utils.is_torchdynamo_exporting = lambda: True
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = saved


def mask_skip_changes_output(wrapper: torch.nn.Module, inputs: dict) -> float:
    """Max abs change of the outputs when the eager SDPA mask-skip shortcut is disabled."""
    try:
        with torch.no_grad():
            a = wrapper(**inputs)
            with masks_as_under_export():
                b = wrapper(**inputs)
    except Exception:
        return 0.0
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
