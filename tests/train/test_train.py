"""loopify.train: distillation with the Monotonic Recursion Loss.

Tiny zoo models (Llama 4 layers -> 2 blocks x 2 loops + LoRA 2; LLaVA with a recursive
connector) for the training paths, the real MiniLM for the encoder path with its own tokenizer,
hand-made tensors for the loss arithmetic. Training data are real sentences already on the
machine (``loopify.texts``); images are matplotlib's sample photographs when matplotlib is there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from loopify.examples import zoo

from loopify import capture, texts
from loopify import convert as conv
from loopify import train as tr
from loopify.train.data import stack_examples

# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def data(work):
    """Real sentences: 24 for training, 6 held out."""
    train_s, held = texts.split(texts.sentences())
    tp, hp = work / "train.txt", work / "heldout.txt"
    tp.write_text("\n".join(train_s[:24]) + "\n")
    hp.write_text("\n".join(held[:6]) + "\n")
    return tp, hp


def _converted(work, name, **cfg) -> Path:
    d = zoo.write_hf(name, work / "zoo")
    cap = capture.load(d)
    res = conv.convert_captured(cap, conv.ConvertConfig(**cfg))
    out = work / f"{name}.pt2"
    conv.save(res, cap, out)
    return out


@pytest.fixture(scope="module")
def llama(work):
    return _converted(work, "llama", rank=2)


@pytest.fixture(scope="module")
def llava(work):
    return _converted(work, "llava-clip", rank=2, connector="recursive")


def _cfg(converted, data, out, **kw) -> tr.TrainConfig:
    base = dict(converted=str(converted), data=str(data[0]), eval_data=str(data[1]), out=str(out), steps=4, batch=2,
                lr=1e-3, tokenizer="bytes", checkpoint_every=0, threads=1)
    base.update(kw)
    return tr.TrainConfig(**base)


def _trainable(module, groups=tr.GROUPS) -> dict[str, torch.Tensor]:
    g = tr.parameter_groups(module)
    return {n: p.detach().clone() for k in groups for n, p in g[k]}


# ----------------------------------------------------------------------------------------------
# losses on hand-made tensors


def test_mrl_weights_a_depth_worse_than_the_previous_gets_beta():
    l1 = torch.tensor([1.0, 1.0, 1.0, 0.2])
    l2 = torch.tensor([0.5, 2.0, 1.0, 0.3], requires_grad=True)   # unit 1 and 3 got worse, unit 2 equal
    l3 = torch.tensor([0.6, 1.0, 0.5, 0.1], requires_grad=True)   # unit 0 got worse than depth 2
    w = tr.mrl_weights([l1, l2, l3], beta=3.0)
    assert w[0].tolist() == [1, 1, 1, 1]
    assert w[1].tolist() == [1, 3, 1, 3]           # equal loss is not "worse"
    assert w[2].tolist() == [3, 1, 1, 1]
    total, info = tr.mrl_loss([l1, l2, l3], beta=3.0)
    expected = l1.mean() + (torch.tensor([1, 3, 1, 3.0]) * l2).mean() + (torch.tensor([3, 1, 1, 1.0]) * l3).mean()
    torch.testing.assert_close(total, expected)
    total.backward()
    # the comparison with the previous depth is detached: d total / d l_k is just w_k / n
    torch.testing.assert_close(l2.grad, torch.tensor([1, 3, 1, 3.0]) / 4)
    torch.testing.assert_close(l3.grad, torch.tensor([3, 1, 1, 1.0]) / 4)
    assert info["worse"] == [0.0, 0.5, 0.25]
    assert info["depths"] == pytest.approx([0.8, 0.95, 0.55])


def test_mrl_with_beta_one_is_the_plain_sum_and_last_is_the_final_depth():
    ls = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])]
    assert float(tr.mrl_loss(ls, 1.0)[0]) == pytest.approx(1.5 + 2.0)
    assert float(tr.mrl_loss(ls, 2.0)[0]) == pytest.approx(1.5 + (6.0 + 1.0) / 2)
    assert float(tr.last_loss(ls)[0]) == pytest.approx(2.0)


def test_token_kl_and_pooled_losses():
    t = torch.randn(1, 5, 7)
    assert tr.token_kl(t, t).abs().max() < 1e-6
    s = torch.randn(1, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    kl = tr.token_kl(t, s, mask)
    assert kl.shape == (3,) and (kl > 0).all()
    p, q = t.log_softmax(-1), s.log_softmax(-1)
    torch.testing.assert_close(kl[0], (p.exp() * (p - q)).sum(-1)[0, 0])
    h = torch.randn(2, 4, 8)
    m = torch.ones(2, 4)
    assert tr.pooled_loss(h, h, m).abs().max() < 1e-6
    assert tr.pooled_loss(h, -h, m).tolist() == pytest.approx([2.0, 2.0])
    assert tr.pooled_loss(h, -h, m, "mse").tolist() == pytest.approx([4.0, 4.0], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# config and data


@pytest.mark.parametrize("kw, message", [
    (dict(loss="first"), "loss must be one of mrl, last"),
    (dict(beta=0.5), "beta must be a number >= 1"),
    (dict(train="base,adapters"), "train must name one or more of base, lora, connector"),
    (dict(out="x.pt"), "must end in .pt2"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(version=9), "version 9 is not supported"),
    (dict(holdout=1.0), "holdout must be in [0, 1)"),
    (dict(lr_scale={"spiral": 0}), "lr_scale of spiral must be a positive number"),
])
def test_config_refuses_bad_values(kw, message):
    base = dict(converted="m.pt2", data="d.txt", out="o.pt2")
    base.update(kw)
    with pytest.raises(tr.TrainError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tr.TrainConfig(**base)


def test_config_round_trips():
    c = tr.TrainConfig(converted="m.pt2", data="d.txt", out="o.pt2", train="base,lora", loss="last",
                       lr_scale={"lora": 3})
    assert c.train == ("base", "lora") and c.lr_scale == (("lora", 3.0),)
    assert tr.TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.checkpoint_path == Path("o.ckpt")
    with pytest.raises(tr.TrainError, match="unknown train config field 'stepz'"):
        tr.TrainConfig.from_dict({**c.to_dict(), "stepz": 3})


def test_data_text_and_json_lines(tmp_path):
    (tmp_path / "a.txt").write_text("First text here.\n\n  Second one.  \n")
    assert [r.text for r in tr.read_records(tmp_path / "a.txt")] == ["First text here.", "Second one."]
    img = tmp_path / "i.png"
    img.write_bytes(b"")
    (tmp_path / "b.jsonl").write_text('"plain"\n{"text": "with image", "image": "i.png"}\n')
    recs = tr.read_records(tmp_path / "b.jsonl")
    assert recs[0].text == "plain" and recs[0].image is None and recs[1].image == img
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(tr.TrainError, match=r"c.jsonl:2: not valid JSON"):
        tr.read_records(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": "x", "image": "missing.png"}\n')
    with pytest.raises(tr.TrainError, match=r"d.jsonl:1: image .*missing.png not found"):
        tr.read_records(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(tr.TrainError, match="non-empty \"text\""):
        tr.read_records(tmp_path / "e.jsonl")
    (tmp_path / "f.txt").write_text("\n\n")
    with pytest.raises(tr.TrainError, match="no texts"):
        tr.read_records(tmp_path / "f.txt")


def test_data_order_is_a_function_of_seed_and_position():
    a = tr.example_indices(0, 25, 10, seed=3)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert tr.example_indices(7, 9, 10, seed=3) == a[7:16]
    assert tr.example_indices(0, 10, 10, seed=4) != a[:10]


# ----------------------------------------------------------------------------------------------
# training


def test_train_tiny_llama_end_to_end(llama, data, tmp_path):
    out = tmp_path / "t.pt2"
    events = []
    res = tr.train(_cfg(llama, data, out, steps=6, eval_every=3), progress=events.append)
    rep = res.report
    assert res.out == out and out.is_file() and out.with_suffix(".json").is_file()
    assert not out.with_suffix(".ckpt").exists()           # removed once the output is written
    assert rep["objective"] == "kl" and rep["depths"] == [1, 2] and rep["steps"] == 6
    assert [e["step"] for e in rep["evals"]] == [0, 3, 6]
    for k in ("1", "2"):                                    # distillation helps at every depth
        assert rep["after"]["depths"][k]["kl"] < rep["before"]["depths"][k]["kl"]
    assert set(rep["history"][0]["depths"]) == {"1", "2"} and "worse" in rep["history"][0]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "eval" and "start" in kinds and kinds.count("step") == 6 and kinds[-1] == "done"
    # the output is a converted model as `loopify convert` writes it, with the report added
    module, _, manifest = conv.load_converted(out)
    assert manifest["train"]["steps"] == 6 and manifest["verify"]["trained"]
    assert manifest["config"] == json.loads(llama.with_suffix(".json").read_text())["config"]
    for n, p in _trainable(res.module).items():
        torch.testing.assert_close(dict(module.named_parameters())[n], p, rtol=0, atol=0)
    # only the chosen groups moved: embeddings and the head are frozen
    orig, _, _ = conv.load_converted(llama)
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, dict(orig.named_parameters())[n])}
    assert moved and moved <= set(_trainable(module))


def test_the_cosine_schedule_ends_at_the_time_limit_when_that_comes_first():
    from loopify.train.loop import _lr_at

    c = tr.TrainConfig(converted="m.pt2", data="d.txt", out="o.pt2", steps=1000, lr=1.0, max_seconds=100)
    assert _lr_at(c, 10, 0.0) == pytest.approx(1.0, abs=1e-3)      # early on: the peak
    assert _lr_at(c, 10, 50.0) == pytest.approx(0.55)               # half the time: half way down the cosine
    assert _lr_at(c, 10, 100.0) == pytest.approx(0.1)               # the time is up: 10% of the peak
    assert _lr_at(c, 1000, 1.0) == pytest.approx(0.1)               # the steps run out first
    no_limit = tr.TrainConfig(converted="m.pt2", data="d.txt", out="o.pt2", steps=1000, lr=1.0)
    assert _lr_at(no_limit, 500, 1e6) == pytest.approx(0.55)       # without a limit the time does not count


def test_stack_examples_cuts_the_columns_that_are_padding_in_every_row():
    right = {"input_ids": torch.tensor([[5, 6, 7, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0]])}
    shorter = {"input_ids": torch.tensor([[8, 9, 0, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0, 0, 0, 0]])}
    b = stack_examples([right, shorter])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    left = {"input_ids": torch.tensor([[0, 0, 4, 5]]), "attention_mask": torch.tensor([[0, 0, 1, 1]])}
    assert stack_examples([left])["input_ids"].tolist() == [[4, 5]]   # left padding is cut from the left
    # a batch with no mask (or all padding) is stacked as it is
    assert stack_examples([{"input_ids": torch.tensor([[1, 2]])}] * 2)["input_ids"].shape == (2, 2)


def test_a_batched_step_trains_like_examples_one_at_a_time(llama, data, tmp_path):
    """The batched forward (one padded batch, trimmed) computes the per-example losses of the
    one-at-a-time path: the same weights after 3 steps up to float re-association (batched
    matmuls sum in another order; 1e-5 relative covers Adam's normalised steps of lr 1e-3)."""
    a = tr.train(_cfg(llama, data, tmp_path / "a.pt2", steps=3, batched=True))
    b = tr.train(_cfg(llama, data, tmp_path / "b.pt2", steps=3, batched=False))
    assert a.report["data"]["batched"] and not b.report["data"]["batched"]
    for k in ("1", "2"):
        assert a.report["history"][0]["depths"][k] == pytest.approx(b.report["history"][0]["depths"][k], rel=1e-5)
    wa, wb = _trainable(a.module), _trainable(b.module)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-5, atol=1e-6)


