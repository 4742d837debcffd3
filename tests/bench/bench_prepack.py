"""PyTorch's linear against oneDNN's on prepacked weights (loopify.nn.prepack), per row count.

Each shape gets ``--layers`` distinct weight matrices, called in turn, so that the weights come
from memory as a model's do (SmolLM2's layers do not stay in cache), not from a warm cache; the
time is the minimum over ``--repeats`` passes, per call. Also the largest difference relative to
the output's scale.

    python tests/bench/bench_prepack.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="576x1536,1536x576,576x576,576x192", help="K x N of the weight (in x out)")
    ap.add_argument("--rows", default="1,4,16,23,41,64,128,512")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [int(m) for m in a.rows.split(",")]
    print(f"{'K x N':<10} " + " ".join(f"{'M=' + str(m):>18}" for m in rows) + "   (PyTorch / packed us, speed-up)")
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        ws = [torch.randn(n, k) for _ in range(a.layers)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
        cells = []
        for m in rows:
            x = torch.randn(1, m, k)

            def plain():
                for w in ws:
                    torch.nn.functional.linear(x, w)

            def onednn():
                for p in packed:
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

            best = []
            for f in (plain, onednn):
                f()
                t = min(_timed(f) for _ in range(a.repeats))
                best.append(t / a.layers * 1e6)
            ref = torch.nn.functional.linear(x, ws[0])
            err = float((torch.ops.mkldnn._linear_pointwise(x, packed[0], None, "none", [], "") - ref).abs().max()
                        / ref.abs().max())
            cells.append(f"{best[0]:.0f}/{best[1]:.0f} {best[0] / best[1]:.2f}x")
            assert err < 1e-5, f"{shape} M={m}: relative difference {err:.1e}"
        print(f"{shape:<10} " + " ".join(f"{c:>18}" for c in cells))
    return 0


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())
