"""Multi-resolution loops (SpiralFormer, the multi-resolution pass) compiled with TVM.

A loop with a resolution schedule of N positions is staged as one body per position, each of
its own static shapes (a coarse step runs on ceil(S / r) groups, or S group slots with image
positions), chosen in ``main`` by the run-time count (position j runs when n >= N - j); the
full-resolution steps past the schedule of a deepened loop are an ordinary loop. The gates are
moved off zero (seeded), else a coarse step adds exactly nothing and its pooling, mask pooling
and unpooling would go unchecked.

Tolerances: the staged programs compute in PyTorch what the eager loop computes, op for op
except that the image-position pooling runs over S dense slots while tracing (sums of the same
terms in another order): 1e-5 relative (measured 0 without, 3e-7 with image positions). The
artifacts are validated by ``compile`` itself at every loop count at its ARTIFACT_RTOL (1e-4;
measured 3e-7 to 9e-7); the tests assert that every count was checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from loopify import convert as conv  # noqa: E402
from loopify.compile import compile_model, loop_counts_to_check  # noqa: E402
from loopify.errors import LoopifyError  # noqa: E402
from loopify.nn import recursions, set_loops  # noqa: E402
from loopify.staging import Stage, run_stages, stages_of  # noqa: E402

STAGED_RTOL = 1e-5


def _spiral_pt2(cap, cfg: conv.ConvertConfig, out: Path) -> Path:
    res = conv.convert_captured(cap, cfg)
    gen = torch.Generator().manual_seed(0)
    for rec in recursions(res.module).values():
        rec.spiral.gate.data.copy_(0.5 * torch.randn(rec.spiral.gate.shape, generator=gen))
    conv.save(res, cap, out)
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_a_position_stage_runs_the_schedule_positions_the_count_reaches():
    """4:2:1 at count n runs the last n positions as steps 0..n-1; past the schedule, the
    full-resolution stage takes steps 3..n-1."""
    prog = object()
    at = [Stage("loop", prog, position=(j, 3)) for j in range(3)]
    rest = Stage("loop", prog, position=(-1, 3))
    assert [[s.steps_at(n) for s in at] for n in range(5)] == [
        [[], [], []], [[], [], [0]], [[], [0], [1]], [[0], [1], [2]], [[0], [1], [2]]]
    assert [rest.steps_at(n) for n in range(6)] == [[], [], [], [], [3], [3, 4]]
    assert Stage("loop", prog).steps_at(2) == [0, 1]
    with pytest.raises(LoopifyError, match="only a loop stage has a schedule position"):
        Stage("straight", prog, position=(0, 2))


@pytest.mark.parametrize("name,cfg,counts", [
    ("llama", conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1)), range(0, 5)),
    ("llama", conv.ConvertConfig(schedule=(2, 1)), range(1, 3)),
    ("llava-clip", conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1)), range(0, 5)),
])
def test_staged_spiral_loops_equal_the_eager_model_at_every_count(captured, name, cfg, counts, tmp_path):
    cap = captured(name, "hf")
    module, cap2, _ = conv.load_converted(_spiral_pt2(cap, cfg, tmp_path / "s.pt2"))
    stages = stages_of(module, cap2)
    loops = [s for s in stages if s.kind == "loop"]
    assert {s.position for s in loops} >= {(0, len(cfg.schedule)), (len(cfg.schedule) - 1, len(cfg.schedule))}
    flat = list(cap2.flat_inputs())
    n_loops = len(recursions(module))
    for k in counts:
        set_loops(module, k)
        with torch.no_grad():
            want = _first(module(*cap2.args, **cap2.kwargs))
            got = run_stages(stages, flat, [k] * n_loops)[0]
        assert _rel(got, want) <= STAGED_RTOL, k


@pytest.mark.parametrize("name,cfg", [
    ("llama", conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1))),   # 0..4: past the schedule too
    ("minilm", conv.ConvertConfig(blocks=3, schedule=(4, 1))),                   # the real MiniLM, compressed
    ("llava-clip", conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1))),  # image positions
])
def test_spiral_artifact_matches_pytorch_at_every_loop_count(captured, name, cfg, tmp_path):
    if name == "minilm":
        from loopify import capture
        from loopify.examples import zoo

        cap = capture.load(zoo._minilm_dir())
    else:
        cap = captured(name, "hf")
    pt2 = _spiral_pt2(cap, cfg, tmp_path / "s.pt2")
    compiled = compile_model(pt2, tmp_path / "art")
    checked = {tuple(c["loops"]) for c in compiled.checks}
    assert checked == {tuple(c) for c in loop_counts_to_check(compiled.manifest["loops"])}
    assert all(c["ok"] for c in compiled.checks)
    n = len(cfg.schedule)
    stages = compiled.manifest["stages"]
    positions = sorted({tuple(s["position"]) for s in stages if s.get("position")})
    assert positions == sorted({(j, n) for j in range(n)} | ({(-1, n)} if cfg.mode == "deepen" else set()))
    # the pooled stages really run on fewer tokens: their coarse step is a program of its own
    assert len({s["name"] for s in stages}) == len(stages)


@pytest.mark.skipif(os.environ.get("LOOPIFY_SLOW") != "1", reason="slow: nvcc builds (LOOPIFY_SLOW=1)")
def test_spiral_artifact_builds_for_cuda(captured, tmp_path):
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    pt2 = _spiral_pt2(captured("llama", "hf"), conv.ConvertConfig(mode="deepen", repeat=3, schedule=(4, 2, 1)),
                      tmp_path / "s.pt2")
    compiled = compile_model(pt2, tmp_path / "cuda", target="cuda")
    assert compiled.manifest["target"]["kind"] == "cuda" and (tmp_path / "cuda" / "lib.so").is_file()
    assert [s.get("position") for s in compiled.manifest["stages"] if s["kind"] == "loop"] == \
        [[0, 3], [1, 3], [2, 3], [-1, 3]]