def test_a_longer_seq_len_needs_a_model_that_runs_at_any_length(llama, llava, data, tmp_path):
    r = tr.train(_cfg(llama, data, tmp_path / "l.pt2", steps=1, seq_len=48))
    assert r.report["data"]["seq_len"] == 48 and r.report["data"]["batched"]
    with pytest.raises(tr.TrainError, match="runs only at its captured length .*image tokens sit at fixed positions"):
        tr.train(_cfg(llava, data, tmp_path / "v.pt2", steps=1, seq_len=48))


def test_train_groups_and_last_loss(llama, data, tmp_path):
    res = tr.train(_cfg(llama, data, tmp_path / "t.pt2", steps=2, train="lora", loss="last"))
    orig, _, _ = conv.load_converted(llama)
    after = dict(res.module.named_parameters())
    g = tr.parameter_groups(orig)
    assert all(torch.equal(p, after[n]) for n, p in g["base"])           # base frozen
    assert any(not torch.equal(p, after[n]) for n, p in g["lora"])      # LoRA trained
    assert "worse" not in res.report["history"][0] and res.report["beta"] is None


def test_nothing_to_train_is_refused(llama, data, tmp_path):
    with pytest.raises(tr.TrainError, match="nothing to train in connector"):
        tr.train(_cfg(llama, data, tmp_path / "t.pt2", train="connector"))


