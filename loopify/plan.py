"""``loopify plan``: search the conversion plans of a model under a budget, without training.

Given a model, calibration text and a budget (``params=0.6``: at most 60% of the original's
parameters; ``latency=0.6``: at most 60% of its FLOPs per token), the planner enumerates
candidates, estimates each one's fidelity on a few hundred calibration tokens and writes the
Pareto front (fidelity against parameters and against estimated latency), each point with the
pipeline spec that ``loopify convert --plan`` runs.

A candidate is a real conversion in module form (eager PyTorch; the fold-loops and relax passes
themselves, so the fidelity is the converted model's, untrained), measured at every loop count:

* which layers fold: the longest run, or the run cut (``fold-loops{keep_first,keep_last}``) where
  its first or last layers have a high block influence on the calibration text (more than twice
  the run's median: SmolLM2's layer 0, 0.99 against 0.02-0.16);
* blocks K (every divisor of the run with 2..``MAX_LOOPS`` loops), sharing (cycle, sequence),
  init (average, stepwise);
* per-depth vectors (``relax{rank=0}``: biases and norm scales per depth) for the best sharing and
  init of each (cut, K);
* per-matrix LoRA ranks (``relax{ranks=...}``) for the best structures below the budget, chosen
  greedily from the SVD energy of the residuals (the rank step that removes the most residual
  energy per parameter first) until the budget is spent.

Parameters are counted exactly (each storage once, as the manifest counts them); latency is
estimated from FLOPs: the original's per-token FLOPs counted once by
``torch.utils.flop_counter`` (per layer and in total), the layers a loop count runs, and the
extra matmuls of factored LoRA (:func:`loopify.nn.lora.choose_form`). Fidelity is the model's
own metric (:mod:`loopify.fidelity.metrics`): KL of the next-token distributions (causal LMs;
perplexity, top-1 agreement and top-5 overlap are reported beside it) or sentence cosine
(encoders; Spearman of similarities beside it).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loopify.errors import LoopifyError

FORMAT = "loopify-plan"
VERSION = 1
MAX_LOOPS = 6          # loops per candidate: more is rarely worth measuring untrained
MAX_KEEP = 2           # at most this many first / last layers kept out of the loop
SEQ = 128              # tokens per calibration window (causal) / per sentence at most (encoder)
LORA_STEP = 8          # ranks are allocated in steps of this many
LORA_MAX = 96          # and at most this rank per matrix (the randomized SVD's width)
LORA_STRUCTURES = 2    # structures that get LoRA candidates
STAGE2 = 4             # (cut, K) groups measured at every loop count and with per-depth vectors
METRICS = {"causal": {"kl": False, "top1_agreement": True, "top5_overlap": True, "perplexity": False},
           "encoder": {"cosine": True, "spearman": True}}


class PlanError(LoopifyError):
    """A plan that cannot be made or used."""


@dataclass(frozen=True)
class Budget:
    kind: str      # params | latency
    value: float   # relative to the original

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, _, value = text.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if kind not in ("params", "latency") or not 0 < v <= 1:
            raise PlanError(f"--budget {text!r}: give params=R or latency=R with 0 < R <= 1 (relative to the original)")
        return cls(kind, v)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass
class Candidate:
    """One conversion plan: the fold-loops and relax options (the spec is made from them)."""

    keep_first: int = 0
    keep_last: int = 0
    blocks: int = 1
    sharing: str = "cycle"
    init: str = "average"
    vectors: bool = False
    ranks: tuple[str, ...] = ()

    def passes(self, stack: str):
        from loopify.passes.find_spans import FindSpans
        from loopify.passes.fold_loops import FoldLoops
        from loopify.passes.relax import Relax

        out = [FindSpans(similarity=False),
               FoldLoops(blocks=self.blocks, sharing=self.sharing, init=self.init, stacks=(stack,),
                         keep_first=self.keep_first, keep_last=self.keep_last)]
        if self.vectors or self.ranks:
            out.append(Relax(rank=0, ranks=self.ranks))
        return out

    def spec(self, stack: str) -> str:
        from loopify.pipeline import Pipeline

        return str(Pipeline.of(*self.passes(stack)))


@dataclass
class Calibration:
    """The calibration inputs, the original's outputs on them and what a layer costs."""

    task: str
    inputs: list[dict]
    reference: list[torch.Tensor]
    index: int                          # which output: logits (causal) or the last hidden state
    tokens: int
    flops: float                        # the original's FLOPs over the calibration inputs
    layer_flops: float                  # one layer's
    influence: list[float] = field(default_factory=list)   # block influence of each layer of the run


