"""`make demo`'s summary: ratios taken against the original on the same backend, verdicts per
loop count against the fidelity goal (encoders: the full-depth goal at the largest count, the
shallow goal below it; causal LMs: perplexity against a multiple of the original's)."""

from __future__ import annotations

from loopify.examples.demo_summary import summarize


def _bench(conv_ms: dict) -> dict:
    res = [{"model": "original", "backend": b, "loops": None, "latency_ms": {"median": 10.0}, "params": 100,
            "bytes_on_disk": 400e6} for b in ("eager", "tvm")]
    res += [{"model": "converted", "backend": b, "loops": k, "latency_ms": {"median": ms}, "params": 77,
             "bytes_on_disk": 300e6} for (b, k), ms in conv_ms.items()]
    return {"machine": {"threads": 1}, "results": res}


def test_encoder_verdicts_use_the_full_depth_goal_at_the_largest_count():
    bench = _bench({("eager", 1): 5.0, ("tvm", 1): 6.0, ("eager", 2): 10.5, ("tvm", 2): 9.0})
    ev = {"task": "encoder", "data": {}, "results": [{"loops": 1, "cosine": 0.91, "spearman": 0.9},
                                                     {"loops": 2, "cosine": 0.93, "spearman": 0.92}]}
    rows, verdicts = summarize(bench, ev, goal_full=0.95, goal_shallow=0.90, goal_ppl=1.5)
    assert rows[0][-2:] == ["held-out cosine", "Spearman"] and rows[2][4:6] == ["5.00 (0.50x)", "6.00 (0.60x)"]
    # 1 loop: 0.91 >= 0.90, faster on both backends; 2 loops: 0.93 < 0.95 and eager 1.05x is not faster
    assert "77% of the parameters" in verdicts[0] and "smaller, faster, within the fidelity goal" in verdicts[0]
    assert "not faster" in verdicts[1] and "not within the fidelity goal, short by 0.020" in verdicts[1]


def test_causal_lm_verdicts_compare_perplexity_with_a_multiple_of_the_original():
    bench = _bench({("eager", 1): 4.0, ("tvm", 1): 4.0})
    ev = {"task": "causal", "data": {}, "original": {"perplexity": 30.0},
          "results": [{"loops": 1, "perplexity": 60.0, "top1_agreement": 0.5}]}
    rows, verdicts = summarize(bench, ev, goal_full=0.95, goal_shallow=0.90, goal_ppl=1.5)
    assert rows[1][-2:] == ["30.00", "1"] and rows[2][-2:] == ["60.00", "0.5000"]
    assert "perplexity 60.00 (goal <= 45.00)" in verdicts[0] and "1.33x over" in verdicts[0]
