"""loopify train --router: Mixture-of-Recursions router losses beside distillation and the MRL.

The tiny zoo Llama (4 layers -> 2 blocks x 2 loops), real sentences from the machine, the
original as teacher. The router losses are checked on hand-set logits (values computed by hand),
the training path end to end: routers added, trained (their weights move, the loss includes
theirs), calibrated to the decode-safe threshold rule and written so that load_converted
rebuilds them.
"""

from __future__ import annotations

import math

import pytest
import torch

from loopify import convert as conv
from loopify import train as tr
from loopify.nn import recursions
from loopify.nn.routing import Router, RouterSpec, router_losses
from tests.train.test_train import _cfg, _converted, data, work  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def plain_llama(work):  # noqa: F811
    return _converted(work, "llama")


def test_expert_aux_loss_is_the_bce_to_the_topk_choice():
    r = Router(RouterSpec("expert", 2, 4, capacity=(1.0, 0.5)))
    z = torch.tensor([[2.0, -1.0, 0.0]])
    keep = torch.tensor([[True, False, True]])
    r.record = [{"step": 1, "logits": z, "eligible": torch.tensor([[True, True, True]]), "keep": keep}]
    got = router_losses(r)
    want = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
             + math.log(0.5)) / 3
    assert abs(float(got["aux"]) - want) < 1e-6
    assert abs(float(got["z"]) - (4 + 1 + 0) / 3) < 1e-6


def test_token_balancing_loss_is_one_when_balanced_and_larger_when_not():
    r = Router(RouterSpec("token", 2, 4, capacity=(1.0, 1.0)))
    even = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one token per depth, probabilities mirrored
    r.record = [{"step": 0, "logits": even, "choice": torch.tensor([[0, 1]])}]
    assert abs(float(router_losses(r)["aux"]) - 1.0) < 1e-6
    skew = torch.tensor([[[3.0, 0.0], [3.0, 0.0]]])
    r.record = [{"step": 0, "logits": skew, "choice": torch.tensor([[0, 0]])}]
    assert float(router_losses(r)["aux"]) > 1.5


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_train_with_a_router_trains_calibrates_and_writes_it(plain_llama, data, work, kind):  # noqa: F811
    out = work / f"routed-{kind}.pt2"
    res = tr.train(_cfg(plain_llama, data, out, router=kind, steps=3,
                        **({"capacity": (1.0, 0.5), "capacity_warmup": 2} if kind == "expert" else {})))
    rep = res.report["router"]["loops"]["model.model.layers.0"]
    assert rep["kind"] == kind and rep["select"] == "threshold"
    module, inputs, manifest = conv.load_converted(out)
    (rec,) = recursions(module).values()
    assert rec.router is not None and rec.router.kind == kind
    assert manifest["skeletons"]["model.model.layers.0"]["router"]["kind"] == kind
    assert manifest["loops"][0]["router"] == kind and manifest["plan"]["router"]["loops"][0]["trained"]
    assert float(rec.router.net[-1].weight.detach().abs().sum()) > 0  # the router trained off its zero start
    hist = rep["depth"]["histogram"]
    assert sum(hist.values()) == rep["depth"]["tokens"] > 0
    if kind == "expert":  # calibrated: about half the held-out tokens take the second step
        assert rep["thresholds"][0] is None and all(math.isfinite(t) for t in rep["thresholds"][1:])
        assert 0.2 < hist["2"] / rep["depth"]["tokens"] < 0.8
    with torch.no_grad():
        a = module(*inputs.args, **inputs.kwargs)[0]
        b = res.module(*inputs.args, **inputs.kwargs)[0]
    assert torch.equal(a, b)  # the written model is the trained one, thresholds included


