"""Fidelity of the real all-MiniLM-L6-v2 converted 6 layers -> 3 blocks x 2 loops (cycle, average)
at several LoRA ranks: cosine of sentence embeddings to the original's, on real English sentences
that ship with the machine (license texts, the model card).

    python -m loopify.examples.minilm_fidelity [--ranks 0,8,32,128,full] [--sentences 200]

Prints a markdown table (the one in the README) and, with --json FILE, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loopify import capture, fidelity, texts
from loopify.convert import ConvertConfig, convert_captured, unique_params
from loopify.examples import zoo
from loopify.nn import set_loops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="0,8,32,128,full")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model_dir = zoo._minilm_dir()
    cap = capture.load(model_dir)
    tok = fidelity.tokenizer_for(model_dir)
    sents = texts.sentences()[: args.sentences]
    inputs = fidelity.batch_inputs(tok, sents, cap.kwargs)
    ref = fidelity.embed(cap.module(), inputs)
    rows = []
    for r in args.ranks.split(","):
        rank = r if r == "full" else int(r)
        t0 = time.perf_counter()
        res = convert_captured(cap, ConvertConfig(blocks=3, sharing="cycle", init="average", rank=rank))
        cos = {}
        for loops in (1, 2):
            set_loops(res.module, loops)
            cos[loops] = fidelity.sentence_cosines(ref, fidelity.embed(res.module, inputs))
        set_loops(res.module, None)
        n, b = unique_params(res.module)
        rows.append({"rank": r, "params": n, "param_ratio": n / unique_params(cap.program.state_dict)[0],
                     "cos_mean": float(cos[2].mean()), "cos_min": float(cos[2].min()),
                     "cos_mean_1loop": float(cos[1].mean()), "seconds": time.perf_counter() - t0})
    print(f"all-MiniLM-L6-v2, 6 layers -> 3 blocks x 2 loops (cycle, average init); {len(sents)} real sentences")
    print("| LoRA rank | params | vs original | cosine mean (2 loops) | cosine min | cosine mean (1 loop) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rank']} | {row['params']:,} | {row['param_ratio']:.1%} | {row['cos_mean']:.4f} | "
              f"{row['cos_min']:.4f} | {row['cos_mean_1loop']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sentences": len(sents), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
