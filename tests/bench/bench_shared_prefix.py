"""One training forward + backward of a converted model at every depth, each depth in full
against the shared prefix (loopify.train.student.DepthRunner), interleaved rounds, medians.

    python tests/bench/bench_shared_prefix.py CONVERTED.pt2 [...] --threads 2 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from loopify.convert import load_converted
    from loopify.train.student import DepthRunner, max_depth

    for path in a.models:
        m, _inputs, _manifest = load_converted(path)
        m.train()
        depths = list(range(1, max_depth(m) + 1))
        torch.manual_seed(0)
        ids = torch.randint(100, 1000, (a.batch, a.seq))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds):
            for shared in (False, True):
                runner = DepthRunner(m, shared_prefix=shared)
                m.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                outs = runner(batch, depths)
                sum(o.float().pow(2).mean() for o in outs).backward()
                times[shared].append(time.perf_counter() - t0)
                assert runner.shared_last == shared, "this model's depths do not share a prefix"
        full, shared = statistics.median(times[False]), statistics.median(times[True])
        print(f"{path}: depths {depths}: every depth in full {full:.2f} s, shared prefix {shared:.2f} s "
              f"(forward + backward of {a.batch} x {a.seq} tokens): {full / shared:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
