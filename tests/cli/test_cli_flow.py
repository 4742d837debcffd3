"""The user's flow through the CLI: convert -> compile (x86, arm64) -> run (TVM and PyTorch,
same inputs, loop count at run time) -> bench.

Tolerance artifact vs PyTorch: 1e-4 relative (TVM reorders float32 reductions, ~1e-6 measured)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loopify.cli import cli


@pytest.fixture(scope="module")
def flow(written, tmp_path_factory):
    d = tmp_path_factory.mktemp("flow")
    r = CliRunner().invoke(cli, ["convert", str(written["llama"]["hf"]), "-o", str(d / "llama.pt2"), "--blocks", "1",
                                 "--rank", "4"])
    assert r.exit_code == 0, r.output
    return d


def _ok(r):
    assert r.exit_code == 0, r.output
    return r.output


def test_compile_converted_x86_validates_every_loop_count(flow):
    # factored LoRA: the artifact stores exactly the converted model's weights (auto would merge
    # the tiny Llama's rank-4 matrices per depth, 19-25% cheaper to run, the original's size)
    out = _ok(CliRunner().invoke(cli, ["compile", str(flow / "llama.pt2"), "-o", str(flow / "x86"),
                                       "--lora-form", "factored"]))
    for k in (1, 2, 3, 4):
        assert f"validate loops=[{k}] output 0" in out
    assert "NOT OK" not in out
    m = json.loads((flow / "x86" / "manifest.json").read_text())
    assert m["loop"] == {"min": 1, "max": 4, "default": 4}
    assert set(m["files"]) == {"lib.so", "params.safetensors", "inputs.safetensors"}
    assert {e["form"] for mats in m["lora"]["loops"].values() for e in mats.values()} == {"factored"}
    # Shared weights once: the artifact's parameters are the converted model's unique parameters.
    conv = json.loads((flow / "llama.json").read_text())
    from safetensors.numpy import load_file

    n = sum(a.size for a in load_file(str(flow / "x86" / "params.safetensors")).values())
    # At most the converted model's unique parameters plus the rotary table (32 floats); fewer when
    # tensors are identical by content (a random-init model's norm scales are all ones).
    assert 0.95 * conv["params"]["converted"] <= n <= conv["params"]["converted"] + 64, (n, conv["params"]["converted"])


def test_run_tvm_and_pytorch_on_the_same_inputs(flow):
    runner = CliRunner()
    if not (flow / "x86").exists():
        _ok(runner.invoke(cli, ["compile", str(flow / "llama.pt2"), "-o", str(flow / "x86"), "--no-validate"]))
    _ok(runner.invoke(cli, ["run", str(flow / "llama.pt2"), "--loops", "2", "--out", str(flow / "pt.out"),
                            "--save-inputs", str(flow / "in.pt")]))
    _ok(runner.invoke(cli, ["run", str(flow / "x86"), "--loops", "2", "--inputs", str(flow / "in.pt"),
                            "--out", str(flow / "tvm.out")]))
    (a,), (b,) = torch.load(flow / "pt.out"), torch.load(flow / "tvm.out")
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    # Loop counts outside the artifact's range are refused in one line.
    r = runner.invoke(cli, ["run", str(flow / "x86"), "--loops", "9", "--inputs", str(flow / "in.pt")])
    assert r.exit_code == 2 and "loopify: error:" in r.output


def test_compile_arm64_gives_an_aarch64_shared_object(flow):
    _ok(CliRunner().invoke(cli, ["compile", str(flow / "llama.pt2"), "-o", str(flow / "arm"), "--target", "arm64"]))
    head = (flow / "arm" / "lib.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_corrupt_artifact_is_refused(flow, tmp_path):
    import shutil

    if not (flow / "x86").exists():
        _ok(CliRunner().invoke(cli, ["compile", str(flow / "llama.pt2"), "-o", str(flow / "x86"), "--no-validate"]))
    bad = tmp_path / "bad"
    shutil.copytree(flow / "x86", bad)
    data = bytearray((bad / "params.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "params.safetensors").write_bytes(bytes(data))
    torch.save((torch.zeros(1, 24, dtype=torch.long), torch.ones(1, 24, dtype=torch.long)), tmp_path / "in.pt")
    r = CliRunner().invoke(cli, ["run", str(bad), "--inputs", str(tmp_path / "in.pt")])
    assert r.exit_code == 2 and "sha256" in r.output


def test_bench_smoke(written, flow, tmp_path):
    r = CliRunner().invoke(cli, ["bench", str(written["llama"]["hf"]), str(flow / "llama.pt2"), "--backends", "eager",
                                 "--loops", "1,4", "--rounds", "2", "--per-round", "2", "--warmup", "1", "--seq", "16",
                                 "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b.json").read_text())
    assert {(x["model"], x["loops"]) for x in rep["results"]} == {("original", None), ("converted", 1), ("converted", 4)}
    for x in rep["results"]:
        assert x["latency_ms"]["median"] > 0 and x["latency_ms"]["n"] == 4 and x["unit"] == "tokens/s"
        assert x["units_per_call"] == 16  # --seq 16 for both models (converted at the default 24)
    full = next(x for x in rep["results"] if x["loops"] == 4)
    assert full["params"] < rep["results"][0]["params"]
    assert {q["loops"] for q in rep["ratios"]} == {1, 4}
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_bench_batch(written, flow, tmp_path):
    # --batch 2 rebuilds both models' inputs at batch 2: twice the tokens per call
    r = CliRunner().invoke(cli, ["bench", str(written["llama"]["hf"]), str(flow / "llama.pt2"), "--backends", "eager",
                                 "--loops", "1", "--rounds", "1", "--per-round", "1", "--warmup", "0", "--seq", "16",
                                 "--batch", "2", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["method"]["batch"] == 2
    assert all(x["units_per_call"] == 32 for x in rep["results"])
    assert all(x["fidelity"]["cosine"] > 0 for x in rep["results"] if x["model"] == "converted")


def test_train_cli(flow, tmp_path):
    from loopify import texts

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts.sentences()[:12]) + "\n")
    out = tmp_path / "trained.pt2"
    r = CliRunner().invoke(cli, ["train", str(flow / "llama.pt2"), "--data", str(data), "-o", str(out), "--steps", "1",
                                 "--batch", "1", "--tokenizer", "bytes"])
    assert r.exit_code == 0, r.output
    assert "monotonic over depth after training" in r.output and out.exists()
    assert json.loads(out.with_suffix(".json").read_text())["train"]["config"]["loss"] == "mrl"
    r = CliRunner().invoke(cli, ["train", str(flow / "llama.pt2"), "--data", str(tmp_path / "none.txt"), "-o",
                                 str(tmp_path / "x.pt2"), "--tokenizer", "bytes"])
    assert r.exit_code == 2 and "loopify: error:" in r.output and not (tmp_path / "x.pt2").exists()
