"""The training loop: set-up, steps, checkpoints, and the trained model's output (see the package
docstring for what it does)."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loopify.io import sha256_file
from loopify.train.checkpoint import StopFlag, check_resumable, load_checkpoint, save_checkpoint
from loopify.train.config import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, GROUPS, TrainConfig, TrainError, TrainInterrupted
from loopify.train.data import Encoder, example_indices, read_records, split_holdout, stack_examples
from loopify.train.distributed import Dist, dist_setup
from loopify.train.evaluate import evaluate
from loopify.train.losses import Objective, last_loss, mrl_loss, resolve_objective
from loopify.train.student import DepthRunner, _first, max_depth, parameter_groups, set_depth


@dataclass
class TrainResult:
    out: Path | None          # None on ranks other than 0
    manifest_path: Path | None
    report: dict
    module: nn.Module


def _lr_at(config: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) after ``seconds`` of training: the
    cosine decays over the steps, or over ``max_seconds`` where that runs out first (a time-limited
    run with many steps still ends at 10% of the peak)."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup)
    t = min(1.0, (step - config.warmup) / span)
    if config.max_seconds:
        t = max(t, min(1.0, seconds / config.max_seconds))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _load_teacher(config: TrainConfig, inputs, manifest: dict, objective: Objective):
    """The teacher: ``teacher``, else the recorded source while it is still there unchanged;
    None for the teacher-free ``ce`` objective. Its inputs must be the student's."""
    from loopify import capture
    from loopify.io import sha256_path

    src = manifest["source"]
    path = Path(config.teacher) if config.teacher else Path(src["path"])
    if config.teacher is None:
        if not objective.needs_teacher:
            return None
        if not path.exists():
            raise TrainError(f"{config.converted}: its original model {path} is gone; give --teacher PATH (a copy of "
                             "the original) or --objective ce to train on the data's next tokens without a teacher")
        if sha256_path(path) != src.get("sha256"):
            raise TrainError(f"{config.converted}: its original model {path} changed since conversion; give "
                             "--teacher PATH")
    # the text length the source was captured at: "text_len" (without image tokens) where recorded, else
    # "seq_len" (a tokenizer sentence records only that; without it a --seq-len conversion got a teacher of
    # the default length and was refused)
    length = src.get("text_len", src.get("seq_len"))
    opts = {"seq_len": length, "batch": src.get("batch")} if src.get("format") in ("hf-dir", "gguf") else {}
    try:
        teacher = capture.load(path, allow_export_mismatch=True, **opts)
    except capture.loader.CaptureError as e:  # a teacher of another format takes no length options
        if not opts:
            raise
        raise TrainError(f"{path}: cannot load the teacher ({e})") from None
    a = {k: tuple(v.shape) for k, v in teacher.kwargs.items()}
    b = {k: tuple(v.shape) for k, v in inputs.kwargs.items()}
    if a != b or len(teacher.args) != len(inputs.args):
        raise TrainError(f"{path}: the teacher takes other inputs than the converted model "
                         f"({a} vs {b}); give the model it was converted from")
    return teacher


