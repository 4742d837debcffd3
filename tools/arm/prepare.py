"""Host side of the arm64-under-emulation check: build arm64 artifacts of converted zoo models and
the PyTorch outputs they must reproduce, as plain files that an emulated aarch64 Python (numpy +
TVM only, no torch) can read (``tools/arm/check.py``).

    .venv/bin/python tools/arm/prepare.py WORK --cases minilm,llava-clip,idefics3,gen-llama

For each forward case NAME (a zoo entry): the zoo's Hugging Face directory, ``loopify convert``
with the default plan, ``loopify compile --target arm64`` (cross-linked; not runnable here, so not
validated here), and, at every combination of loop counts (``every_count``),
the converted PyTorch model's outputs on the example inputs. A ``gen-NAME`` case compiles a
generation artifact (``--max-context``) and records, per loop count, the eager prefill logits and
greedy tokens. ``q8-NAME``, ``q4-NAME``, ``q4a-NAME``: the forward case with ``--weights int8``,
``int4`` or ``int4asym``. ``s-NAME``: the default plan with a multi-resolution schedule (2:1,
SpiralFormer) whose gates are moved off zero. Everything goes to ``WORK/NAME/`` with a ``case.json`` naming the files; a case
whose ``case.json`` records the same source hash (loopify's code and this directory) is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
#: Sources whose change invalidates a prepared case (check.py runs on the emulated side only).
SOURCES = ("loopify", "passes", "backends", "examples", "tools/arm/prepare.py")
GEN_PROMPT_TOKENS = 12   # as compile's own validate_generation
GEN_NEW_TOKENS = 8


def source_hash() -> str:
    h = hashlib.sha256()
    for top in SOURCES:
        for p in sorted((REPO / top).rglob("*.py")) if (REPO / top).is_dir() else [REPO / top]:
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def every_count(loops: list[dict]) -> list[list[int]]:
    """Every combination of loop counts (the host compile's ``loop_counts_to_check`` varies the
    loops of a VLM together; here each vision / text count is also run against the other's)."""
    from loopify.compile import loop_counts_to_check

    rows = loop_counts_to_check(loops)
    return [list(c) for c in itertools.product(*[sorted({r[i] for r in rows}) for i in range(len(loops))])]


def _save(d: Path, name: str, x) -> str:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    np.save(d / f"{name}.npy", np.ascontiguousarray(a))
    return f"{name}.npy"


#: Which form of a zoo model each forward case converts: the Hugging Face directory (module form)
#: or the zoo's torch.export archive (graph form). LLaVA in module form fails to stage today
#: (``vision_feature_layer`` selects a hidden state the loop's boundary op does not record).
SOURCE_FORM = {"llava-clip": "export"}


def _converted(name: str, work: Path, form: str = "hf") -> Path:
    """zoo NAME (WORK/zoo/NAME, or its archive WORK/zoo/NAME.pt) -> WORK/NAME/model.pt2, converted
    with the default plan (halve every run)."""
    from loopify.convert import ConvertConfig, convert
    from loopify.examples import zoo

    hf_dir = work / "zoo" / name
    if not (hf_dir / "config.json").is_file():
        zoo.write_hf(name, work / "zoo")
    src = hf_dir
    if form == "export":
        src = work / "zoo" / f"{name}.pt"
        if not src.is_file():
            zoo.write_export(name, work / "zoo", hf_dir=hf_dir)
    out = work / name / "model.pt2"
    convert(src, ConvertConfig(), out)
    return out


#: ``PREFIX-NAME`` cases: the converted model's artifact with quantised weights (``compile --weights``).
QUANT_PREFIX = {"q8": "int8", "q4": "int4", "q4a": "int4asym"}
#: ``h-NAME`` cases: the converted model's float16 artifact (``compile --dtype float16``).
HALF_PREFIX = "h"
#: ``s-NAME`` cases: the default plan with a 2:1 resolution schedule, its gates off zero.
SPIRAL_PREFIX = "s"


def _spiral(name: str, work: Path) -> Path:
    """zoo NAME -> WORK/s-NAME/model.pt2: the default plan with schedule 2:1 (each loop's first
    step on pairs of tokens), its gates set to seeded random values (at zero, the neutral start,
    a coarse step would add nothing and its pooling would go unchecked)."""
    from loopify import capture
    from loopify.convert import ConvertConfig, convert_captured, save
    from loopify.examples import zoo
    from loopify.nn import recursions

    hf_dir = work / "zoo" / name
    if not (hf_dir / "config.json").is_file():
        zoo.write_hf(name, work / "zoo")
    cap = capture.load(hf_dir)
    res = convert_captured(cap, ConvertConfig(schedule=(2, 1)))
    gen = torch.Generator().manual_seed(0)
    for rec in recursions(res.module).values():
        rec.spiral.gate.data.copy_(0.5 * torch.randn(rec.spiral.gate.shape, generator=gen))
    out = work / f"{SPIRAL_PREFIX}-{name}" / "model.pt2"
    save(res, cap, out)
    return out


def prepare_forward(name: str, case: Path, work: Path, weights: str = "float32", dtype: str = "float32",
                    model: Path | None = None) -> dict:
    """Converted zoo model -> arm64 artifact + inputs + expected outputs at every loop count. With
    quantised ``weights`` the expected outputs are the PyTorch model's with the same dequantised
    weights (what the artifact computes, as the host validation compares); with ``dtype``
    float16, the float16 PyTorch model's on float16 inputs."""
    from loopify.compile import compile_model
    from loopify.convert import load_converted
    from loopify.nn import set_loops
    from loopify.nn.quant import QuantConfig, quantize_module_
    from loopify.verify import flat_tensors

    model = model or _converted(name, work, SOURCE_FORM.get(name, "hf"))
    compiled = compile_model(model, case / "art", target="arm64", weights=weights, dtype=dtype)
    module, captured, _ = load_converted(model)
    if dtype != "float32":
        from loopify.compile import _half_inputs

        module.to(getattr(torch, dtype))
        captured = _half_inputs(captured, dtype)
    if weights != "float32":
        quantize_module_(module, QuantConfig(weights))
    inputs = [_save(case, f"in{i}", x) for i, x in enumerate(captured.flat_inputs())]
    checks = []
    for counts in every_count(compiled.manifest.get("loops", [])):
        set_loops(module, counts or None)
        with torch.no_grad():
            outs = flat_tensors(module(*captured.args, **captured.kwargs))
        tag = "_".join(map(str, counts)) or "none"
        checks.append({"loops": counts, "expected": [_save(case, f"out_{tag}_{j}", o) for j, o in enumerate(outs)]})
    return {"kind": "forward", "inputs": inputs, "checks": checks}


def prepare_generation(name: str, case: Path, work: Path, max_context: int = 64) -> dict:
    """Converted causal LM -> arm64 generation artifact + prompt, eager prefill logits and greedy
    tokens at every loop count (decoded as ``loopify.generate.engine.run`` does, no end token)."""
    from loopify.compile import compile_model
    from loopify.convert import load_converted
    from loopify.generate import Sampling
    from loopify.generate.eager import EagerDecoder
    from loopify.generate.engine import run
    from loopify.nn import set_loops

    model = _converted(name, work)
    compiled = compile_model(model, case / "art", target="arm64", max_context=max_context)
    policy = compiled.manifest["generation"]["kv_policy"]
    wrapper, inputs, _ = load_converted(model)
    prompt = [int(i) for i in inputs.kwargs["input_ids"][0][:GEN_PROMPT_TOKENS]]
    ids = torch.tensor([prompt])
    checks = []
    for counts in every_count(compiled.manifest.get("loops", [])):
        set_loops(wrapper, counts or None)
        with torch.no_grad():
            logits = EagerDecoder(wrapper, policy).prefill(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(len(prompt))[None]})
        tokens = run(EagerDecoder(wrapper, policy), [prompt], Sampling(max_new_tokens=GEN_NEW_TOKENS)).tokens[0]
        tag = "_".join(map(str, counts)) or "none"
        checks.append({"loops": counts, "prefill_logits": _save(case, f"prefill_{tag}", logits), "tokens": tokens})
    set_loops(wrapper, None)
    return {"kind": "generation", "prompt": prompt, "checks": checks}


