"""Uptraining the real all-MiniLM-L6-v2 converted 6 layers -> 3 blocks x 2 loops (cycle, average
init, LoRA rank 0) by distillation from the original, with the Monotonic Recursion Loss and, for
comparison, with the last-depth loss: fidelity (cosine of mean-pooled sentence embeddings to the
original's) at each depth on held-out real sentences, before and after training.

    python -m loopify.examples.minilm_train [--steps 200] [--batch 8] [--lr 2e-4] [--beta 2]
        [--max-seconds 600] [--losses mrl,last] [--work DIR] [--json FILE]

Data: real English sentences already on the machine. Held out: the held-out split of
``loopify.texts.sentences()`` (every 5th sentence of the Debian license texts and the model
card). Training: the other sentences, plus the sentences of further license texts in
/usr/share/common-licenses that are not held out. Prints a markdown table (the one in the README).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from loopify.examples import zoo

from loopify import capture, texts
from loopify.convert import ConvertConfig, convert_captured, save
from loopify.train import TrainConfig, format_report, train

EXTRA = ["GPL-2", "LGPL-2.1", "MPL-1.1", "GFDL-1.2", "CC0-1.0", "BSD", "GPL-1", "LGPL-2"]


def write_data(work: Path) -> tuple[Path, Path, int, int]:
    """train.txt and heldout.txt (one sentence per line)."""
    train_s, held = texts.split(texts.sentences())
    extra_files = [texts.LICENSES / f for f in EXTRA if (texts.LICENSES / f).is_file()]
    seen = set(train_s) | set(held)
    extra = [s for s in texts.sentences(files=extra_files) if s not in seen] if extra_files else []
    train_s = train_s + extra
    tp, hp = work / "train.txt", work / "heldout.txt"
    tp.write_text("\n".join(train_s) + "\n")
    hp.write_text("\n".join(held) + "\n")
    return tp, hp, len(train_s), len(held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=600.0, help="training time limit per run")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--losses", default="mrl,last")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="directory for the converted and trained models (default: temporary)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loopify-minilm-train-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = zoo._minilm_dir()
    cap = capture.load(model_dir)
    res = convert_captured(cap, ConvertConfig(blocks=3, sharing="cycle", init="average", rank=0))
    converted = work / "minilm-3x2.pt2"
    save(res, cap, converted)
    tp, hp, n_train, n_held = write_data(work)

    runs = {}
    for loss in args.losses.split(","):
        out = work / f"minilm-3x2-{loss}.pt2"
        ckpt = out.with_suffix(".ckpt")
        if ckpt.exists():
            ckpt.unlink()
        cfg = TrainConfig(converted=str(converted), data=str(tp), eval_data=str(hp), out=str(out), steps=args.steps,
                          batch=args.batch, lr=args.lr, loss=loss, beta=args.beta, eval_every=args.eval_every,
                          max_seconds=args.max_seconds, threads=args.threads, checkpoint_every=0)
        t0 = time.perf_counter()
        rep = train(cfg).report
        print(f"--- loss {loss} ({time.perf_counter() - t0:.0f} s wall)")
        print(format_report(rep), flush=True)
        runs[loss] = rep

    depths = next(iter(runs.values()))["depths"]
    print()
    print(f"all-MiniLM-L6-v2, 6 layers -> 3 blocks x 2 loops (cycle, average init, LoRA rank 0); trains the shared "
          f"blocks (5.3M parameters); {n_train} training sentences, {n_held} held-out; batch {args.batch}, "
          f"lr {args.lr:g} (cosine), beta {args.beta:g}")
    print("| loss | steps | train time | " + " | ".join(f"depth {k} before | depth {k} after" for k in depths)
          + " | monotonic after |")
    print("|---|---|---|" + "---|---|" * len(depths) + "---|")
    for loss, rep in runs.items():
        cells = []
        for k in depths:
            cells += [f"{rep['before']['depths'][str(k)]['cosine']:.4f}", f"{rep['after']['depths'][str(k)]['cosine']:.4f}"]
        print(f"| {loss} | {rep['steps']} | {rep['seconds']:.0f} s | " + " | ".join(cells)
              + f" | {'yes' if rep['after']['monotonic'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "train_sentences": n_train, "heldout_sentences": n_held,
                       "runs": {k: {kk: v[kk] for kk in ("steps", "seconds", "before", "after", "evals", "history",
                                                         "stopped")} for k, v in runs.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
