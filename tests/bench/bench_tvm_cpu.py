"""CPU timings of TVM-compiled models against eager PyTorch, in ONE process, side by side.

    .venv/bin/python tests/bench/bench_tvm_cpu.py                       # bench-llama, all variants
    .venv/bin/python tests/bench/bench_tvm_cpu.py --model llama --schedules loopify dlight
    .venv/bin/python tests/bench/bench_tvm_cpu.py --schedules loopify --tune --trials 64 \
        --tuning-db out/tuning-db                                       # MetaSchedule on top

For each thread count (1 and 2) it times eager PyTorch (``torch.set_num_threads(n)``) and each
compiled variant with TVM's pool sized to n, in interleaved rounds. Each compiled artifact is
checked against PyTorch first. ``--artifact NAME=DIR`` adds a prebuilt artifact (e.g. tuned by
``loopify compile --tune``). Timings on a shared machine swing with other load: compare only within one run.
Writes a JSON report (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def load_model(name: str, cache: Path):
    """The zoo entry's export archive (written once into ``cache``) -> (program, args, kwargs)."""
    from loopify import capture
    from loopify.examples import zoo

    path = cache / f"{name}.pt"
    if not path.exists():
        zoo.write_export(name, cache)
    cap = capture.load(path)
    return cap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench-llama")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "loopify-bench-zoo")
    ap.add_argument("--schedules", nargs="+", default=["loopify", "dlight"],
                    help="CPU schedule variants to build (loopify, dlight, none)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--tuning-db", default=None)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "loopify-bench-art")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR",
                    help="also time a prebuilt artifact of the same model (e.g. a tuned one)")
    a = ap.parse_args(argv)

    import loopify.runtime as rt
    from loopify.backends.tvm import compile_program

    a.cache.mkdir(parents=True, exist_ok=True)
    cap = load_model(a.model, a.cache)
    ep = cap.program
    args = tuple(cap.args) + tuple(cap.kwargs.values())
    eager = ep.module()
    report = {"model": a.model, "inputs": [list(x.shape) for x in args], "variants": {},
              "timings": {}}
    with torch.no_grad():
        ref = eager(*cap.args, **cap.kwargs)

    variants = list(a.schedules) + (["tuned"] if a.tune else [])
    arts = {}
    for spec in a.artifact:  # prebuilt artifacts, e.g. one tuned earlier: NAME=DIR
        name, _, path = spec.partition("=")
        art = rt.load(path)
        checks = rt.validate(art, lambda *i: ref, args)
        arts[name] = art
        report["variants"][name] = {"path": path, "tuning": art.manifest.get("tuning"),
                                    "checks": [c._asdict() for c in checks]}
        print(f"loaded {name}: {path}, matches: {all(c.ok for c in checks)}", flush=True)
    for v in variants:
        t = time.time()
        opts = {"schedule": "loopify" if v == "tuned" else v}
        if v == "tuned":
            opts.update(tune=True, trials=a.trials, tuning_db=a.tuning_db)
        res = compile_program(ep, "x86", a.out / v, **opts)
        art = rt.load(res.path)
        checks = rt.validate(art, lambda *i: ref, args)
        arts[v] = art
        report["variants"][v] = {"build_s": round(time.time() - t, 1), "timings": res.timings,
                                 "checks": [c._asdict() for c in checks]}
        print(f"built {v}: {report['variants'][v]}", flush=True)

    for n in a.threads:
        torch.set_num_threads(n)
        rt.set_num_threads(n)

        def eager_call():
            with torch.no_grad():
                eager(*cap.args, **cap.kwargs)

        calls = {"eager": eager_call}
        for v, art in arts.items():
            calls[v] = (lambda art=art: art(*args))
        for fn in calls.values():  # warm-up, not counted
            fn()
        # Interleaved rounds, alternating direction, so every variant sees the same conditions
        # (TVM's naive "none" schedule takes seconds: once per round at most).
        times = {k: [] for k in calls}
        order = list(calls)
        for r in range(a.repeat):
            for k in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                calls[k]()
                times[k].append((time.perf_counter() - t) * 1e3)
        row = {k: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2), "n": len(v)}
               for k, v in times.items()}
        report["timings"][f"threads={n}"] = row
        print(f"threads={n}: " + ", ".join(f"{k} {r['median_ms']:.1f} ms" for k, r in row.items()),
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