@dataclass
class Run:
    """Everything one training run holds."""

    config: TrainConfig
    dist: Dist
    progress: Callable | None
    student: nn.Module
    inputs: object                 # example inputs of the converted model (a Captured)
    manifest: dict
    teacher: object                # a Captured, or None (teacher-free objective)
    objective: Objective
    encoder: Encoder
    train_ex: list
    eval_ex: list
    trainable: list
    groups: dict
    opt: torch.optim.Optimizer
    depths: list[int]
    run_depths: list[int]
    ckpt_path: Path
    converted_sha: str
    data_sha: str
    step: int = 0
    pos: int = 0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    seconds_before: float = 0.0
    resumed_from: int | None = None
    eval_tgt: list = field(default_factory=list)
    model: nn.Module | None = None
    t_loop: float = 0.0
    batched: bool = False          # a step's examples run as one batch (see TrainConfig.batched)
    tcache: dict | None = None     # the teacher cache (see _teacher_cache)

    def emit(self, event: dict) -> None:
        if self.progress is not None:
            self.progress(event)

    def target(self, ex: dict) -> torch.Tensor:
        """What the student's output at every depth is compared with for one example."""
        if self.teacher is None:
            return ex["input_ids"]
        with torch.no_grad():
            return _first(self._teacher_module(**ex))

    @property
    def _teacher_module(self):
        if not hasattr(self, "_tm"):  # a batched run's inputs have other shapes than the program's: the eager model
            self._tm = self.teacher.eager if self.batched else self.teacher.module()
        return self._tm

    def do_eval(self, at: int):
        if not self.dist.main or not self.eval_ex:
            return None
        ev = evaluate(self.student, self.eval_ex, self.eval_tgt, self.objective, self.depths)
        ev["step"] = at
        self.evals.append(ev)
        self.emit({"event": "eval", "step": at, "eval": ev})
        return ev

    def checkpoint(self, at: int) -> None:
        if self.dist.main:
            save_checkpoint(self.ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config.to_dict(),
                "converted_sha256": self.converted_sha, "data_sha256": self.data_sha, "world": self.dist.world,
                "step": at, "pos": self.pos, "params": {n: p.detach().clone() for n, p in self.trainable},
                "optimizer": self.opt.state_dict(), "rng": torch.get_rng_state(), "router_bias": _router_buffers(self),
                "history": self.history, "evals": self.evals,
                "seconds": self.seconds_before + (time.perf_counter() - self.t_loop)})
            self.emit({"event": "checkpoint", "step": at, "path": str(self.ckpt_path)})
        self.dist.barrier()


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the converted model at every recursion depth; write the output.

    Raises:
        TrainError: bad data, checkpoint or options.
        TrainInterrupted: after SIGINT/SIGTERM/KeyboardInterrupt, once the checkpoint is written.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = dist_setup()
    try:
        run = _setup(config, progress if dist.main else None, dist)
        _begin(run)
        interrupted, stopped = _steps(run)
        if interrupted:
            run.checkpoint(run.step)
            run.emit({"event": "done", "step": run.step})
            raise TrainInterrupted(f"interrupted ({interrupted}) after step {run.step} of {config.steps}; checkpoint "
                                   f"written to {run.ckpt_path}; continue with --resume")
        return _finish(run, stopped)
    finally:
        if dist.started_here:
            torch.distributed.destroy_process_group()


def _preflight(config: TrainConfig):
    """Refuse what can be refused before the (slow) model loading."""
    ckpt_path = config.checkpoint_path
    if not config.resume and ckpt_path.exists():
        raise TrainError(f"{ckpt_path}: a checkpoint of an unfinished run is there; pass --resume to continue it, "
                         "or delete it to start over")
    converted = Path(config.converted)
    if not converted.is_file():
        raise TrainError(f"{converted}: converted model not found")
    if not Path(config.data).is_file():
        raise TrainError(f"{config.data}: data file not found")
    from loopify.converted import Bundle, check_bundle_output
    from loopify.io import check_output

    check_bundle_output(Bundle.of(config.out))  # before the training, not after it
    check_output(ckpt_path, what="checkpoint")
    converted_sha, data_sha = sha256_file(converted), sha256_file(config.data)
    state = None
    if config.resume:
        state = load_checkpoint(ckpt_path)
        check_resumable(config, state, converted_sha, data_sha, ckpt_path)
        if int(state["step"]) > config.steps:
            raise TrainError(f"{ckpt_path}: the checkpoint is at step {state['step']}, past --steps {config.steps}")
    return ckpt_path, converted_sha, data_sha, state


def _examples(config: TrainConfig, encoder: Encoder) -> tuple[list, list, list]:
    records = read_records(config.data)
    if config.eval_data:
        train_recs, eval_recs = records, read_records(config.eval_data)
    else:
        train_recs, eval_recs = split_holdout(records, config.holdout)
    if not train_recs:
        raise TrainError(f"{config.data}: no training examples left after holding out {config.holdout:.0%}")
    if config.eval_size:
        eval_recs = eval_recs[:config.eval_size]
    return [encoder.encode(r) for r in train_recs], [encoder.encode(r) for r in eval_recs], train_recs


