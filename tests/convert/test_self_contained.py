"""A converted model stands on its own: deleting (or changing) the model it came from changes
nothing for load, train, compile and bench; its files are checked against its manifest; older
files are refused with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from loopify import convert as conv
from loopify.cli import cli
from loopify.converted import Bundle


@pytest.fixture()
def orphan(written, tmp_path):
    """The zoo Llama converted from a copy of it, then the copy deleted."""
    src = tmp_path / "llama-src"
    shutil.copytree(written["llama"]["hf"], src)
    out = tmp_path / "llama.pt2"
    conv.convert(src, conv.ConvertConfig(rank=4), out)
    shutil.rmtree(src)
    return out


def test_loads_with_its_source_deleted(orphan, written):
    module, inputs, manifest = conv.load_converted(orphan)
    assert not __import__("pathlib").Path(manifest["source"]["path"]).exists()
    saved = torch.export.load(orphan).module()
    with torch.no_grad():
        torch.testing.assert_close(module(**inputs.kwargs)[0], saved(**inputs.kwargs)[0], rtol=1e-5, atol=1e-5)
    # any other length and batch: the architecture is in the files, not the source
    m2, inp2, _ = conv.load_converted(orphan, seq_len=11, batch=2)
    assert tuple(inp2.kwargs["input_ids"].shape) == (2, 11)
    with torch.no_grad():
        assert m2(**inp2.kwargs)[0].shape[:2] == (2, 11)


def test_trains_with_its_source_deleted(orphan, tmp_path, written):
    from loopify import texts, train as tr

    data = tmp_path / "d.txt"
    data.write_text("\n".join(texts.sentences()[:8]) + "\n")
    base = dict(converted=str(orphan), data=str(data), steps=1, batch=1, tokenizer="bytes", checkpoint_every=0)
    with pytest.raises(tr.TrainError, match="is gone; give --teacher PATH"):
        tr.train(tr.TrainConfig(out=str(tmp_path / "a.pt2"), **base))
    r = tr.train(tr.TrainConfig(out=str(tmp_path / "b.pt2"), objective="ce", **base))
    assert r.report["objective"] == "ce" and r.report["teacher"] is None
    r = tr.train(tr.TrainConfig(out=str(tmp_path / "c.pt2"), teacher=str(written["llama"]["hf"]), **base))
    assert r.report["objective"] == "kl" and r.report["after"]["depths"]["2"]["kl"] >= 0
    conv.load_converted(tmp_path / "c.pt2")  # the trained output loads too


def test_compiles_and_benches_with_its_source_deleted(orphan, tmp_path, written):
    pytest.importorskip("tvm")
    r = CliRunner().invoke(cli, ["compile", str(orphan), "-o", str(tmp_path / "x86")])
    assert r.exit_code == 0 and "NOT OK" not in r.output, r.output
    r = CliRunner().invoke(cli, ["bench", str(written["llama"]["hf"]), str(orphan), "--backends", "eager",
                                 "--rounds", "1", "--per-round", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.output


def test_files_are_checked_against_the_manifest(orphan):
    b = Bundle.of(orphan)
    with open(b.weights, "r+b") as f:  # flip one byte of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(conv.LoopifyError, match="llama.safetensors does not match the sha256"):
        conv.load_converted(orphan)


def test_manifest_entries_outside_the_bundle_are_refused(orphan):
    b = Bundle.of(orphan)
    m = json.loads(b.manifest.read_text())
    m["files"]["/etc/hostname"] = "0" * 64
    b.manifest.write_text(json.dumps(m))
    with pytest.raises(conv.LoopifyError, match="is not inside the model's directory"):
        conv.load_converted(orphan)


def test_older_files_are_refused_in_one_line(orphan):
    b = Bundle.of(orphan)
    m = json.loads(b.manifest.read_text())
    m["version"] = 1
    b.manifest.write_text(json.dumps(m))
    r = CliRunner().invoke(cli, ["run", str(orphan)])
    assert r.exit_code == 2
    assert "converted-model format 1" in r.output and "convert it again" in r.output


def test_ties_survive_the_round_trip(written, tmp_path):
    """nanoGPT ties its head to its embedding: one parameter object after loading, stored once."""
    out = tmp_path / "n.pt2"
    conv.convert(written["nanogpt"]["hf"], conv.ConvertConfig(), out)
    module, _, manifest = conv.load_converted(out)
    assert manifest["ties"] == {"model.lm_head.weight": "model.wte.weight"}
    assert module.model.lm_head.weight is module.model.wte.weight


def test_bench_runs_the_original_at_the_length_the_model_was_converted_at(written, tmp_path):
    """The real MiniLM converted with --seq-len 40 (a sentence from its tokenizer records its
    length as seq_len, not text_len): bench runs the original at 40 tokens too. It ran it at the
    default length and stopped with an internal ShapeMismatch."""
    import json as _json

    out = tmp_path / "m40.pt2"
    src = written["minilm"]["hf"]
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--seq-len", "40"])
    assert r.exit_code == 0, r.output
    assert "text_len" not in _json.loads(out.with_suffix(".json").read_text())["source"]
    r = CliRunner().invoke(cli, ["bench", str(src), str(out), "--backends", "eager", "--loops", "1",
                                 "--rounds", "1", "--per-round", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0 and "internal error" not in r.output, r.output
    rows = _json.loads((tmp_path / "b.json").read_text())["results"]
    assert len(rows) == 2 and all(x["units_per_call"] == 40 for x in rows)
