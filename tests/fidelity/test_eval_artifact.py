"""``loopify eval`` of a generation artifact: TVM's prefill logits of every position give the
same fidelity as the converted model they were compiled from, against the same original (found
through the artifact's record of its converted model and that model's record of its source)."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from loopify import convert as conv  # noqa: E402
from loopify import texts  # noqa: E402
from loopify.fidelity.report import evaluate  # noqa: E402


@pytest.mark.slow  # a TVM build: about 1 min of CPU, 7 min of wall time on the shared 2 cores
def test_artifact_measures_as_its_converted_model(tmp_path):
    from loopify.compile import compile_model
    from loopify.examples import zoo

    src = zoo.write_zoo(tmp_path / "zoo", ["llama"])["llama"]["hf"]
    pt2 = tmp_path / "llama.pt2"
    conv.convert(src, conv.ConvertConfig(rank=4), pt2)
    compile_model(pt2, tmp_path / "llama.gen", max_context=40)
    texts.write_corpus(tmp_path / "corpus")
    opts = dict(data=tmp_path / "corpus" / "heldout.txt", tokenizer_choice="bytes", limit=3)
    art = evaluate(tmp_path / "llama.gen", **opts)
    eager = evaluate(pt2, **opts, seq_len=40)   # the artifact's default window: its maximum context
    assert art["kind"] == "artifact" and art["reference"] == eager["reference"] == str(src)
    assert art["data"]["window_tokens"] == 40
    for a, e in zip(art["results"], eager["results"]):
        # TVM reorders float32 reductions (prefill logits ~1e-7 relative, see generate's tests):
        # perplexity and KL agree far inside 1e-4; the argmax choices are the same tokens
        assert a["loops"] == e["loops"]
        assert a["perplexity"] == pytest.approx(e["perplexity"], rel=1e-4)
        assert a["kl"] == pytest.approx(e["kl"], rel=1e-3, abs=1e-7)
        assert a["top1_agreement"] == e["top1_agreement"] and a["top5_overlap"] == e["top5_overlap"]
    assert art["original"]["perplexity"] == pytest.approx(eager["original"]["perplexity"], rel=1e-12)
