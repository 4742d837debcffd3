"""Per-kernel time of one call of a generation artifact's entry point (not in `make test`).

    TVM_NUM_THREADS=1 python tests/bench/profile_generation.py ART.gen prefill --past 0 --tokens 128
    TVM_NUM_THREADS=1 python tests/bench/profile_generation.py ART.gen decode --past 512 [--loops 1]

Times the call alone (median-free mean of --calls calls), then again with a timer around every
call instruction of the Relax VM (``VirtualMachine.set_instrument``: kernels, branches and VM
builtins) and prints the slowest, with their call counts. The instrumented times include a
Python callback per call (a few microseconds), so builtins called thousands of times read high;
compare kernels with kernels. Random token ids and cache (timings do not depend on values).
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def main(argv=None) -> int:
    import tvm
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine

    from loopify.runtime import GenerationArtifact

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("entry", choices=["prefill", "decode"])
    ap.add_argument("--past", type=int, default=0, help="cached tokens before the call")
    ap.add_argument("--tokens", type=int, default=1, help="the call's tokens (decode: 1)")
    ap.add_argument("--loops", help="loop counts, comma-separated (default: the manifest's)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    art = GenerationArtifact(a.artifact, verify=False)
    if art.routed or art.has_state:
        raise SystemExit("profile_generation: routed and multi-resolution artifacts take more inputs; not covered")
    t = 1 if a.entry == "decode" else a.tokens
    loops = [int(x) for x in a.loops.split(",")] if a.loops else [l["default"] for l in art.loops]
    vm = VirtualMachine(tvm.runtime.load_module(str(art.path / art.gen["entries"][a.entry])), art.device)
    s, h, d = art.gen["layout"]["slots"], art.gen["kv_heads"], art.gen["head_dim"]
    cache = (np.random.default_rng(0).standard_normal((s, 1, h, a.past, d)) * 0.1).astype(art.gen.get("dtype", "float32"))
    args = [art.tensor(np.random.default_rng(1).integers(0, 100, (1, t)), "int64"),
            art.tensor(np.ones((1, a.past + t)), "int64"), art.tensor(np.arange(a.past, a.past + t)[None], "int64"),
            art.tensor(cache), art.tensor(cache.copy()), art.tensor(loops, "int64")]
    if art.gen.get("token_types"):
        args.append(art.tensor(np.zeros((1, t)), "int64"))
    if art.gen.get("logit_rows"):
        args.append(art.tensor(np.arange(t - 1, t), "int64"))
    f = vm["main"]
    for _ in range(2):
        f(*args, *art.params)
    t0 = time.perf_counter()
    for _ in range(a.calls):
        f(*args, *art.params)
    plain = (time.perf_counter() - t0) / a.calls
    times: dict = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    start: dict = {}

    def instrument(func, symbol, before, ret, *rest):
        if before:
            start[symbol] = time.perf_counter()
        else:
            times[symbol] += time.perf_counter() - start[symbol]
            counts[symbol] += 1
        return 0

    vm.set_instrument(tvm_ffi.convert(instrument))
    for _ in range(a.calls):
        f(*args, *art.params)
    n = a.calls
    print(f"{a.entry} past={a.past} tokens={t} loops={loops}: call {plain * 1e3:.2f} ms; "
          f"instrumented sum {sum(times.values()) / n * 1e3:.2f} ms")
    for sym, sec in sorted(times.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"  {sec / n * 1e3:9.3f} ms  x{counts[sym] // n:5d}  {sym}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
