"""Training at several depths on a shared prefix (loopify.train.student.DepthRunner).

The largest depth runs once and records each loop's state after k recursion steps; every other
depth replays it through the rest of the model. Against running each depth on its own (the
reference, ``shared_prefix=False``), in eval mode (no dropout): outputs and the gradients of the
summed loss agree within 1e-5 relative (float re-association of the summed backward; about 1e-7
is seen), and the blocks run fewer times (counted by hooks). Plans whose depths do not share a
prefix (sequence sharing, routers) fall back to the reference path, exactly.
"""

from __future__ import annotations

import pytest
import torch

from loopify import capture
from loopify.nn import recursions
from loopify.pipeline import State, parse, run_pipeline
from loopify.train.student import DepthRunner

RTOL = 1e-5


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    from loopify.examples import zoo

    return capture.load(zoo.write_hf("llama", tmp_path_factory.mktemp("zoo")))


def _module(cap, spec: str, seed: int = 0):
    w = run_pipeline(parse("find-spans{similarity=false}," + spec), State(cap, cap.editable())).state.module
    torch.manual_seed(seed)
    with torch.no_grad():  # move LoRA B, connectors and routers off their neutral zeros, as training would
        for name, p in w.named_parameters():
            if any(k in name for k in ("lora_B", "connector", "router")):
                p.add_(torch.randn_like(p) * 0.02)
    return w.eval()


def _block_calls(w) -> list[int]:
    n = [0]
    for rec in recursions(w).values():
        for b in rec.blocks:
            b.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def _run(w, cap, depths, shared: bool):
    runner = DepthRunner(w, shared_prefix=shared)
    w.zero_grad(set_to_none=True)
    outs = runner({k: v for k, v in cap.kwargs.items()}, depths)
    sum(o.float().pow(2).mean() for o in outs).backward()
    grads = {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads, runner.shared_last


def _close(a, b) -> bool:
    return float((a - b).abs().max()) <= RTOL * max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("spec,depths,shares", [
    ("fold-loops{blocks=2},relax{rank=2}", [1, 2], True),                   # cycle + per-depth LoRA
    ("fold-loops{blocks=1}", [1, 2, 3, 4], True),                           # 1 block x 4
    ("fold-loops{blocks=1,keep_first=1}", [2, 1, 3], True),                  # a unique first layer, any order
    ("fold-loops{blocks=2},insert-connectors", [1, 2], True),               # a recursive connector
    ("fold-loops{mode=deepen,repeat=2}", [1, 2], True),                     # deepen
    ("fold-loops{blocks=2,sharing=sequence}", [1, 2], False),               # no shared prefix
    ("fold-loops{blocks=2},route{kind=expert}", [1, 2], False),             # routers run every depth
])
def test_shared_prefix_gives_each_depths_outputs_and_gradients(cap, spec, depths, shares):
    w = _module(cap, spec)
    calls = _block_calls(w)
    ref_out, ref_grad, ref_shared = _run(w, cap, depths, shared=False)
    n_ref, calls[0] = calls[0], 0
    out, grad, shared = _run(w, cap, depths, shared=True)
    assert not ref_shared and shared == shares
    assert len(out) == len(depths) and all(_close(a, b) for a, b in zip(out, ref_out))
    assert grad.keys() == ref_grad.keys() and all(_close(grad[n], ref_grad[n]) for n in grad)
    # the outputs differ between depths (a replay that returned the wrong depth would not)
    assert not torch.allclose(out[0], out[1])
    if shares:
        (rec,) = recursions(w).values()
        per_step = rec.step_len
        assert calls[0] == per_step * max(min(k, rec.spec.max_loops) for k in depths) < n_ref
    else:
        assert calls[0] == n_ref


def test_a_loop_called_twice_in_one_forward_falls_back(cap):
    """A model that calls its loop twice per forward cannot replay one recorded state: the runner
    notices and runs every depth in full (same results as the reference)."""
    w = _module(cap, "fold-loops{blocks=2}")
    (rec,) = recursions(w).values()
    forward = rec.forward

    def twice(*a, **kw):
        forward(*a, **kw)
        return forward(*a, **kw)

    rec.forward = twice
    try:
        ref_out, ref_grad, _ = _run(w, cap, [1, 2], shared=False)
        out, grad, shared = _run(w, cap, [1, 2], shared=True)
    finally:
        del rec.forward
    assert not shared
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out))