def test_model_without_tokenizer_needs_an_explicit_choice(llama, data, tmp_path):
    with pytest.raises(tr.TrainError, match="has no tokenizer of its own; .*--tokenizer bytes"):
        tr.train(_cfg(llama, data, tmp_path / "t.pt2", tokenizer="auto"))


RESUME_KW = dict(steps=6, batch=2, checkpoint_every=2, eval_every=0)


@pytest.fixture(scope="module")
def full_run(llama, data, work):
    """The uninterrupted reference run: (trainable weights, report)."""
    res = tr.train(_cfg(llama, data, work / "full.pt2", **RESUME_KW))
    return _trainable(res.module), res.report


@pytest.mark.parametrize("how", ["sigint", "keyboard-interrupt"])
def test_interrupted_run_resumes_to_the_same_weights(llama, data, tmp_path, how, full_run):
    kw = RESUME_KW

    out = tmp_path / "part.pt2"

    def stop_at_3(event):
        if event["event"] == "step" and event["step"] == 3:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)   # the handler lets step 3 finish, then checkpoints
            else:
                raise KeyboardInterrupt

    with pytest.raises(tr.TrainInterrupted, match="after step 3 of 6; checkpoint written"):
        tr.train(_cfg(llama, data, out, **kw), progress=stop_at_3)
    ckpt = out.with_suffix(".ckpt")
    assert ckpt.is_file() and not out.exists()
    state = tr.load_checkpoint(ckpt)
    assert state["step"] == 3 and state["pos"] == 6
    with pytest.raises(tr.TrainError, match="pass --resume to continue it"):
        tr.train(_cfg(llama, data, out, **kw))
    with pytest.raises(tr.TrainError, match="--resume with lr=0.01"):
        tr.train(_cfg(llama, data, out, resume=True, **{**kw, "lr": 1e-2}))
    resumed = tr.train(_cfg(llama, data, out, resume=True, **kw))
    assert resumed.report["resumed_from"] == 3 and resumed.report["steps"] == 6
    a, b = full_run[0], _trainable(resumed.module)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n   # bitwise: same step, optimizer state and data position
    assert [h["loss"] for h in resumed.report["history"]] == [h["loss"] for h in full_run[1]["history"]]
    assert resumed.report["before"] == full_run[1]["before"]


