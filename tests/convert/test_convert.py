"""convert end to end: every zoo model, verify, atomic save, manifest, load back, CLI.

Lossless plans must reproduce the original within 1e-5 relative (see tests/test_passes.py for
why that tolerance).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loopify import convert as conv
from loopify.cli import cli
from loopify.examples import zoo
from loopify.nn import recursions, set_loops

SMALL = [n for n in zoo.names(include_large=False) if "negative" not in zoo.ZOO[n].tags]


@pytest.mark.parametrize("name", SMALL)
def test_every_zoo_model_converts_and_lossless_plans_reproduce_it(name, captured):
    cap = captured(name)
    default = conv.convert_captured(cap, conv.ConvertConfig())
    assert default.manifest["params"]["converted"] < default.manifest["params"]["original"]
    lossless = conv.convert_captured(cap, conv.ConvertConfig(rank="full"))
    v = lossless.manifest["verify"]
    assert v["lossless_plan"] and v["ok"] and v["rel_err"] < conv.LOSSLESS_RTOL, v
    deepen = conv.convert_captured(cap, conv.ConvertConfig(mode="deepen", repeat=1))
    assert deepen.manifest["verify"]["ok"]


def test_manifest_and_archive(captured, tmp_path):
    cap = captured("llama")
    res = conv.convert_captured(cap, conv.ConvertConfig(blocks=1))
    pt2, man = conv.save(res, cap, tmp_path / "out.pt2")
    m = json.loads(man.read_text())
    assert m["plan"]["loops"][0]["blocks"] == 1 and m["plan"]["loops"][0]["loops"] == 4
    assert set(m["params"]) >= {"original", "converted"} and set(m["bytes"]) >= {"original", "converted"}
    assert set(m["verify"]) >= {"max_abs_err", "cosine", "kl"} and m["verify"]["kl"] > 0
    assert m["loops"] == [{"module": "model.model.layers_loop", "stack": "model.model.layers", "min": 1, "max": 4,
                           "default": 4, "mode": "compress"}]
    # Shared weights are stored once: the archive's weight entries are the converted parameter
    # bytes (the loop calls one block four times) plus buffers (rotary tables: <2%), and the
    # file is smaller than the original's.
    import zipfile

    with zipfile.ZipFile(pt2) as z:
        weight_bytes = sum(i.file_size for i in z.infolist() if "/data/weights/" in i.filename)
    assert m["bytes"]["converted"] <= weight_bytes < 1.02 * m["bytes"]["converted"]
    assert m["bytes"]["converted"] < 0.6 * m["bytes"]["original"]
    assert m["bytes"]["converted_file"] < m["bytes"]["original_file"]
    ep = torch.export.load(pt2)
    assert sum(v.numel() for v in ep.state_dict.values()) == m["params"]["converted"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_load_back_trainable_with_adjustable_loops(captured, tmp_path):
    cap = captured("llava-clip")
    res = conv.convert_captured(cap, conv.ConvertConfig(rank=4, connector="recursive"))
    with torch.no_grad():  # pretend training moved the weights: they must come back as saved
        for p in res.module.parameters():
            p.add_(0.01)
    pt2, _ = conv.save(res, cap, tmp_path / "llava.pt2")
    module, original, manifest = conv.load_converted(pt2)
    saved = torch.export.load(pt2).module()
    with torch.no_grad():
        torch.testing.assert_close(module(*cap.args, **cap.kwargs)[0], saved(*cap.args, **cap.kwargs)[0],
                                   rtol=1e-5, atol=1e-5)
    set_loops(module, [1, 1])
    with torch.no_grad():
        one = module(*cap.args, **cap.kwargs)[0]
    assert not torch.allclose(one, saved(*cap.args, **cap.kwargs)[0])
    set_loops(module, None)
    loss = module(*cap.args, **cap.kwargs)[0].square().mean()
    loss.backward()
    rec = recursions(module)["model.model.language_model.layers_loop"]
    assert next(rec.blocks[0].parameters()).grad is not None
    assert rec.connector.scale.grad is not None


def test_failed_lossless_verify_writes_nothing(written, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "LOSSLESS_RTOL", 0.0)  # no float32 result is that exact
    out = tmp_path / "x.pt2"
    with pytest.raises(conv.ConvertError, match="does not reproduce the original.*nothing written"):
        conv.convert(written["llama"]["export"], conv.ConvertConfig(rank="full"), out)
    assert list(tmp_path.iterdir()) == []


def test_config_round_trips_and_refuses_bad_versions():
    c = conv.ConvertConfig(blocks=2, rank="full", stacks=("a", "b"))
    assert conv.ConvertConfig.from_dict(c.to_dict()) == c
    with pytest.raises(conv.ConvertError, match="config version 9 is not supported"):
        conv.ConvertConfig.from_dict({**c.to_dict(), "version": 9})
    with pytest.raises(conv.ConvertError, match="unknown config field 'colour'"):
        conv.ConvertConfig.from_dict({"colour": 1})
    assert str(c.to_pipeline()) == "find-spans{similarity=false},fold-loops{blocks=2,stacks=a:b},relax{rank=full}"


def test_cli_convert(written, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q.pt2"
    r = runner.invoke(cli, ["convert", str(written["qwen2"]["export"]), "-o", str(out), "--rank", "full"])
    assert r.exit_code == 0, r.output
    assert "OK (lossless plan within 1e-5 relative)" in r.output and out.exists() and out.with_suffix(".json").exists()
    r = runner.invoke(cli, ["convert", str(written["qwen2"]["export"]), "--dry-run", "--blocks", "1"])
    assert r.exit_code == 0 and "dry run: nothing written" in r.output


@pytest.mark.parametrize("args,message", [
    (["--rank", "lots"], "--rank must be an integer >= 0 or 'full'"),
    (["--blocks", "3"], "4 layers do not split into 3 blocks evenly"),
    (["--blocks", "2", "--loops", "2"], "give --blocks or --loops, not both"),
    (["--mode", "deepen", "--rank", "4"], "--rank applies to compress mode"),
    (["-o", "x.bin"], "the output must end in .pt2"),
    (["--pipeline", "fold-loops{wat=1}"], "unknown option 'wat'"),
    ([], "give -o OUT.pt2 (or --dry-run)"),
])
def test_cli_convert_refuses_bad_options(written, tmp_path, args, message):
    argv = ["convert", str(written["llama"]["export"])] + [a if a != "x.bin" else str(tmp_path / "x.bin") for a in args]
    if "-o" not in args and args:
        argv += ["-o", str(tmp_path / "o.pt2")]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2, r.output
    err = [l for l in r.output.splitlines() if l.startswith("loopify: error:")]
    assert len(err) == 1 and message in err[0], r.output
    assert not (tmp_path / "o.pt2").exists()


def test_minilm_fidelity_rises_with_rank(captured, written):
    """The real MiniLM, 6 layers -> 3 blocks x 2 loops: cosine of sentence embeddings on real
    sentences rises with the LoRA rank, and full rank is the original."""
    from loopify import fidelity, texts

    cap = captured("minilm", "hf")
    tok = fidelity.tokenizer_for(written["minilm"]["hf"])
    inputs = fidelity.batch_inputs(tok, texts.sentences()[:12], cap.kwargs)
    ref = fidelity.embed(cap.module(), inputs)
    means = []
    for rank in (0, 32, "full"):
        res = conv.convert_captured(cap, conv.ConvertConfig(blocks=3, rank=rank))
        means.append(float(fidelity.sentence_cosines(ref, fidelity.embed(res.module, inputs)).mean()))
    assert means[0] < means[1] < means[2] and means[2] > 0.9999, means


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_every_zoo_model_with_every_sharing_map_and_init(name, captured):
    """Every sharing map and every init on every zoo model, each made lossless by rank=full.
    Middle-* maps need 3+ layers: they apply to the stacks that have them (text decoders)."""
    cap = captured(name)
    from loopify.passes.find_spans import find_spans

    long_stacks = tuple(s.stack for s in find_spans(cap, similarity=False).spans if s.length >= 4)
    inits = ["stepwise", "average", "lower", "upper"]
    for i, sharing in enumerate(["cycle", "sequence", "middle-cycle", "middle-sequence"]):
        middle = sharing.startswith("middle")
        config = conv.ConvertConfig(sharing=sharing, init=inits[i], rank="full",
                                    blocks=3 if middle else 0, stacks=long_stacks if middle else ())
        v = conv.convert_captured(cap, config).manifest["verify"]
        assert v["ok"] and v["rel_err"] < conv.LOSSLESS_RTOL, (sharing, v["rel_err"])
    for init in inits:
        res = conv.convert_captured(cap, conv.ConvertConfig(init=init))
        assert res.manifest["params"]["converted"] < res.manifest["params"]["original"]


def test_convert_never_imports_tvm(written):
    """The convert path (capture, passes, verify) must not import TVM (DESIGN.md layering);
    checked in a fresh interpreter so that other tests' imports cannot hide it."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from loopify.cli import cli; "
            f"r = CliRunner().invoke(cli, ['convert', {str(written['llama']['export'])!r}, '--dry-run', '--rank', '4']); "
            "assert r.exit_code == 0, r.output; "
            "print(any(m == 'tvm' or m.startswith('tvm.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