def _trainable(config: TrainConfig, student: nn.Module) -> tuple[dict, list]:
    groups = parameter_groups(student)
    for p in student.parameters():
        p.requires_grad_(False)
    trainable = [item for g in config.train for item in groups[g]]
    if not trainable:
        have = [g for g in GROUPS if groups[g]]
        raise TrainError(f"{config.converted}: nothing to train in {','.join(config.train)}: the converted model has "
                         f"parameters only in {', '.join(have) or 'no group'} (LoRA needs --rank > 0 at conversion, "
                         "connectors --connector)")
    for _, p in trainable:
        p.requires_grad_(True)
    return groups, trainable


def _param_groups(config: TrainConfig, groups: dict, trainable: list) -> list[dict]:
    """The optimizer's parameter groups: one per learning-rate factor (``config.lr_scale``), in
    the trainable parameters' order; each carries its ``scale`` (see :func:`_one_step`)."""
    scale = dict(config.lr_scale)
    of = {id(p): scale.get(g, 1.0) for g in config.train for _, p in groups[g]}
    by: dict[float, list] = {}
    for _, p in trainable:
        by.setdefault(of.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "scale": s} for s, ps in by.items()]


def _setup(config: TrainConfig, progress, dist: Dist) -> Run:
    from loopify.convert import load_converted

    ckpt_path, converted_sha, data_sha, state = _preflight(config)
    student, inputs, manifest = load_converted(config.converted)
    student = _add_routers(config, student, inputs)
    objective = resolve_objective(config.objective, inputs)
    teacher = _load_teacher(config, inputs, manifest, objective)
    tok_dir = Path(inputs.info.get("assets_dir") or config.converted)
    encoder = Encoder(inputs, tok_dir, config.tokenizer, seq_len=config.seq_len)
    why_not = _not_batchable(student, manifest, teacher, encoder)
    captured_len = int(inputs.kwargs["input_ids"].shape[-1])
    if why_not and config.seq_len and config.seq_len != captured_len:
        raise TrainError(f"{config.converted}: --seq-len {config.seq_len}: the model runs only at its captured "
                         f"length {captured_len} ({why_not})")
    train_ex, eval_ex, train_recs = _examples(config, encoder)
    groups, trainable = _trainable(config, student)
    opt = torch.optim.AdamW(_param_groups(config, groups, trainable), lr=config.lr, weight_decay=config.weight_decay)
    n = max_depth(student)
    depths = list(range(1, n + 1))
    run = Run(config, dist, progress, student, inputs, manifest, teacher, objective, encoder, train_ex, eval_ex,
              trainable, groups, opt, depths, depths if config.loss == "mrl" else [n], ckpt_path, converted_sha,
              data_sha)
    run.train_recs = train_recs  # type: ignore[attr-defined]
    run.batched = config.batched and why_not is None
    run.eval_tgt = [run.target(ex) for ex in eval_ex] if dist.main else []  # the teacher does not change
    torch.manual_seed(config.seed)
    if state is not None:
        _restore(run, state)
    run.tcache = _teacher_cache(run)
    runner = DepthRunner(student, shared_prefix=config.shared_prefix)
    run.model = runner
    if dist.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.model = DDP(runner, find_unused_parameters=True, broadcast_buffers=False)
    return run


def _not_batchable(student: nn.Module, manifest: dict, teacher, encoder: Encoder) -> str | None:
    """Why the student cannot run a step's examples as one batch of any length (None: it can)."""
    from loopify.capture.captured import MODULE_FORM_FORMATS
    from loopify.nn import recursions

    if manifest.get("source", {}).get("format") not in MODULE_FORM_FORMATS:
        return "a graph-form model has the captured program's static shapes"
    if encoder.vlm:
        return "image tokens sit at fixed positions"
    if any(r.router is not None or r.spiral is not None for r in recursions(student).values()):
        return "routers and multi-resolution loops train one example at a time"
    if teacher is not None and teacher.eager is None:
        return "the teacher has no eager model"
    return None


