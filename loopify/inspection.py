"""Presenting a span analysis: the terminal table, the JSON report, the similarity heatmaps."""

from __future__ import annotations

import math
from pathlib import Path

from loopify.errors import LoopifyError
from loopify.io import atomic_path, write_json as _write_json


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(analysis) -> str:
    """One row per stack, then the spans and the refused layers."""
    rows = [("stack", "layers", "runs", "params/layer", "w-resid", "BI mean", "spans")]
    for st in analysis.stacks:
        runs = " ".join(f"{s}+{n}" + (f"/{p}" if p > 1 else "") if n > 1 else f"{s}" for s, n, p in _runs(st))
        resid = _mean(x for sp in st.spans for x in sp.similarity.get("weight_residual", []))
        bi = _mean(st.hidden.get("block_influence", []))
        ppl = sorted(set(st.params_per_layer))
        ppl_s = f"{ppl[0]:,}" if len(ppl) == 1 else f"{ppl[0]:,}..{ppl[-1]:,}"
        rows.append((st.path, str(len(st.layers)), runs, ppl_s, _fmt(resid), _fmt(bi), str(len(st.spans))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not analysis.stacks and not getattr(analysis, "shared", []):
        lines.append("(no layer stacks found: no module has children numbered 0..n-1)")
    for sp in analysis.spans:
        groups = (f" = {sp.groups} groups of {sp.period} ({sp.why_groups or 'single layers do not repeat'})"
                  if sp.period > 1 else "")
        lines.append(f"span {sp.stack}[{sp.start}:{sp.start + sp.length}]  {sp.length} layers x "
                     f"{sp.params_per_layer:,} params{groups}, block influence "
                     f"{' '.join(_fmt(x, '.2f') for x in sp.similarity.get('block_influence', []))}")
    for r in analysis.refused:
        lines.append(f"refused {r['stack']}.{r['layer']}: {r['reason']}")
    for sh in getattr(analysis, "shared", []):
        lines.append(f"already a loop: {sh.module} runs {sh.calls} times with the same weights "
                     "(nothing to fold; compile it as it is)")
    lines.append("runs: start+length (/p: groups of p layers); w-resid: weight-matrix residual vs run mean (relative Frobenius); "
                 "BI: block influence 1-cos(in,out) on the example inputs")
    return "\n".join(lines)


def _runs(st):
    covered, out = set(), []
    for sp in st.spans:
        out.append((sp.start, sp.length, sp.period))
        covered.update(range(sp.start, sp.start + sp.length))
    out += [(i, 1, 1) for i in range(len(st.layers)) if i not in covered]
    return sorted(out)


def _clean(obj):
    """NaN is not JSON: write null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def report_dict(captured, analysis) -> dict:
    return _clean({"model": captured.describe(), **analysis.to_dict()})


def write_json(path: Path, captured, analysis) -> Path:
    return _write_json(path, report_dict(captured, analysis))


def plot(path: Path, analysis) -> Path:
    """Heatmaps per stack: weight cosine between layers, angular distance between hidden states."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise LoopifyError("--plot needs matplotlib: pip install 'loopify[plot]'") from None
    stacks = analysis.stacks
    if not stacks:
        raise LoopifyError("no layer stacks to plot")
    fig, axes = plt.subplots(len(stacks), 2, figsize=(10, 4.2 * len(stacks)), squeeze=False)
    for row, st in zip(axes, stacks):
        for ax, key, title, cmap in ((row[0], "weight_cosine", "weight cosine", "viridis"),
                                     (row[1], "hidden_angular_distance", "hidden-state angular distance", "magma_r")):
            m = np.array(st.matrices.get(key) or [[float("nan")]], dtype=float)
            im = ax.imshow(m, cmap=cmap, interpolation="nearest")
            ax.set_title(f"{st.path}\n{title}", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            n = m.shape[0]
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            for sp in st.spans:
                ax.add_patch(plt.Rectangle((sp.start - 0.5, sp.start - 0.5), sp.length, sp.length,
                                           fill=False, edgecolor="red", linewidth=1.5))
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
