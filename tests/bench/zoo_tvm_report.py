"""Which zoo models import into TVM and build for which targets (and whether x86 matches PyTorch).

    .venv/bin/python tests/bench/zoo_tvm_report.py [--targets x86 arm64 cuda] [--only NAME ...]

For every model: import (loopify's legalisation), then for each target a full build to an
artifact; the x86 artifact is run and compared with the exported program (rel. tol 1e-4).
Prints one line per model and target with the exact reason of any failure; ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ["llama", "qwen2", "minilm", "nanogpt", "llava-clip", "llava-siglip", "paligemma",
          "idefics3", "qwen2-vl-text"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=MODELS)
    ap.add_argument("--targets", nargs="+", default=["x86", "arm64", "cuda"])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "loopify-bench-zoo")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "loopify-zoo-art")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import torch

    import loopify.runtime as rt
    from loopify import capture
    from loopify.backends.tvm import compile_program, import_program
    from loopify.examples import zoo

    a.cache.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in a.only:
        row = report.setdefault(name, {})
        try:
            path = a.cache / f"{name}.pt"
            if not path.exists():
                zoo.write_export(name, a.cache)
            cap = capture.load(path)
        except Exception as e:  # noqa: BLE001
            row["capture"] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(name, row, flush=True)
            continue
        t = time.time()
        try:
            import_program(cap.program)
            row["import"] = f"ok ({time.time() - t:.1f}s)"
        except Exception as e:  # noqa: BLE001
            row["import"] = f"FAIL {str(e).splitlines()[0][:400]}"
            print(f"{name}: import {row['import']}", flush=True)
            continue
        args = tuple(cap.args) + tuple(cap.kwargs.values())
        with torch.no_grad():
            ref = cap.program.module()(*cap.args, **cap.kwargs)
        for tgt in a.targets:
            t = time.time()
            try:
                res = compile_program(cap.program, tgt, a.out / f"{name}.{tgt}")
                msg = f"built ({time.time() - t:.1f}s)"
                if tgt == "x86":
                    checks = rt.validate(res.path, lambda *i: ref, args)
                    worst = max(c.rel_err for c in checks)
                    msg += f", {'matches' if all(c.ok for c in checks) else 'DIFFERS'} " \
                           f"(max rel err {worst:.1e} over {len(checks)} outputs)"
                row[tgt] = msg
            except Exception as e:  # noqa: BLE001
                row[tgt] = f"FAIL {str(e).splitlines()[0][:400]}"
            print(f"{name}: {tgt} {row[tgt]}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
