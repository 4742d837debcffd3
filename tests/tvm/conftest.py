"""Fixtures shared by the TVM tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def llama_pt2(written, tmp_path_factory):
    """The zoo Llama (4 layers, hidden 64) converted with the default plan: 2 blocks x 2 loops."""
    from loopify import convert as conv

    pt2 = tmp_path_factory.mktemp("llama-conv") / "llama.pt2"
    conv.convert(written["llama"]["hf"], conv.ConvertConfig(), pt2)
    return pt2