def test_resume_without_checkpoint_is_refused(llama, data, tmp_path):
    with pytest.raises(tr.TrainError, match="no checkpoint to resume from"):
        tr.train(_cfg(llama, data, tmp_path / "t.pt2", resume=True))
    bad = tmp_path / "t.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(tr.TrainError, match="cannot read the checkpoint"):
        tr.train(_cfg(llama, data, tmp_path / "t.pt2", resume=True))


def _sample_images() -> list[Path]:
    try:
        import matplotlib

        d = Path(matplotlib.get_data_path()) / "sample_data"
    except ImportError:
        return []
    return [p for p in (d / "grace_hopper.jpg", d / "logo2.png") if p.is_file()]


def test_llava_end_to_end_with_images(llava, data, tmp_path):
    """LLaVA (CLIP + Llama, LoRA 2, recursive connectors on both loops): JSON lines with real
    sentences and images; every group trains; the output loads back."""
    imgs = _sample_images()
    sents = [l for l in data[0].read_text().splitlines() if l][:8]
    recs = [{"text": s, **({"image": str(imgs[i % len(imgs)])} if imgs and i % 2 == 0 else {})}
            for i, s in enumerate(sents)]
    jl = tmp_path / "vl.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "llava-t.pt2"
    res = tr.train(_cfg(llava, (jl, data[1]), out, steps=3, eval_every=0, teacher=None))
    rep = res.report
    assert rep["objective"] == "kl" and rep["depths"] == [1, 2]
    assert rep["trainable"]["connector"] > 0 and rep["trainable"]["lora"] > 0 and rep["trainable"]["base"] > 0
    if imgs:
        assert rep["data"]["images"] == 4
        assert any("images resized to 32x32" in n for n in rep["data"]["notes"])
    for k in ("1", "2"):
        assert rep["after"]["depths"][k]["kl"] < rep["before"]["depths"][k]["kl"]
    module, cap, manifest = conv.load_converted(out)
    assert manifest["train"]["steps"] == 3
    conn = [r.connector for r in conv.recursions(module).values() if r.connector is not None]
    assert conn and any(float(c.scale.detach().abs().sum()) > 0 for c in conn)   # connectors moved off zero


