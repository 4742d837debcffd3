"""Prefill matmul kernels against PyTorch, side by side in one run (not in `make test`).

    TVM_NUM_THREADS=1 python tests/bench/bench_matmul.py [--rows 128]

Each SmolLM2-135M linear shape ``x [1, T, K] @ W.T`` (W ``[N, K]``, T symbolic, run at
``--rows``) built with loopify's CPU rules (the NT dot kernel at several tiles, and the NN
outer-product kernel on a transposed weight) and timed against ``torch`` at one thread,
interleaved (torch first and last). Prints ms and GFLOP/s per kernel.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def build(n: int, k: int, layout: str, mi: int = 4, nj: int = 3):
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from loopify.backends.tvm import cpu_rules, schedules, sym_rules
    from loopify.backends.tvm.build import CompileOptions
    from loopify.backends.tvm.targets import target_for

    tgt = tvm.target.Target(target_for("x86"))
    t = tvm.tirx.Var("T", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, t, k], "float32"))
    w = relax.Var("w", relax.TensorType([n, k] if layout == "NT" else [k, n], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = relax.op.matmul(x, relax.op.permute_dims(w)) if layout == "NT" else relax.op.matmul(x, w)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    rules = [cpu_rules.Guarded(sym_rules.MatmulLike(mi=mi, nj=nj)), *cpu_rules.default_rules(tgt, CompileOptions())]
    with tgt:
        mod = tvm.transform.Sequential(schedules.legalize_passes(tgt) + [dl.ApplyDefaultSchedule(*rules)])(bb.get())
    return relax.VirtualMachine(relax.build(mod, tgt), tvm.cpu())["main"]


def timed(fn, n: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    import torch
    import tvm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = a.rows
    for n, k in [(1536, 576), (576, 1536), (576, 576)]:
        x = np.random.randn(1, m, k).astype("float32")
        w = np.random.randn(n, k).astype("float32")
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        res = {"torch": timed(lambda: xt @ wt.T)}
        for layout, mi, nj in [("NT", 4, 3), ("NT", 3, 4), ("NT", 2, 6), ("NN", 4, 3)]:
            f = build(n, k, layout, mi, nj)
            args = (tvm.runtime.tensor(x), tvm.runtime.tensor(w if layout == "NT" else np.ascontiguousarray(w.T)))
            res[f"{layout} {mi}x{nj}" if layout == "NT" else "NN"] = timed(lambda: f(*args))
        res["torch again"] = timed(lambda: xt @ wt.T)
        gflop = 2 * m * n * k / 1e6
        print(f"[{m}, {k}] x [{k}, {n}]: " + ", ".join(f"{name} {ms:.2f} ms {gflop / ms:.0f} GFLOP/s"
                                                    for name, ms in res.items()))


if __name__ == "__main__":
    main()