def _add_routers(config: TrainConfig, student: nn.Module, inputs) -> nn.Module:
    """``--router``: routers on every loop (the route pass on the loaded model); expert routers
    train with MoR's top-k selection (and are calibrated to a per-token threshold at the end)."""
    from loopify.nn.routing import routers

    have = {r.kind for r in routers(student).values()}
    if config.router != "none" and not have:
        from loopify.passes.route import Route
        from loopify.pipeline import State

        try:
            student = Route(kind=config.router, capacity=config.capacity).run(
                State(inputs, student, history=("fold-loops",))).state.module
        except ValueError as e:
            raise TrainError(f"{config.converted}: --router: {e}") from None
    elif config.router != "none" and have != {config.router}:
        raise TrainError(f"{config.converted}: the model already has {'/'.join(sorted(have))} routers, "
                         f"not {config.router}")
    for r in routers(student).values():
        if r.kind == "expert":
            r.select = "topk"
        elif config.balance == "bias":
            r.balance, r.load = "bias", torch.zeros(r.spec.steps, dtype=torch.long)
    return student


def _router_warmup(run: Run) -> None:
    """Expert routers: the capacity warm-up at this step (1 - step / capacity_warmup of the way
    from keeping every token to the capacity)."""
    from loopify.nn.routing import routers

    w = run.config.capacity_warmup
    for r in routers(run.student).values():
        if r.kind == "expert":
            r.warm = min(1.0, run.step / w) if w else 1.0


def _router_bias_step(run: Run) -> None:
    """Token routers with loss-free balancing: one bias update from this step's loads (summed over
    the processes, so every process keeps the same bias)."""
    from loopify.nn.routing import routers

    for r in routers(run.student).values():
        if r.load is not None:
            load = torch.tensor(run.dist.reduce([float(v) for v in r.load]))
            r.update_bias(load, run.config.bias_rate)
            r.load.zero_()


def _router_buffers(run: Run) -> dict[str, torch.Tensor]:
    from loopify.nn.routing import routers

    return {p: r.balance_bias.detach().clone() for p, r in routers(run.student).items() if r.load is not None}


def _restore(run: Run, state: dict) -> None:
    names = [n for n, _ in run.trainable]
    if sorted(state["params"]) != sorted(names):
        raise TrainError(f"{run.ckpt_path}: the checkpoint holds other trainable parameters than this run")
    with torch.no_grad():
        for n, p in run.trainable:
            p.copy_(state["params"][n])
    run.opt.load_state_dict(state["optimizer"])
    from loopify.nn.routing import routers

    for p, b in state.get("router_bias", {}).items():
        routers(run.student)[p].balance_bias.copy_(b)
    torch.set_rng_state(state["rng"])
    run.step, run.pos = int(state["step"]), int(state["pos"])
    run.history, run.evals = list(state["history"]), list(state["evals"])
    run.seconds_before = float(state["seconds"])
    run.resumed_from = run.step


def _begin(run: Run) -> None:
    if run.step == 0 and not any(e.get("step") == 0 for e in run.evals):
        run.do_eval(0)
    run.dist.barrier()
    run.emit({"event": "start", "step": run.step, "steps": run.config.steps, "depths": run.depths,
              "trainable": sum(p.numel() for _, p in run.trainable)})


def _one_step(run: Run, lr: float) -> tuple[list[float], list[float]]:
    """Forward and backward over one step's examples (gradients accumulate); returns the summed
    loss and per-depth losses, and the MRL's per-depth fraction of worse units."""
    config, dist = run.config, run.dist
    idx = example_indices(run.pos + dist.rank * config.batch, config.batch, len(run.train_ex), config.seed)
    for g in run.opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)
    run.opt.zero_grad(set_to_none=True)
    sums = [0.0] * (len(run.run_depths) + 1)
    worse = [0.0] * len(run.run_depths)
    if run.batched:
        return _batched_step(run, idx, sums, worse)
    for j, i in enumerate(idx):
        ex = run.train_ex[i]
        sync = contextlib.nullcontext() if (not dist.on or j == len(idx) - 1) else run.model.no_sync()
        with sync:
            tgt = run.target(ex)
            outs = run.model(ex, run.run_depths)
            loss, info = _losses(run, tgt, outs, ex.get("attention_mask"))
            for d, w in enumerate(info.get("worse", [])):
                worse[d] += w
            (loss / len(idx)).backward()
        sums[0] += float(loss.detach())
        for d, v in enumerate(info["depths"]):
            sums[d + 1] += v
    return sums, worse


