"""What converting bought, in one table: `make demo`'s last step.

    python -m loopify.examples.demo_summary BENCH.json EVAL.json [--goal-full 0.95] [--goal-shallow 0.90]

BENCH.json is `loopify bench ORIGINAL CONVERTED ... --json` (parameters, bytes on disk, latency
per backend and loop count, measured side by side); EVAL.json is `loopify eval CONVERTED --data
HELDOUT --json` (the model's own fidelity metric on held-out text at every loop count: sentence
cosine and Spearman for encoders, perplexity and top-1 agreement for causal LMs). Prints one row
per loop count and a verdict per row: smaller, faster (on every backend measured), and within
the fidelity goal (for encoders: cosine at least ``--goal-full`` at the full loop count and
``--goal-shallow`` below it; for causal LMs: perplexity within ``--goal-ppl`` times the
original's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _latency(bench: dict) -> dict:
    """{(model, backend, loops): median latency ms}."""
    return {(r["model"], r["backend"], r["loops"]): r["latency_ms"]["median"] for r in bench["results"]}


def _first(bench: dict, model: str, key: str):
    return next((r[key] for r in bench["results"] if r["model"] == model and r.get(key) is not None), None)


def summarize(bench: dict, ev: dict, goal_full: float, goal_shallow: float, goal_ppl: float) -> tuple[list, list]:
    """(rows, verdicts): the table rows (one per loop count, the original first) and one verdict
    line per loop count."""
    lat = _latency(bench)
    backends = sorted({b for (_, b, _) in lat})
    p0, b0 = _first(bench, "original", "params"), _first(bench, "original", "bytes_on_disk")
    p1, b1 = _first(bench, "converted", "params"), _first(bench, "converted", "bytes_on_disk")
    loops = sorted({r["loops"] for r in ev["results"] if r.get("loops") is not None})
    full = max(loops) if loops else None
    encoder = ev.get("task") == "encoder" or any("cosine" in r for r in ev["results"])
    rows = [["original", "-", f"{p0:,}", f"{b0 / 1e6:.1f} MB"]
            + [f"{lat[('original', b, None)]:.2f}" if ('original', b, None) in lat else "-" for b in backends]
            + (["1", "1"] if encoder else [f"{ev['original']['perplexity']:.2f}", "1"])]
    verdicts = []
    for k in loops:
        r = next(x for x in ev["results"] if x.get("loops") == k)
        ratios = {b: lat[("converted", b, k)] / lat[("original", b, None)] for b in backends
                  if ("converted", b, k) in lat and ("original", b, None) in lat}
        cells = [f"{lat[('converted', b, k)]:.2f} ({ratios[b]:.2f}x)" if b in ratios else "-" for b in backends]
        if encoder:
            metric, second = r["cosine"], r.get("spearman")
            goal = goal_full if k == full else goal_shallow
            ok, shown, cell = metric >= goal, f"cosine {metric:.3f} (goal {goal:.2f})", f"{metric:.4f}"
        else:
            metric, second = r["perplexity"], r.get("top1_agreement")
            bound = goal_ppl * ev["original"]["perplexity"]
            ok, shown, cell = metric <= bound, f"perplexity {metric:.2f} (goal <= {bound:.2f})", f"{metric:.2f}"
        rows.append(["converted", str(k), f"{p1:,}", f"{b1 / 1e6:.1f} MB"] + cells
                    + [cell, f"{second:.4f}" if second is not None else "-"])
        smaller = p1 < p0
        faster = bool(ratios) and all(v < 1 for v in ratios.values())
        gap = "" if ok else (f", short by {goal - metric:.3f}" if encoder else f", {metric / bound:.2f}x over")
        verdicts.append(f"loops={k}: {p1 / p0:.0%} of the parameters, latency "
                        + ", ".join(f"{b} {v:.2f}x" for b, v in ratios.items())
                        + f", {shown}: {'smaller' if smaller else 'not smaller'}, "
                        + f"{'faster' if faster else 'not faster'}, {'within' if ok else 'not within'} the fidelity goal{gap}")
    head = ["model", "loops", "params", "bytes on disk"] + [f"{b} ms" for b in backends] + (
        ["held-out cosine", "Spearman"] if encoder else ["held-out perplexity", "top-1 agreement"])
    return [head] + rows, verdicts


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("eval", type=Path)
    ap.add_argument("--goal-full", type=float, default=0.95, help="encoders: cosine at the full loop count")
    ap.add_argument("--goal-shallow", type=float, default=0.90, help="encoders: cosine below the full loop count")
    ap.add_argument("--goal-ppl", type=float, default=1.5, help="causal LMs: perplexity at most this times the original's")
    args = ap.parse_args(argv)
    bench, ev = (json.loads(p.read_text()) for p in (args.bench, args.eval))
    rows, verdicts = summarize(bench, ev, args.goal_full, args.goal_shallow, args.goal_ppl)
    print(f"\nwhat converting bought ({bench['machine'].get('threads')} thread(s); latency: median of interleaved rounds, "
          f"side by side; fidelity on {ev['data'].get('path', 'held-out text')})")
    print(_table(rows))
    for v in verdicts:
        print(v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
