"""Multi-resolution recursion (loopify.nn.spiral, the multi-resolution pass).

Tolerances: neutral insertion (gates at zero) must give *exactly* what the loop gives without
its coarse steps (``h + 0 * u`` is ``h`` bit for bit), so a deepened loop whose only
full-resolution step is the original pass reproduces the original within the lossless 1e-5
relative (measured: 0). Causality: an earlier position's output must not move when a later
token changes; those positions compute the same numbers from the same inputs, so the bound is
1e-6 of the output's scale (measured: 0), against changes of 1e-2 or more where information
does flow (the test also shows it catches a leak: without the shift, earlier tokens move).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loopify import capture
from loopify import convert as conv
from loopify.errors import PipelineError
from loopify.nn import recursions, set_loops
from loopify.nn.spiral import Pooling, SpiralSpec
from loopify.pipeline import State, parse, run_pipeline

RTOL = 1e-5
CAUSAL_TOL = 1e-6
DEEP = "fold-loops{mode=deepen,repeat=3},multi-resolution{schedule=4:2:1}"


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def llama(zoo_dir):
    from loopify.examples import zoo

    return capture.load(zoo.write_hf("llama", zoo_dir))


@pytest.fixture(scope="module")
def llava(zoo_dir):
    from loopify.examples import zoo

    return capture.load(zoo.write_hf("llava-clip", zoo_dir))


@pytest.fixture(scope="module")
def minilm():
    from loopify.examples import zoo

    return capture.load(zoo._minilm_dir())


def _run(cap, spec):
    return run_pipeline(parse("find-spans{similarity=false}," + spec), State(cap, cap.editable())).state.module


def _out(cap, module, **change):
    with torch.no_grad():
        return module(*cap.args, **{**cap.kwargs, **change})[0]


def _gates(module, std=0.5, seed=0):
    """Move every gate off zero, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for r in recursions(module).values():
            if r.spiral is not None:
                r.spiral.gate.normal_(0, std)
    return module


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


# ----------------------------------------------------------------------------------------------
# pooling


def test_pooling_groups_consecutive_tokens_and_never_crosses_a_modality_boundary():
    valid = torch.ones(1, 10, dtype=torch.bool)
    image = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    p = Pooling(2, valid, image, dense=False)
    # text [0] | image [1 2] [3 4] [5] | text [6 7] [8 9]: the last image group is partial
    assert p.gid.tolist() == [[0, 1, 1, 2, 2, 3, 4, 4, 5, 5]]
    assert p.anchor.tolist() == [[0, 2, 4, 5, 7, 9]]  # each group runs at its last token
    h = torch.arange(10.0).view(1, 10, 1)
    assert p.pool(h).flatten().tolist() == [0.0, 1.5, 3.5, 5.0, 6.5, 8.5]
    u = torch.arange(1.0, 7.0).view(1, 6, 1)
    assert p.unpool(u, shift=False).flatten().tolist() == [1, 2, 2, 3, 3, 4, 5, 5, 6, 6]
    assert p.unpool(u, shift=True).flatten().tolist() == [0, 1, 1, 2, 2, 3, 4, 4, 5, 5]


