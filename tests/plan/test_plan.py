"""``loopify plan`` on a tiny Llama: the front is Pareto, the parameter counts are the converted
model's, the chosen point is the best within the budget, ``convert --plan`` converts exactly the
point's spec, and bad plans are refused in one line. Plus the pass options the planner writes
(``fold-loops{keep_first,keep_last}``, ``relax{ranks}``)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loopify import plan as pl
from loopify.cli import cli


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory):
    from loopify.examples import zoo

    w = zoo.write_zoo(tmp_path_factory.mktemp("zoo"), ["llama", "minilm"])
    return {n: v["hf"] for n, v in w.items()}


@pytest.fixture(scope="module")
def planned(zoo_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    mp = pytest.MonkeyPatch()
    mp.setattr(pl, "STAGE2", 2)  # a smaller search: seconds, not a minute
    request_finalizer = mp.undo
    r = CliRunner().invoke(cli, ["plan", str(zoo_dirs["llama"]), "--budget", "params=0.7", "--tokenizer", "bytes",
                                 "--tokens", "96", "--json", str(out)])
    request_finalizer()
    assert r.exit_code == 0, r.output
    return out, json.loads(out.read_text()), r.output


def test_the_front_is_pareto_and_the_chosen_point_is_the_best_within_budget(planned):
    _, rep, output = planned
    pts, allp = rep["points"], rep["evaluated"]
    key = lambda p: -p["metrics"]["kl"]
    for axis in ("params", "latency"):
        front = [p for p in pts if axis in p["front"]]
        assert front
        for p in front:  # no measured candidate dominates a front point on its axis
            assert not any(q[f"{axis}_ratio"] <= p[f"{axis}_ratio"] and key(q) >= key(p)
                           and (q[f"{axis}_ratio"] < p[f"{axis}_ratio"] or key(q) > key(p)) for q in allp)
    c = pts[rep["chosen"]]
    assert c["params_ratio"] <= 0.7
    assert key(c) == max(key(p) for p in allp if p["params_ratio"] <= 0.7)
    assert key(c) >= key(rep["default"]) or rep["default"]["params_ratio"] > 0.7
    # LoRA candidates with per-matrix ranks were measured, and every point names its spec
    assert any("ranks=" in p["spec"] for p in allp)
    assert all(p["spec"].startswith("find-spans") for p in pts)
    assert "chosen (within params=0.7)" in output and "default plan" in output


def test_convert_plan_reproduces_the_point(planned, zoo_dirs, tmp_path):
    path, rep, _ = planned
    for index in sorted({rep["chosen"], 0}):
        p = rep["points"][index]
        out = tmp_path / f"p{index}.pt2"
        args = ["convert", str(zoo_dirs["llama"]), "--plan", str(path), "-o", str(out)]
        r = CliRunner().invoke(cli, args + ([] if index == rep["chosen"] else ["--point", str(index)]))
        assert r.exit_code == 0, r.output
        m = json.loads(out.with_suffix(".json").read_text())
        assert m["pipeline"] == p["spec"]
        assert m["params"]["converted"] == p["params"]  # counted exactly


def test_the_estimate_is_the_converted_models_fidelity(planned, zoo_dirs, tmp_path):
    """The chosen point converted by `convert` measures on the calibration as the planner said."""
    from loopify import capture
    from loopify.convert import ConvertConfig, convert_captured

    _, rep, _ = planned
    p = rep["points"][rep["chosen"]]
    cap = capture.load(zoo_dirs["llama"])
    texts, _ = pl.calibration_texts(None)
    inputs = pl.calibration_inputs(cap, "causal", texts, 96, "bytes")
    cal = pl.Calibration("causal", inputs, pl.run_outputs(cap.eager, inputs, 0), 0, 96, 1.0, 0.0)
    res = convert_captured(cap, ConvertConfig(pipeline=p["spec"]))
    got = pl.fidelity("causal", cal, pl.run_outputs(res.module, inputs, 0, p["loops"]))
    assert got["kl"] == pytest.approx(p["metrics"]["kl"], rel=1e-3, abs=1e-6)
    assert got["top1_agreement"] == pytest.approx(p["metrics"]["top1_agreement"], abs=1e-6)


@pytest.mark.parametrize("case, expected", [
    ("garbage", "not a readable plan file"),
    ("notplan", "not a loopify plan"),
    ("range", "--point 99: out of range; the plan has points 0.."),
    ("other", "the plan was made for another model"),
    ("point-alone", "--point needs --plan PLAN.json"),
])
def test_bad_plans_are_refused_in_one_line(planned, zoo_dirs, tmp_path, case, expected):
    path, rep, _ = planned
    model, extra = zoo_dirs["llama"], []
    if case == "garbage":
        path = tmp_path / "g.json"
        path.write_text("{not json")
    elif case == "notplan":
        path = tmp_path / "n.json"
        path.write_text(json.dumps({"format": "something"}))
    elif case == "range":
        extra = ["--point", "99"]
    elif case == "other":
        model = zoo_dirs["minilm"]
    args = ["convert", str(model), "-o", str(tmp_path / "o.pt2")]
    args += (["--point", "1"] if case == "point-alone" else ["--plan", str(path)] + extra)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert expected in r.output and len(r.output.strip().splitlines()) <= 2, r.output
    assert not (tmp_path / "o.pt2").exists()


@pytest.mark.parametrize("budget", ["params=2", "params=x", "size=0.5", "latency=0"])
def test_bad_budgets_are_refused(zoo_dirs, budget):
    r = CliRunner().invoke(cli, ["plan", str(zoo_dirs["llama"]), "--budget", budget])
    assert r.exit_code == 2 and "--budget" in r.output and "0 < R <= 1" in r.output


def test_cuts_keep_the_layers_of_high_influence():
    smol = [0.99, 0.17, 0.04, 0.03, 0.04, 0.03, 0.03, 0.2, 0.03, 0.29]
    assert pl.cuts(smol) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert pl.cuts([0.1] * 6) == [(0, 0)]
    assert pl.block_counts(30) == [15, 10, 6, 5] and pl.block_counts(29) == []


def test_allocation_spends_at_most_the_room_and_prefers_energy():
    """Greedy ranks: never over the room; the matrix whose residual holds the energy gets it."""
    from types import SimpleNamespace

    class Cache:
        def svd(self, original, shared):
            S = torch.tensor([10.0] * 8 + [0.0] * 8) if original is big else torch.tensor([1.0] * 16)
            return None, S, None, 0.0, 1.0

    big, small = torch.zeros(16, 16), torch.zeros(16, 16)
    block = torch.nn.Module()
    block.a, block.b = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)
    rec = SimpleNamespace(sharing=lambda: [0, 0], blocks=[block],
                          spec=SimpleNamespace(depth_paths=("l0", "l1"), layers=2))
    import loopify.nn as lnn

    orig = {"l0.a.weight": big, "l1.a.weight": big, "l0.b.weight": small, "l1.b.weight": small}
    saved = lnn.recursions
    lnn.recursions = lambda m: {"loop": rec}
    try:
        ranks = pl.allocate_ranks(None, orig, Cache(), room=2 * 32 * 8, step=8)
    finally:
        lnn.recursions = saved
    assert ranks == {"a.weight": 8}


def test_keep_first_and_ranks_options_reproduce_the_original_at_full_rank(zoo_dirs):
    """fold-loops{keep_first=1} folds layers 1..3 only; relax{ranks=...} sets per-matrix ranks."""
    from loopify import capture
    from loopify.convert import ConvertConfig, convert_captured

    cap = capture.load(zoo_dirs["llama"])
    res = convert_captured(cap, ConvertConfig(
        pipeline="find-spans{similarity=false},fold-loops{blocks=1,keep_first=1},relax{rank=full}"))
    loop = res.manifest["plan"]["loops"][0]
    assert loop["start"] == 1 and loop["layers"] == 3 and loop["blocks"] == 1
    assert res.manifest["verify"]["rel_err"] < 1e-5
    res = convert_captured(cap, ConvertConfig(
        pipeline="find-spans{similarity=false},fold-loops{keep_last=2},relax{rank=0,ranks=self_attn.q_proj@4:mlp@2}"))
    ranks = res.manifest["plan"]["relax"]["loops"][0]["ranks"]
    assert ranks == {"self_attn.q_proj.weight": 4, "mlp.gate_proj.weight": 2, "mlp.up_proj.weight": 2,
                     "mlp.down_proj.weight": 2}
    r = CliRunner().invoke(cli, ["convert", str(zoo_dirs["llama"]), "--dry-run", "--pipeline",
                                 "find-spans,fold-loops{keep_first=3}"])
    assert r.exit_code == 2 and "leaves 1 to fold (at least 2 needed)" in r.output
