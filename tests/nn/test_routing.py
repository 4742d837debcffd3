"""Mixture-of-Recursions routers (loopify.nn.routing, the route pass).

Tolerances: neutral insertion must give *exactly* the unrouted loop's outputs (the routed
update is computed as f(h) + (s - 1) * (f(h) - h) with s = 1 exactly: bit-equal), and a lossless
plan with routers the original's within 1e-5 relative (float32 re-association of W + B@A).
Prefill against token-by-token decode: 1e-5 absolute on logits of magnitude ~1 (the same
tokens and keys reach every depth; only the order of float32 reductions differs, ~1e-7 seen).
"""

from __future__ import annotations

import pytest
import torch

from loopify import capture
from loopify import convert as conv
from loopify.errors import PipelineError
from loopify.generate.cache import LoopCache
from loopify.nn import recursions, set_loops
from loopify.nn.routing import RouterSpec, calibrate
from loopify.pipeline import State, parse, run_pipeline

RTOL = 1e-5
DECODE_ATOL = 1e-5

#: every sharing map staging supports, on the zoo's 4-layer Llama
PLANS = ["fold-loops{blocks=2}", "fold-loops{blocks=2,sharing=sequence}",
         "fold-loops{blocks=3,sharing=middle-cycle}", "fold-loops{blocks=3,sharing=middle-sequence}",
         "fold-loops{mode=deepen,repeat=2}"]


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    from loopify.examples import zoo

    return capture.load(zoo.write_hf("llama", tmp_path_factory.mktemp("zoo")))


def _run(cap, spec):
    return run_pipeline(parse("find-spans{similarity=false}," + spec), State(cap, cap.editable())).state.module


def _out(cap, module):
    with torch.no_grad():
        return module(*cap.args, **cap.kwargs)[0]


def _routed(cap, kind, plan="fold-loops{blocks=2}", seed=1, threshold=0.0):
    """A routed loop whose router has been moved off neutral (as training would), so that tokens
    stop at different depths."""
    w = _run(cap, f"{plan},route{{kind={kind}}}")
    (rec,) = recursions(w).values()
    torch.manual_seed(seed)
    with torch.no_grad():
        rec.router.net[-1].weight.normal_(0, 0.5)
        rec.router.threshold.fill_(threshold)
    return w, rec


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("kind", ["expert", "token"])
def test_routers_are_neutral_at_insertion_for_every_sharing_map(cap, plan, kind):
    base = _out(cap, _run(cap, plan))
    routed = _run(cap, f"{plan},route{{kind={kind}}}")
    assert torch.equal(base, _out(cap, routed))
    (rec,) = recursions(routed).values()
    assert bool((rec.router.last_depth == rec.spec.max_loops).all())  # every token took every step


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_a_lossless_plan_with_routers_still_reproduces_the_original(cap, kind):
    ref = cap.run()[0]
    got = _out(cap, _run(cap, f"fold-loops{{blocks=2}},relax{{rank=full}},route{{kind={kind}}}"))
    assert float((ref - got).abs().max() / ref.abs().max()) < RTOL


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_blocks_run_on_the_active_tokens_only(cap, kind):
    """Counting the tokens each block call receives: step r's blocks get exactly the tokens
    active at step r (gathered), not the whole sequence with a mask."""
    w, rec = _routed(cap, kind)
    seen = []
    for b in rec.blocks:
        b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                    with_kwargs=True)
    _out(cap, w)
    depth = rec.router.last_depth[0]
    per_step = [int((depth > r).sum()) for r in range(2)]
    assert 0 < per_step[1] < per_step[0] or 0 < per_step[0] < depth.numel()  # some tokens stop early
    # cycle, 2 blocks x 2 steps: each step's 2 blocks see that step's tokens
    assert seen == [n for n in per_step for _ in range(2) if n > 0]
    assert sum(seen) < 4 * depth.numel()