def test_pooling_takes_real_tokens_only_and_pools_the_mask_consistently():
    valid = torch.tensor([[False, False, True, True, True]])  # left padding
    p = Pooling(2, valid, None, dense=False)
    assert p.gid.tolist() == [[0, 0, 1, 1, 2]] and p.valid.tolist() == [[False, True, True]]
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool)) & valid.view(1, 5)
    m = p.mask(causal.view(1, 1, 5, 5), True, torch.float32)
    # the padding group is no key; the real groups are causal over groups; padding attends to itself
    assert m[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert p.unpool(torch.ones(1, 3, 1), shift=True).flatten().tolist() == [0, 0, 0, 0, 1]


# ----------------------------------------------------------------------------------------------
# (b) neutral insertion


@pytest.mark.parametrize("name", ["llama", "minilm", "llava"])
def test_neutral_insertion_is_lossless_in_deepen_mode(name, request):
    """Deepened 3 times with schedule 4:2:1, the two coarse steps are new recursions in front of
    the original pass: at insertion the model is the original."""
    cap = request.getfixturevalue(name)
    ref = cap.run()[0]
    assert _rel(ref, _out(cap, _run(cap, DEEP))) <= RTOL


def test_neutral_coarse_steps_are_skipped_exactly_in_compress_mode(llama):
    """Compress 4 -> 2 x 2 with schedule 2:1: at zero gates the coarse step adds nothing, so the
    model is the plain loop at one step (a lossy plan: the coarse step replaces a full one)."""
    plain = _run(llama, "fold-loops{blocks=2}")
    set_loops(plain, 1)
    spiral = _run(llama, "fold-loops{blocks=2},multi-resolution{schedule=2:1}")
    assert torch.equal(_out(llama, plain), _out(llama, spiral))


def test_convert_verifies_the_lossless_spiral_plan_and_loads_it_back(llama, tmp_path):
    cfg = conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1))
    assert str(cfg.to_pipeline()).endswith("multi-resolution{schedule=4:2:1}") and cfg.lossless()
    res = conv.convert_captured(llama, cfg)
    assert res.manifest["verify"]["ok"] and res.manifest["verify"]["lossless_plan"]
    assert res.manifest["loops"][0]["schedule"] == [4, 2, 1]
    _gates(res.module)
    conv.save(res, llama, tmp_path / "s.pt2")
    module, cap, _ = conv.load_converted(tmp_path / "s.pt2")
    (rec,) = recursions(module).values()
    assert rec.spiral.spec == SpiralSpec((4, 2, 1), 64, True)
    assert torch.equal(_out(cap, module), _out(llama, res.module))  # the gates came back
    for k in (0, 1, 2, 3):  # any count: the last k entries of the schedule
        set_loops(module, k)
        set_loops(res.module, k)
        assert torch.equal(_out(cap, module), _out(llama, res.module))
    _generate_refuses(tmp_path / "s.pt2", tmp_path)


def _generate_refuses(pt2, tmp_path):
    """Eager decoding of a multi-resolution loop serves one text prompt at a time with the
    per-depth policy (generation artifacts: tests/generate/test_spiral_compiled.py). Each
    refusal is one line."""
    from loopify.errors import LoopifyError
    from loopify.generate import Sampling, open_model

    g = open_model(pt2)
    with pytest.raises(LoopifyError, match="KV policy 'share-first' is not available here"):
        g.generate([[1, 2, 3]], Sampling(max_new_tokens=2), policy="share-first")
    with pytest.raises(LoopifyError, match="decodes one text prompt at a time"):
        g.generate([[1, 2, 3], [4, 5]], Sampling(max_new_tokens=2))
    assert len(g.generate([[1, 2, 3]], Sampling(max_new_tokens=3)).tokens[0]) == 3


# ----------------------------------------------------------------------------------------------
# decoding with a KV cache (eager)

DECODE_RTOL = 1e-5  # decoding computes the same sums as the cache-free forward in another grouping: measured <= 7.2e-7


def _with_gates(module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for rec in recursions(module).values():
        rec.spiral.gate.data.copy_(0.5 * torch.randn(rec.spiral.gate.shape, generator=g))
    return module


def _full_logits(wrapper, ids):
    with torch.no_grad():
        out = wrapper.run_model({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)},
                                use_cache=False)
    return out["logits"][0, -1]


@pytest.mark.parametrize("spec,counts", [(DEEP, range(0, 5)), ("fold-loops{blocks=2},multi-resolution{schedule=2:1}", range(1, 3))])
def test_decoding_with_a_cache_equals_the_cache_free_forward_of_the_whole_sequence(llama, spec, counts):
    """Prefill then decode one token at a time: every step's logits are the cache-free forward's
    on the whole sequence so far, for prompts that end inside a group, at a group's end, and
    shorter than one group (so the groups complete across calls), at every loop count."""
    from loopify.generate.eager import EagerDecoder

    w = _with_gates(_run(llama, spec))
    gen = torch.Generator().manual_seed(1)
    for k in counts:
        set_loops(w, k)
        for n in (1, 3, 4, 5, 9):
            ids = [int(i) for i in torch.randint(1, 100, (n,), generator=gen)]
            dec = EagerDecoder(w, "per-depth")
            logits = dec.prefill({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, n, dtype=torch.long),
                                  "position_ids": torch.arange(n)[None]})[0]
            for _ in range(6):
                assert _rel(logits, _full_logits(w, ids)) <= DECODE_RTOL, (k, n, len(ids))
                ids.append(int(logits.argmax()))
                t = len(ids)
                logits = dec.decode(torch.tensor([[ids[-1]]]), torch.ones(1, t, dtype=torch.long), torch.tensor([[t - 1]]))[0]
    set_loops(w, None)