def test_encoder_with_its_own_tokenizer(tmp_path, data):
    """The real MiniLM (rank 0: only the shared blocks train) with its tokenizer: cosine objective."""
    cap = capture.load(zoo._minilm_dir())
    res = conv.convert_captured(cap, conv.ConvertConfig(blocks=3, rank=0))
    src = tmp_path / "minilm.pt2"
    conv.save(res, cap, src)
    r = tr.train(_cfg(src, data, tmp_path / "m.pt2", steps=14, tokenizer="auto", lr=2e-4))
    rep = r.report
    # 24 texts, 2 a step: steps 13 and 14 take their teacher states from the cache
    assert rep["teacher_cache"] == {"on": True, "examples": 24, "bytes": rep["teacher_cache"]["bytes"], "hits": 4}
    assert rep["teacher_cache"]["bytes"] > 24 * 384 * 4
    assert rep["objective"] == "cosine" and rep["trainable"] == {"base": 5323392, "lora": 0, "connector": 0, "router": 0,
                                                                "spiral": 0}
    # the converted model carries its own tokenizer (its assets), not a path to the original's
    assert rep["data"]["tokenizer"] == str(src.with_suffix(".assets")) and rep["data"]["seq_len"] == 30
    for k in ("1", "2"):
        assert rep["after"]["depths"][k]["cosine"] > rep["before"]["depths"][k]["cosine"]


