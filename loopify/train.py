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
  depth), ``connector`` (the connectors between recursion steps). Everything else (embeddings,
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
* **Output**: ``OUT.pt2`` + ``OUT.json`` written by :func:`loopify.convert.save` exactly as
  ``loopify convert`` writes them (so ``load_converted`` reads them back), with the training report
  under ``manifest["train"]`` and a fresh verify against the original at the default depth.
* **Distributed**: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group
  is initialised (gloo on CPU, nccl on CUDA) and the depth runner is wrapped in
  DistributedDataParallel; each process takes its own ``batch`` examples of every step (the
  effective batch is ``batch x world size``); rank 0 evaluates, checkpoints and writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from loopify.config import fields_from_dict
from loopify.errors import LoopifyError
from loopify.io import atomic_path

log = logging.getLogger(__name__)

TRAIN_CONFIG_VERSION = 1
CHECKPOINT_FORMAT = "loopify-train-checkpoint"
CHECKPOINT_VERSION = 1
GROUPS = ("base", "lora", "connector")
LOSSES = ("mrl", "last")
OBJECTIVES = ("auto", "kl", "cosine", "mse")
SCHEDULES = ("cosine", "constant")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
#: Fields that may differ between an interrupted run and its ``--resume``: they do not change the
#: trajectory of the weights (how long to run, how often to look, where to write).
RESUME_MAY_CHANGE = ("steps", "eval_every", "eval_size", "checkpoint_every", "resume", "max_seconds",
                     "log_every", "threads", "out", "checkpoint", "teacher")


class TrainError(LoopifyError):
    """Training could not start or continue (bad config, data, checkpoint ...)."""


class TrainInterrupted(LoopifyError):
    """Training stopped on an interrupt after writing its checkpoint."""

    exit_code = 130


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and how. Validates itself; serialises to and from a dict.

    Attributes:
        converted: the converted model (``OUT.pt2`` of ``loopify convert``; its ``.json`` beside it).
        data: training data: a text file (one text per line) or JSON lines.
        out: the output ``.pt2`` (its manifest ``.json`` is written beside it).
        teacher: the original model (default: the source recorded in the converted manifest).
        eval_data: held-out data; default: every ``round(1/holdout)``-th example of ``data``.
        holdout: fraction of ``data`` held out for evaluation when ``eval_data`` is not given (0: none).
        steps: optimizer steps (in total, counting those before a resume).
        lr: peak learning rate (AdamW).
        batch: examples per step per process (gradient accumulation; the model runs batch 1).
        loss: ``mrl`` (every depth, worse-than-previous units weighted by beta) or ``last``.
        beta: the MRL weight of a unit whose loss rose from the previous depth (>= 1).
        train: parameter groups to train: base, lora, connector.
        objective: ``auto`` (KL for logits, cosine for hidden states), ``kl``, ``cosine``, ``mse``.
        schedule: ``cosine`` (to 10% of lr at the last step) or ``constant``, after ``warmup`` steps.
        warmup: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (0: no clipping).
        seed: data order and RNG seed.
        checkpoint: checkpoint path (default ``OUT.ckpt``).
        checkpoint_every: steps between checkpoints (0: only on interrupt).
        resume: continue from the checkpoint (same step, optimizer state and data position).
        eval_every: steps between evaluations (0: only before and after training).
        eval_size: at most this many held-out examples are evaluated (0: all).
        tokenizer: ``auto`` (the model's own), ``bytes`` (UTF-8 bytes onto the vocabulary), or a
            tokenizer directory.
        max_seconds: stop (and write the output) after this much training time (0: no limit).
        log_every: steps between history records in the report.
        threads: torch intra-op threads (0: leave torch's setting).
    """

    converted: str = ""
    data: str = ""
    out: str = ""
    version: int = TRAIN_CONFIG_VERSION
    teacher: str | None = None
    eval_data: str | None = None
    holdout: float = 0.1
    steps: int = 100
    lr: float = 1e-4
    batch: int = 8
    loss: Literal["mrl", "last"] = "mrl"
    beta: float = 2.0
    train: tuple[str, ...] = GROUPS
    objective: Literal["auto", "kl", "cosine", "mse"] = "auto"
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 50
    resume: bool = False
    eval_every: int = 0
    eval_size: int = 0
    tokenizer: str = "auto"
    max_seconds: float = 0.0
    log_every: int = 1
    threads: int = 0

    def __post_init__(self):
        if self.version != TRAIN_CONFIG_VERSION:
            raise TrainError(f"train config version {self.version} is not supported (this loopify reads version "
                             f"{TRAIN_CONFIG_VERSION})")
        if isinstance(self.train, str):
            object.__setattr__(self, "train", tuple(g.strip() for g in self.train.split(",") if g.strip()))
        else:
            object.__setattr__(self, "train", tuple(self.train))
        for name in ("converted", "data", "out"):
            if not getattr(self, name):
                raise TrainError(f"{name} must be given")
        if not str(self.out).endswith(".pt2"):
            raise TrainError(f"{self.out}: the output must end in .pt2")
        bad = [g for g in self.train if g not in GROUPS]
        if bad or not self.train:
            raise TrainError(f"train must name one or more of {', '.join(GROUPS)}, not {','.join(self.train) or 'nothing'!r}")
        if len(set(self.train)) != len(self.train):
            raise TrainError(f"train names a group twice: {','.join(self.train)}")
        _choice("loss", self.loss, LOSSES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("schedule", self.schedule, SCHEDULES)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("batch", self.batch, 1)
        for name in ("warmup", "checkpoint_every", "eval_every", "eval_size", "seed", "threads"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("log_every", self.log_every, 1)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"lr must be a positive number, not {self.lr!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 1):
            raise TrainError(f"beta must be a number >= 1 (the weight of a depth that got worse), not {self.beta!r}")
        if not (0 <= self.holdout < 1):
            raise TrainError(f"holdout must be in [0, 1), not {self.holdout!r}")
        for name in ("weight_decay", "grad_clip", "max_seconds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise TrainError(f"{name} must be a number >= 0, not {v!r}")
        if self.warmup >= self.steps and self.warmup:
            raise TrainError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.out).with_suffix(".ckpt")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = list(self.train)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**fields_from_dict(cls, d, TrainError, "train config"))


def _choice(name, value, allowed):
    if value not in allowed:
        raise TrainError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainError(f"{name} must be an integer >= {low}, not {value!r}")


@dataclass
class TrainResult:
    out: Path | None          # None on ranks other than 0
    manifest_path: Path | None
    report: dict
    module: nn.Module


# ----------------------------------------------------------------------------------------------
# Losses (pure functions on tensors)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(teacher || student) at temperature 1, in nats: ``[..., S, V] -> [n]`` over the
    positions where ``mask`` (``[..., S]``) is nonzero (all positions without a mask)."""
    lt = torch.log_softmax(teacher_logits.float(), -1)
    ls = torch.log_softmax(student_logits.float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    if mask is None:
        return kl.reshape(-1)
    return kl[mask.to(torch.bool).expand_as(kl)]


def pooled_loss(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, mask: torch.Tensor,
                kind: str = "cosine") -> torch.Tensor:
    """Per-example loss between mean-pooled, L2-normalised embeddings: ``[B, S, D] -> [B]``.

    ``cosine``: 1 - cos; ``mse``: squared distance of the normalised embeddings (= 2 - 2 cos).
    """
    from loopify.fidelity import mean_pooled

    t = mean_pooled(teacher_hidden.float(), mask)
    s = mean_pooled(student_hidden.float(), mask)
    if kind == "cosine":
        return 1 - (t * s).sum(-1)
    if kind == "mse":
        return (t - s).square().sum(-1)
    raise ValueError(f"unknown pooled loss {kind!r}")


def mrl_weights(depth_losses: Sequence[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """The MRL weight of every unit at every depth: 1 at the first depth; at depth k, ``beta``
    where the unit's loss is higher than at depth k-1 (compared detached), else 1."""
    out = [torch.ones_like(depth_losses[0])]
    for prev, cur in zip(depth_losses[:-1], depth_losses[1:]):
        worse = cur.detach() > prev.detach()
        out.append(torch.where(worse, torch.full_like(cur, float(beta)), torch.ones_like(cur)))
    return out


def mrl_loss(depth_losses: Sequence[torch.Tensor], beta: float) -> tuple[torch.Tensor, dict]:
    """Monotonic Recursion Loss: ``sum_k mean_u(w_{k,u} * l_{k,u})`` (see :func:`mrl_weights`).

    ``depth_losses[k]`` holds the per-unit losses (tokens or examples) at depth k+1, same shape at
    every depth. Returns the loss and ``{"depths": [mean unweighted loss per depth],
    "worse": [fraction of units weighted by beta, per depth]}``.
    """
    if not depth_losses:
        raise ValueError("no depth losses")
    weights = mrl_weights(depth_losses, beta)
    total = sum((w * l).mean() for w, l in zip(weights, depth_losses))
    info = {"depths": [float(l.detach().mean()) for l in depth_losses],
            "worse": [float((w > 1).float().mean()) if w.numel() else 0.0 for w in weights]}
    return total, info


def last_loss(depth_losses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Only the last (full) depth is supervised."""
    return depth_losses[-1].mean(), {"depths": [float(l.detach().mean()) for l in depth_losses]}


# ----------------------------------------------------------------------------------------------
# Depths


def max_depth(module: nn.Module) -> int:
    """N: the largest loop count over the model's loops (their default in deepen mode)."""
    from loopify.recursion import recursions

    loops = recursions(module)
    if not loops:
        raise TrainError("the model has no loops: nothing to train at several depths")
    return max(r.spec.max_loops for r in loops.values())


def set_depth(module: nn.Module, k: int | None) -> None:
    """Run every loop with ``min(k, its maximum)`` loops (``None``: every loop at its default)."""
    from loopify.recursion import recursions, set_loops

    if k is None:
        set_loops(module, None)
        return
    set_loops(module, [min(k, r.spec.max_loops) for r in recursions(module).values()])


class DepthRunner(nn.Module):
    """One forward = the student's first output at each of ``depths`` (one DDP forward per step)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, inputs: dict, depths: list[int]) -> list[torch.Tensor]:
        outs = []
        try:
            for k in depths:
                set_depth(self.student, k)
                outs.append(_first(self.student(**inputs)))
        finally:
            set_depth(self.student, None)
        return outs


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Record:
    text: str
    image: Path | None = None


def read_records(path: str | Path) -> list[Record]:
    """Text file (one text per line, blank lines skipped) or JSON lines (by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: data file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: data file is not UTF-8 text (byte {e.start})") from None
    out: list[Record] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise TrainError(f"{path}:{i}: a record must be a string or an object with a non-empty \"text\"")
            img = obj.get("image")
            if img is not None:
                if not isinstance(img, str):
                    raise TrainError(f"{path}:{i}: \"image\" must be a path")
                img = Path(img) if Path(img).is_absolute() else path.parent / img
                if not img.is_file():
                    raise TrainError(f"{path}:{i}: image {img} not found")
            out.append(Record(obj["text"], img))
    else:
        out = [Record(line.strip()) for line in raw.splitlines() if line.strip()]
    if not out:
        raise TrainError(f"{path}: no texts in the data file")
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_json(source: Path) -> dict:
    try:
        if source.is_dir() and (source / "config.json").is_file():
            return json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    return {}


def _special_ids(d: dict) -> set[int]:
    ids: set[int] = set()
    for k, v in d.items():
        if isinstance(v, dict):
            ids |= _special_ids(v)
        elif isinstance(k, str) and k.endswith(("_token_id", "_token_index", "_token_ids")):
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, int) and not isinstance(x, bool):
                    ids.add(x)
    return ids


def _find(d: dict, key: str):
    if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
        return d[key]
    for v in d.values():
        if isinstance(v, dict):
            r = _find(v, key)
            if r is not None:
                return r
    return None


class ByteTokenizer:
    """UTF-8 bytes mapped onto the vocabulary minus its special ids (only on request: for tiny
    test models that ship no tokenizer). ``bos`` is prepended when given."""

    def __init__(self, vocab: int, specials: set[int], bos: int | None, pad: int):
        self.allowed = [i for i in range(vocab) if i not in specials]
        if len(self.allowed) < 2:
            raise TrainError(f"vocabulary of {vocab} ids has too few non-special ids for byte tokenisation")
        self.bos, self.pad = bos, pad

    def ids(self, text: str) -> list[int]:
        body = [self.allowed[b % len(self.allowed)] for b in text.encode("utf-8")]
        return ([self.bos] if self.bos is not None else []) + body


class Encoder:
    """Turns records into keyword inputs with the captured program's static shapes."""

    def __init__(self, captured, source: Path, tokenizer: str):
        self.template = {k: v for k, v in captured.kwargs.items()}
        if captured.args:
            raise TrainError(f"{captured.source}: the model takes positional inputs; text training data need a model "
                             "with keyword inputs (input_ids, attention_mask ...) such as a Hugging Face model")
        if "input_ids" not in self.template:
            raise TrainError(f"{captured.source}: the model takes no input_ids; training data are texts")
        self.seq = int(self.template["input_ids"].shape[-1])
        self.image_token_id = captured.info.get("image_token_id")
        ids = self.template["input_ids"][0]
        self.image_slots = (ids == self.image_token_id) if self.image_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        self.vlm = bool(self.image_slots.any()) and "pixel_values" in self.template
        self.notes: list[str] = []
        self.source = source
        cfg = _config_json(source)
        self.hf_tok = None
        self.bytes_tok = None
        if tokenizer == "bytes":
            self.bytes_tok = self._byte_tokenizer(captured, cfg)
            self.tokenizer_desc = "bytes"
            self.notes.append("texts tokenised as UTF-8 bytes mapped onto the vocabulary (tokenizer=bytes)")
        else:
            tok_dir = source if tokenizer == "auto" else Path(tokenizer)
            if tokenizer == "auto" and not _has_tokenizer(tok_dir):
                raise TrainError(f"{source}: the model has no tokenizer of its own; pass a tokenizer directory, or "
                                 "--tokenizer bytes to map UTF-8 bytes onto its vocabulary")
            if not _has_tokenizer(tok_dir):
                raise TrainError(f"{tok_dir}: no tokenizer files in this directory")
            from loopify.fidelity import tokenizer_for

            self.hf_tok = tokenizer_for(tok_dir)
            self.tokenizer_desc = str(tok_dir)
            vocab = self._vocab(captured, cfg)
            if vocab is not None and len(self.hf_tok) > vocab:
                raise TrainError(f"{tok_dir}: tokenizer has {len(self.hf_tok)} ids, the model's vocabulary only {vocab}")
        self.image_proc = None
        self.image_note_done = False

    # -- tokenisers --------------------------------------------------------------------------

    @staticmethod
    def _vocab(captured, cfg) -> int | None:
        shapes = captured.info.get("output_shapes") or {}
        if "logits" in shapes:
            return int(shapes["logits"][-1])
        return _find(cfg, "vocab_size")

    def _byte_tokenizer(self, captured, cfg) -> ByteTokenizer:
        vocab = self._vocab(captured, cfg)
        if not vocab:
            raise TrainError(f"{captured.source}: cannot tell the vocabulary size for byte tokenisation")
        specials = _special_ids(cfg)
        if self.image_token_id is not None:
            specials.add(int(self.image_token_id))
        bos = _find(cfg, "bos_token_id")
        first = int(self.template["input_ids"][0, 0])
        bos = bos if bos is not None and bos == first else None
        pad = _find(cfg, "pad_token_id")
        pad = pad if pad is not None and 0 <= pad < vocab else 0
        specials |= {i for i in (bos, pad) if i is not None}
        return ByteTokenizer(vocab, specials, bos, pad)

    def _text_ids(self, text: str, n: int) -> tuple[list[int], int]:
        """Token ids of ``text``, truncated to ``n``, and the pad id."""
        if self.hf_tok is not None:
            enc = self.hf_tok(text, truncation=True, max_length=n)
            pad = self.hf_tok.pad_token_id if self.hf_tok.pad_token_id is not None else 0
            return list(enc["input_ids"])[:n], int(pad)
        return self.bytes_tok.ids(text)[:n], self.bytes_tok.pad

    # -- examples -------------------------------------------------------------------------------

    def encode(self, rec: Record) -> dict[str, torch.Tensor]:
        t = self.template
        if not self.vlm:
            if rec.image is not None:
                raise TrainError(f"{rec.image}: the model takes no images")
            if self.hf_tok is not None:  # as loopify.fidelity.batch_inputs does
                enc = self.hf_tok(rec.text, padding="max_length", truncation=True, max_length=self.seq, return_tensors="pt")
                return {k: enc[k].to(t[k].dtype) if k in enc else torch.zeros_like(t[k]) for k in t}
            ids, pad = self._text_ids(rec.text, self.seq)
            out = {k: v.clone() for k, v in t.items()}
            out["input_ids"] = _padded(ids, self.seq, pad, t["input_ids"].dtype)
            if "attention_mask" in t:
                out["attention_mask"] = _mask(len(ids), self.seq, t["attention_mask"].dtype)
            if "token_type_ids" in t:
                out["token_type_ids"] = torch.zeros_like(t["token_type_ids"])
            return out
        # vision-language: the text fills the positions that are not image tokens
        slots = (~self.image_slots).nonzero().flatten()
        ids, pad = self._text_ids(rec.text, len(slots))
        out = {k: v.clone() for k, v in t.items()}
        new_ids = t["input_ids"].clone()
        new_ids[0, slots] = pad
        new_ids[0, slots[:len(ids)]] = torch.tensor(ids, dtype=new_ids.dtype)
        out["input_ids"] = new_ids
        if "attention_mask" in t:
            m = torch.ones_like(t["attention_mask"])
            m[0, slots[len(ids):]] = 0
            out["attention_mask"] = m
        if rec.image is not None:
            out["pixel_values"] = self._pixels(rec.image, t["pixel_values"])
        return out

    def _pixels(self, path: Path, like: torch.Tensor) -> torch.Tensor:
        try:
            from PIL import Image
        except ImportError:
            raise TrainError(f"{path}: reading images needs Pillow (pip install pillow)") from None
        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"{path}: cannot read the image ({type(e).__name__})") from None
        h, w = like.shape[-2:]
        if self.image_proc is None and (self.source / "preprocessor_config.json").is_file():
            try:
                from transformers import AutoImageProcessor

                self.image_proc = AutoImageProcessor.from_pretrained(str(self.source), local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise TrainError(f"{self.source}: cannot load its image processor ({type(e).__name__})") from None
        if self.image_proc is not None:
            px = self.image_proc(images=img, return_tensors="pt")["pixel_values"]
            if px.numel() != like.numel():
                raise TrainError(f"{path}: the image processor makes pixel values of shape {tuple(px.shape)}, the "
                                 f"captured model takes {tuple(like.shape)}")
            return px.reshape(like.shape).to(like.dtype)
        if not self.image_note_done:
            self.notes.append(f"no image processor in {self.source}: images resized to {h}x{w} and scaled to [-1, 1]")
            self.image_note_done = True
        img = img.resize((int(w), int(h)), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(int(h), int(w), 3)
        x = x.permute(2, 0, 1).float() / 127.5 - 1
        ch = like.shape[-3]
        if ch != 3:
            x = x.mean(0, keepdim=True).expand(ch, -1, -1)
        return x.reshape(like.shape).to(like.dtype)


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in (
        "tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model"))


def _padded(ids: list[int], n: int, pad: int, dtype) -> torch.Tensor:
    x = torch.full((1, n), pad, dtype=dtype)
    if ids:
        x[0, :len(ids)] = torch.tensor(ids, dtype=dtype)
    return x


def _mask(n_valid: int, n: int, dtype) -> torch.Tensor:
    m = torch.zeros((1, n), dtype=dtype)
    m[0, :n_valid] = 1
    return m


def split_holdout(records: list, holdout: float) -> tuple[list, list]:
    """Every ``round(1/holdout)``-th record is held out (the first one included)."""
    if holdout <= 0:
        return list(records), []
    k = max(2, round(1 / holdout))
    return [r for i, r in enumerate(records) if i % k], [r for i, r in enumerate(records) if i % k == 0]


def data_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training examples in one epoch (a function of seed and epoch only)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def example_indices(pos: int, count: int, n: int, seed: int) -> list[int]:
    """The training examples at global data positions ``pos .. pos+count-1``."""
    out, cache = [], {}
    for p in range(pos, pos + count):
        e = p // n
        if e not in cache:
            cache[e] = data_order(n, seed, e)
        out.append(int(cache[e][p % n]))
    return out


# ----------------------------------------------------------------------------------------------
# Objective


class Objective:
    """Per-unit distillation losses and evaluation metrics for one output kind."""

    def __init__(self, kind: str):
        self.kind = kind  # kl | cosine | mse

    def units(self, teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "kl":
            return token_kl(teacher, student, mask)
        if mask is None:
            mask = torch.ones(teacher.shape[:-1], dtype=torch.long)
        return pooled_loss(teacher, student, mask, self.kind)

    @property
    def metric(self) -> str:
        return "kl" if self.kind == "kl" else "cosine"

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "kl"


def resolve_objective(objective: str, captured) -> Objective:
    names = captured.info.get("output_names") or []
    first = names[0] if names else None
    if objective != "auto":
        return Objective(objective)
    if first == "logits":
        return Objective("kl")
    if first in ("last_hidden_state", "hidden_states", "embeddings"):
        return Objective("cosine")
    raise TrainError(f"{captured.source}: cannot tell whether its first output ({first or 'unnamed'}) is logits or "
                     "hidden states; pass --objective kl, cosine or mse")


# ----------------------------------------------------------------------------------------------
# Parameter groups


def parameter_groups(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group: [(name, parameter)]}`` for base, lora and connector, in ``named_parameters`` order."""
    from loopify.recursion import recursions

    ids: dict[int, str] = {}
    for r in recursions(module).values():
        for p in r.blocks.parameters():
            ids[id(p)] = "base"
        for d in (r.lora_A, r.lora_B, r.depth_params):
            for p in d.parameters():
                ids[id(p)] = "lora"
        if r.connector is not None:
            for p in r.connector.parameters():
                ids[id(p)] = "connector"
    out: dict[str, list] = {g: [] for g in GROUPS}
    for name, p in module.named_parameters():
        g = ids.get(id(p))
        if g is not None:
            out[g].append((name, p))
    return out


# ----------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    started_here: bool = False

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.on:
            torch.distributed.barrier()

    def reduce(self, values: list[float], op="sum") -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
        return t.tolist()


def dist_setup() -> Dist:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    import torch.distributed as td

    started = False
    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend=backend)
        started = True
    return Dist(td.get_rank(), td.get_world_size(), started)


# ----------------------------------------------------------------------------------------------
# Interrupts


class _StopFlag:
    """SIGINT/SIGTERM set a flag (the step in progress finishes, then a checkpoint is written); a
    second SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.requested = False
        self.signal = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):  # pragma: no cover
                    pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> Path:
    """torch.save to a temporary file beside ``path``, then rename (atomic)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise TrainError(f"{path}: cannot read the checkpoint ({type(e).__name__}); it is truncated or not a loopify "
                         "training checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a loopify training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path}: checkpoint version {state.get('version')} is not supported")
    return state


def _check_resumable(config: TrainConfig, state: dict, converted_sha: str, data_sha: str, path: Path) -> None:
    if state["converted_sha256"] != converted_sha:
        raise TrainError(f"{path}: the checkpoint belongs to another converted model (sha256 differs from {config.converted})")
    if state["data_sha256"] != data_sha:
        raise TrainError(f"{path}: the training data changed since the checkpoint (sha256 of {config.data} differs)")
    old, new = state["config"], config.to_dict()
    for k in sorted(new):
        if k in RESUME_MAY_CHANGE or k in ("converted", "data"):
            continue
        if old.get(k) != new[k]:
            raise TrainError(f"{path}: --resume with {k}={new[k]!r}, the checkpoint was made with {k}={old.get(k)!r}; "
                             f"only {', '.join(RESUME_MAY_CHANGE[:4])} ... may change")
    if state.get("world", 1) != _world_now():
        raise TrainError(f"{path}: the checkpoint was made with {state.get('world', 1)} processes, this run has "
                         f"{_world_now()}: the data order would change")


def _world_now() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(student: nn.Module, examples: list[dict], targets: list[torch.Tensor], objective: Objective,
             depths: list[int]) -> dict:
    """Per depth: mean loss, and mean cosine (encoders) or mean KL and top-1 agreement (logits)."""
    out: dict[str, Any] = {"examples": len(examples), "depths": {}}
    try:
        for k in depths:
            set_depth(student, k)
            losses, metric, agree, n_tok = [], [], 0.0, 0
            for ex, tgt in zip(examples, targets):
                o = _first(student(**ex))
                mask = ex.get("attention_mask")
                u = objective.units(tgt, o, mask)
                losses.append(u)
                if objective.kind == "kl":
                    sel = mask.to(torch.bool) if mask is not None else torch.ones(o.shape[:-1], dtype=torch.bool)
                    agree += float((tgt.argmax(-1)[sel] == o.argmax(-1)[sel]).float().sum())
                    n_tok += int(sel.sum())
                else:
                    metric.append(1 - pooled_loss(tgt, o, mask, "cosine"))
            allu = torch.cat([l.reshape(-1) for l in losses]) if losses else torch.zeros(0)
            row = {"loss": float(allu.mean()) if allu.numel() else float("nan")}
            if objective.kind == "kl":
                row["kl"] = row["loss"] if objective.kind == "kl" else None
                row["top1"] = agree / max(n_tok, 1)
            else:
                cos = torch.cat(metric)
                row["cosine"] = float(cos.mean())
                row["cosine_min"] = float(cos.min())
            out["depths"][str(k)] = row
    finally:
        set_depth(student, None)
    vals = [out["depths"][str(k)][objective.metric] for k in depths]
    if objective.higher_is_better:
        out["monotonic"] = all(b >= a for a, b in zip(vals, vals[1:]))
    else:
        out["monotonic"] = all(b <= a for a, b in zip(vals, vals[1:]))
    return out


# ----------------------------------------------------------------------------------------------
# Progress


class ConsoleProgress:
    """A tqdm progress bar with the loss per depth; evaluations and checkpoints as lines."""

    def __init__(self, file=None, disable: bool | None = None):
        import sys

        self.file = file or sys.stderr
        self.disable = (not self.file.isatty()) if disable is None else disable
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["event"]
        if kind == "start":
            self.bar = tqdm(total=event["steps"], initial=event["step"], desc="train", unit="step",
                            file=self.file, disable=self.disable, dynamic_ncols=True)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            post = {f"d{i + 1}": f"{v:.4f}" for i, v in enumerate(event["depths"])}
            post["loss"] = f"{event['loss']:.4f}"
            self.bar.set_postfix(post, refresh=False)
        elif kind == "eval":
            row = "  ".join(f"depth {k}: " + ", ".join(f"{m} {v:.4f}" for m, v in r.items() if m != "loss")
                            for k, r in event["eval"]["depths"].items())
            self._write(f"eval at step {event['step']}: {row}")
        elif kind == "checkpoint":
            self._write(f"checkpoint at step {event['step']}: {event['path']}")
        elif kind == "done" and self.bar is not None:
            self.bar.close()

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        if self.bar is not None and not self.disable:
            tqdm.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)


# ----------------------------------------------------------------------------------------------
# Train


def _lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup)
    t = min(1.0, (step - config.warmup) / span)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _load_teacher(config: TrainConfig, source_captured, manifest: dict):
    from loopify import capture

    if config.teacher is None or Path(config.teacher).resolve() == Path(manifest["source"]["path"]).resolve():
        return source_captured
    teacher = capture.load(config.teacher)
    a = {k: tuple(v.shape) for k, v in teacher.kwargs.items()}
    b = {k: tuple(v.shape) for k, v in source_captured.kwargs.items()}
    if a != b or len(teacher.args) != len(source_captured.args):
        raise TrainError(f"{config.teacher}: the teacher takes other inputs than the converted model "
                         f"({a} vs {b}); give the model it was converted from")
    return teacher


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Distil the original model into the converted one at every recursion depth; write the output.

    Raises:
        TrainError: bad data, checkpoint or options.
        TrainInterrupted: after SIGINT/SIGTERM/KeyboardInterrupt, once the checkpoint is written.
    """
    from loopify import convert as conv

    t_start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = dist_setup()
    try:
        return _train(config, progress if dist.main else None, dist, conv, t_start)
    finally:
        if dist.started_here:
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, progress, dist: Dist, conv, t_start: float) -> TrainResult:
    ckpt_path = config.checkpoint_path
    if not config.resume and ckpt_path.exists():
        raise TrainError(f"{ckpt_path}: a checkpoint of an unfinished run is there; pass --resume to continue it, "
                         "or delete it to start over")
    converted = Path(config.converted)
    if not converted.is_file():
        raise TrainError(f"{converted}: converted model not found")
    converted_sha = file_sha256(converted)
    if not Path(config.data).is_file():
        raise TrainError(f"{config.data}: data file not found")
    data_sha = file_sha256(config.data)
    state = None
    if config.resume:  # refuse a bad checkpoint before the (slow) model loading
        state = load_checkpoint(ckpt_path)
        _check_resumable(config, state, converted_sha, data_sha, ckpt_path)
        if int(state["step"]) > config.steps:
            raise TrainError(f"{ckpt_path}: the checkpoint is at step {state['step']}, past --steps {config.steps}")
    student, source_cap, manifest = conv.load_converted(converted)
    teacher_cap = _load_teacher(config, source_cap, manifest)
    teacher = teacher_cap.module()
    objective = resolve_objective(config.objective, source_cap)
    source = Path(manifest["source"]["path"])

    # data
    records = read_records(config.data)
    if config.eval_data:
        train_recs, eval_recs = records, read_records(config.eval_data)
    else:
        train_recs, eval_recs = split_holdout(records, config.holdout)
    if not train_recs:
        raise TrainError(f"{config.data}: no training examples left after holding out {config.holdout:.0%}")
    if config.eval_size:
        eval_recs = eval_recs[:config.eval_size]
    encoder = Encoder(source_cap, source, config.tokenizer)
    train_ex = [encoder.encode(r) for r in train_recs]
    eval_ex = [encoder.encode(r) for r in eval_recs]

    # parameters
    groups = parameter_groups(student)
    for p in student.parameters():
        p.requires_grad_(False)
    trainable: list[tuple[str, nn.Parameter]] = []
    for g in config.train:
        trainable += groups[g]
    if not trainable:
        have = [g for g in GROUPS if groups[g]]
        raise TrainError(f"{converted}: nothing to train in {','.join(config.train)}: the converted model has parameters "
                         f"only in {', '.join(have) or 'no group'} (LoRA needs --rank > 0 at conversion, connectors --connector)")
    for _, p in trainable:
        p.requires_grad_(True)
    names = [n for n, _ in trainable]
    opt = torch.optim.AdamW([p for _, p in trainable], lr=config.lr, weight_decay=config.weight_decay)

    N = max_depth(student)
    depths = list(range(1, N + 1))
    run_depths = depths if config.loss == "mrl" else [N]

    # teacher targets for evaluation (the teacher does not change)
    with torch.no_grad():
        eval_tgt = [_first(teacher(**ex)) for ex in eval_ex] if dist.main else []

    step, pos, history, evals, seconds_before, resumed_from = 0, 0, [], [], 0.0, None
    torch.manual_seed(config.seed)
    if state is not None:
        if sorted(state["params"]) != sorted(names):
            raise TrainError(f"{ckpt_path}: the checkpoint holds other trainable parameters than this run")
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, pos = int(state["step"]), int(state["pos"])
        history, evals = list(state["history"]), list(state["evals"])
        seconds_before = float(state["seconds"])
        resumed_from = step

    runner = DepthRunner(student)
    model: nn.Module = runner
    if dist.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(runner, find_unused_parameters=True, broadcast_buffers=False)

    def emit(event):
        if progress is not None:
            progress(event)

    def do_eval(at):
        if not dist.main or not eval_ex:
            return None
        ev = evaluate(student, eval_ex, eval_tgt, objective, depths)
        ev["step"] = at
        evals.append(ev)
        emit({"event": "eval", "step": at, "eval": ev})
        return ev

    def checkpoint(at):
        if dist.main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.to_dict(),
                "converted_sha256": converted_sha, "data_sha256": data_sha, "world": dist.world,
                "step": at, "pos": pos, "params": {n: p.detach().clone() for n, p in trainable},
                "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "history": history, "evals": evals,
                "seconds": seconds_before + (time.perf_counter() - t_loop)})
            emit({"event": "checkpoint", "step": at, "path": str(ckpt_path)})
        dist.barrier()

    if step == 0 and not any(e.get("step") == 0 for e in evals):
        do_eval(0)
    dist.barrier()
    emit({"event": "start", "step": step, "steps": config.steps, "depths": depths,
          "trainable": sum(p.numel() for _, p in trainable)})

    t_loop = time.perf_counter()
    interrupted, stopped, updating = None, "steps", False
    per = config.batch * dist.world
    with _StopFlag() as flag:
        try:
            while step < config.steps:
                stop = [1.0 if flag.requested else 0.0,
                        1.0 if config.max_seconds and time.perf_counter() - t_loop >= config.max_seconds else 0.0]
                stop = dist.reduce(stop, "max")
                if stop[0]:
                    interrupted = flag.signal or "signal"
                    break
                if stop[1]:
                    stopped = "time limit"
                    break
                idx = example_indices(pos + dist.rank * config.batch, config.batch, len(train_ex), config.seed)
                lr = _lr_at(config, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                sums = [0.0] * (len(run_depths) + 1)
                worse = [0.0] * len(run_depths)
                for j, i in enumerate(idx):
                    ex = train_ex[i]
                    sync = contextlib.nullcontext() if (not dist.on or j == len(idx) - 1) else model.no_sync()
                    with sync:
                        with torch.no_grad():
                            tgt = _first(teacher(**ex))
                        outs = model(ex, run_depths)
                        mask = ex.get("attention_mask")
                        units = [objective.units(tgt, o, mask) for o in outs]
                        if config.loss == "mrl":
                            loss, info = mrl_loss(units, config.beta)
                            for d, w in enumerate(info["worse"]):
                                worse[d] += w
                        else:
                            loss, info = last_loss(units)
                        (loss / len(idx)).backward()
                    sums[0] += float(loss.detach())
                    for d, v in enumerate(info["depths"]):
                        sums[d + 1] += v
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
                updating = True
                opt.step()
                step += 1
                pos += per
                updating = False
                tot = dist.reduce(sums + worse)
                n_ex = per
                rec = {"step": step, "lr": lr, "loss": tot[0] / n_ex,
                       "depths": {str(k): v / n_ex for k, v in zip(run_depths, tot[1:len(run_depths) + 1])}}
                if config.loss == "mrl":
                    rec["worse"] = {str(k): v / n_ex for k, v in zip(run_depths, tot[len(run_depths) + 1:])}
                if step % config.log_every == 0 or step == config.steps:
                    history.append(rec)
                emit({"event": "step", "step": step, "steps": config.steps, "loss": rec["loss"],
                      "depths": list(rec["depths"].values()), "lr": lr})
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    do_eval(step)
                    dist.barrier()
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    checkpoint(step)
        except KeyboardInterrupt:
            if updating:  # the weights are half updated: keep the last checkpoint as it is
                raise TrainInterrupted(f"interrupted during the update of step {step + 1}; the last checkpoint "
                                       f"({ckpt_path}) is kept; continue with --resume") from None
            interrupted = "KeyboardInterrupt"
    if interrupted:
        checkpoint(step)
        emit({"event": "done", "step": step})
        raise TrainInterrupted(f"interrupted ({interrupted}) after step {step} of {config.steps}; checkpoint written to "
                               f"{ckpt_path}; continue with --resume")
    train_seconds = seconds_before + (time.perf_counter() - t_loop)
    last = evals[-1] if evals and evals[-1]["step"] == step else do_eval(step)
    emit({"event": "done", "step": step})

    # output
    set_depth(student, None)
    with torch.no_grad():
        verify = conv.verify(source_cap.run(), student(*source_cap.args, **source_cap.kwargs),
                             source_cap.info.get("output_names"))
    verify.update({"lossless_plan": False, "ok": True, "trained": True})
    before = next((e for e in evals if e["step"] == 0), None)
    report = {
        "version": 1, "config": config.to_dict(), "converted": str(converted.resolve()),
        "converted_sha256": converted_sha, "teacher": str(Path(teacher_cap.source).resolve()),
        "objective": objective.kind, "loss": config.loss, "beta": config.beta if config.loss == "mrl" else None,
        "depths": depths, "steps": step, "stopped": stopped, "resumed_from": resumed_from,
        "examples_seen": pos, "world_size": dist.world, "seconds": train_seconds,
        "trainable": {g: sum(p.numel() for _, p in groups[g]) if g in config.train else 0 for g in GROUPS},
        "data": {"path": str(Path(config.data).resolve()), "sha256": data_sha, "train_examples": len(train_ex),
                 "eval_examples": len(eval_ex), "eval_data": config.eval_data, "tokenizer": encoder.tokenizer_desc,
                 "seq_len": encoder.seq, "images": sum(r.image is not None for r in train_recs),
                 "notes": encoder.notes},
        "before": before, "after": last, "evals": evals, "history": history,
        "verify_before": manifest.get("verify"),
    }
    out_path = manifest_path = None
    if dist.main:
        new_manifest = copy.deepcopy(manifest)
        for k in ("files", "versions"):
            new_manifest.pop(k, None)
        new_manifest["verify"] = verify
        new_manifest["train"] = report
        result = conv.ConvertResult(student, new_manifest)
        out_path, manifest_path = conv.save(result, source_cap, config.out)
        if ckpt_path.exists():
            ckpt_path.unlink()
    dist.barrier()
    return TrainResult(out_path, manifest_path, report, student)


def format_report(report: dict) -> str:
    """Fidelity per depth before and after training, for the terminal."""
    lines = [f"trained {report['steps']} steps ({report['stopped']}) in {report['seconds']:.0f} s, loss {report['loss']}"
             + (f" (beta {report['beta']})" if report.get("beta") else "") + f", objective {report['objective']}"]
    before, after = report.get("before"), report.get("after")
    if after:
        metric = "cosine" if report["objective"] != "kl" else "kl"
        head = f"{'depth':<6} {metric + ' before':>14} {metric + ' after':>14}"
        lines.append(head)
        for k, row in after["depths"].items():
            b = before["depths"][k][metric] if before else float("nan")
            lines.append(f"{k:<6} {b:>14.4f} {row[metric]:>14.4f}")
        lines.append(f"monotonic over depth after training: {'yes' if after['monotonic'] else 'NO'}")
    else:
        lines.append("no held-out data: no evaluation")
    return "\n".join(lines)
