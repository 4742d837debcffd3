"""``loopify eval`` on real model classes: a lossless conversion measures as the original (ppl
ratio 1, agreement 1; cosine 1, Spearman 1), a lossy one less; bad --data / --loops refused in
one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from loopify import convert as conv
from loopify import texts
from loopify.cli import cli
from loopify.fidelity.report import evaluate


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory):
    from loopify.examples import zoo

    w = zoo.write_zoo(tmp_path_factory.mktemp("zoo"), ["llama", "minilm"])
    return {n: v["hf"] for n, v in w.items()}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    texts.write_corpus(d)
    return d / "heldout.txt"


@pytest.fixture(scope="module")
def llamas(zoo_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    conv.convert(zoo_dirs["llama"], conv.ConvertConfig(rank="full"), d / "full.pt2")
    conv.convert(zoo_dirs["llama"], conv.ConvertConfig(), d / "lossy.pt2")
    return d / "full.pt2", d / "lossy.pt2"


def test_lossless_conversion_measures_as_the_original(llamas, heldout):
    """Rank full reproduces every layer (W_shared + B A = W_l): the only difference is float32
    re-association in the merged matmuls (~1e-6 relative on the logits, see verify), so perplexity
    matches to 1e-4 relative and every next-token choice is the original's."""
    rep = evaluate(llamas[0], heldout, tokenizer_choice="bytes", seq_len=48, limit=6)
    assert rep["kind"] == "converted" and rep["task"] == "causal" and rep["reference"]
    full = next(r for r in rep["results"] if r["loops"] == 2)
    assert full["perplexity"] / rep["original"]["perplexity"] == pytest.approx(1.0, rel=1e-4)
    assert full["top1_agreement"] == 1.0 and full["top5_overlap"] == 1.0 and full["kl"] < 1e-8
    assert full["accuracy"] == rep["original"]["accuracy"]
    # one loop of two runs half the depth: a different model, and the numbers say so
    half = next(r for r in rep["results"] if r["loops"] == 1)
    assert half["top1_agreement"] < 1.0 and half["kl"] > 1e-4
    assert [r["loops"] for r in rep["results"]] == [1, 2] and rep["data"]["windows"] == 6
    # convert's own verify (example inputs) reports the same agreement through loopify.fidelity
    v = json.loads(llamas[0].with_suffix(".json").read_text())["verify"]
    assert v["top1_agreement"] == 1.0 and v["top5_overlap"] == 1.0
    lossy = json.loads(llamas[1].with_suffix(".json").read_text())["verify"]
    assert lossy["top1_agreement"] < 1.0


def test_lossy_conversion_and_the_cli(llamas, heldout, tmp_path):
    out = tmp_path / "rep.json"
    r = CliRunner().invoke(cli, ["eval", str(llamas[1]), "--data", str(heldout), "--tokenizer", "bytes",
                                 "--loops", "2", "--seq-len", "32", "--limit", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    (row,) = rep["results"]
    assert row["loops"] == 2 and row["top1_agreement"] < 1.0 and row["kl"] > 0
    assert "top5 overlap" in r.output and "original" in r.output


def test_an_original_alone_reports_its_perplexity(zoo_dirs, heldout):
    rep = evaluate(zoo_dirs["llama"], heldout, tokenizer_choice="bytes", seq_len=32, limit=2)
    (row,) = rep["results"]
    assert rep["reference"] is None and row["loops"] is None and row["perplexity"] > 1
    assert "top1_agreement" not in row


def test_encoder_lossless_and_default_plan(zoo_dirs, heldout, tmp_path):
    """MiniLM (real weights): rank full gives cosine 1 and the same similarity ranking (float32
    re-association: 1e-5); the default plan (3 x 2, no LoRA) gives less on both."""
    conv.convert(zoo_dirs["minilm"], conv.ConvertConfig(rank="full"), tmp_path / "full.pt2")
    conv.convert(zoo_dirs["minilm"], conv.ConvertConfig(), tmp_path / "plan.pt2")
    full = evaluate(tmp_path / "full.pt2", heldout, loops=[2], limit=12)
    (row,) = full["results"]
    assert full["task"] == "encoder"
    assert row["cosine"] == pytest.approx(1.0, abs=1e-5) and row["spearman"] == pytest.approx(1.0, abs=1e-5)
    plan = evaluate(tmp_path / "plan.pt2", heldout, limit=12)
    assert [r["loops"] for r in plan["results"]] == [1, 2]
    assert all(r["cosine"] < 0.99 and r["spearman"] < 0.99 for r in plan["results"])


@pytest.mark.parametrize("case, expected", [
    ("missing", "missing.txt: data file not found"),
    ("empty", "empty.txt: no texts in the data file"),
    ("binary", "binary.txt: data file is not UTF-8 text (byte 0)"),
    ("images", "images.jsonl: image records are not evaluated yet; give text records only"),
])
def test_bad_data_is_refused_in_one_line(llamas, tmp_path, case, expected):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "cat.png").write_bytes(b"png")
    (tmp_path / "images.jsonl").write_text('{"text": "a cat", "image": "cat.png"}\n')
    name = f"{case}.jsonl" if case == "images" else f"{case}.txt"
    r = CliRunner().invoke(cli, ["eval", str(llamas[1]), "--data", str(tmp_path / name),
                                 "--tokenizer", "bytes"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].endswith(expected), r.output


@pytest.mark.parametrize("which, loops, expected", [
    ("converted", "3", "--loops 3: outside the model's range [1, 2]"),
    ("original", "1", "not a converted model; it has no loops to set (drop --loops)"),
])
def test_bad_loops_are_refused_in_one_line(llamas, zoo_dirs, heldout, which, loops, expected):
    model = llamas[1] if which == "converted" else zoo_dirs["llama"]
    r = CliRunner().invoke(cli, ["eval", str(model), "--data", str(heldout), "--tokenizer", "bytes", "--loops", loops])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("loopify: error: ")
    assert r.output.strip().endswith(expected), r.output


def test_a_model_without_a_tokenizer_asks_for_one(llamas, heldout):
    r = CliRunner().invoke(cli, ["eval", str(llamas[1]), "--data", str(heldout)])
    assert r.exit_code == 2 and "has no tokenizer of its own; pass --tokenizer DIR, or --tokenizer bytes" in r.output