def prepare(case_name: str, work: Path, digest: str) -> dict:
    case = work / case_name
    meta = case / "case.json"
    if meta.is_file() and json.loads(meta.read_text()).get("source_hash") == digest:
        print(f"arm: {case_name}: prepared already (source {digest})", flush=True)
        return json.loads(meta.read_text())
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    t0 = time.perf_counter()
    prefix, _, rest = case_name.partition("-")
    if prefix == "gen":
        spec = prepare_generation(rest, case, work)
    elif prefix in QUANT_PREFIX and rest:
        spec = prepare_forward(rest, case, work, weights=QUANT_PREFIX[prefix])
        spec["weights"] = QUANT_PREFIX[prefix]
    elif prefix == SPIRAL_PREFIX and rest:
        spec = prepare_forward(rest, case, work, model=_spiral(rest, work))
        spec["schedule"] = [2, 1]
    elif prefix == HALF_PREFIX and rest:
        spec = prepare_forward(rest, case, work, dtype="float16")
        spec["dtype"] = "float16"
    else:
        spec = prepare_forward(case_name, case, work)
    spec.update(name=case_name, artifact="art", source_hash=digest, host_s=round(time.perf_counter() - t0, 1))
    meta.write_text(json.dumps(spec, indent=1) + "\n")  # written last: a case without it is redone
    print(f"arm: {case_name}: arm64 artifact and references in {spec['host_s']} s", flush=True)
    return spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--cases", default="minilm,llava-clip,idefics3,gen-llama")
    args = ap.parse_args(argv)
    from loopify.errors import LoopifyError

    for category in (FutureWarning, DeprecationWarning, UserWarning):  # library chatter, as the CLI
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    digest = source_hash()
    try:
        for name in args.cases.split(","):
            prepare(name, args.work, digest)
    except LoopifyError as e:
        print(f"arm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
