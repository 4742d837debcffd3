"""Uptraining the real all-MiniLM-L6-v2 converted 6 layers -> 3 blocks x 2 loops (LoRA rank 0) by
distillation from the original, with the Monotonic Recursion Loss and, for comparison, other
losses: fidelity (cosine of mean-pooled sentence embeddings to the original's) at each depth on
held-out real sentences, before and after training.

    python -m loopify.examples.minilm_train [--init stepwise] [--sharing cycle] [--steps 100000]
        [--batch 16] [--lr 5e-4] [--beta 2] [--max-seconds 600] [--losses mrl] [--objective auto]
        [--eval-size 300] [--threads 2] [--work DIR] [--json FILE]

Data: ``loopify.texts.document_sentences()``: the sentences of the real documents on this machine
(Debian licence texts, man pages, Python's reference topics), held out by document. Steps run
batched (one padded batch of ``--batch`` sentences). Prints a markdown table.
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


def write_data(work: Path) -> tuple[Path, Path, int, int]:
    """train.txt and heldout.txt (one sentence per line), held out by document."""
    train_s, held = texts.document_sentences()
    tp, hp = work / "train.txt", work / "heldout.txt"
    tp.write_text("\n".join(train_s) + "\n")
    hp.write_text("\n".join(held) + "\n")
    return tp, hp, len(train_s), len(held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default="stepwise")
    ap.add_argument("--sharing", default="cycle")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=600.0, help="training time limit per run")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--losses", default="mrl")
    ap.add_argument("--objective", default="auto")
    ap.add_argument("--threads", type=int, default=2)
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
    res = convert_captured(cap, ConvertConfig(blocks=3, sharing=args.sharing, init=args.init, rank=0))
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
                          batch=args.batch, lr=args.lr, warmup=args.warmup, loss=loss, beta=args.beta,
                          objective=args.objective, eval_every=args.eval_every, eval_size=args.eval_size,
                          max_seconds=args.max_seconds, threads=args.threads, checkpoint_every=0)
        t0 = time.perf_counter()
        rep = train(cfg).report
        print(f"--- loss {loss} ({time.perf_counter() - t0:.0f} s wall)")
        print(format_report(rep), flush=True)
        runs[loss] = rep

    depths = next(iter(runs.values()))["depths"]
    print()
    print(f"all-MiniLM-L6-v2, 6 layers -> 3 blocks x 2 loops ({args.sharing}, {args.init} init, LoRA rank 0); trains "
          f"the shared blocks (5.3M parameters); {n_train} training sentences, {n_held} held out by document "
          f"({args.eval_size or n_held} evaluated); batch {args.batch}, lr {args.lr:g} (cosine), beta {args.beta:g}")
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