def _losses(run: Run, tgt, outs, mask) -> tuple[torch.Tensor, dict]:
    """The step's loss on one forward (the objective's units at every depth, MRL or last, and the
    routers' losses) and its per-depth information."""
    config = run.config
    units = [run.objective.units(tgt, o, mask) for o in outs]
    loss, info = mrl_loss(units, config.beta) if config.loss == "mrl" else last_loss(units)
    for rl in _runner(run).router_losses:  # Mixture-of-Recursions router losses, every depth
        loss = loss + config.router_aux * rl.get("aux", 0.0) + config.router_z * rl.get("z", 0.0)
    return loss, info


#: The most memory the teacher's cached hidden states may take (see :func:`_targets`).
TEACHER_CACHE_BYTES = 1 << 30


def _teacher_cache(run: Run) -> dict | None:
    """A per-example cache of the teacher's hidden states, for hidden-state objectives (encoders:
    pooled cosine / MSE, token cosine) on right-padded text examples: the teacher does not change,
    so from the second epoch on its forward is a lookup. Logits (KL) are not cached: SmolLM2's are
    12.6 MB per 64-token example."""
    if run.teacher is None or run.objective.kind not in ("cosine", "mse", "token-cosine") or not run.batched:
        return None
    tokens = 0
    for ex in run.train_ex:
        m = ex.get("attention_mask")
        if m is None or m.dim() != 2 or m.shape[0] != 1 or set(ex) - {"input_ids", "attention_mask", "token_type_ids"}:
            return None
        n = int(m.sum())
        if not bool(m[0, :n].all()):  # left-padded: positions move with the batch's length
            return None
        tokens += n
    return {"rows": {}, "bytes": 0, "hits": 0, "off": False, "tokens": tokens}


def _targets(run: Run, idx: list[int], batch: dict) -> torch.Tensor:
    """The teacher's targets for the step's batch, from the cache where it holds them (the real
    tokens' states: what the masked losses read; padding columns zero)."""
    cache = run.tcache
    if cache is None or cache["off"]:
        return run.target(batch)
    rows = cache["rows"]
    missing = [i for i in dict.fromkeys(idx) if i not in rows]
    cache["hits"] += len(idx) - len(missing)
    if missing:
        sub = stack_examples([run.train_ex[i] for i in missing])
        t = run.target(sub)
        if t.dim() != 3 or cache["tokens"] * t.shape[-1] * t.element_size() > TEACHER_CACHE_BYTES:
            cache.update(off=True, rows={}, bytes=0)  # not hidden states, or would not fit: the teacher every step
            return run.target(batch) if len(missing) != len(idx) else t
        for j, i in enumerate(missing):
            rows[i] = t[j, :int(sub["attention_mask"][j].sum())].clone()
            cache["bytes"] += rows[i].numel() * rows[i].element_size()
    s = batch["input_ids"].shape[1]
    first = rows[idx[0]]
    out = first.new_zeros(len(idx), s, first.shape[-1])
    for b, i in enumerate(idx):
        r = rows[i]
        out[b, :r.shape[0]] = r
    return out


def _batched_step(run: Run, idx: list[int], sums: list[float], worse: list[float]):
    """One forward and backward of the step's examples as one batch; the loss is computed per
    example, as one at a time, so a batched step differs from one of single examples only by
    float re-association (and DDP's mean over processes stays the same mean)."""
    batch = stack_examples([run.train_ex[i] for i in idx])
    tgt = _targets(run, idx, batch)
    outs = run.model(batch, run.run_depths)
    mask = batch.get("attention_mask")
    total = 0.0
    for b in range(len(idx)):  # per example, as one at a time: the step's loss is the mean of the examples' losses
        one = slice(b, b + 1)
        loss, info = _losses(run, tgt[one], [o[one] for o in outs], mask[one] if mask is not None else None)
        total = total + loss
        sums[0] += float(loss.detach())
        for d, v in enumerate(info["depths"]):
            sums[d + 1] += v
        for d, w in enumerate(info.get("worse", [])):
            worse[d] += w
    (total / len(idx)).backward()
    return sums, worse


def _runner(run: Run) -> DepthRunner:
    return run.model if isinstance(run.model, DepthRunner) else run.model.module  # DDP wraps the runner


