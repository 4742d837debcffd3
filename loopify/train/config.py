"""The training config: what to train, on what, and how; validates itself."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loopify.config import fields_from_dict
from loopify.errors import LoopifyError

TRAIN_CONFIG_VERSION = 1
CHECKPOINT_FORMAT = "loopify-train-checkpoint"
CHECKPOINT_VERSION = 1
GROUPS = ("base", "lora", "connector", "router", "spiral")
LOSSES = ("mrl", "last")
OBJECTIVES = ("auto", "kl", "cosine", "mse", "token-cosine", "ce")
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
        batch: examples per step per process.
        batched: run a step's examples as one padded batch, trimmed to its longest text, where the
            model allows it (a Hugging Face source in module form, text only, no routers or
            multi-resolution loops); else one example at a time (gradient accumulation).
        seq_len: tokens per text example (0: the captured length); a longer one needs a batched run.
        loss: ``mrl`` (every depth, worse-than-previous units weighted by beta) or ``last``.
        beta: the MRL weight of a unit whose loss rose from the previous depth (>= 1).
        train: parameter groups to train: base, lora, connector, router, spiral (the gates of
            multi-resolution loops).
        lr_scale: ``{group: factor}``: a group's learning rate is ``factor * lr`` (e.g. the
            zero-initialised gates of multi-resolution loops, ``spiral``, which move by about
            ``lr`` per step at most); the others ``lr``.
        objective: ``auto`` (KL for logits, cosine for hidden states), ``kl``, ``cosine``, ``mse``, or
            ``ce`` (next-token cross-entropy on the data: no teacher needed).
        schedule: ``cosine`` (to 10% of lr at the last step, or at ``max_seconds`` where that comes
            first) or ``constant``, after ``warmup`` steps.
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
        router: ``none``, ``expert`` or ``token``: add a Mixture-of-Recursions router to every loop
            before training (a model converted with ``--router`` keeps its own, of the same kind).
        capacity: expert router: fraction of the tokens kept per step (empty: (N-r)/N).
        router_aux: weight of the router's auxiliary loss (expert: BCE against the top-k
            decision; token: balancing).
        router_z: weight of the router z-loss.
        capacity_warmup: expert router: steps over which the top-k capacity falls linearly from
            1 (every token takes every step) to ``capacity`` (0: the capacity from the start).
        balance: token router: ``loss`` (the balancing loss, weight ``router_aux``) or ``bias``
            (MoR's loss-free balancing: a per-depth bias on the choice logits, moved by
            ``bias_rate`` per step towards equal loads; no auxiliary loss).
        bias_rate: update of the loss-free bias per step.
        shared_prefix: run the largest depth once and replay its loops' states for the smaller
            depths (:class:`loopify.train.student.DepthRunner`): same losses and gradients, fewer
            block calls; off: every depth runs in full.
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
    batched: bool = True
    seq_len: int = 0
    loss: Literal["mrl", "last"] = "mrl"
    beta: float = 2.0
    train: tuple[str, ...] = GROUPS
    lr_scale: tuple[tuple[str, float], ...] = ()
    objective: Literal["auto", "kl", "cosine", "mse", "token-cosine", "ce"] = "auto"
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
    router: Literal["none", "expert", "token"] = "none"
    capacity: tuple[float, ...] = ()
    router_aux: float = 0.1
    router_z: float = 1e-3
    capacity_warmup: int = 0
    balance: Literal["loss", "bias"] = "loss"
    bias_rate: float = 1e-3
    shared_prefix: bool = True

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
        scale = dict(self.lr_scale)
        for g, f in scale.items():
            if g not in GROUPS:
                raise TrainError(f"lr_scale names {g!r}: groups are {', '.join(GROUPS)}")
            if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0):
                raise TrainError(f"lr_scale of {g} must be a positive number, not {f!r}")
        object.__setattr__(self, "lr_scale", tuple(sorted((g, float(f)) for g, f in scale.items())))
        if len(set(self.train)) != len(self.train):
            raise TrainError(f"train names a group twice: {','.join(self.train)}")
        _choice("loss", self.loss, LOSSES)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("schedule", self.schedule, SCHEDULES)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("batch", self.batch, 1)
        for name in ("warmup", "checkpoint_every", "eval_every", "eval_size", "seed", "threads", "seq_len"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("log_every", self.log_every, 1)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"lr must be a positive number, not {self.lr!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 1):
            raise TrainError(f"beta must be a number >= 1 (the weight of a depth that got worse), not {self.beta!r}")
        if not (0 <= self.holdout < 1):
            raise TrainError(f"holdout must be in [0, 1), not {self.holdout!r}")
        _choice("router", self.router, ("none", "expert", "token"))
        object.__setattr__(self, "capacity", tuple(float(c) for c in self.capacity))
        if self.capacity and self.router != "expert":
            raise TrainError("capacity applies to --router expert")
        _int_at_least("capacity_warmup", self.capacity_warmup, 0)
        if self.capacity_warmup and self.router != "expert":
            raise TrainError("capacity_warmup applies to --router expert")
        _choice("balance", self.balance, ("loss", "bias"))
        if self.balance != "loss" and self.router != "token":
            raise TrainError("balance applies to --router token")
        for name in ("weight_decay", "grad_clip", "max_seconds", "router_aux", "router_z", "bias_rate"):
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
        d["capacity"] = list(self.capacity)
        d["lr_scale"] = dict(self.lr_scale)
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


