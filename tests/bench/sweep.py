"""Coverage sweep: every transformers architecture class that can be built from its default
config, tried as a new user would (issue 15), written as a table.

For each class: a tiny random model (tests/tiny.py, 2 layers), then ``loopify inspect``,
``convert --rank full`` (lossless, must be exact), the default ``convert``, and ``compile`` for
x86 (validated against PyTorch at every loop count). Each architecture runs in its own process
under a time limit, so a crash or a hang is one row, not the end of the sweep.

    python tests/bench/sweep.py --out sweep.md                     # every class (hours)
    python tests/bench/sweep.py --only ViTModel,FalconModel --out sweep.md
    python tests/bench/sweep.py --kinds base,causal --limit 40 --out sweep.md

Not part of ``make test``. The table in README.md ("Coverage sweep") is its output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("build", "inspect", "full", "default", "compile")
# auto-mapping name -> kind (which head classes the sweep takes by default)
KINDS = {"base": "MODEL_MAPPING_NAMES", "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
         "vlm": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
         "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
         "image": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
         "audio": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"}


def architectures(kinds: list[str]) -> list[str]:
    """Model class names of the auto mappings of ``kinds`` that transformers exports."""
    import transformers
    from transformers.models.auto import modeling_auto

    names: list[str] = []
    for k in kinds:
        for v in getattr(modeling_auto, KINDS[k]).values():
            for n in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(transformers, n) and n not in names:
                    names.append(n)
    return names


def _first_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("loopify: ")] or text.strip().splitlines()[-1:] or [""]
    line = re.sub(r"\S*/sweep-one-[^/\s]+/[^:\s]+: ", "", lines[-1])  # the temporary model path
    return line.replace("loopify: error: ", "").replace("|", "/")[:160]


def run_one(arch: str, work: Path, steps: tuple[str, ...], layers: int = 2) -> dict:
    """The flow on one architecture, in this process: per step "ok", or the first error line."""
    from click.testing import CliRunner

    from loopify.cli import cli
    from tests.tiny import write_tiny

    row: dict = {"arch": arch}
    try:
        d = write_tiny(arch, work, layers=layers)
        row["build"] = "ok"
    except Exception as e:  # noqa: BLE001 - a row of the table
        row["build"] = f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}"
        return row
    cmds = {"inspect": ["inspect", d, "--json", work / "spans.json"],
            "full": ["convert", d, "-o", work / "full.pt2", "--rank", "full"],
            "default": ["convert", d, "-o", work / "def.pt2"],
            "compile": ["compile", work / "def.pt2", "-o", work / "x86"]}
    for step in steps[1:]:
        r = CliRunner().invoke(cli, [str(a) for a in cmds[step]])
        row[step] = "ok" if r.exit_code == 0 else _first_line(r.output)
        if step == "inspect" and r.exit_code == 0:
            spans = json.loads((work / "spans.json").read_text())
            row["spans"] = len(spans["spans"])
            row["shared"] = len(spans.get("shared", []))
        if step == "full" and r.exit_code == 0:
            row["full_rel_err"] = json.loads((work / "full.json").read_text())["verify"]["rel_err"]
        if r.exit_code != 0:
            break
    return row


def run_isolated(arch: str, timeout: int, steps: tuple[str, ...], layers: int = 2) -> dict:
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--one", arch, "--row", str(out), "--steps", ",".join(steps),
               "--layers", str(layers)]
        t = time.time()
        try:
            subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        except subprocess.TimeoutExpired:
            pass
        row = json.loads(out.read_text()) if out.is_file() else {"arch": arch, "note": f"timed out after {timeout} s"}
        row["seconds"] = round(time.time() - t)
        return row


def table(rows: list[dict], steps: tuple[str, ...]) -> str:
    head = ["architecture", *steps, "spans", "lossless rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arch"]]
        for s in steps:
            v = r.get(s, "")
            cells.append("ok" if v == "ok" else (f"**{v}**" if v else ("-" if "note" not in r else "")))
        cells.append(str(r.get("spans", "")) + (f" (+{r['shared']} shared)" if r.get("shared") else ""))
        cells.append(f"{r['full_rel_err']:.1e}" if "full_rel_err" in r else "")
        if "note" in r:
            cells[-1] = r["note"]
        lines.append("| " + " | ".join(cells) + " |")
    done = {s: sum(r.get(s) == "ok" for r in rows) for s in steps}
    lines.append("")
    lines.append(f"{len(rows)} architectures, {datetime.date.today().isoformat()}: "
                 + ", ".join(f"{done[s]} {s}" for s in steps) + ".")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated class names (default: the auto mappings of --kinds)")
    ap.add_argument("--kinds", default="base,causal,vlm,seq2seq,image,audio")
    ap.add_argument("--limit", type=int, default=0, help="at most this many architectures")
    ap.add_argument("--steps", default=",".join(STEPS), help="the steps to run, in order (a prefix of "
                                                             + ",".join(STEPS) + ")")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per architecture")
    ap.add_argument("--out", type=Path, help="write the markdown table here (and a .json beside it)")
    ap.add_argument("--layers", type=int, default=2, help="layers per model (periodic patterns need "
                                                              "two groups: 8 for SmolLM3's period 4)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    steps = tuple(a.steps.split(","))
    if a.one:
        sys.path.insert(0, str(ROOT))
        with tempfile.TemporaryDirectory(prefix="sweep-one-") as work:
            a.row.write_text(json.dumps(run_one(a.one, Path(work), steps, a.layers)))
        return
    archs = a.only.split(",") if a.only else architectures(a.kinds.split(","))
    archs = archs[: a.limit] if a.limit else archs
    rows = []
    for i, arch in enumerate(archs):
        rows.append(run_isolated(arch, a.timeout, steps, a.layers))
        print(f"[{i + 1}/{len(archs)}] {arch}: " + ", ".join(f"{s}={rows[-1].get(s, '-')}" for s in steps),
              file=sys.stderr, flush=True)
        if a.out:  # written after every row: a long sweep can be read while it runs
            a.out.write_text(table(rows, steps) + "\n")
            a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table(rows, steps))


if __name__ == "__main__":
    main()
