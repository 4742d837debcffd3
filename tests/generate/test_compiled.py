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


@pytest.mark.parametrize("form", ["auto", "merged"])
def test_per_depth_lora_is_never_merged_per_token(gen_artifact, form):
    """The decode step applies a low-rank LoRA factored (``auto`` at rank 4: x @ W.T + s (x @ A.T)
    @ B.T) or reads premerged per-depth matrices (``merged``): no product over a whole matrix,
    W + s B @ A, is left in the step (it was, per matrix, depth and token: r times a decode
    GEMV's work). Checked on every graph of the exported step, the cond branches included."""
    from loopify.compile import _generation_source
    from loopify.generate.export import export_step
    from loopify.nn import recursions

    pt2, _, res = gen_artifact
    forms = {m["form"] for loop in res.manifest["lora"]["loops"].values() for m in loop.values()}
    assert res.manifest["lora"]["policy"] == "auto" and res.manifest["lora"]["rule"] == "decode"
    assert forms == {"factored"}
    wrapper, inputs, _, _ = _generation_source(pt2)
    shapes = {tuple(rec.blocks[0].get_parameter(k.replace("__", ".")).shape)
              for rec in recursions(wrapper).values() for k in rec.lora_A.keys()}
    assert shapes
    ex = export_step(wrapper, inputs, "per-depth", 32, None, lora_form=form)
    assert {m["form"] for loop in ex.lora["loops"].values() for m in loop.values()} == {
        "factored" if form == "auto" else "merged"}
    products = [n for gm in ex.program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
                for n in gm.graph.nodes if n.op == "call_function"
                and str(n.target).startswith(("aten.mm", "aten.matmul", "aten.bmm"))
                and _static(getattr(n.meta.get("val"), "shape", ())) in shapes]
    assert products == []
    linears = [n for gm in ex.program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    # positive control of the walk: the factored step has three linears per relaxed matrix
    assert len(linears) > 3 * len(shapes)


def _static(shape) -> tuple | None:
    """A node's shape as ints, None when a size is symbolic (attention's products over T)."""
    return tuple(shape) if all(isinstance(x, int) for x in shape) else None


def test_the_loop_count_is_a_run_time_input(gen_artifact):
    """One artifact, both counts: prefill logits at one loop equal the eager model's at one loop
    and differ from two loops (the count really changes the depth run)."""
    from loopify import runtime
    from loopify.generate.compiled import TVMDecoder
    from loopify.generate.eager import EagerDecoder
    from loopify.nn import set_loops

    pt2, art, _ = gen_artifact
    module, _, _ = conv.load_converted(pt2)
    a = runtime.load(art)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(5)[None]}
    got = {k: TVMDecoder(a, "per-depth", k).prefill(dict(batch)) for k in (1, 2)}
    for k in (1, 2):
        set_loops(module, k)
        ref = EagerDecoder(module).prefill(dict(batch))
        assert float((got[k] - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert float((got[1] - got[2]).abs().max()) > 1e-3


def test_decode_buffers_do_not_grow_with_the_past(gen_artifact):
    """Every storage the decode entry allocates has the same size at any past length (the memory
    planner sized it for the maximum context), except buffers under a page, which the pooled
    allocator rounds to one size anyway. A loop's cond branches had no bounds on the symbolic
    sizes and the slots were sliced out of the past before each branch: a new buffer of a new
    size at every token, kept by the pool (the converted SmolLM2 peaked at 2.4 GB, the original
    at 1.4 GB)."""
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from loopify import runtime

    _, path, _ = gen_artifact
    art = runtime.load(path)
    vm = VirtualMachine(tvm.runtime.load_module(str(path / "decode.so")), art.device)
    sizes: list = []

    def instrument(func, symbol, before, ret, *args):
        if before and symbol == "vm.builtin.alloc_storage":
            sizes.append(int(args[1][0]))
        return 0

    vm.set_instrument(instrument)
    seen = {}
    for past in (5, 9, 40):
        k0, _ = art.empty_cache()
        kv = np.zeros(k0.shape[:3] + (past,) + k0.shape[4:], "float32")
        sizes.clear()
        rows = [art.tensor([0], "int64")] if art.gen.get("logit_rows") else []
        vm["main"](art.tensor(np.array([[3]]), "int64"), art.tensor(np.ones((1, past + 1)), "int64"),
                   art.tensor(np.array([[past]]), "int64"), art.tensor(kv), art.tensor(kv.copy()),
                   art.tensor([2], "int64"), *rows, *art.params)
        seen[past] = sorted(s for s in sizes if s >= 4096)
    assert seen[5] and seen[5] == seen[9] == seen[40], seen


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", ",".join(["5"] * 96)], "past the maximum context of 96"),
    (["--prompt-ids", "1,2", "--loops", "3"], "outside the model's range [1, 2]"),
    (["--prompt-ids", "1,2", "--kv-policy", "last"], "KV policy 'last' is not available"),
    (["--prompt-ids", "1,2", "--image", "x.png"], "a text-only model takes no --image"),
    (["--prompt", "hello"], "has no tokenizer"),
    ([], "give --prompt TEXT or --prompt-ids"),
    (["--prompt-ids", "1,1000000000"], "token id 1000000000 is outside the vocabulary"),
    (["--prompt-ids", "1,-1"], "token id -1 is outside the vocabulary"),
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


@pytest.mark.parametrize("policy", ["share-first", "last"])
def test_shared_kv_policies_compile_and_decode_the_eager_tokens(gen_artifact, tmp_path, policy):
    """MoR's share-first and Ouro's last: one slot per block. The exported step passes a read
    slot's entries into the later recursion's ``cond`` as copies (views of one tensor are aliased
    operands, which torch.cond refuses), and a step that does not run keeps the slot's earlier
    entries ("last" at one loop: zeros there had the next token attend to nothing)."""
    from loopify.compile import compile_model

    pt2, _, _ = gen_artifact
    res = compile_model(pt2, tmp_path / f"{policy}.gen", max_context=64, kv_policy=policy)
    assert res.manifest["generation"]["layout"]["slots"] == 2          # 2 blocks, a slot each
    eager, compiled = open_model(pt2), open_model(tmp_path / f"{policy}.gen")
    for loops in (1, 2):
        a = eager.generate([[1, 9, 44, 3]], Sampling(max_new_tokens=10), loops=loops, policy=policy)
        b = compiled.generate([[1, 9, 44, 3]], Sampling(max_new_tokens=10), loops=loops, policy=policy)
        assert a.tokens == b.tokens, (policy, loops)


def test_generate_cli_streams_and_reports(gen_artifact, tmp_path):
    _, art, _ = gen_artifact
    out = tmp_path / "g.json"
    r = CliRunner().invoke(cli, ["generate", str(art), "--prompt-ids", "1,5,6", "--max-new-tokens", "5", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "time to first token" in r.output and "tokens/s" in r.output and "KV cache" in r.output
    import json

    rep = json.loads(out.read_text())
    assert rep["kind"] == "artifact" and len(rep["tokens"][0]) == 5 and rep["kv_bytes"] > 0


def test_a_vlm_artifact_generates_from_an_image_like_transformers(written, tmp_path):
    """LLaVA (CLIP + Llama) converted losslessly and compiled for generation: prefill_image with
    the pixel values, then decode; greedy tokens equal transformers' generate of the original."""
    from loopify.capture import hf
    from loopify.compile import compile_model

    pt2 = tmp_path / "llava.pt2"
    conv.convert(written["llava-clip"]["hf"], conv.ConvertConfig(rank="full"), pt2)
    res = compile_model(pt2, tmp_path / "llava.gen", max_context=80)
    assert all(c["ok"] for c in res.checks) and "prefill_image" in res.manifest["generation"]["entries"]
    m = hf.load_hf_dir(written["llava-clip"]["hf"])
    ids = m.inputs["input_ids"][:1]
    with torch.no_grad():
        ref = m.module.model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=m.inputs["pixel_values"][:1],
                                      max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    g = open_model(tmp_path / "llava.gen")
    got = g.generate([ids[0].tolist()], Sampling(max_new_tokens=8), extra={"pixel_values": m.inputs["pixel_values"][:1]})
    assert got.tokens[0] == ref


GENERATIVE = ["llama", "qwen2", "nanogpt", "llava-clip", "llava-siglip", "idefics3", "paligemma"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATIVE)
def test_every_zoo_generative_model_decodes_the_originals_tokens(written, tmp_path, name):
    """Every zoo causal LM and VLM, converted losslessly: its .pt2 (eager) and its x86 generation
    artifact give the original's greedy tokens (VLMs from their example image); the original's
    tokens come from transformers' generate (nanoGPT, not a transformers model: from re-running
    the whole sequence)."""
    from loopify.capture import hf
    from loopify.compile import compile_model

    pt2 = tmp_path / f"{name}.pt2"
    conv.convert(written[name]["hf"], conv.ConvertConfig(rank="full"), pt2)
    compile_model(pt2, tmp_path / f"{name}.gen", max_context=96)
    m = hf.load_hf_dir(written[name]["hf"])
    ids = m.inputs["input_ids"][:1]
    extra = {"pixel_values": m.inputs["pixel_values"][:1]} if "pixel_values" in m.inputs else {}
    n = 8
    if name == "nanogpt":
        seq = ids[0].tolist()
        with torch.no_grad():
            for _ in range(n):
                x = torch.tensor([seq])
                seq.append(int(m.module(input_ids=x, attention_mask=torch.ones_like(x))[0][0, -1].argmax()))
        ref = seq[ids.shape[1]:]
    else:
        kw = dict(extra)
        if "token_type_ids" in m.inputs:
            kw["token_type_ids"] = torch.zeros_like(ids)
        with torch.no_grad():
            ref = m.module.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                          **kw)[0, ids.shape[1]:].tolist()
    for model in (pt2, tmp_path / f"{name}.gen"):
        got = open_model(model).generate([ids[0].tolist()], Sampling(max_new_tokens=n), extra=extra)
        assert got.tokens[0] == ref, (model, got.tokens[0], ref)


def test_bench_generate_measures_every_configuration_side_by_side(written, gen_artifact, tmp_path):
    """``loopify bench --generate`` on the tiny Llama: transformers' generate, eager (original and
    converted at both loop counts) and the converted artifact (the original's artifact is built
    here too), every prompt length; the JSON as the README's schema says; per-depth agrees with
    itself exactly and the KV table's bytes per token follow the policies' slot counts."""
    import json

    from loopify.compile import compile_model

    pt2, art, _ = gen_artifact
    orig = written["llama"]["hf"]
    orig_art = tmp_path / "orig.gen"
    compile_model(orig, orig_art, max_context=96)
    out = tmp_path / "gen.json"
    r = CliRunner().invoke(cli, ["bench", str(orig), str(pt2), str(orig_art), str(art), "--generate",
                                 "--prompt-lengths", "4,16", "--new-tokens", "4", "--rounds", "1", "--warmup", "0",
                                 "--kv-table", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["machine"]["bandwidth_gbs"] > 0
    seen = {(x["model"], x["backend"], x["loops"]) for x in rep["results"]}
    assert seen == {("original", "hf", None), ("original", "eager", None), ("converted", "eager", 1),
                    ("converted", "eager", 2), ("original", "tvm", None), ("converted", "tvm", 1),
                    ("converted", "tvm", 2)}
    for x in rep["results"]:
        assert x["prompt_tokens"] in (4, 16) and x["ttft_ms"] > 0 and x["decode_tokens_per_s"] > 0
        assert 0 < x["bandwidth_fraction"] and x["weight_bytes_per_token"] > 0
    assert all(q["decode_vs_hf"] > 0 for q in rep["ratios"]) and len(rep["ratios"]) == 2 * (len(seen) - 1)
    kv = {(x["loops"], x["kv_policy"]): x for x in rep["kv_policies"]}
    assert kv[(2, "per-depth")]["agreement_with_per_depth"] == 1.0
    # 2 blocks: per-depth keeps a slot per executed depth (4 at two loops), the shared policies one per block
    assert kv[(2, "per-depth")]["kv_bytes_per_token"] == pytest.approx(2 * kv[(2, "share-first")]["kv_bytes_per_token"])
    assert kv[(1, "per-depth")]["kv_bytes_per_token"] == pytest.approx(kv[(1, "last")]["kv_bytes_per_token"])


def test_the_runtime_refuses_out_of_vocabulary_ids_below_the_generator(gen_artifact):
    """Called directly (no Generator in between), a generation artifact checks the token ids
    against its vocabulary before the VM runs (before: the clip-mode gather clamped the id to the
    last row and logits came back, silently wrong)."""
    import numpy as np

    from loopify import runtime
    from loopify.bounds import IndexRangeError
    from loopify.generate.compiled import TVMDecoder

    _, art, _ = gen_artifact
    a = runtime.load(art)
    vocab = a.gen["vocab"]
    dec = TVMDecoder(a, "per-depth", None)
    ids = torch.tensor([[1, vocab]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(2)[None]}
    with pytest.raises(IndexRangeError, match=f"holds {vocab}, outside \\[0, {vocab - 1}\\]"):
        dec.prefill(batch)
    batch["input_ids"] = torch.tensor([[1, vocab - 1]])
    assert np.isfinite(dec.prefill(batch).numpy()).all()


def _connector_llama(written, out):
    """The zoo Llama converted 2 x 2 with recursive connectors whose scale and
    projections are moved off their neutral start (at insertion a connector adds nothing, which
    would let an export that drops it pass)."""
    from loopify import capture
    from loopify.nn import recursions

    cap = capture.load(written["llama"]["hf"])
    res = conv.convert_captured(cap, conv.ConvertConfig(rank=2, connector="recursive"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rec in recursions(res.module).values():
            rec.connector.scale.fill_(0.5)
            for p in rec.connector.proj.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    conv.save(res, cap, out)
    return out


def _group_gemma2(tmp_path, out):
    """A 4-layer Gemma2 (sliding-window / full attention pairs) as one loop over 2-layer groups."""
    from tests.tiny import write_tiny

    conv.convert(write_tiny("Gemma2ForCausalLM", tmp_path, layers=4), conv.ConvertConfig(rank=4), out)
    return out


@pytest.mark.parametrize("case", ["connectors", "group-loop"])
def test_connectors_and_group_loops_decode_in_the_artifact(written, tmp_path, case):
    """A loop with recursive connectors (each step's ``cond`` gets the previous step's per-depth
    states as operands: the taps) and a loop over groups of layers (depth d takes group position
    d % p's mask) compile for generation; compile's own validation checks prefill logits within
    ARTIFACT_RTOL and greedy tokens at every loop count, and a second prompt decodes as eager."""
    from loopify.compile import compile_model

    pt2 = _connector_llama(written, tmp_path / "c.pt2") if case == "connectors" else \
        _group_gemma2(tmp_path, tmp_path / "g.pt2")
    res = compile_model(pt2, tmp_path / "a.gen", max_context=48)
    assert res.ok and {tuple(c["loops"]) for c in res.checks} == {(1,), (2,)}, res.checks
    eager, compiled = open_model(pt2), open_model(tmp_path / "a.gen")
    by_loops = {}
    for loops in (1, 2):
        a = eager.generate([[2, 17, 30, 4, 9]], Sampling(max_new_tokens=8), loops=loops).tokens
        assert compiled.generate([[2, 17, 30, 4, 9]], Sampling(max_new_tokens=8), loops=loops).tokens == a, loops
        by_loops[loops] = a
    assert by_loops[1] != by_loops[2]  # the loop count (and the connector at step 2) changes the text


def test_prefill_runs_the_head_on_the_rows_asked_for(gen_artifact):
    """``logit_rows``: a generating prefill asks for the last row only (the head over every
    prompt row was 17% of SmolLM2's prefill) and gets that row's logits of a full prefill
    (within ARTIFACT_RTOL: the same kernels, one row instead of T)."""
    import numpy as np

    from loopify import runtime

    _, path, _ = gen_artifact
    art = runtime.load(path)
    assert art.gen["logit_rows"]
    ids = np.array([[4, 8, 15, 16, 23, 42]])
    args = (ids, np.ones_like(ids), np.arange(6)[None])
    full, _, _ = art.step("prefill", *args, *art.empty_cache(), [2])
    last, k, _ = art.step("prefill", *args, *art.empty_cache(), [2], last=True)
    assert full.shape[1] == 6 and last.shape[1] == 1 and k.shape[3] == 6
    assert np.abs(last[0, 0] - full[0, -1]).max() <= 1e-4 * np.abs(full[0, -1]).max()
