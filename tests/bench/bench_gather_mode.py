"""Cost of bounds-safe gathers: TVM's ``take`` in ``clip`` mode (loopify's import default, see
backends/tvm/importer.py) against the ``fast`` mode that reads out of bounds for a bad index.

    python tests/bench/bench_gather_mode.py [--vocab 8192 --dim 512 --seq 128] [--model embed|llama]

Builds the same program twice (fast, clip), then times the two artifacts interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def _program(kind: str, vocab: int, dim: int, seq: int):
    from loopify.backends.tvm.testing import LogitsOnly, export, llama_inputs, tiny_llama

    if kind == "llama":
        model = LogitsOnly(tiny_llama(vocab=vocab, hidden=dim, intermediate=2 * dim, layers=2, heads=8, kv_heads=8))
        inputs = llama_inputs(model.model, seq=seq)
        return export(model, inputs), inputs

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, dim)

        def forward(self, ids):
            return self.emb(ids) * 2.0

    ids = torch.randint(0, vocab, (1, seq))
    return export(Embed().eval(), (ids,)), (ids,)


def _build(ep, out: Path, mode: str):
    import tvm.relax as relax

    from loopify.backends.tvm import compile_program

    original = relax.op.take
    if mode == "fast":  # what TVM's importer does without loopify's patch
        relax.op.take = lambda x, i, axis=None, mode="fast": original(x, i, axis, "fast")
    try:
        return compile_program(ep, "x86", out).path
    finally:
        relax.op.take = original


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["embed", "llama"], default="embed")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    from loopify import runtime

    ep, inputs = _program(a.model, a.vocab, a.dim, a.seq)
    with tempfile.TemporaryDirectory() as d:
        arts = {m: runtime.load(_build(ep, Path(d) / m, m)) for m in ("fast", "clip")}
        times = {m: [] for m in arts}
        for r in range(a.rounds):
            for m in (("fast", "clip") if r % 2 == 0 else ("clip", "fast")):
                times[m].append(arts[m].benchmark(*inputs, repeat=50, warmup=5)["median_ms"])
        outs = {m: arts[m](*inputs, output="numpy")[0] for m in arts}
    same = np.array_equal(outs["fast"], outs["clip"])
    for m, t in times.items():
        print(f"{a.model} vocab={a.vocab} dim={a.dim} seq={a.seq} take mode={m}: median {np.median(t):.4f} ms "
              f"(rounds {', '.join(f'{x:.4f}' for x in t)})")
    print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()