# ----------------------------------------------------------------------------------------------
# Calibration


def calibration_texts(data: str | Path | None) -> tuple[list[str], str]:
    """The texts to calibrate on and where they came from: ``data``, else the train side of the
    real text on this machine (:func:`loopify.texts.split_documents`; never the held-out side)."""
    if data is not None:
        from loopify.fidelity.report import read_texts

        return read_texts(data), str(data)
    from loopify import texts

    train, _ = texts.split_documents()
    return [p for _, paras in train for p in paras], "train side of loopify.texts (real text on this machine)"


def _encoder_fn(captured, tokenizer_choice: str):
    from types import SimpleNamespace

    from loopify.fidelity.models import _json
    from loopify.fidelity.report import tokenizer

    assets = Path(captured.info.get("assets_dir") or captured.source)
    subject = SimpleNamespace(path=captured.source, assets=assets, config=_json(assets / "config.json"))
    return tokenizer(subject, tokenizer_choice)[0]


def calibration_inputs(captured, task: str, texts: list[str], tokens: int, tokenizer_choice: str) -> list[dict]:
    """Keyword inputs: windows of up to :data:`SEQ` tokens (causal: the texts as one stream), or
    sentences (encoders, evenly spaced lines, each at most :data:`SEQ` tokens, at least 8), until
    ``tokens`` tokens."""
    from loopify.fidelity import inputs as text_inputs

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than the maximum": the texts are cut below
    encode = _encoder_fn(captured, tokenizer_choice)
    if task == "causal":
        ids = encode("\n".join(texts[:2000]))
        seq = min(SEQ, tokens)
        rows = text_inputs.windows(ids, seq, max(1, math.ceil(tokens / seq)))
    else:
        sents = [encode(t)[:SEQ] for t in text_inputs.evenly(texts, 400)]
        sents = [s for s in sents if len(s) >= 2]
        rows, total = [], 0
        for s in text_inputs.evenly(sents, max(8, tokens // 16)):
            if total >= tokens and len(rows) >= 8:
                break
            rows.append(s)
            total += len(s)
    if len(rows) < (1 if task == "causal" else 3):
        raise PlanError("the calibration text is too short (give --data FILE with more text)")
    takes = _takes(captured.eager)
    out = []
    for r in rows:
        x = torch.tensor([r], dtype=torch.long)
        kw = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        if "token_type_ids" in takes:
            kw["token_type_ids"] = torch.full_like(x, 1 if task == "causal" else 0)
        out.append({k: v for k, v in kw.items() if k in takes})
    return out


def _takes(module) -> set[str]:
    import inspect

    inner = getattr(module, "model", module)
    return set(inspect.signature(inner.forward).parameters)


@torch.no_grad()
def run_outputs(module, cal_inputs: list[dict], index: int, loops: int | None = None) -> list[torch.Tensor]:
    from loopify.nn import set_loops

    if loops is not None:
        set_loops(module, loops)
    return [module(**kw)[index][0].float() for kw in cal_inputs]


def block_influence(module, layers: list[str], cal_inputs: list[dict], index: int) -> list[float]:
    """ShortGPT's block influence of each layer, 1 - cos(input, output) of its hidden state,
    averaged over the tokens of the calibration inputs."""
    seen: dict[str, list[float]] = {p: [] for p in layers}
    handles = []

    def hook(path):
        def fn(mod, args, kwargs, out):
            h_in = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(h_in, torch.Tensor) and isinstance(h_out, torch.Tensor) and h_in.shape == h_out.shape:
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                seen[path].append(float(1 - cos.mean()))
        return fn

    for p in layers:
        handles.append(module.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True))
    try:
        run_outputs(module, cal_inputs, index)
    finally:
        for h in handles:
            h.remove()
    return [sum(v) / len(v) if v else float("nan") for v in (seen[p] for p in layers)]


def count_flops(module, cal_inputs: list[dict], index: int, layers: list[str]) -> tuple[float, float]:
    """(total FLOPs over the calibration inputs, FLOPs of one layer of the run), counted by
    ``torch.utils.flop_counter`` on the original."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with mode:
        run_outputs(module, cal_inputs, index)
    counts = {name: sum(v.values()) for name, v in mode.get_flop_counts().items()}
    total = float(counts.get("Global", 0))
    per = [v for name, v in counts.items() for p in layers if name.endswith("." + p) or name == p]
    return total, (sum(per) / len(per) if per else 0.0)


# ----------------------------------------------------------------------------------------------
# Measuring one candidate


def fidelity(task: str, cal: Calibration, outputs: list[torch.Tensor]) -> dict:
    """The model's own metrics on the calibration inputs, against the original's outputs."""
    from loopify.fidelity.metrics import NextToken, mean_pooled, sentence_fidelity

    if task == "causal":
        stats = NextToken()
        for kw, out, ref in zip(cal.inputs, outputs, cal.reference):
            stats.add(out, kw["input_ids"][0], ref)
        r = stats.result()
        return {k: r[k] for k in ("perplexity", "top1_agreement", "top5_overlap", "kl")}
    pool = lambda hs: torch.cat([mean_pooled(h[None], kw["attention_mask"]) for h, kw in zip(hs, cal.inputs)])
    r = sentence_fidelity(pool(cal.reference), pool(outputs))
    return {"cosine": r["cosine"], "cosine_min": r["cosine_min"], "spearman": r["spearman"]}


def lora_extra_flops(module, tokens: int, executed: dict[str, int]) -> float:
    """FLOPs the factored LoRA matrices add (merged ones add none): 2 r (in + out) per token and
    executed depth, for the form ``compile --lora-form auto`` gives each matrix."""
    from loopify.nn import lora, recursions
    from loopify.nn.recursion import unkey

    extra = 0.0
    for path, rec in recursions(module).items():
        blocks = dict(rec.blocks[0].named_parameters())
        for k, A in rec.lora_A.items():
            shape, r = blocks[unkey(k)].shape, int(A.shape[1])
            if lora.choose_form(shape, r) == "factored":
                extra += 2.0 * r * (shape[0] + shape[1]) * tokens * executed.get(path, 0)
    return extra


def measure(state, cand: Candidate, stack: str, cal: Calibration, original_params: int, all_loops: bool,
            relax_cls=None, folded=None) -> tuple[list[dict], object]:
    """Convert with the candidate's passes (module form) and measure it at its full loop count
    (``all_loops``: at every count). Returns one point per count and the converted state.
    ``folded``: the state after this candidate's fold-loops, reused (only relax runs);
    ``relax_cls``: the relax pass class to run (the planner's, with cached factors)."""
    from loopify.convert import unique_params
    from loopify.nn import recursions
    from loopify.pipeline import Pipeline, run_pipeline

    passes = cand.passes(stack)[1:]
    if relax_cls is not None and len(passes) > 1:
        passes[1] = relax_cls(**passes[1].options())
    if folded is not None and len(passes) > 1:
        state, passes = folded, passes[1:]
    result = run_pipeline(Pipeline.of(*passes), state)
    module = result.state.module
    loops = recursions(module)
    if not loops:
        raise PlanError(f"{cand.spec(stack)}: made no loop")
    params = unique_params(module)[0]
    top = min(r.spec.max_loops for r in loops.values())
    points = []
    for k in (range(1, top + 1) if all_loops else [top]):
        executed = {p: len(r.depth_schedule(k)) for p, r in loops.items()}
        folded = sum(r.spec.layers for r in loops.values())
        flops = cal.flops + cal.layer_flops * (sum(executed.values()) - folded) + \
            lora_extra_flops(module, cal.tokens, executed)
        metrics = fidelity(cal.task, cal, run_outputs(module, cal.inputs, cal.index, k))
        points.append({"spec": cand.spec(stack), "loops": k, "max_loops": top, "params": int(params),
                       "params_ratio": params / original_params, "latency_ratio": flops / cal.flops,
                       "metrics": metrics, "candidate": dataclasses.asdict(cand)})
    return points, result.state


def score(point: dict, metric: str, task: str) -> float:
    """Higher is better: the metric, negated where lower is better (KL, perplexity)."""
    v = point["metrics"][metric]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("-inf")
    return v if METRICS[task][metric] else -v


# ----------------------------------------------------------------------------------------------
# LoRA ranks from the SVD energy


class SVDCache:
    """Top singular triplets of each residual ``W_l - W_shared``, computed once (randomized SVD,
    :data:`LORA_MAX` + 8 wide) and shared by the rank allocation and the relax pass the planner
    runs (:meth:`relax_class`); keyed by the original tensor and the shared weight's bytes."""

    def __init__(self, width: int = LORA_MAX + 8):
        self.width = width
        self.cache: dict = {}

    def svd(self, original: torch.Tensor, shared: torch.Tensor):
        k = (id(original), hash(shared.detach().contiguous().numpy().tobytes()))
        if k not in self.cache:
            resid = original.detach().float() - shared.detach().float()
            q = min(self.width, *resid.shape)
            torch.manual_seed(0)
            if q < min(resid.shape):
                U, S, V = torch.svd_lowrank(resid, q=q, niter=2)
            else:
                U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
                V = Vh.T
            self.cache[k] = (U, S, V, float(resid.square().sum()), float(original.float().square().sum()))
        return self.cache[k]

    def factors(self, original, shared, rank: int, scale: float):
        from loopify.nn.lora import Factors

        U, S, V, resid2, orig2 = self.svd(original, shared)
        r = min(rank, S.numel())
        B, A = (U[:, :r] * S[:r] / scale).contiguous(), V[:, :r].T.contiguous()
        norm = math.sqrt(max(orig2, 1e-60))
        dropped = math.sqrt(max(resid2 - float(S[:r].square().sum()), 0.0)) / norm
        return Factors(A, B, dropped, dropped)

    def relax_class(self):
        from loopify.passes.relax import Relax

        cache = self

        @dataclasses.dataclass(frozen=True)
        class CachedRelax(Relax):
            factors = staticmethod(lambda o, s, r, scale: cache.factors(o, s, r, scale))
        return CachedRelax


def allocate_ranks(folded_module, original: dict, cache: SVDCache, room: int, step: int = LORA_STEP) -> dict[str, int]:
    """Per-matrix LoRA ranks that spend at most ``room`` parameters: greedily the rank step (of
    ``step``) that removes the most relative residual energy (summed over depths) per parameter.
    A matrix's rank is the same at every depth of a loop (the factors are stacked per depth)."""
    from loopify.nn import lora, recursions

    gains, costs, caps = {}, {}, {}
    for rec in recursions(folded_module).values():
        smap, blocks = rec.sharing(), [dict(b.named_parameters()) for b in rec.blocks]
        for name in lora.matrix_params(rec.blocks[0]):
            energy = []
            for d, path in enumerate(rec.spec.depth_paths):
                _, S, _, _, orig2 = cache.svd(original[f"{path}.{name}"], blocks[smap[d]][name])
                energy.append(S.double().square() / max(orig2, 1e-60))
            n = min(e.numel() for e in energy)
            gains[name] = sum(e[:n] for e in energy)
            shape = blocks[0][name].shape
            costs[name] = rec.spec.layers * (shape[0] + shape[1])
            caps[name] = min(n, lora.full_rank(shape))
    ranks = {n: 0 for n in gains}
    while True:
        best, best_gain = None, 0.0
        for n, g in gains.items():
            r = ranks[n]
            s = min(step, caps[n] - r)
            if s <= 0 or costs[n] * s > room:
                continue
            gain = float(g[r:r + s].sum()) / (costs[n] * s)
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return {n: r for n, r in ranks.items() if r}
        s = min(step, caps[best] - ranks[best])
        ranks[best] += s
        room -= costs[best] * s


def ranks_option(ranks: dict[str, int]) -> tuple[str, ...]:
    """``relax{ranks=...}`` entries, ``.weight`` left off the names."""
    return tuple(f"{n.removesuffix('.weight')}@{r}" for n, r in sorted(ranks.items()))


# ----------------------------------------------------------------------------------------------
# Candidates


def cuts(influence: list[float]) -> list[tuple[int, int]]:
    """(keep_first, keep_last) pairs: 0, and up to :data:`MAX_KEEP` first / last layers whose
    block influence is more than twice the run's median."""
    vals = sorted(x for x in influence if not math.isnan(x))
    median = vals[len(vals) // 2] if vals else 0.0
    high = [not math.isnan(x) and x > 2 * median for x in influence]

    def leading(flags):
        n = 0
        while n < min(MAX_KEEP, len(flags)) and flags[n]:
            n += 1
        return n

    first, last = leading(high), leading(high[::-1])
    return [(a, b) for a in range(first + 1) for b in range(last + 1)]


def block_counts(length: int, period: int = 1) -> list[int]:
    """Blocks K for a run of ``length`` layers: K divides it into 2..MAX_LOOPS loops (whole groups)."""
    groups = length // period
    return [groups // n * period for n in range(2, MAX_LOOPS + 1) if groups % n == 0]


def structures(span, influence: list[float]) -> list[Candidate]:
    """Every cut x blocks x init, with cycle and (uncut runs) sequence sharing (rank 0, shared norms)."""
    out = []
    pairs = cuts(influence) if span.period == 1 else [(0, 0)]
    for a, b in pairs:
        for k in block_counts(span.length - a - b, span.period):
            # sequence sharing on the uncut run only: the cut runs differ from it by the kept layers
            for sharing in (("cycle", "sequence") if span.period == 1 and not (a or b) else ("cycle",)):
                for init in ("average", "stepwise"):
                    out.append(Candidate(keep_first=a, keep_last=b, blocks=k, sharing=sharing, init=init))
    return out


def default_candidate(span) -> Candidate:
    """What ``loopify convert`` does with no options: K = L/2 (:func:`default_blocks`), cycle, average."""
    from loopify.nn.sharing import default_blocks

    k = default_blocks(span.length // span.period) * span.period
    return Candidate(blocks=k)


# ----------------------------------------------------------------------------------------------
# Pareto front and the chosen point


def pareto(points: list[dict], axis: str, key: Callable[[dict], float]) -> list[int]:
    """Indices of the points no other point dominates (``axis`` no larger and ``key`` no smaller,
    one of them strictly), by ``axis``."""
    front = []
    for i, p in enumerate(points):
        dominated = any(q[axis] <= p[axis] and key(q) >= key(p) and (q[axis] < p[axis] or key(q) > key(p))
                        for q in points)
        if not dominated:
            front.append(i)
    # equal points: keep the first
    seen, out = set(), []
    for i in sorted(front, key=lambda i: (points[i][axis], i)):
        sig = (points[i][axis], key(points[i]))
        if sig not in seen:
            seen.add(sig)
            out.append(i)
    return out


def choose(points: list[dict], budget: Budget, key: Callable[[dict], float]) -> int | None:
    """The best point within the budget (on a tie the cheaper one), or None."""
    axis = f"{budget.kind}_ratio"
    inside = [i for i, p in enumerate(points) if p[axis] <= budget.value + 1e-12]
    if not inside:
        return None
    return max(inside, key=lambda i: (key(points[i]), -points[i][axis], -i))


# ----------------------------------------------------------------------------------------------
# The search


@dataclass
class Search:
    """What every stage of the search shares."""

    state: object               # after find-spans
    span: object
    cal: Calibration
    original_params: int
    metric: str
    progress: Callable[[str], None]
    evaluated: list = field(default_factory=list)
    measured: int = 0
    done: dict = field(default_factory=dict)

    def key(self, point: dict) -> float:
        return score(point, self.metric, self.cal.task)

    def run(self, cand: Candidate, all_loops: bool = False, **kw) -> tuple[list[dict], object]:
        spec = cand.spec(self.span.stack)
        if not all_loops and not kw and spec in self.done:  # the default plan is also a structure
            return self.done[spec], None
        t0 = time.perf_counter()
        points, state = measure(self.state, cand, self.span.stack, self.cal, self.original_params, all_loops, **kw)
        seen = {(p["spec"], p["loops"]) for p in self.evaluated}
        self.evaluated += [p for p in points if (p["spec"], p["loops"]) not in seen]
        self.measured += 1
        self.done[spec] = points[-1:]
        top = points[-1]
        self.progress(f"[{self.measured}] {_short(cand)}: params {top['params_ratio']:.1%}, latency "
                      f"{top['latency_ratio']:.1%}, {self.metric} {top['metrics'][self.metric]:.4g} "
                      f"({time.perf_counter() - t0:.1f} s)")
        return points, state


def _short(c: Candidate) -> str:
    cut = f" keep {c.keep_first}+{c.keep_last}" if c.keep_first or c.keep_last else ""
    extra = (f" lora {len(c.ranks)} matrices" if c.ranks else " per-depth vectors" if c.vectors else "")
    return f"K={c.blocks} {c.sharing} {c.init}{cut}{extra}"


def search(s: Search, budget: Budget) -> None:
    """Stage 1: every structure at its full loop count. Stage 2: the best sharing and init of
    the :data:`STAGE2` best (cut, K) at every loop count and with per-depth vectors. Stage 3: per-matrix LoRA on
    the best structures below the budget, filled to it (and half-way)."""
    best: dict = {}
    for cand in structures(s.span, s.cal.influence):
        p = s.run(cand)[0][-1]
        k = (cand.keep_first, cand.keep_last, cand.blocks)
        if k not in best or s.key(p) > s.key(best[k][1]):
            best[k] = (cand, p)
    ranked = sorted(best.values(), key=lambda cp: -s.key(cp[1]))
    lora = [cp for cp in ranked if cp[1]["params_ratio"] < _lora_target(budget, cp[1]) - 0.02][:LORA_STRUCTURES]
    cache = SVDCache()
    for cand, p in ranked[:STAGE2] + [cp for cp in lora if cp not in ranked[:STAGE2]]:
        _, folded = s.run(cand, all_loops=True)
        vec_points, _ = s.run(dataclasses.replace(cand, vectors=True), folded=folded)
        if (cand, p) not in lora:
            continue
        vec_params = vec_points[-1]["params"] - p["params"]
        top = _lora_target(budget, p)
        for t in ((p["params_ratio"] + top) / 2, top):
            room = int(t * s.original_params) - p["params"] - vec_params
            if room <= 0:
                continue
            ranks = allocate_ranks(folded.module, s.state.captured.program.state_dict, cache, room)
            if ranks:
                s.run(dataclasses.replace(cand, ranks=ranks_option(ranks)), all_loops=True,
                      relax_cls=cache.relax_class(), folded=folded)


def _lora_target(budget: Budget, point: dict) -> float:
    """The parameter ratio LoRA fills a structure to (and half-way to it): a parameter budget;
    under a latency budget, 20% of the original's parameters above the structure's."""
    return budget.value if budget.kind == "params" else min(1.0, point["params_ratio"] + 0.2)


def plan(model: str | Path, budget: Budget, *, data: str | Path | None = None, tokens: int = 512,
         metric: str | None = None, tokenizer_choice: str = "auto",
         progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Search the conversion plans of ``model`` and return the plan report (see the module doc)."""
    from loopify import capture
    from loopify.convert import unique_params
    from loopify.io import sha256_path
    from loopify.pipeline import State, parse, run_pipeline

    t0 = time.perf_counter()
    cap = capture.load(model)
    if cap.eager is None:
        raise PlanError(f"{model}: plan needs a Hugging Face directory or a GGUF file (converted in module form, "
                        "measured on text of any length)")
    state = run_pipeline(parse("find-spans{similarity=false}"), State(cap, cap.editable())).state
    spans = state.analyses["spans"].spans
    if not spans:
        raise PlanError(f"{model}: no span of interchangeable layers to fold (see `loopify inspect`)")
    span = max(spans, key=lambda sp: sp.length)
    task = "causal" if "logits" in (cap.info.get("output_names") or []) else "encoder"
    metric = metric or ("kl" if task == "causal" else "cosine")
    if metric not in METRICS[task]:
        raise PlanError(f"--metric {metric}: for a{'n' if task == 'encoder' else ''} {task} model one of "
                        f"{', '.join(METRICS[task])}")
    texts, source = calibration_texts(data)
    cal = _calibrate(cap, span, task, texts, tokens, tokenizer_choice)
    progress(f"calibration: {len(cal.inputs)} {'windows' if task == 'causal' else 'sentences'}, {cal.tokens} "
             f"tokens; span {span.stack}[{span.start}:{span.start + span.length}], block influence "
             + " ".join(f"{x:.2f}" for x in cal.influence))
    s = Search(state, span, cal, unique_params(cap.program.state_dict)[0], metric, progress)
    default = s.run(default_candidate(span))[0][-1]
    search(s, budget)
    report = _report(s, budget, default)
    report["model"] = {"path": str(Path(model).resolve()), "sha256": sha256_path(Path(model)),
                       "architecture": cap.info.get("architecture"), "task": task}
    report["calibration"] = {"source": source, "inputs": len(cal.inputs), "tokens": cal.tokens,
                             "window_tokens": SEQ if task == "causal" else None}
    report["seconds"] = time.perf_counter() - t0
    return report


def _calibrate(cap, span, task: str, texts: list[str], tokens: int, tokenizer_choice: str) -> Calibration:
    cal_inputs = calibration_inputs(cap, task, texts, tokens, tokenizer_choice)
    index = (cap.info.get("output_names") or ["logits"]).index("logits") if task == "causal" else 0
    module = cap.eager
    ref = run_outputs(module, cal_inputs, index)
    influence = block_influence(module, list(span.layers), cal_inputs, index)
    flops, layer_flops = count_flops(module, cal_inputs, index, list(span.layers))
    n = sum(int(kw["input_ids"].numel()) for kw in cal_inputs)
    return Calibration(task, cal_inputs, ref, index, n, flops, layer_flops, influence)


def _report(s: Search, budget: Budget, default: dict) -> dict:
    pts = s.evaluated
    fronts = {axis: pareto(pts, f"{axis}_ratio", s.key) for axis in ("params", "latency")}
    keep = sorted(set(fronts["params"]) | set(fronts["latency"]),
                  key=lambda i: (pts[i]["params_ratio"], pts[i]["latency_ratio"]))
    points = [dict(pts[i], front=[a for a in ("params", "latency") if i in fronts[a]]) for i in keep]
    chosen = choose(points, budget, s.key)
    default_at = choose([p for p in points if p["params_ratio"] <= default["params_ratio"] + 1e-12] or points,
                        Budget("params", 1.0), s.key)
    return {"format": FORMAT, "version": VERSION, "budget": {"kind": budget.kind, "value": budget.value},
            "metric": s.metric, "higher_is_better": METRICS[s.cal.task][s.metric],
            "original": {"params": s.original_params, "flops": s.cal.flops, "layer_flops": s.cal.layer_flops},
            "span": {"stack": s.span.stack, "start": s.span.start, "length": s.span.length,
                     "period": s.span.period, "block_influence": s.cal.influence},
            "latency": "estimated from FLOPs (torch.utils.flop_counter on the original, per layer; factored "
                       "LoRA's extra matmuls added), relative to the original",
            "candidates": s.measured, "points": points, "chosen": chosen, "default": default,
            "best_at_default_params": default_at, "evaluated": pts}


# ----------------------------------------------------------------------------------------------
# Output, and reading a plan back


def format_table(rep: dict) -> str:
    """The front as a table, the chosen point marked with ``*``, and the default plan."""
    m = rep["metric"]
    cols = ["#", "params", "latency", "loops", m] + [k for k in rep["points"][0]["metrics"] if k != m] + ["plan"] \
        if rep["points"] else ["#"]
    rows = []
    for i, p in enumerate(rep["points"]):
        mark = "*" if i == rep["chosen"] else ""
        rows.append([f"{i}{mark}", f"{p['params_ratio']:.1%}", f"{p['latency_ratio']:.1%}",
                     f"{p['loops']}/{p['max_loops']}", _fmt(p["metrics"][m])]
                    + [_fmt(v) for k, v in p["metrics"].items() if k != m] + [_short(Candidate(**_cand(p)))])
    widths = [max(len(x) for x in col) for col in zip(cols, *rows)] if rows else [1]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [cols] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    d = rep["default"]
    lines.append(f"default plan ({_short(Candidate(**_cand(d)))}): params {d['params_ratio']:.1%}, "
                 f"{m} {_fmt(d['metrics'][m])}")
    b = rep["budget"]
    if rep["chosen"] is None:
        lines.append(f"no point within {b['kind']}={b['value']:g}")
    else:
        c = rep["points"][rep["chosen"]]
        lines.append(f"chosen (within {b['kind']}={b['value']:g}): point {rep['chosen']}, {c['spec']}")
    lines.append(f"{rep['candidates']} candidates measured on {rep['calibration']['tokens']} calibration tokens "
                 f"in {rep['seconds']:.0f} s; latency {rep['latency'].split(' (')[0]}; "
                 f"{m} {'higher' if rep['higher_is_better'] else 'lower'} is better")
    return "\n".join(lines)


def _cand(p: dict) -> dict:
    c = dict(p["candidate"])
    c["ranks"] = tuple(c.get("ranks") or ())
    return c


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.3g}"


def write(rep: dict, path: str | Path) -> Path:
    from loopify.io import write_json

    return write_json(path, rep)


def plot(rep: dict, path: str | Path) -> Path:
    """Fidelity against parameters and against estimated latency: every candidate, the front,
    the chosen point, the default plan and the budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install 'loopify[plot]'") from None
    from loopify.io import atomic_path

    m = rep["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, axis in zip(axes, ("params", "latency")):
        xs = lambda ps: [p[f"{axis}_ratio"] for p in ps]
        ys = lambda ps: [p["metrics"][m] for p in ps]
        ax.scatter(xs(rep["evaluated"]), ys(rep["evaluated"]), s=10, c="0.7", label="candidates")
        front = [p for p in rep["points"] if axis in p["front"]]
        ax.plot(xs(front), ys(front), "o-", c="C0", ms=4, label="Pareto front")
        ax.scatter(xs([rep["default"]]), ys([rep["default"]]), marker="s", c="C1", s=40, label="default plan")
        if rep["chosen"] is not None:
            c = rep["points"][rep["chosen"]]
            ax.scatter(xs([c]), ys([c]), marker="*", c="C3", s=160, label="chosen", zorder=5)
        if rep["budget"]["kind"] == axis:
            ax.axvline(rep["budget"]["value"], ls="--", c="C3", lw=1)
        ax.set_xlabel(f"{axis} (relative to the original{', FLOPs' if axis == 'latency' else ''})")
        ax.set_ylabel(f"{m} ({'higher' if rep['higher_is_better'] else 'lower'} is better)")
        if m in ("kl", "perplexity"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"loopify plan: {Path(rep['model']['path']).name}, {rep['candidates']} candidates", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


def point_spec(plan_path: str | Path, model: str | Path, point: int | None = None) -> tuple[str, dict]:
    """The pipeline spec of a plan's point (default: the chosen one) and the point, after checking
    that the plan was made for ``model``."""
    import json

    from loopify.io import sha256_path

    try:
        rep = json.loads(Path(plan_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"--plan {plan_path}: not a readable plan file ({type(e).__name__})") from None
    if not isinstance(rep, dict) or rep.get("format") != FORMAT or not isinstance(rep.get("points"), list):
        raise PlanError(f"--plan {plan_path}: not a loopify plan (write one with `loopify plan`)")
    if rep.get("version") != VERSION:
        raise PlanError(f"--plan {plan_path}: plan version {rep.get('version')} is not supported (this loopify "
                        f"reads version {VERSION})")
    want = (rep.get("model") or {}).get("sha256")
    if want != sha256_path(Path(model)):
        raise PlanError(f"--plan {plan_path}: the plan was made for another model "
                        f"({(rep.get('model') or {}).get('path')}), not {model}")
    n = len(rep["points"])
    if point is None:
        point = rep.get("chosen")
        if point is None:
            raise PlanError(f"--plan {plan_path}: the plan has no chosen point (nothing within its budget); "
                            f"give --point N (0..{n - 1})")
    if not 0 <= point < n:
        raise PlanError(f"--point {point}: out of range; the plan has points 0..{n - 1}")
    return rep["points"][point]["spec"], rep["points"][point]