def _record(run: Run, lr: float, sums: list[float], worse: list[float]) -> dict:
    per = run.config.batch * run.dist.world
    tot = run.dist.reduce(sums + worse)
    k = len(run.run_depths)
    rec = {"step": run.step, "lr": lr, "loss": tot[0] / per,
           "depths": {str(d): v / per for d, v in zip(run.run_depths, tot[1:k + 1])}}
    if run.config.loss == "mrl":
        rec["worse"] = {str(d): v / per for d, v in zip(run.run_depths, tot[k + 1:])}
    return rec


def _steps(run: Run) -> tuple[str | None, str]:
    """Train until the step count, the time limit or an interrupt; returns (interrupted, stopped)."""
    config, dist = run.config, run.dist
    run.t_loop = time.perf_counter()
    interrupted, stopped, updating = None, "steps", False
    with StopFlag() as flag:
        try:
            while run.step < config.steps:
                stop = dist.reduce([1.0 if flag.requested else 0.0,
                                    1.0 if config.max_seconds and time.perf_counter() - run.t_loop >= config.max_seconds
                                    else 0.0], "max")
                if stop[0]:
                    interrupted = flag.signal or "signal"
                    break
                if stop[1]:
                    stopped = "time limit"
                    break
                lr = _lr_at(config, run.step, run.seconds_before + time.perf_counter() - run.t_loop)
                _router_warmup(run)
                sums, worse = _one_step(run, lr)
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in run.trainable], config.grad_clip)
                updating = True
                run.opt.step()
                _router_bias_step(run)
                run.step += 1
                run.pos += config.batch * dist.world
                updating = False
                _after_step(run, _record(run, lr, sums, worse), lr)
        except KeyboardInterrupt:
            if updating:  # the weights are half updated: keep the last checkpoint as it is
                raise TrainInterrupted(f"interrupted during the update of step {run.step + 1}; the last checkpoint "
                                       f"({run.ckpt_path}) is kept; continue with --resume") from None
            interrupted = "KeyboardInterrupt"
    return interrupted, stopped


def _after_step(run: Run, rec: dict, lr: float) -> None:
    config, step = run.config, run.step
    if step % config.log_every == 0 or step == config.steps:
        run.history.append(rec)
    run.emit({"event": "step", "step": step, "steps": config.steps, "loss": rec["loss"],
              "depths": list(rec["depths"].values()), "lr": lr})
    if config.eval_every and step % config.eval_every == 0 and step < config.steps:
        run.do_eval(step)
        run.dist.barrier()
    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
        run.checkpoint(step)


def _finish(run: Run, stopped: str) -> TrainResult:
    from loopify import convert as conv

    config = run.config
    train_seconds = run.seconds_before + (time.perf_counter() - run.t_loop)
    routed = run.routed = _finish_routers(run)  # type: ignore[attr-defined]
    if routed:  # calibrated to the decode-safe rule: evaluate that
        run.evals = [e for e in run.evals if e["step"] != run.step]
    last = run.evals[-1] if run.evals and run.evals[-1]["step"] == run.step else run.do_eval(run.step)
    run.emit({"event": "done", "step": run.step})
    set_depth(run.student, None)
    verify = {"note": "no teacher to compare with (objective ce)"}
    if run.teacher is not None:
        with torch.no_grad():
            verify = conv.verify(run.teacher.run(), run.student(*run.inputs.args, **run.inputs.kwargs),
                                 run.inputs.info.get("output_names"))
    verify.update({"lossless_plan": False, "ok": True, "trained": True})
    report = _report(run, stopped, train_seconds, last)
    out_path = manifest_path = None
    if run.dist.main:
        new_manifest = copy.deepcopy(run.manifest)
        for k in ("files", "versions", "architecture", "ties"):
            new_manifest.pop(k, None)
        new_manifest["verify"] = verify
        new_manifest["train"] = report
        if routed:
            _record_routers(new_manifest, run)
        result = conv.ConvertResult(run.student, new_manifest)
        out_path, manifest_path = conv.save(result, run.inputs, config.out)
        if run.ckpt_path.exists():
            run.ckpt_path.unlink()
    run.dist.barrier()
    return TrainResult(out_path, manifest_path, report, run.student)


