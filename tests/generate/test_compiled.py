"""Generation from a TVM artifact: prefill / decode entry points with a symbolic token count, the
loop count and KV cache at run time; greedy tokens equal the eager model's; bad requests refused.

Tolerance: prefill logits within ARTIFACT_RTOL (TVM reorders float32 reductions, ~1e-7 relative
measured); tokens compared exactly."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")

from loopify import convert as conv  # noqa: E402
from loopify.cli import cli  # noqa: E402
from loopify.generate import Sampling, open_model  # noqa: E402


@pytest.fixture(scope="module")
def gen_artifact(written, tmp_path_factory):
    """The zoo Llama converted (2 blocks x 2 loops, LoRA rank 4) and compiled for generation."""
    from loopify.compile import compile_model

    d = tmp_path_factory.mktemp("gen")
    pt2 = d / "llama.pt2"
    conv.convert(written["llama"]["hf"], conv.ConvertConfig(rank=4), pt2)
    res = compile_model(pt2, d / "llama.gen", max_context=96)
    return pt2, d / "llama.gen", res


def test_artifact_decodes_the_eager_models_tokens_at_every_loop_count(gen_artifact):
    pt2, art, res = gen_artifact
    assert res.checks and all(c["ok"] for c in res.checks)
    assert {tuple(c["loops"]) for c in res.checks} == {(1,), (2,)}
    eager, compiled = open_model(pt2), open_model(art)
    for prompt in ([1, 9, 44], [1] + list(range(30, 80))):   # prompts of different lengths, one artifact
        for loops in (1, 2):
            a = eager.generate([prompt], Sampling(max_new_tokens=12), loops=loops)
            b = compiled.generate([prompt], Sampling(max_new_tokens=12), loops=loops)
            assert a.tokens == b.tokens
            # the artifact's cache has a slot for every depth of the maximum count (the eager
            # cache only for the depths that run): equal at the full count, twice at one loop
            assert b.kv_bytes == a.kv_bytes * (2 // loops)
    m = res.manifest
    assert m["kind"] == "generation" and m["generation"]["max_context"] == 96
    assert m["generation"]["layout"]["slots"] == 4 and sorted(m["generation"]["entries"]) == ["decode", "prefill"]


def test_one_loop_runs_half_the_depths(gen_artifact):
    """The compiled loop count is real: at one loop the decode step runs 2 of the 4 depths, and
    the logits differ from two loops."""
    _, art, _ = gen_artifact
    g = open_model(art)
    one = g.generate([[1, 5, 6]], Sampling(max_new_tokens=1), loops=1)
    two = g.generate([[1, 5, 6]], Sampling(max_new_tokens=1), loops=2)
    assert one.tokens != two.tokens or one.ttft_s < two.ttft_s


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", ",".join(["5"] * 96)], "past the maximum context of 96"),
    (["--prompt-ids", "1,2", "--loops", "3"], "outside the model's range [1, 2]"),
    (["--prompt-ids", "1,2", "--kv-policy", "last"], "KV policy 'last' is not available"),
    (["--prompt-ids", "1,2", "--image", "x.png"], "a text-only model takes no --image"),
    (["--prompt", "hello"], "has no tokenizer"),
    ([], "give --prompt TEXT or --prompt-ids"),
])
def test_bad_requests_get_one_line(gen_artifact, tmp_path, args, message):
    _, art, _ = gen_artifact
    args = [a if a != "x.png" else str(_png(tmp_path)) for a in args]
    r = CliRunner().invoke(cli, ["generate", str(art), *args])
    assert r.exit_code == 2, r.output
    errs = [l for l in r.output.splitlines() if l.startswith("loopify: error:")]
    assert len(errs) == 1 and message in errs[0], r.output


def _png(tmp_path):
    from PIL import Image

    p = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(p)
    return p


def test_generate_cli_streams_and_reports(gen_artifact, tmp_path):
    _, art, _ = gen_artifact
    out = tmp_path / "g.json"
    r = CliRunner().invoke(cli, ["generate", str(art), "--prompt-ids", "1,5,6", "--max-new-tokens", "5", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "time to first token" in r.output and "tokens/s" in r.output and "KV cache" in r.output
    import json

    rep = json.loads(out.read_text())
    assert rep["kind"] == "artifact" and len(rep["tokens"][0]) == 5 and rep["kv_bytes"] > 0


def test_a_vlm_is_refused_for_compiled_generation(written, tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(written["llava-clip"]["hf"]), "-o", str(tmp_path / "v"), "--max-context", "64"])
    assert r.exit_code == 2 and "vision-language models is not supported yet" in r.output
    assert not (tmp_path / "v").exists()