def test_router_options_are_checked(plain_llama, data, work):  # noqa: F811
    with pytest.raises(tr.TrainError, match="capacity applies to --router expert"):
        _cfg(plain_llama, data, work / "x.pt2", router="token", capacity=(1.0, 0.5))
    with pytest.raises(tr.TrainError, match="router must be one of"):
        _cfg(plain_llama, data, work / "x.pt2", router="both")
    with pytest.raises(tr.TrainError, match="one value per recursion step"):
        tr.train(_cfg(plain_llama, data, work / "x.pt2", router="expert", capacity=(1.0, 0.5, 0.25)))


def test_capacity_warmup_keeps_every_token_at_its_start_and_the_capacity_at_its_end():
    r = Router(RouterSpec("expert", 2, 4, capacity=(1.0, 0.25)))
    r.select = "topk"
    h = torch.randn(1, 8, 4)
    active = torch.ones(1, 8, dtype=torch.bool)
    counts = []
    for warm in (0.0, 0.5, 1.0):
        r.warm = warm
        keep, _ = r.expert_step(h, 1, active)
        counts.append(int(keep.sum()))
    assert counts == [8, 5, 2]  # ceil(8 * (1 - w * 0.75)): 8, ceil(5.0), ceil(2.0)


def test_loss_free_bias_moves_the_choice_towards_equal_loads_and_adds_no_aux_loss():
    r = Router(RouterSpec("token", 2, 4, capacity=(1.0, 1.0)))
    r.update_bias(torch.tensor([6, 2]), rate=0.5)  # depth 1 over-loaded: its bias falls, depth 2's rises
    assert r.balance_bias.tolist() == [-0.5, 0.5]
    with torch.no_grad():  # logits prefer depth 1 by 0.6 for every token ...
        r.net[-1].bias.copy_(torch.tensor([0.6, 0.0]))
    depth, scale = r.token_depths(torch.zeros(1, 3, 4), 2)
    assert depth.tolist() == [[2, 2, 2]]  # ... the bias (+1 for depth 2) turns the choice
    assert torch.allclose(scale, r.scale(torch.zeros(1, 3)))  # the update scale ignores the bias
    r.balance = "bias"
    assert set(router_losses(r)) == {"z"}
    fresh = Router(RouterSpec("token", 2, 4, capacity=(1.0, 1.0)))
    state = {k: v for k, v in r.state_dict().items() if k != "balance_bias"}
    fresh.load_state_dict(state)  # a model written before the bias existed loads with a zero bias
    assert fresh.balance_bias.tolist() == [0.0, 0.0]


def test_train_token_router_with_loss_free_bias_writes_the_bias(plain_llama, data, work):  # noqa: F811
    out = work / "routed-bias.pt2"
    res = tr.train(_cfg(plain_llama, data, out, router="token", steps=3, balance="bias", bias_rate=0.01))
    rep = res.report["router"]["loops"]["model.model.layers.0"]
    assert rep["balance"] == "bias" and len(rep["bias"]) == 2
    # 3 updates of +-0.01 each, opposite signs for the two depths (or 0 on an exact tie)
    assert all(abs(b) <= 0.03 + 1e-6 for b in rep["bias"]) and any(b != 0 for b in rep["bias"])
    module, inputs, manifest = conv.load_converted(out)
    (rec,) = recursions(module).values()
    assert rec.router.balance_bias.tolist() == pytest.approx(rep["bias"])
    assert manifest["plan"]["router"]["loops"][0]["balance"] == "bias"


def test_router_warmup_and_balance_options_are_checked(plain_llama, data, work):  # noqa: F811
    with pytest.raises(tr.TrainError, match="capacity_warmup applies to --router expert"):
        _cfg(plain_llama, data, work / "x.pt2", router="token", capacity_warmup=5)
    with pytest.raises(tr.TrainError, match="balance applies to --router token"):
        _cfg(plain_llama, data, work / "x.pt2", router="expert", balance="bias")
    with pytest.raises(tr.TrainError, match="balance must be one of"):
        _cfg(plain_llama, data, work / "x.pt2", router="token", balance="free")
