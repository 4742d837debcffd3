"""Uptraining a converted model by distillation from the original, with the Monotonic Recursion Loss.

``train(TrainConfig(converted="m.pt2", data="texts.txt", out="trained.pt2"))`` loads the converted
model (:func:`loopify.convert.load_converted`: a trainable eager module with adjustable loop
counts) as the *student* and the original model it was converted from (or ``teacher``) as the
*teacher*, and trains the chosen parameter groups so that the student's output at every recursion
depth comes close to the teacher's:

* **Depth k** runs every loop with ``min(k, its maximum)`` loops (``set_loops``); the student's
  output at depth k is the whole model's output with the rest of the network after k loops.
  Depths run 1..N, N the largest loop count of the converted model.
* **Distillation objective**, per unit: models whose first output is ``logits`` (language and
  vision-language models): KL(teacher || student) per token, teacher temperature 1, over the
  positions of the attention mask; encoders (first output ``last_hidden_state``): 1 - cosine
  (or squared distance, ``objective="mse"``) between mean-pooled, L2-normalised sentence
  embeddings (sentence-transformers pooling), one unit per example.
* **Monotonic Recursion Loss** (RecursiveVLM, arXiv 2602.09080), ``loss="mrl"``: every depth is
  supervised; a unit whose loss at depth k is higher than at depth k-1 (the comparison uses the
  previous depth's loss detached) has its depth-k loss weighted by ``beta`` (>= 1; 1 disables the
  penalty); the per-depth weighted means are summed:
  ``L = sum_k mean_u(w_{k,u} * l_{k,u})``, ``w_{1,u} = 1``,
  ``w_{k,u} = beta if l_{k,u} > sg(l_{k-1,u}) else 1``. ``loss="last"`` supervises the full
  depth only (the usual distillation of Relaxed Recursive Transformers, arXiv 2410.20672).
* **What trains** (``train``): ``base`` (the loops' shared block weights), ``lora`` (the per-depth
  LoRA matrices and the per-depth vectors of the relaxation: biases and norm scales kept per
  depth), ``connector`` (the connectors between recursion steps), ``router`` (Mixture-of-Recursions
  routers), ``spiral`` (the gates of multi-resolution loops). Everything else (embeddings,
  heads, layers outside the loops) stays frozen.
* **Data**: a text file (one text per line) or JSON lines (``.jsonl``/``.json``/``.ndjson``: a
  string, or ``{"text": ..., "image": PATH}``; image paths are relative to the data file), each
  example fitted to the captured program's static input shapes (batch 1, fixed sequence length):
  tokenised with the model's own tokenizer when the source is a Hugging Face directory that has
  one (``tokenizer="auto"``), a tokenizer directory given as ``tokenizer=PATH``, or, only when
  asked with ``tokenizer="bytes"``, UTF-8 bytes mapped onto the vocabulary minus its special ids
  (tiny test models have no tokenizer). For vision-language models the text fills the positions
  that are not image tokens; an image is loaded with PIL and made into pixel values by the
  directory's image processor (or, without one, resized to the captured size and scaled to
  [-1, 1], noted in the report); a record without an image uses the captured example pixels.
* A step accumulates gradients over ``batch`` examples (per process), then clips and takes one
  AdamW step; the learning rate follows ``schedule`` (cosine to 10% or constant, after ``warmup``).
* **Checkpoints** (``OUT.ckpt`` unless ``checkpoint`` is given) are written atomically every
  ``checkpoint_every`` steps and on SIGINT/SIGTERM/KeyboardInterrupt (at the end of the step in
  progress), holding the trainable weights, the optimizer state, the RNG state and the data
  position; ``resume=True`` continues exactly where the checkpoint stopped. The checkpoint is
  removed once the output is written.
* **Evaluation per depth** on held-out data (``eval_data``, else every ``round(1/holdout)``-th
  example is held out of training) before training, every ``eval_every`` steps and at the end:
  mean cosine (encoders) or mean per-token KL and top-1 agreement (logits) at each depth.
* **Teacher**: ``teacher``, else the source recorded in the converted model's manifest when it is
  still there unchanged. Without one, ``objective="ce"`` (next-token cross-entropy on the data's
  own tokens) trains a causal LM or VLM with no teacher at all.
* **Output**: ``OUT.pt2`` + its bundle written by :func:`loopify.convert.save` exactly as
  ``loopify convert`` writes them (so ``load_converted`` reads them back), with the training report
  under ``manifest["train"]`` and a fresh verify against the teacher at the default depth.
* **Layout**: :mod:`.config` (the config), :mod:`.losses` (losses, the MRL, objectives),
  :mod:`.data` (records, tokenisers), :mod:`.student` (depths, parameter groups),
  :mod:`.checkpoint` (checkpoints, interrupts, resume), :mod:`.distributed` (torchrun),
  :mod:`.evaluate`, :mod:`.report` (console), :mod:`.loop` (the training loop).
* **Distributed**: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group
  is initialised (gloo on CPU, nccl on CUDA) and the depth runner is wrapped in
  DistributedDataParallel; each process takes its own ``batch`` examples of every step (the
  effective batch is ``batch x world size``); rank 0 evaluates, checkpoints and writes.
"""

from loopify.train.checkpoint import load_checkpoint, save_checkpoint
from loopify.train.config import GROUPS, TrainConfig, TrainError, TrainInterrupted
from loopify.train.data import Encoder, Record, example_indices, read_records, split_holdout
from loopify.train.evaluate import evaluate
from loopify.train.loop import TrainResult, train
from loopify.train.losses import Objective, last_loss, mrl_loss, mrl_weights, pooled_loss, token_ce, token_kl
from loopify.train.report import ConsoleProgress, format_report
from loopify.train.student import DepthRunner, max_depth, parameter_groups, set_depth

__all__ = ["ConsoleProgress", "DepthRunner", "Encoder", "GROUPS", "Objective", "Record", "TrainConfig", "TrainError",
           "TrainInterrupted", "TrainResult", "evaluate", "example_indices", "format_report", "last_loss",
           "load_checkpoint", "max_depth", "mrl_loss", "mrl_weights", "parameter_groups", "pooled_loss",
           "read_records", "save_checkpoint", "set_depth", "split_holdout", "token_ce", "token_kl", "train"]
