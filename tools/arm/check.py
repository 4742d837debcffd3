"""Emulated side of the arm64 check: run the arm64 artifacts ``tools/arm/prepare.py`` built, with
loopify's runtime on an aarch64 Python (numpy and TVM only: this file must not need torch), and
compare them with the host's PyTorch outputs.

    tools/arm/python tools/arm/check.py WORK [--cases a,b] [--json FILE]

Forward cases: every output at every loop count within ``loopify.verify.ARTIFACT_RTOL`` (max abs
error / max abs reference value; ``HALF_ARTIFACT_RTOL`` for float16 ``h-`` cases), the same
tolerance as the host compile's own validation.
Generation cases: prefill logits within that tolerance and the same greedy tokens as the eager
model, the artifact driven as ``loopify.generate.engine.run`` drives it (prefill the prompt, then
one token per decode call with the attention mask grown by one and the next position). Exit
status 1 when any row fails. Timings are of the emulator, not of an ARM CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from loopify import runtime
from loopify.verify import ARTIFACT_RTOL, HALF_ARTIFACT_RTOL, check_rows, diff


def check_forward(case: Path, spec: dict) -> list[dict]:
    art = runtime.load(case / spec["artifact"])
    inputs = [np.load(case / f) for f in spec["inputs"]]
    rows = []
    for c in spec["checks"]:
        t0 = time.perf_counter()
        got = list(art(*inputs, loops=c["loops"] or None, output="numpy"))
        ms = (time.perf_counter() - t0) * 1e3
        expected = [np.load(case / f) for f in c["expected"]]
        rtol = HALF_ARTIFACT_RTOL if spec.get("dtype") == "float16" else ARTIFACT_RTOL
        for r in check_rows(expected, got, rtol, loops=c["loops"]):
            rows.append({**r, "what": f"output {r['output']}", "emulated_ms": round(ms, 1)})
    return rows


def greedy(art, prompt: list[int], counts: list[int], new_tokens: int):
    """Prefill ``prompt``, then greedy decode: (prefill logits [1, V], tokens)."""
    k, v = art.empty_cache()
    ids = np.asarray([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    logits, k, v = art.step("prefill", ids, mask, np.arange(len(prompt), dtype=np.int64)[None], k, v, counts)
    first = logits[:, -1]
    tokens = [int(first[0].argmax())]
    for step in range(new_tokens - 1):
        mask = np.ones((1, len(prompt) + step + 1), dtype=np.int64)
        pos = np.asarray([[len(prompt) + step]], dtype=np.int64)
        logits, k, v = art.step("decode", np.asarray([[tokens[-1]]], dtype=np.int64), mask, pos, k, v, counts)
        tokens.append(int(logits[0, -1].argmax()))
    return first, tokens


def check_generation(case: Path, spec: dict) -> list[dict]:
    art = runtime.load(case / spec["artifact"])
    rows = []
    for c in spec["checks"]:
        t0 = time.perf_counter()
        logits, tokens = greedy(art, spec["prompt"], c["loops"], len(c["tokens"]))
        ms = (time.perf_counter() - t0) * 1e3
        d = diff(np.load(case / c["prefill_logits"]), logits)
        rows.append({"loops": c["loops"], "what": "prefill logits", "max_abs_err": d.max_abs_err,
                     "rel_err": d.rel_err, "ok": d.ok(ARTIFACT_RTOL), "emulated_ms": round(ms, 1)})
        rows.append({"loops": c["loops"], "what": f"{len(tokens)} greedy tokens", "ok": tokens == c["tokens"],
                     "detail": f"{tokens} vs eager {c['tokens']}", "emulated_ms": round(ms, 1)})
    return rows


def packages_loaded() -> list[str]:
    """The top-level non-standard-library packages this process imported: what a board running
    loopify's artifacts must install (loopify itself, numpy, TVM and what they pull in)."""
    top = {m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names)
    return sorted(m for m in top if not m.startswith("_") and m not in ("sitecustomize", "usercustomize")
                  and getattr(sys.modules.get(m), "__file__", None))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--cases", default=None, help="comma-separated (default: every prepared case)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if platform.machine() != "aarch64":
        print(f"check.py runs on aarch64 (tools/arm/python), not {platform.machine()}", file=sys.stderr)
        return 2
    names = args.cases.split(",") if args.cases else sorted(p.parent.name for p in args.work.glob("*/case.json"))
    report, ok = {}, True
    for name in names:
        case = args.work / name
        spec = json.loads((case / "case.json").read_text())
        t0 = time.perf_counter()
        rows = (check_generation if spec["kind"] == "generation" else check_forward)(case, spec)
        report[name] = rows
        for r in rows:
            err = (f"max abs err {r['max_abs_err']:.2e} (rel {r['rel_err']:.2e})" if "rel_err" in r
                   else r.get("detail", ""))
            print(f"{name:12s} loops={r['loops']!s:6s} {r['what']:18s} {'ok' if r['ok'] else 'FAIL':4s} {err}"
                  f"  ({r['emulated_ms']:.0f} ms emulated)", flush=True)
        ok &= all(r["ok"] for r in rows)
        print(f"{name}: {sum(r['ok'] for r in rows)}/{len(rows)} ok in {time.perf_counter() - t0:.0f} s "
              "(emulated; not ARM timings)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rtol": ARTIFACT_RTOL, "machine": platform.machine(),
                                         "packages": packages_loaded(), "cases": report}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
