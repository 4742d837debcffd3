"""Mixture-of-Recursions in a generation artifact: routed loops compiled for TVM.

Each routed recursion step is a ``cond`` on the router's decision (a decoded token the router
stops runs none of the step's blocks); the slots' validity per token is explicit state, so a
decoded token attends to exactly the tokens that took each depth (recursion-wise KV caching), as
the eager :class:`loopify.generate.cache.LoopCache` does. Prefill runs a step's kept tokens
gathered into the smallest bucket that holds them (the default ``--route-bucket 0.25``: buckets
of 1, 2 and 3 quarters of the prompt), else every token masked: the prompts of 3, 7 and 41 tokens
below take both forms at the router's decisions.

Tolerances: prefill logits within the artifact tolerance of the compile's own validation (TVM
reorders float32 reductions); tokens and per-token depths compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")

from loopify import capture  # noqa: E402
from loopify import convert as conv  # noqa: E402
from loopify.cli import cli  # noqa: E402
from loopify.generate import Sampling, open_model  # noqa: E402
from loopify.nn import recursions  # noqa: E402

PROMPTS = ([1, 9, 44], [1] + list(range(30, 70)), [5, 6, 7, 8, 9, 10, 11])


def _routed_pt2(written, path, kind: str, rank: int = 4):
    """The zoo Llama, 2 blocks x 2 loops with LoRA and a router moved off neutral (as training
    would: tokens stop at different depths), saved."""
    cap = capture.load(written["llama"]["hf"])
    res = conv.convert_captured(cap, conv.ConvertConfig(blocks=2, rank=rank, router=kind))
    (rec,) = recursions(res.module).values()
    torch.manual_seed(1)
    with torch.no_grad():
        rec.router.net[-1].weight.normal_(0, 0.5)
        rec.router.threshold.fill_(0.0)
    conv.save(res, cap, path)
    return path


# (token-choice with share-first is a slow case: each artifact's compile is 2.5 minutes of the
# 30 that make test may take; LOOPIFY_SLOW=1 runs it)
@pytest.fixture(scope="module", params=[("expert", "per-depth"),
                                        pytest.param(("token", "share-first"), marks=pytest.mark.slow)],
                ids=["expert-per-depth", "token-share-first"])
def routed_artifact(written, tmp_path_factory, request):
    from loopify.compile import compile_model

    kind, policy = request.param
    d = tmp_path_factory.mktemp("routed")
    pt2 = _routed_pt2(written, d / "r.pt2", kind)
    res = compile_model(pt2, d / "r.gen", max_context=64, kv_policy=policy)
    return pt2, d / "r.gen", res, policy


def test_routed_artifact_decodes_the_eager_tokens_and_depths(routed_artifact):
    pt2, art, res, policy = routed_artifact
    assert res.checks and all(c["ok"] for c in res.checks), res.checks
    assert any(c["what"] == "depths" for c in res.checks)
    gen = res.manifest["generation"]
    assert gen["layout"]["routed"] == ["model.model.layers@0"] and "route_valid" in gen["inputs"]
    # the decision's thresholds (expert) or balancing bias (token) are weights of the artifact:
    # a re-calibrated capacity needs no compile
    what = "threshold" if res.manifest["generation"]["layout"]["routed"] and policy == "per-depth" else "balance_bias"
    assert f"wrapper.model.model.layers.0.router.{what}" in res.manifest["params"]
    eager, compiled = open_model(pt2), open_model(art)
    depths = set()
    for prompt in PROMPTS:
        for loops in (1, 2):
            a = eager.generate([prompt], Sampling(max_new_tokens=10), loops=loops, policy=policy)
            b = compiled.generate([prompt], Sampling(max_new_tokens=10), loops=loops, policy=policy)
            assert a.tokens == b.tokens, (prompt, loops)
            assert a.depth == b.depth, (prompt, loops)
            (stats,) = b.depth.values()
            depths |= {int(d) for d, c in stats["histogram"].items() if c}
    assert len(depths) > 1  # tokens really stopped at different depths


def test_routed_generate_cli_reports_the_depth_per_token(routed_artifact):
    _, art, _, policy = routed_artifact
    r = CliRunner().invoke(cli, ["generate", str(art), "--prompt-ids", "1,5,6,7", "--max-new-tokens", "4",
                                 "--kv-policy", policy])
    assert r.exit_code == 0, r.output
    assert "recursion depth per token" in r.output


def test_the_last_policy_is_refused_for_a_routed_artifact(written, tmp_path):
    pt2 = _routed_pt2(written, tmp_path / "r.pt2", "expert", rank=0)
    r = CliRunner().invoke(cli, ["compile", str(pt2), "-o", str(tmp_path / "x.gen"), "--max-context", "32",
                                 "--kv-policy", "last"])
    assert r.exit_code == 2, r.output
    errs = [l for l in r.output.splitlines() if l.startswith("loopify: error:")]
    assert len(errs) == 1 and "'last'" in errs[0], r.output
    assert not (tmp_path / "x.gen").exists()
