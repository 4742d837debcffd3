#!/usr/bin/env python
"""Held-out fidelity of a plan's chosen point against the default plan, as `loopify eval` measures
it (same windows, same NextToken / sentence metrics), on the module-form conversions (no export). Writes PLAN.heldout.json.

Usage: python tools/plan/heldout.py MODEL PLAN.json HELDOUT.txt WINDOWS_OR_SENTENCES
"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(2)
from transformers.utils import logging as hl; hl.set_verbosity_error()
from loopify import capture, plan as pl
from loopify.convert import ConvertConfig, convert_captured
from loopify.fidelity import inputs as ti
from loopify.fidelity.report import read_texts
from loopify.nn import recursions

model, plan_path, heldout, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rep = json.load(open(plan_path))
cap = capture.load(model)
task = rep["model"]["task"]
texts = read_texts(heldout)
enc = pl._encoder_fn(cap, "auto")
if task == "causal":
    rows = ti.windows(enc("\n".join(texts)), 128, limit)
else:
    rows = ti.evenly([enc(t)[:128] for t in texts if t], limit)
inputs = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)} for r in rows]
takes = pl._takes(cap.eager)
if "token_type_ids" in takes:
    for kw in inputs: kw["token_type_ids"] = torch.zeros_like(kw["input_ids"])
index = (cap.info.get("output_names") or ["logits"]).index("logits") if task == "causal" else 0
ref = pl.run_outputs(cap.eager, inputs, index)
cal = pl.Calibration(task, inputs, ref, index, 0, 1.0, 0.0)
out = {}
specs = {"default": rep["default"]["spec"], "chosen": rep["points"][rep["chosen"]]["spec"]}
for name, spec in specs.items():
    t = time.time()
    res = convert_captured(cap, ConvertConfig(pipeline=spec))
    top = min(r.spec.max_loops for r in recursions(res.module).values())
    out[name] = {"spec": spec, "params_ratio": res.manifest["params"]["ratio"], "results": {}}
    for k in range(1, top + 1):
        out[name]["results"][k] = pl.fidelity(task, cal, pl.run_outputs(res.module, inputs, index, k))
    print(name, spec, json.dumps(out[name]), f"{time.time()-t:.0f}s", flush=True)
json.dump(out, open(plan_path.replace(".json", ".heldout.json"), "w"), indent=1)