def _finish_routers(run: Run) -> dict | None:
    """Expert routers: thresholds calibrated on (at most 8) training examples so that the
    per-token rule keeps the capacity top-k kept in training; then the depth per token on the
    held-out examples at full count. None for a model without routers."""
    from loopify.nn.routing import calibrate_on, depth_stats, routers

    rs = routers(run.student)
    if not rs:
        return None
    for r in rs.values():
        r.warm, r.load = 1.0, None  # calibrated and saved at the full capacity; no more bias updates
    thresholds = calibrate_on(run.student, run.train_ex[:8])
    depths: dict[str, list] = {p: [] for p in rs}
    set_depth(run.student, None)
    with torch.no_grad():
        for ex in run.eval_ex or run.train_ex[:8]:
            run.student(**ex)
            mask = ex.get("attention_mask")
            for p, r in rs.items():
                d = r.last_depth
                depths[p].append(d[mask.bool()] if mask is not None and mask.shape == d.shape else d.flatten())
    def finite(ts):  # JSON has no infinity: a threshold of -inf (every token passes) is null
        return None if ts is None else [t if math.isfinite(t) else None for t in ts]

    return {"loops": {p: {"kind": r.kind, "capacity": list(r.spec.capacity), "select": r.select,
                          "thresholds": finite(thresholds.get(p)), "depth": depth_stats(torch.cat(depths[p]), r.spec.steps),
                          **({"capacity_warmup": run.config.capacity_warmup} if r.kind == "expert" else
                             {"balance": r.balance, "bias": [float(b) for b in r.balance_bias]})}
                      for p, r in rs.items()}}


def _record_routers(manifest: dict, run: Run) -> None:
    """The trained model's manifest describes its routers (added by --router or trained)."""
    from loopify.nn import recursions

    loops = recursions(run.student)
    manifest["skeletons"] = {p: r.skeleton() for p, r in loops.items()}
    kinds = {r.router.kind for r in loops.values() if r.router is not None}
    manifest.setdefault("config", {})["router"] = kinds.pop() if len(kinds) == 1 else "mixed"
    for entry in manifest.get("loops", []):
        r = loops.get(entry["module"])
        if r is not None and r.router is not None:
            entry["router"] = r.router.kind
    manifest.setdefault("plan", {})["router"] = {"kind": manifest["config"]["router"], "loops": [
        {"loop": p, "kind": r.router.kind, "steps": r.router.spec.steps, "capacity": list(r.router.spec.capacity),
         "activation": r.router.spec.activation, "hidden": r.router.spec.hidden,
         **({"balance": r.router.balance} if r.router.kind == "token" else {}),
         "params": sum(q.numel() for q in r.router.parameters()), "trained": True}
        for p, r in loops.items() if r.router is not None]}


def _report(run: Run, stopped: str, seconds: float, last) -> dict:
    config, enc = run.config, run.encoder
    return {
        "version": 1, "config": config.to_dict(), "converted": str(Path(config.converted).resolve()),
        "converted_sha256": run.converted_sha,
        "teacher": str(Path(run.teacher.source).resolve()) if run.teacher is not None else None,
        "objective": run.objective.kind, "loss": config.loss, "beta": config.beta if config.loss == "mrl" else None,
        "depths": run.depths, "steps": run.step, "stopped": stopped, "resumed_from": run.resumed_from,
        "examples_seen": run.pos, "world_size": run.dist.world, "seconds": seconds,
        "trainable": {g: sum(p.numel() for _, p in run.groups[g]) if g in config.train else 0 for g in GROUPS},
        "data": {"path": str(Path(config.data).resolve()), "sha256": run.data_sha, "train_examples": len(run.train_ex),
                 "eval_examples": len(run.eval_ex), "eval_data": config.eval_data, "tokenizer": enc.tokenizer_desc,
                 "seq_len": enc.seq, "batched": run.batched, "images": sum(r.image is not None for r in run.train_recs), "notes": enc.notes},
        "before": next((e for e in run.evals if e["step"] == 0), None), "after": last, "evals": run.evals,
        "history": run.history, "verify_before": run.manifest.get("verify"),
        "router": getattr(run, "routed", None),
        "teacher_cache": None if run.tcache is None else
        {"on": not run.tcache["off"], "examples": len(run.tcache["rows"]), "bytes": run.tcache["bytes"],
         "hits": run.tcache["hits"]},
    }