def test_a_coarse_step_runs_its_blocks_only_when_a_decoded_token_completes_a_group(llama):
    """4:2:1 (deepened 4-layer Llama: every step calls each block once): decoding token t calls
    block 0 once for the full-resolution step, once more when t ends a pair, once more when t
    ends a group of four."""
    from loopify.generate.eager import EagerDecoder

    w = _with_gates(_run(llama, DEEP))
    (rec,) = recursions(w).values()
    calls = []
    hook = rec.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        dec = EagerDecoder(w, "per-depth")
        dec.prefill({"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
                     "position_ids": torch.arange(2)[None]})
        per_token = []
        for t in range(2, 10):
            calls.clear()
            dec.decode(torch.tensor([[7]]), torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]))
            per_token.append(len(calls))
    finally:
        hook.remove()
    assert per_token == [1 + (t % 2 == 1) + (t % 4 == 3) for t in range(2, 10)]
    # the coarse depths' cache slots hold one entry per complete group, not one per token
    held = sorted(layer.keys.shape[-2] for layer in dec.cache.layers)
    assert held == sorted([10 // 4] * 4 + [10 // 2] * 4 + [10] * 4)


# ----------------------------------------------------------------------------------------------
# (a) causality


def _later_token_never_moves_earlier_outputs(cap, module, positions, image_token=None):
    ids = cap.kwargs["input_ids"]
    base = _out(cap, module)
    scale = float(base.abs().max())
    for t in positions:
        assert image_token is None or int(ids[0, t]) != image_token
        changed = ids.clone()
        changed[:, t] = (ids[:, t] + 1) % 100 + 1
        out = _out(cap, module, input_ids=changed)
        assert float((out[:, :t] - base[:, :t]).abs().max()) <= CAUSAL_TOL * scale, t
        assert float((out[:, t:] - base[:, t:]).abs().max()) > 1e-3 * scale  # the change does reach later tokens


def test_causal_lm_stays_causal_with_coarse_steps(llama):
    module = _gates(_run(llama, DEEP))
    (rec,) = recursions(module).values()
    assert rec.spiral.spec.causal
    _later_token_never_moves_earlier_outputs(llama, module, [3, 9, 14, 22])


def test_the_causality_test_catches_a_leak_without_the_shift(llama):
    module = _gates(_run(llama, "fold-loops{mode=deepen,repeat=3},multi-resolution{schedule=4:2:1,causal=false}"))
    ids = llama.kwargs["input_ids"]
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 100 + 1
    base, out = _out(llama, module), _out(llama, module, input_ids=changed)
    assert float((out[:, 8] - base[:, 8]).abs().max()) > 1e-3 * float(base.abs().max())  # token 8 sees 9


def test_vlm_stays_causal_and_pools_image_apart_from_text(llava):
    module = _gates(_run(llava, DEEP))
    loops = recursions(module)
    causal = {p.split(".")[2]: r.spiral.spec.causal for p, r in loops.items()}
    assert causal == {"vision_tower": False, "language_model": True}  # patches attend both ways
    token = llava.info["image_token_id"]
    assert [r.modality_token for r in loops.values()] == [None, token]
    ids = llava.kwargs["input_ids"][0]
    last_image = int((ids == token).nonzero().max())
    _later_token_never_moves_earlier_outputs(llava, module, [last_image + 2, ids.numel() - 3], token)


def test_encoder_is_not_causal_and_coarse_steps_change_the_output(minilm):
    module = _run(minilm, DEEP)
    (rec,) = recursions(module).values()
    assert not rec.spiral.spec.causal
    ref = _out(minilm, module)
    got = _out(minilm, _gates(module))
    assert _rel(ref, got) > 1e-2


# ----------------------------------------------------------------------------------------------
# (c) coarse steps act; bad schedules


def test_coarse_steps_run_on_the_pooled_sequence_and_change_the_output(llama):
    module = _gates(_run(llama, DEEP))
    (rec,) = recursions(module).values()
    seen = []
    for b in rec.blocks:
        b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                    with_kwargs=True)
    out = _out(llama, module)
    seq = llama.kwargs["input_ids"].shape[1]  # 24: 6 groups of 4, 12 of 2, 24 tokens
    assert seen == [seq // 4] * 4 + [seq // 2] * 4 + [seq] * 4
    assert _rel(llama.run()[0], out) > 1e-2


def test_bad_schedules_are_refused_in_one_line(llama):
    with pytest.raises(PipelineError, match="pooling factors must be >= 1"):
        parse("find-spans,fold-loops,multi-resolution{schedule=2:0}")
    with pytest.raises(PipelineError, match="has 3 factors for a loop of 2 recursion steps"):
        _run(llama, "fold-loops{blocks=2},multi-resolution{schedule=4:2:1}")
    with pytest.raises(PipelineError, match="no coarse step"):
        _run(llama, "fold-loops{blocks=2},multi-resolution{schedule=1:1}")
    with pytest.raises(PipelineError, match="needs recursion steps"):
        _run(llama, "fold-loops{blocks=2,sharing=sequence},multi-resolution{schedule=2:1}")
    with pytest.raises(PipelineError, match="not combined with routers"):
        _run(llama, "fold-loops{blocks=2},route{kind=expert},multi-resolution{schedule=2:1}")
    with pytest.raises(PipelineError, match="needs a schedule"):
        parse("find-spans,fold-loops,multi-resolution")


def test_the_pass_is_idempotent_and_refuses_the_graph_form(llama, tiny_capture):
    res = run_pipeline(parse(f"find-spans{{similarity=false}},{DEEP},multi-resolution{{schedule=4:2:1}}"),
                       State(llama, llama.editable()))
    assert not res.records[-1].modified and res.records[-1].report["note"] == "already scheduled"
    with pytest.raises(PipelineError, match="needs the module form"):
        _run(tiny_capture, "fold-loops{blocks=1},multi-resolution{schedule=2:1:1:1:1}")


def test_the_pipeline_spec_prints_back():
    spec = "find-spans,fold-loops{mode=deepen,repeat=3},multi-resolution{schedule=4:2:1,causal=true}"
    assert str(parse(spec)) == spec


# ----------------------------------------------------------------------------------------------
# the real SmolLM2 (slow: its find-spans takes about 2 minutes here)


SMOLLM2 = Path(os.environ.get("LOOPIFY_SMOLLM2_DIR", "/work/scratch/zoo/smollm2"))


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="set LOOPIFY_SMOLLM2_DIR to a SmolLM2 HF dir")
def test_smollm2_neutral_insertion_is_lossless_and_coarse_steps_stay_causal():
    cap = capture.load(SMOLLM2)
    module = _run(cap, DEEP)
    assert _rel(cap.run()[0], _out(cap, module)) <= RTOL
    _later_token_never_moves_earlier_outputs(cap, _gates(module, std=0.05), [5, 13, 20])


def test_bench_reports_flops_per_token_of_each_resolution(llama, tmp_path):
    """``loopify bench`` on a deepened 4:2:1 loop: count k runs the last k entries, so going
    from 1 to 2 loops adds a factor-2 step and from 2 to 3 a factor-4 step. Their matrix
    products are S/2 and S/4 tokens long (attention's scores S^2/4 and S^2/16): the step added at
    factor 2 costs about twice the one at factor 4 (1.6-2.6: pooling and the head's work aside)."""
    import json

    from click.testing import CliRunner

    from loopify.cli import cli

    res = conv.convert_captured(llama, conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1)))
    conv.save(res, llama, tmp_path / "d.pt2")
    r = CliRunner().invoke(cli, ["bench", str(llama.source), str(tmp_path / "d.pt2"), "--backends", "eager", "--loops",
                                 "1,2,3", "--rounds", "1", "--per-round", "1", "--warmup", "0",
                                 "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert "MFLOP/unit" in r.output
    rows = {x["loops"]: x for x in json.loads((tmp_path / "b.json").read_text())["results"]}
    f = {k: rows[k]["flops_per_unit"] for k in (None, 1, 2, 3)}
    assert f[1] == pytest.approx(f[None], rel=1e-6)  # one full-resolution pass: the original's work
    assert 1.6 < (f[2] - f[1]) / (f[3] - f[2]) < 2.6


def test_decode_weight_bytes_count_a_coarse_step_once_per_group(llama):
    """The generation bench's bandwidth bound: a decoded token reads a factor-r step's block
    weights once per r tokens on average (the step runs when a group ends), so a deepened 4:2:1
    loop adds (1/2 + 1/4) of its blocks' bytes over its full-resolution pass, not two passes."""
    from loopify.bench_generate import weight_bytes_per_token

    res = conv.convert_captured(llama, conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1)))
    (rec,) = recursions(res.module).values()
    blocks = sum(p.numel() * p.element_size() for b in rec.blocks for p in b.parameters())
    w = {k: weight_bytes_per_token(res.module, k) for k in (1, 2, 3)}
    assert w[2] - w[1] == blocks // 2
    assert w[3] - w[2] == blocks // 4
