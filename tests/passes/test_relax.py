"""relax: per-depth LoRA from the SVD of the residual: reconstruction error, parameter counts, alpha, refusals, golden IR, idempotence."""

from __future__ import annotations

import pytest

from loopify.errors import PipelineError
from loopify.nn import recursions
from tests.passes.helpers import RTOL, check_golden, describe, out, rel, run


def test_relax_error_equals_dropped_singular_energy(captured):
    cap = captured("llama")
    for rank in (1, 4, 16):
        res = run(cap, f"fold-loops{{blocks=1}},relax{{rank={rank}}}")
        (loop,) = res.records[-1].report["loops"]
        assert loop["max_recon_vs_dropped_gap"] < 1e-6
        assert loop["max_recon_error"] > 0


def test_relax_param_count_formula(captured):
    cap = captured("llama")  # hidden 64, intermediate 128, 4 heads, 2 kv heads (k/v: 32 x 64)
    res = run(cap, "fold-loops{blocks=2},relax{rank=4,vectors=false}")
    (loop,) = res.records[-1].report["loops"]
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    assert loop["params_added"] == 4 * sum(4 * (o + i) for o, i in shapes)


def test_relax_alpha_is_compensated(captured):
    cap = captured("qwen2")
    a = out(cap, run(cap, "fold-loops,relax{rank=8}").state.module)
    b = out(cap, run(cap, "fold-loops,relax{rank=8,alpha=32.0}").state.module)
    assert rel(a, b) < RTOL


@pytest.mark.parametrize("spec,message", [
    ("relax{rank=4}", "relax needs a loop: run fold-loops before it"),
    ("fold-loops,relax{rank=-1}", "rank must be >= 0 or 'full'"),
    ("fold-loops,relax{rank=lots}", "expected an integer or one of full"),
])
def test_relax_refusals(captured, spec, message):
    with pytest.raises(PipelineError, match=message):
        run(captured("llama"), spec)




# -- golden IR, idempotence, module form ----------------------------------------------------------


def test_golden_ir(tiny_capture):
    res = run(tiny_capture, "fold-loops{blocks=1},relax{rank=2}")
    check_golden("relax", describe(res.state.module))


def test_a_second_run_changes_nothing(tiny_capture):
    from loopify.passes.relax import Relax

    res = run(tiny_capture, "fold-loops{blocks=1},relax{rank=2}")
    again = Relax(rank=2).run(res.state)
    assert not again.modified and "already" in again.report["note"]
    with pytest.raises(ValueError, match="already relaxed at another rank"):
        Relax(rank=3).run(res.state)


def test_full_rank_is_exact_in_module_form(captured):
    cap = captured("qwen2", "hf")
    res = run(cap, "fold-loops{blocks=1},relax{rank=full}", form="module")
    assert rel(cap.run()[0], out(cap, res.state.module)) < RTOL


def test_a_rank_above_full_is_clamped_and_lossless(captured):
    """rank=10000 on 64-wide matrices: clamped to each matrix's full rank, reported, and the
    plan treated as lossless (issue 16.8)."""
    from loopify import convert as conv

    cap = captured("llama")
    res = conv.convert_captured(cap, conv.ConvertConfig(rank=10000))
    rep = res.manifest["plan"]["relax"]["loops"][0]
    assert rep["effective_rank"] == 64 and rep["clamped"] and res.manifest["plan"]["relax"]["lossless"]
    assert res.manifest["verify"]["lossless_plan"] and res.manifest["verify"]["ok"]