def test_cached_teacher_targets_are_the_teachers_own(tmp_path):
    """The teacher cache (hidden-state objectives) gives, at every real token, the teacher's states
    on the step's batch within 1e-5 relative (the teacher ran on another batch: float
    re-association), zeros at padding, whichever examples were cached before."""
    from types import SimpleNamespace

    from loopify.train import loop as L

    cap = capture.load(zoo._minilm_dir())
    teacher = cap.eager
    sentences = texts.sentences()[:10]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(zoo._minilm_dir())
    exs = [dict(tok(t, padding="max_length", max_length=30, truncation=True, return_tensors="pt")) for t in sentences]
    run = SimpleNamespace(teacher=cap, objective=SimpleNamespace(kind="cosine"), batched=True, train_ex=exs,
                          target=lambda b: teacher(**b)[0].detach())
    run.tcache = L._teacher_cache(run)
    assert run.tcache is not None
    with torch.no_grad():
        for idx in ([0, 1, 2, 3], [2, 5, 0, 9], [9, 9, 4, 1]):  # misses, then a mix, a repeat
            batch = stack_examples([exs[i] for i in idx])
            got, ref = L._targets(run, idx, batch), run.target(batch)
            m = batch["attention_mask"].bool()
            assert got.shape == ref.shape and float((got[m] - ref[m]).abs().max()) <= 1e-5 * float(ref.abs().max())
            assert not bool(got[~m].any())
    assert run.tcache["hits"] == 2 + 3 and len(run.tcache["rows"]) == 7
    # logits (a causal LM's KL) are not cached, nor left-padded texts
    assert L._teacher_cache(SimpleNamespace(**{**vars(run), "objective": SimpleNamespace(kind="kl")})) is None
    left = [{k: v.flip(-1) for k, v in e.items()} for e in exs]
    assert L._teacher_cache(SimpleNamespace(**{**vars(run), "train_ex": left})) is None


# ----------------------------------------------------------------------------------------------
# distributed


_DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from loopify import train as tr
    cfg = tr.TrainConfig.from_dict(json.loads(sys.argv[1]))
    res = tr.train(cfg)
    if torch.distributed.is_initialized():
        raise SystemExit("process group left initialised")
    import os
    if os.environ["RANK"] == "0":
        torch.save({n: p.detach() for n, p in res.module.named_parameters()}, sys.argv[2])
""")


def test_ddp_two_cpu_processes_match_one_process_with_twice_the_batch(llama, data, tmp_path, full_run):
    """torchrun with 2 processes on gloo, batch 1 each == 1 process with batch 2 (the same examples
    per step: rank r takes the r-th of them), up to float re-association in the all-reduce."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    cfg = _cfg(llama, data, tmp_path / "ddp.pt2", **{**RESUME_KW, "batch": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           json.dumps(cfg.to_dict()), str(tmp_path / "ddp-weights.pt")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp-weights.pt")
    manifest = json.loads((tmp_path / "ddp.json").read_text())
    assert manifest["train"]["world_size"] == 2 and manifest["train"]["examples_seen"] == 12
    assert not (tmp_path / "ddp.ckpt").exists()
    for n, p in full_run[0].items():
        torch.testing.assert_close(ddp[n], p, rtol=1e-5, atol=1e-6)


_KILLABLE = '''
import sys, time
from loopify import train as tr
kw = dict(converted=sys.argv[1], data=sys.argv[2], eval_data=sys.argv[3], out=sys.argv[4], steps=6, batch=2, lr=1e-3,
          tokenizer="bytes", checkpoint_every=2, eval_every=0, threads=1)
def hook(e):
    if e["event"] == "step":
        print("step", e["step"], flush=True)
        time.sleep(0.3)
tr.train(tr.TrainConfig(**kw), progress=hook)
'''


@pytest.mark.parametrize("kill_at", [3, 5])
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(llama, data, tmp_path, full_run, kill_at):
    """kill -9 (no handler runs, no checkpoint on the way out) between checkpoints: --resume goes
    on from the last complete checkpoint and ends bitwise where the uninterrupted run ends, with
    no temporary left beside the checkpoint (issue 16, case 11)."""
    out = tmp_path / "killed.pt2"
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    p = subprocess.Popen([sys.executable, str(script), str(llama), str(data[0]), str(data[1]), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    for line in p.stdout:
        if line.strip() == f"step {kill_at}":
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL and not out.exists()
    assert tr.load_checkpoint(out.with_suffix(".ckpt"))["step"] == kill_at - 1
    resumed = tr.train(_cfg(llama, data, out, resume=True, **RESUME_KW))
    assert resumed.report["resumed_from"] == kill_at - 1
    a, b = full_run[0], _trainable(resumed.module)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
