"""Mixture-of-Recursions: perplexity and eager wall-clock time against average depth.

For a converted model with expert routers (``loopify convert --router expert`` then ``loopify
train``, or ``loopify train --router expert``), each capacity of the last step is set by
re-calibrating the thresholds on training text (:func:`loopify.nn.routing.calibrate_on`), then
on held-out windows: perplexity, accuracy, average recursion depth per token, and the median
time of one forward (eager PyTorch, interleaved rounds in one process, the thread count fixed; per
round the mean over the windows, whose depths differ; then the median over the rounds).
The same model without its routers is measured at every fixed loop count. The time saved is
compared with the ideal saving of the loop's share of the time, (1 - depth / N) * loop time,
where the loop time of one step is t(N) - t(N-1). Two estimates of saved / ideal: from the
medians of each configuration, and *paired*: per round (every configuration back to back), then
the median over the rounds, which cancels the machine's slow drifts (the better one on a noisy
machine).

    python tests/bench/mor_pareto.py ROUTED.pt2 --data heldout.txt --calib train.txt \\
        --capacities 1,0.75,0.5,0.25 --windows 8 --seq 64 --threads 1 --json pareto.json --plot pareto.png

With ``--generate``, wall-clock time against average depth for generation too: time to first
token (prefill of a ``--prompt``-token held-out prompt) and the time per decoded token
(``--new-tokens`` greedy), in eager PyTorch (the loop KV cache) and, with ``--artifact
ROUTED.gen`` (``loopify compile ROUTED.pt2 --max-context N``), in the TVM artifact, whose
thresholds are its weights: each capacity's calibrated thresholds are written into the loaded
artifact, no compile per capacity. Fixed loop counts in the artifact: every token passes
(thresholds -inf) at loops 1 .. N. Each phase's saving is compared with its ideal, from the
average depth of the tokens it ran (the prompt's for prefill, the decoded tokens' for decode).

With ``--prepack``, the eager forward and eager generation run the linear layers on oneDNN-packed
weights (:mod:`loopify.nn.prepack`): the BLAS's per-call copy of every weight matrix is a fixed
cost of a recursion step, whatever the number of tokens it runs, and hides most of what a
routed step saves at short lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--capacities", default="1,0.75,0.5,0.25", help="capacity of the last step (earlier steps keep 1)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--generate", action="store_true", help="also time prefill and decode (eager, and TVM with --artifact)")
    ap.add_argument("--artifact", help="the routed model's generation artifact (loopify compile --max-context)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for --generate")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prepack", action="store_true", help="eager: linear layers on oneDNN-packed weights")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from loopify.convert import load_converted
    from loopify.fidelity.inputs import tokenizer_for, windows
    from loopify.fidelity.metrics import NextToken
    from loopify.nn import recursions, set_loops
    from loopify.nn.routing import calibrate_on, depth_stats, routers

    module, inputs, manifest = load_converted(a.model)
    module.eval()
    if a.prepack:
        from loopify.nn.prepack import prepack

        print(f"prepacked {prepack(module)} linear layers (oneDNN)")
    tok = tokenizer_for(Path(a.model).with_suffix(".assets"))
    enc = lambda path: tok(Path(path).read_text(), add_special_tokens=False)["input_ids"]  # noqa: E731
    held = [torch.tensor([w]) for w in windows(enc(a.data), a.seq, a.windows) if len(w) == a.seq]
    calib = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)}
             for w in windows(enc(a.calib), a.seq, a.calib_windows) if len(w) == a.seq]
    rs = routers(module)
    if not rs or any(r.kind != "expert" for r in rs.values()):
        raise SystemExit(f"{a.model}: needs expert routers")
    loops = recursions(module)
    n = max(r.spec.max_loops for r in loops.values())
    trained = {p: (r.spec, r.threshold.clone()) for p, r in rs.items()}
    calibrated: dict = {}  # capacity -> thresholds per loop (calibrated once)

    def configure(cfg):
        kind, value = cfg
        for p, rec in loops.items():
            rec.router = rs.get(p) if kind == "routed" else None
        set_loops(module, None if kind == "routed" else value)
        if kind == "routed":
            for p, r in rs.items():
                cap = tuple([1.0] * (r.spec.steps - 1) + [value])
                r.spec = dataclasses.replace(trained[p][0], capacity=cap)
                r.threshold.copy_(calibrated[value][p] if value in calibrated else trained[p][1])
            if value not in calibrated:
                calibrate_on(module, calib)
                calibrated[value] = {p: r.threshold.clone() for p, r in rs.items()}

    configs = [("loops", k) for k in range(1, n + 1)] + [("routed", float(c)) for c in a.capacities.split(",")]
    rows = {}
    for cfg in configs:  # quality (one pass over the held-out windows)
        configure(cfg)
        stats, depths = NextToken(), []
        with torch.no_grad():
            for ids in held:
                logits = module(input_ids=ids, attention_mask=torch.ones_like(ids))[0][0].float()
                stats.add(logits, ids[0])
                if cfg[0] == "routed":
                    depths.append(sum(r.last_depth for r in rs.values()).flatten())
        d = depth_stats(torch.cat(depths), n) if depths else {"average": float(cfg[1]), "max": n}
        rows[cfg] = {"config": cfg[0], "value": cfg[1], **stats.result(), "depth": d,
                     "thresholds": {p: [t if t > float("-inf") else None for t in r.threshold.tolist()]  # null: all pass
                                    for p, r in rs.items()} if cfg[0] == "routed" else None,
                     "times_ms": []}
    for _ in range(a.rounds):  # time, interleaved: every config once per round
        for cfg in configs:
            configure(cfg)
            with torch.no_grad():  # the mean over the windows (their depths differ: a median would pick one)
                t0 = time.perf_counter()
                for ids in held:
                    module(input_ids=ids, attention_mask=torch.ones_like(ids))
                rows[cfg]["times_ms"].append((time.perf_counter() - t0) * 1e3 / len(held))
    for r in rows.values():
        r["median_ms"] = statistics.median(r["times_ms"])
        r["min_ms"] = min(r["times_ms"])
    t_full, t_less = rows[("loops", n)]["median_ms"], rows[("loops", n - 1)]["median_ms"] if n > 1 else 0.0
    step_ms = t_full - t_less
    for r in rows.values():
        if r["config"] == "routed":
            ideal = (1 - r["depth"]["average"] / n) * n * step_ms
            r["saved_ms"] = t_full - r["median_ms"]
            r["ideal_saved_ms"] = ideal
            r["saved_of_ideal"] = r["saved_ms"] / ideal if ideal > 0 else None
            r["saved_of_ideal_paired"] = _paired(rows[("loops", n)]["times_ms"],
                                                 rows[("loops", n - 1)]["times_ms"] if n > 1 else None,
                                                 r["times_ms"], r["depth"]["average"], n)
    report = {"model": str(a.model), "seq": a.seq, "windows": len(held), "threads": a.threads, "rounds": a.rounds,
              "eager_prepack": a.prepack,
              "step_ms": step_ms, "results": [{k: v for k, v in r.items() if k != "times_ms"} for r in rows.values()]}
    if a.generate:
        prompt = next(w for w in windows(enc(a.data), a.prompt, 1) if len(w) == a.prompt)
        report["generate"] = _generation_times(a, module, rs, configs, configure, prompt, n)
    print(f"{'config':<16} {'avg depth':>9} {'perplexity':>11} {'accuracy':>9} {'median ms':>10} {'min ms':>8} "
          f"{'saved/ideal':>11} {'paired':>8}")
    for r in report["results"]:
        name = f"loops={r['value']}" if r["config"] == "loops" else f"capacity={r['value']:g}"
        soi, som = r.get("saved_of_ideal"), r.get("saved_of_ideal_paired")
        print(f"{name:<16} {r['depth']['average']:>9.3f} {r['perplexity']:>11.2f} {r['accuracy']:>9.3f} "
              f"{r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {'' if soi is None else f'{soi:.2f}':>11} "
              f"{'' if som is None else f'{som:.2f}':>8}")
    if a.generate:
        g = report["generate"]
        print(f"\ngeneration: prompt {a.prompt} tokens, {a.new_tokens} new tokens, {a.threads} thread(s), "
              f"{a.rounds} interleaved rounds (median)")
        print(f"{'backend':<8} {'config':<16} {'depth pre':>9} {'TTFT ms':>8} {'saved/ideal':>11} {'paired':>8} "
              f"{'depth dec':>9} {'ms/token':>8} {'saved/ideal':>11} {'paired':>8}")
        for r in g["results"]:
            name = f"loops={r['value']}" if r["config"] == "loops" else f"capacity={r['value']:g}"
            f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{r['backend']:<8} {name:<16} {r['prefill_depth']:>9.3f} {r['ttft_ms']:>8.1f} "
                  f"{f(r.get('prefill_saved_of_ideal')):>11} {f(r.get('prefill_saved_of_ideal_paired')):>8} "
                  f"{r['decode_depth']:>9.3f} {r['ms_per_token']:>8.2f} "
                  f"{f(r.get('decode_saved_of_ideal')):>11} {f(r.get('decode_saved_of_ideal_paired')):>8}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        gen = report.get("generate")
        fig, axes = plt.subplots(2 if gen else 1, 2, figsize=(10, 8 if gen else 4))
        a1, a2 = axes[0] if gen else axes
        for kind, marker in (("loops", "s"), ("routed", "o")):
            rs_ = [r for r in report["results"] if r["config"] == kind]
            label = "fixed loop count" if kind == "loops" else "expert router (capacity)"
            a1.plot([r["depth"]["average"] for r in rs_], [r["perplexity"] for r in rs_], marker=marker, label=label)
            a2.plot([r["depth"]["average"] for r in rs_], [r["median_ms"] for r in rs_], marker=marker, label=label)
        a1.set_xlabel("average recursion depth per token"), a1.set_ylabel("perplexity (held out)"), a1.set_yscale("log")
        a2.set_xlabel("average recursion depth per token"), a2.set_ylabel("eager forward, median ms")
        a1.legend(), a2.legend()
        if gen:
            for ax, key, depth, what in ((axes[1][0], "ttft_ms", "prefill_depth", f"prefill of {gen['prompt']} tokens, ms"),
                                         (axes[1][1], "ms_per_token", "decode_depth", "decode, ms per token")):
                for b, color in (("eager", "tab:green"), ("tvm", "tab:red")):
                    for kind, marker, style in (("loops", "s", "-"), ("routed", "o", "--")):
                        rs_ = sorted((r for r in gen["results"] if r["backend"] == b and r["config"] == kind),
                                     key=lambda r: r[depth])
                        if rs_:
                            ax.plot([r[depth] for r in rs_], [r[key] for r in rs_], marker=marker, linestyle=style,
                                    color=color, label=f"{b}, {'fixed loop count' if kind == 'loops' else 'router'}")
                ax.set_xlabel("average recursion depth of the tokens run"), ax.set_ylabel(what)
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


def _generation_times(a, module, rs, configs, configure, prompt: list[int], n: int) -> dict:
    """Per backend and configuration: median time to first token and per decoded token, with the
    average depth of the prompt's and the decoded tokens (see the module doc)."""
    import numpy as np

    from loopify.generate import Sampling
    from loopify.generate.eager import EagerDecoder
    from loopify.generate.engine import run

    backends = {"eager": None}
    art = None
    if a.artifact:
        from loopify import runtime
        from loopify.generate.compiled import TVMDecoder

        art = runtime.load(a.artifact, num_threads=a.threads)
        names = art.manifest["params"]
        at = {p: names.index(f"wrapper.{p}.router.threshold") for p in rs}
        backends["tvm"] = art
    sampling = Sampling(max_new_tokens=a.new_tokens + 1)  # the first token comes with the prefill

    def thresholds_to_artifact(cfg):
        for p, r in rs.items():
            t = r.threshold if cfg[0] == "routed" else torch.full_like(r.threshold, float("-inf"))
            art.params[at[p]] = art.tensor(t.numpy().astype(np.float32))

    def one(backend, cfg):
        configure(cfg)
        loops = None if cfg[0] == "routed" else [cfg[1]] * len(art.loops if art else [1])
        if backend == "eager":
            dec = EagerDecoder(module)
        else:
            thresholds_to_artifact(cfg)
            dec = TVMDecoder(art, "per-depth", loops if cfg[0] == "loops" else [n] * len(art.loops))
        res = run(dec, [prompt], sampling)
        if cfg[0] == "loops":
            pre = dec_ = float(cfg[1])
        else:
            calls = list(dec.depths.values())[0]
            to_np = lambda x: x.numpy() if hasattr(x, "numpy") else np.asarray(x)  # noqa: E731
            pre = float(np.mean(to_np(calls[0])))
            dec_ = float(np.mean(np.concatenate([to_np(c) for c in calls[1:]]))) if len(calls) > 1 else float("nan")
        return res.ttft_s * 1e3, res.decode_s * 1e3 / max(res.decoded, 1), pre, dec_

    rows = {(b, cfg): {"backend": b, "config": cfg[0], "value": cfg[1], "ttft": [], "tok": []}
            for b in backends for cfg in configs}
    for _ in range(a.rounds):
        for b in backends:
            for cfg in configs:
                with torch.no_grad():
                    ttft, tok, pre, dec_ = one(b, cfg)
                r = rows[(b, cfg)]
                r["ttft"].append(ttft), r["tok"].append(tok)
                r["prefill_depth"], r["decode_depth"] = pre, dec_
    out = []
    for b in backends:
        full, less = rows[(b, ("loops", n))], rows[(b, ("loops", n - 1))]
        for key, depth_key, name in (("ttft", "prefill_depth", "prefill"), ("tok", "decode_depth", "decode")):
            t_full, t_less = statistics.median(full[key]), statistics.median(less[key])
            for cfg in configs:
                r = rows[(b, cfg)]
                r[f"{key}_median"] = t = statistics.median(r[key])
                if cfg[0] == "routed":
                    ideal = (1 - r[depth_key] / n) * n * (t_full - t_less)
                    r[f"{name}_saved_of_ideal"] = (t_full - t) / ideal if ideal > 0 else None
                    r[f"{name}_saved_of_ideal_paired"] = _paired(full[key], less[key], r[key], r[depth_key], n)
        for cfg in configs:
            r = rows[(b, cfg)]
            out.append({"backend": b, "config": r["config"], "value": r["value"], "ttft_ms": r["ttft_median"],
                        "ms_per_token": r["tok_median"], "prefill_depth": r["prefill_depth"],
                        "decode_depth": r["decode_depth"],
                        **{k: r[k] for k in ("prefill_saved_of_ideal", "decode_saved_of_ideal",
                                             "prefill_saved_of_ideal_paired", "decode_saved_of_ideal_paired") if k in r}})
    configure(configs[-1])
    return {"prompt": a.prompt, "new_tokens": a.new_tokens, "results": out}


def _paired(full: list, less: list | None, routed: list, depth: float, n: int) -> float | None:
    """Saved / ideal per round (the configurations of a round run back to back, so the machine's
    slow drifts cancel), then the median over the rounds."""
    per = []
    for i, t in enumerate(routed):
        step = full[i] - (less[i] if less is not None else 0.0)
        ideal = (1 - depth / n) * n * step
        if ideal > 0:
            per.append((full[i] - t) / ideal)
    return statistics.median(per) if per else None


if __name__ == "__main__":
    raise SystemExit(main())
