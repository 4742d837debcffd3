"""find-spans on every zoo model, captured from its HF directory and from its export archive:
each stack (text decoder, vision tower) is found with the expected run; negatives are refused."""

from __future__ import annotations

import re

import pytest

from loopify.examples import zoo
from loopify.passes.find_spans import find_spans

POSITIVE = [n for n in zoo.names(include_large=False) if "negative" not in zoo.ZOO[n].tags]


@pytest.mark.parametrize("form", ["hf", "export"])
@pytest.mark.parametrize("name", POSITIVE)
def test_every_stack_is_one_full_span(name, form, captured):
    cap = captured(name, form)
    a = find_spans(cap)
    expected = zoo.ZOO[name].expected
    assert {st.path: len(st.layers) for st in a.stacks} == expected
    assert sorted((s.stack, s.start, s.length) for s in a.spans) == sorted((k, 0, v) for k, v in expected.items())
    assert a.refused == []
    for sp in a.spans:
        assert sp.params_per_layer > 0
        assert len(sp.similarity["block_influence"]) == sp.length


def test_hf_and_export_forms_agree(captured):
    a = find_spans(captured("llava-clip", "hf")).to_dict()
    b = find_spans(captured("llava-clip", "export")).to_dict()
    assert [(s["stack"], s["start"], s["length"], s["params_per_layer"]) for s in a["spans"]] == \
           [(s["stack"], s["start"], s["length"], s["params_per_layer"]) for s in b["spans"]]


def test_neg_mlp_width(captured):
    a = find_spans(captured("neg-mlp-width"))
    assert [(s.start, s.length) for s in a.spans] == [(0, 2), (3, 3)]
    reasons = {r["layer"]: r["reason"] for r in a.refused}
    assert set(reasons) == {2, 3} and "different parameter shapes" in reasons[2]


def test_neg_alt_attn(captured):
    # Full and sliding-window layers alternate: every neighbour pair gets a different mask
    # (single layers: groups=false; as pairs they are one run of groups, tests/passes/test_groups.py).
    a = find_spans(captured("neg-alt-attn"), groups=False)
    assert a.spans == []
    assert [r["layer"] for r in a.refused] == [1, 2, 3]
    # Said as a person would, from the masks' example values, not the graph's node names.
    reasons = {r["layer"]: r["reason"] for r in a.refused}
    assert re.search(r"layer 1 uses the sliding-window mask \(window \d+\), layer 0 the full causal mask$",
                     reasons[1]), reasons[1]
    assert re.search(r"layer 2 uses the full causal mask, layer 1 the sliding-window mask", reasons[2]), reasons[2]
