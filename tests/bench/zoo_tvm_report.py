"""Which zoo models compile for which targets, original and converted, and whether x86 matches.

    .venv/bin/python tests/bench/zoo_tvm_report.py [--targets x86 arm64 cuda] [--only NAME ...]

For every model: its Hugging Face directory and its default conversion (`loopify convert`
with no options), each compiled with `loopify.compile.compile_model` for every target. The x86
artifacts are validated against PyTorch at every loop count (rel. tol 1e-4); arm64 must be an
aarch64 ELF and cuda must carry device code for the arch. One line per model, form and target
with the exact reason of any failure; ``--json`` saves it.
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

    from loopify.compile import compile_model
    from loopify.convert import ConvertConfig, convert
    from loopify.examples import zoo

    a.cache.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in a.only:
        row = report.setdefault(name, {})
        try:
            hf = a.cache / name
            if not (hf / "config.json").exists():
                hf = zoo.write_hf(name, a.cache)
            conv = a.cache / f"{name}.loop.pt2"
            if not conv.exists():
                convert(hf, ConvertConfig(), conv)
        except Exception as e:  # noqa: BLE001
            row["convert"] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(name, row, flush=True)
            continue
        for form, src in (("original", hf), ("converted", conv)):
            for tgt in a.targets:
                t = time.time()
                key = f"{form} {tgt}"
                try:
                    res = compile_model(src, a.out / f"{name}.{form}.{tgt}", target=tgt)
                    m = res.manifest
                    msg = f"built ({time.time() - t:.1f}s)"
                    if res.checks:
                        worst = max(c["rel_err"] for c in res.checks)
                        counts = sorted({str(c["loops"]) for c in res.checks})
                        msg += f", matches at loops {' '.join(counts)} (max rel err {worst:.1e})"
                    if tgt == "arm64":
                        head = (res.path / "lib.so").read_bytes()[:20]
                        msg += f", ELF e_machine {int.from_bytes(head[18:20], 'little')}"
                    if tgt == "cuda":
                        msg += f", device code {m.get('device_code', {}).get('arch', '?')}"
                    if m.get("assumptions"):
                        msg += f", assumes {[(x['node'], x['count']) for x in m['assumptions']]}"
                    row[key] = msg
                except Exception as e:  # noqa: BLE001
                    row[key] = f"FAIL {str(e).splitlines()[0][:400]}"
                print(f"{name}: {key}: {row[key]}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
