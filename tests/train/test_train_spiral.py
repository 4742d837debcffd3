"""``loopify train`` learns the gates of a multi-resolution loop (distillation + MRL).

The real MiniLM, 6 layers -> 3 blocks x 2 loops with schedule 2:1: the first step runs on the
sequence pooled by 2, its gate starts at zero, so before training depth 2 is depth 1 (a lossy
plan: the coarse step replaced a full one). Training only the gates (``train=spiral``) must
move them off zero, improve depth 2's held-out cosine to the original (strictly: the coarse
step starts as a no-op, and the first steps follow its gradient), and write a model whose
gates load back exactly.
"""

from __future__ import annotations

import pytest
import torch

from loopify import capture, texts
from loopify import convert as conv
from loopify import train as tr
from loopify.nn import recursions


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train_spiral")


def _spiral_minilm(work, tag: str, n_train: int, n_held: int):
    """MiniLM 3 x 2 with schedule 2:1 written to ``work`` with train / held-out sentence files:
    (converted path, train path, held-out path, the conversion result)."""
    from loopify.examples import zoo

    train_s, held = texts.split(texts.sentences())
    tp, hp = work / f"train{tag}.txt", work / f"heldout{tag}.txt"
    tp.write_text("\n".join(train_s[:n_train]) + "\n")
    hp.write_text("\n".join(held[:n_held]) + "\n")
    cap = capture.load(zoo._minilm_dir())
    res = conv.convert_captured(cap, conv.ConvertConfig(blocks=3, schedule=(2, 1)))
    src = work / f"minilm-spiral{tag}.pt2"
    conv.save(res, cap, src)
    return src, tp, hp, res


def test_train_learns_the_gates_of_a_spiral_minilm(work):
    src, tp, hp, _ = _spiral_minilm(work, "", 16, 6)
    cfg = tr.TrainConfig(converted=str(src), data=str(tp), eval_data=str(hp), out=str(work / "t.pt2"), steps=4,
                         batch=2, lr=5e-2, tokenizer="auto", checkpoint_every=0, threads=1, train=("spiral",),
                         warmup=0)
    r = tr.train(cfg)
    rep = r.report
    assert rep["trainable"] == {"base": 0, "lora": 0, "connector": 0, "router": 0, "spiral": 384}
    before, after = rep["before"]["depths"], rep["after"]["depths"]
    assert before["1"]["cosine"] == pytest.approx(before["2"]["cosine"], abs=1e-6)  # neutral: depth 2 = depth 1
    assert after["2"]["cosine"] > before["2"]["cosine"]
    assert after["1"]["cosine"] == pytest.approx(before["1"]["cosine"], abs=1e-6)  # depth 1 has no coarse step
    (rec,) = recursions(r.module).values()
    gate = rec.spiral.gate.detach()
    assert float(gate.abs().max()) > 1e-3
    module, _, manifest = conv.load_converted(work / "t.pt2")
    (back,) = recursions(module).values()
    assert torch.equal(back.spiral.gate.detach(), gate)
    assert manifest["loops"][0]["schedule"] == [2, 1]
    print("depth 2 cosine", before["2"]["cosine"], "->", after["2"]["cosine"], "gate max", float(gate.abs().max()))


def test_lr_scale_gives_a_group_its_own_learning_rate(work):
    """``lr_scale={"spiral": 20}``: after one AdamW step (a first step moves every parameter with
    a gradient by exactly its learning rate: m / sqrt(v) = +-1, no weight decay) the gates moved
    by 20 x lr and the shared blocks by lr."""
    src, tp, hp, res = _spiral_minilm(work, "2", 8, 2)
    (rec0,) = recursions(res.module).values()
    w0 = rec0.blocks[0].get_parameter("attention.self.query.weight").detach().clone()
    lr = 1e-3
    cfg = tr.TrainConfig(converted=str(src), data=str(tp), eval_data=str(hp), out=str(work / "t2.pt2"), steps=1,
                         batch=2, lr=lr, checkpoint_every=0, threads=1, train=("base", "spiral"),
                         lr_scale={"spiral": 20}, schedule="constant")
    assert cfg.to_dict()["lr_scale"] == {"spiral": 20.0}
    r = tr.train(cfg)
    (rec,) = recursions(r.module).values()
    assert float(rec.spiral.gate.detach().abs().max()) == pytest.approx(20 * lr, rel=1e-3)
    moved = (rec.blocks[0].get_parameter("attention.self.query.weight").detach() - w0).abs().max()
    assert float(moved) == pytest.approx(lr, rel=1e-3)
    with pytest.raises(tr.TrainError, match="lr_scale names 'gates'"):
        tr.TrainConfig(converted=str(src), data=str(tp), out=str(work / "x.pt2"), lr_scale={"gates": 2})