@pytest.mark.parametrize("plan", PLANS[:4])
def test_token_choice_runs_the_schedule_of_the_depth_it_gives(cap, plan):
    """A router that gives every token depth d (zero weights, the bias picks d, its score 0 so
    the update scale is 1) makes the loop compute what the unrouted loop computes at loop count
    d, for every sharing map: a token of depth d takes the depths ``schedule(d)`` runs."""
    routed = _run(cap, f"{plan},route{{kind=token}}")
    (rec,) = recursions(routed).values()
    plain = _run(cap, plan)
    for d in (1, 2):
        with torch.no_grad():
            rec.router.net[-1].bias.copy_(torch.tensor([0.0, -1.0] if d == 1 else [-1.0, 0.0]))
        got = _out(cap, routed)
        assert bool((rec.router.last_depth == d).all())
        set_loops(plain, d)
        assert torch.equal(got, _out(cap, plain)), (plan, d)


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_routing_is_causal_a_prefix_gets_the_same_depths_and_logits(cap, kind):
    """Recursion-wise attention is causal over the active tokens and the threshold / argmax
    decisions read only the token's own state: a prefix of the text gives its tokens the same
    depths and logits as the whole text."""
    w, rec = _routed(cap, kind)
    ids = cap.kwargs["input_ids"]
    with torch.no_grad():
        full = w(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
        depth = rec.router.last_depth.clone()
        part = w(input_ids=ids[:, :9], attention_mask=torch.ones_like(ids[:, :9]))[0]
    assert torch.equal(rec.router.last_depth, depth[:, :9])
    assert float((part - full[:, :9]).abs().max()) < DECODE_ATOL


def _step(w, rec, ids, cache=None, pos0=0):
    n = ids.shape[1]
    inputs = {"input_ids": ids, "attention_mask": torch.ones(1, pos0 + n, dtype=torch.long),
              "position_ids": torch.arange(pos0, pos0 + n)[None]}
    with torch.no_grad():
        out = w.run_model(inputs, use_cache=cache is not None, cache=cache)
    return out["logits"][0], rec.router.last_depth[0].clone()


@pytest.mark.parametrize("kind", ["expert", "token"])
@pytest.mark.parametrize("policy", ["per-depth", "share-first"])
def test_prefill_and_token_by_token_decode_agree(cap, kind, policy):
    """Decode-safe routing with the loop KV cache: a prompt prefilled at once and the same prompt
    decoded one token at a time (after a 4-token prefill) give each token the same depth and the
    same logits. per-depth is recursion-wise KV caching (it also equals the cache-free forward);
    share-first is MoR's recursive KV sharing."""
    w, rec = _routed(cap, kind)
    ids = cap.kwargs["input_ids"][:, :12]
    ref, ref_depth = _step(w, rec, ids)
    c = LoopCache(policy)
    pre, pre_depth = _step(w, rec, ids, c)
    c = LoopCache(policy)
    parts = [_step(w, rec, ids[:, :4], c)]
    parts += [_step(w, rec, ids[:, t:t + 1], c, t) for t in range(4, 12)]
    dec, dec_depth = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    assert torch.equal(dec_depth, pre_depth) and torch.equal(pre_depth, ref_depth)
    assert len(set(ref_depth.tolist())) > 1  # tokens really took different depths
    assert float((dec - pre).abs().max()) < DECODE_ATOL
    if policy == "per-depth":
        assert float((pre - ref).abs().max()) < DECODE_ATOL
    else:  # sharing the first recursion's KV is another model: it must differ
        assert float((pre - ref).abs().max()) > 1e-3


def test_a_batch_with_padding_equals_each_row_alone(cap):
    """Rows of different lengths, left-padded: each row's depths and last logits are those it
    gets alone (padding is never a key, rows are gathered separately)."""
    from loopify.generate.engine import left_pad

    w, rec = _routed(cap, "expert")
    rows = [cap.kwargs["input_ids"][0, :10].tolist(), cap.kwargs["input_ids"][0, 5:9].tolist()]
    batch = left_pad(rows, 0)
    with torch.no_grad():
        together = w.run_model(batch)["logits"][:, -1]
        depth = rec.router.last_depth.clone()
        for i, row in enumerate(rows):
            alone = w.run_model(left_pad([row], 0))["logits"][:, -1]
            assert float((alone - together[i]).abs().max()) < DECODE_ATOL
            assert torch.equal(rec.router.last_depth[0], depth[i, -len(row):])


def test_topk_keeps_the_capacity_and_calibrated_thresholds_match_it(cap):
    """Expert-choice top-k keeps ceil(capacity * S) tokens per step; thresholds calibrated on the
    same scores keep the same fraction per token (the decode-safe form of the capacity)."""
    w = _run(cap, "fold-loops{blocks=2},route{kind=expert,capacity=1:0.5}")
    (rec,) = recursions(w).values()
    torch.manual_seed(0)
    with torch.no_grad():
        rec.router.net[-1].weight.normal_(0, 0.5)
    rec.router.select = "topk"
    _out(cap, w)
    seq = cap.kwargs["input_ids"].shape[1]
    assert [int((rec.router.last_depth > r).sum()) for r in range(2)] == [seq, seq // 2]
    step1 = rec.router.record[1]["logits"][rec.router.record[1]["eligible"]]
    calibrate(rec.router, [rec.router.record[0]["logits"].flatten(), step1])
    rec.router.select = "threshold"
    _out(cap, w)
    assert int((rec.router.last_depth > 1).sum()) == seq // 2


def test_routed_model_saves_and_rebuilds_with_its_router(cap, tmp_path):
    """The router's options are in the manifest (config, plan, skeleton) and load_converted
    rebuilds it with its trained weights and thresholds."""
    res = conv.convert_captured(cap, conv.ConvertConfig(blocks=2, router="token"))
    (rec,) = recursions(res.module).values()
    with torch.no_grad():
        rec.router.net[-1].weight.normal_(0, 0.5)
    want = _out(cap, res.module)
    conv.save(res, cap, tmp_path / "r.pt2")
    module, inputs, manifest = conv.load_converted(tmp_path / "r.pt2")
    (back,) = recursions(module).values()
    assert manifest["config"]["router"] == "token" and manifest["loops"][0]["router"] == "token"
    assert manifest["skeletons"]["model.model.layers.0"]["router"]["kind"] == "token"
    assert back.router is not None and torch.equal(back.router.net[-1].weight, rec.router.net[-1].weight)
    assert torch.equal(_out(inputs, module), want)


def test_eval_reports_the_average_depth_of_a_routed_model(cap, tmp_path):
    from loopify.fidelity.report import evaluate, format_report

    res = conv.convert_captured(cap, conv.ConvertConfig(blocks=2, router="expert"))
    (rec,) = recursions(res.module).values()
    with torch.no_grad():
        rec.router.net[-1].weight.normal_(0, 0.5)
        rec.router.threshold.fill_(0.0)
    conv.save(res, cap, tmp_path / "r.pt2")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n")
    rep = evaluate(tmp_path / "r.pt2", text, tokenizer_choice="bytes", seq_len=16, limit=2)
    for row in rep["results"]:
        d = row["depth"]
        assert d["max"] == row["loops"] and sum(d["histogram"].values()) == d["tokens"] == 32
        assert 0 <= d["average"] <= row["loops"]
    assert "avg depth" in format_report(rep)


def test_refusals(cap, tiny_capture):
    # the graph form has the captured shapes: a routed step cannot run on fewer tokens there
    with pytest.raises(PipelineError, match="module form"):
        run_pipeline(parse("find-spans{similarity=false},fold-loops{blocks=1},route"),
                     State(tiny_capture, tiny_capture.unflatten()))
    # one capacity per recursion step
    with pytest.raises(PipelineError, match="one value per recursion step"):
        _run(cap, "fold-loops{blocks=2},route{capacity=1:0.5:0.25}")
    # a step keeps a subset of the previous step's tokens
    with pytest.raises(ValueError, match="must not increase"):
        RouterSpec("expert", 2, 8, capacity=(0.5, 1.0))
    with pytest.raises(PipelineError, match="capacities must be in"):
        parse("route{capacity=1.5}")
    # routers and connectors are not combined
    with pytest.raises(PipelineError, match="not combined"):
        _run(cap, "fold-loops{blocks=2},insert-connectors,route")
    # Ouro's 'last' KV policy rewrites entries a routed depth does not hold
    w, rec = _routed(cap, "expert")
    with pytest.raises(ValueError, match="'last'"):
        _step(w, rec, cap.kwargs["input_ids"][:, :5], LoopCache("last"))
    with pytest.raises(conv.ConvertError, match="--capacity applies to --router expert"):
        conv.ConvertConfig(capacity=(1.0, 0.5))


def test_a_second_route_run_changes_nothing(cap):
    from loopify.passes.route import Route

    w = _run(cap, "fold-loops{blocks=2},route")
    again = Route().run(State(cap, w))
    assert not again.modified and "already" in again.report["note"]
    with pytest.raises(ValueError, match="already have expert routers"):
        Route(kind="token").run(State(cap, w))


def test_generation_reports_the_depth_of_every_token(cap):
    """generate's eager decoder records each real token's depth (prompt and decoded); padding
    is not counted, and the tokens are those greedy decoding gives with the same cache."""
    from loopify.generate import Sampling
    from loopify.generate.eager import EagerDecoder
    from loopify.generate.engine import run

    w, rec = _routed(cap, "expert")
    prompts = [cap.kwargs["input_ids"][0, :7].tolist(), cap.kwargs["input_ids"][0, 2:5].tolist()]
    res = run(EagerDecoder(w), prompts, Sampling(max_new_tokens=5))
    (stats,) = res.depth.values()
    assert stats["tokens"] == 7 + 3 + res.decoded  # the last generated token is not run
    assert sum(stats["histogram"].values()) == stats["tokens"] and 0 < stats["average"] < 2
    assert res.to_dict()["depth"] == res.depth


def test_topk_counts_and_keeps_only_real_tokens():
    """Per row, top-k keeps ceil(capacity * real tokens) of the real tokens, the highest scores,
    never padding."""
    from loopify.nn.routing import Router

    r = Router(RouterSpec("expert", 2, 4, capacity=(1.0, 0.5)))
    r.select = "topk"
    with torch.no_grad():
        r.net[-1].weight.zero_()
        r.net[-1].weight[1, 0] = 1.0  # step 1 scores = the first feature
    h = torch.zeros(2, 6, 4)
    h[..., 0] = torch.tensor([[5.0, 1, 4, 2, 3, 0], [9.0, 8, 1, 2, 3, 4]])
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    keep, _ = r.expert_step(h, 1, torch.ones(2, 6, dtype=torch.bool), real)
    assert keep.tolist() == [[True, False, True, False, True, False], [False, False, False, False, True, True]]
