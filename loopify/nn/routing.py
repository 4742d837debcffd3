"""Mixture-of-Recursions routers: each token its own recursion depth (arXiv 2507.10524).

A router sits on a loop (:class:`loopify.nn.recursion.Recursion`) and decides, per token, which
recursion steps it takes:

* ``expert`` (expert-choice): before recursion step r, the router scores the tokens still
  active (``z_r = router(h)[..., r]``) and keeps some of them; the others leave the loop with
  the hidden state they have. Two selections: ``topk`` keeps ``ceil(capacity[r] * S)`` tokens
  of the row (MoR's training-time rule: it reads the whole sequence, so it is undefined for one
  decoded token), ``threshold`` keeps the tokens with ``z_r >= threshold[r]`` (decode-safe: the
  decision depends on the token's own hidden state, which depends only on earlier tokens);
* ``token`` (token-choice): at the first step the router gives each token its number of
  recursions, ``d = argmax_j z_j + 1`` over ``j = 0..N-1`` (ties go to the deepest), and the
  token takes steps ``0..d-1``. Decode-safe by construction.

Which steps a token takes follows the sharing map: a token of depth d runs exactly the depths
:func:`loopify.nn.sharing.schedule` runs at loop count d (cycle: the first d passes of the K
blocks; sequence: the first d repetitions of every block; middle-*: the first and last layer
always, the middle ones as cycle / sequence). The decision for step r is taken at the first
depth of step r in execution order (for sequence sharing: block 0's r-th repetition), from the
hidden state there.

**Scaled update** (MoR): a routed unit (the depths of one step that run one after the other:
the K blocks of a cycle step, one repetition of a sequence block) maps the active tokens' ``h``
to ``f(h)``, and the token gets ``h + s * (f(h) - h)`` with ``s = 2 * sigmoid(z)`` or
``1 + tanh(z)`` of its score: both are exactly 1 at ``z = 0``, so a router whose weights start
at zero changes nothing (computed as ``f(h) + (s - 1) * (f(h) - h)``, exactly ``f(h)`` at
``s = 1``), and the score still gets gradient.

**Neutral at insertion**: zero weights, thresholds ``-inf`` (every token passes every step) and,
for token-choice, all-equal logits (every token the deepest): the routed model computes what the
loop computes.

**Compute really saved**: a unit runs its blocks on the active tokens only: they are gathered
into ``[B, m, D]`` (m = the most active tokens of any row; a row with fewer is padded with
invalid entries), the blocks run, the results are scattered back. The arguments that run along
the sequence (``position_embeddings``, ``position_ids``) are gathered too.

**Recursion-wise attention**: at step r a token attends to the tokens active at step r at or
before it (causal over the active subset; padded and invalid entries are never keys). Without
a cache this is an additive mask over the gathered tokens; with the loop KV cache
(:class:`loopify.generate.cache.LoopCache`) each executed depth's slot holds only the tokens
that were active there, with their absolute index and validity, so a decoded token attends to
exactly the keys it would see in a prefill of the whole text (recursion-wise KV caching,
policy ``per-depth``). ``share-first`` (MoR's recursive KV sharing) lets later recursions read
the first recursion's slot: every token active at the first recursion is a key.

Compiled generation (:mod:`loopify.generate.export`, ``_routed_groups``) takes the same
decisions in the graph, per token: a routed step runs under ``cond`` on them (a decoded token
the router stops runs none of its blocks), prefill gathers the kept tokens into buckets, and
each KV slot's validity per token is explicit state.
"""

from __future__ import annotations

import contextvars
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

KINDS = ("expert", "token")
ACTIVATIONS = ("sigmoid", "tanh")
SELECTIONS = ("threshold", "topk")

#: (absolute index [B, m], valid [B, m]) of the tokens a routed depth is running, for the KV cache
_ROUTED = contextvars.ContextVar("loopify_routed", default=None)


def current_routed():
    """While a routed depth runs: (absolute index [B, m], valid [B, m]) of its tokens, else None."""
    return _ROUTED.get()


def default_capacity(steps: int) -> tuple[float, ...]:
    """MoR's expert-choice default: step r keeps (N - r) / N of the tokens."""
    return tuple((steps - r) / steps for r in range(steps))


@dataclass(frozen=True)
class RouterSpec:
    """A router's configuration (JSON-able, stored in the loop's skeleton).

    Attributes:
        kind: expert or token.
        steps: N, the recursion steps the router decides (the loop's maximum count).
        dim: hidden size.
        activation: sigmoid or tanh (how a score becomes the update scale).
        hidden: 0 for a linear router, else the width of a two-layer MLP.
        capacity: expert: fraction of the row's tokens kept at each step (topk, and the target
            the auxiliary loss and :func:`calibrate` match).
        select: expert: threshold (decode-safe) or topk.
    """

    kind: str
    steps: int
    dim: int
    activation: str = "sigmoid"
    hidden: int = 0
    capacity: tuple[float, ...] = field(default_factory=tuple)
    select: str = "threshold"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"router kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"router activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"router selection must be one of {', '.join(SELECTIONS)}, not {self.select!r}")
        if self.steps < 1:
            raise ValueError("a router needs at least one recursion step")
        if self.hidden < 0:
            raise ValueError("router hidden width must be >= 0")
        cap = self.capacity
        if len(cap) != self.steps:
            raise ValueError(f"capacity needs one value per recursion step ({self.steps}), got {len(cap)}")
        if any(not 0 < c <= 1 for c in cap):
            raise ValueError("capacities must be in (0, 1]")
        if any(b > a for a, b in zip(cap, cap[1:])):
            raise ValueError("capacities must not increase from one step to the next (a step keeps a subset)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capacity"] = list(self.capacity)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RouterSpec":
        return cls(**{**d, "capacity": tuple(float(c) for c in d.get("capacity", ()))})


class Router(nn.Module):
    """Scores tokens on the hidden state and decides their recursion steps (see the module doc).

    ``select`` (expert) may be switched at run time; ``threshold`` holds one threshold per step
    (``-inf`` at insertion). After each forward ``last_depth`` holds the steps each token took
    ([B, S] long) and ``record`` what the router losses need: per decided step, the logits,
    the tokens eligible and the tokens kept.
    """

    def __init__(self, spec: RouterSpec):
        super().__init__()
        self.spec = spec
        self.select = spec.select
        if spec.hidden:
            self.net = nn.Sequential(nn.Linear(spec.dim, spec.hidden), nn.GELU(), nn.Linear(spec.hidden, spec.steps))
        else:
            self.net = nn.Sequential(nn.Linear(spec.dim, spec.steps))
        with torch.no_grad():  # zero output layer: every score 0, every scale exactly 1
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()
        self.register_buffer("threshold", torch.full((spec.steps,), float("-inf")))
        # token-choice, MoR's loss-free balancing: a bias added to the logits for the choice only
        # (not to the update scale), moved by training towards equal loads (zero: no effect)
        self.register_buffer("balance_bias", torch.zeros(spec.steps))
        self.last_depth: torch.Tensor | None = None
        self.record: list[dict] = []
        self.balance = "loss"  # token-choice in training: "loss" (balancing loss) or "bias" (loss-free)
        self.warm = 1.0  # expert top-k: capacity warm-up, 0 keeps every token, 1 the capacity
        self.load: torch.Tensor | None = None  # token-choice: depth counts since the last bias update

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models written before the loss-free bias existed have none: zero is exactly their behaviour
        state_dict.setdefault(prefix + "balance_bias", torch.zeros_like(self.balance_bias))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def capacity_at(self, r: int) -> float:
        """Top-k capacity of step r under the warm-up: 1 - warm * (1 - capacity[r])."""
        return 1.0 - self.warm * (1.0 - self.spec.capacity[min(r, self.spec.steps - 1)])

    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Loss-free balancing step (DeepSeek-V3, as MoR's token-choice uses it): every depth whose
        share of the tokens is under the mean gets ``+rate``, over it ``-rate``."""
        with torch.no_grad():
            frac = load.float() / load.sum().clamp(min=1)
            self.balance_bias += rate * torch.sign(frac.mean() - frac)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., N] router logits (float32)."""
        return self.net(h.to(self.net[-1].weight.dtype)).float()

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Update scale of a score: 2 sigmoid(z) or 1 + tanh(z) (1 at z = 0)."""
        return 2 * torch.sigmoid(z) if self.spec.activation == "sigmoid" else 1 + torch.tanh(z)

    def extra_repr(self) -> str:
        s = self.spec
        return f"kind={s.kind}, steps={s.steps}, activation={s.activation}, select={self.select}"

    def _note(self, entry: dict) -> None:
        from loopify.nn.recursion import _tracing

        if not _tracing():  # an exported program keeps no Python-side state
            self.record.append(entry)

    # -- decisions -----------------------------------------------------------------------------

    def token_depths(self, h: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-choice: ([B, S] depth in 1..steps, [B, S] scale) from the state entering the loop."""
        z = self.logits(h)[..., :steps]
        flipped = (z + self.balance_bias[:steps].to(z.dtype)).flip(-1)  # argmax of the flipped logits: ties go to the deepest depth
        choice = steps - 1 - flipped.argmax(-1)
        zsel = z.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        if self.load is not None and steps == self.spec.steps and torch.is_grad_enabled():
            # training forwards at the full count (evaluation runs without grad; a shallower run
            # forces every token to its last step, which is no choice of the router)
            self.load += torch.bincount(choice.reshape(-1).detach(), minlength=self.spec.steps)[:self.spec.steps]
        self._note({"step": 0, "logits": z, "choice": choice})
        return choice + 1, self.scale(zsel)

    def expert_step(self, h: torch.Tensor, r: int, active: torch.Tensor,
                    real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert-choice at step r: ([B, S] kept, a subset of ``active``; [B, S] scale). ``real``
        ([B, S]) marks the row's real tokens: top-k keeps ``ceil(capacity * real tokens)`` of
        them per row (padding is never kept by top-k)."""
        z = self.logits(h)[..., min(r, self.spec.steps - 1)]
        if self.select == "topk":
            real = torch.ones_like(active) if real is None else real
            k = (self.capacity_at(r) * real.sum(-1).float()).ceil().long()  # [B]
            order = z.masked_fill(~(active & real), float("-inf")).argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(z.shape[-1], device=z.device).expand_as(order))
            keep = (rank < k.unsqueeze(-1)) & active & real
        else:
            keep = active & (z >= self.threshold[min(r, self.spec.steps - 1)])
        self._note({"step": r, "logits": z, "eligible": active, "keep": keep})
        return keep, self.scale(z)


def depth_stats(depths: torch.Tensor, steps: int) -> dict:
    """Average recursion depth per token and its distribution, from a 1-D tensor of the steps
    each token took (what ``generate`` and ``bench`` report)."""
    depths = depths.flatten().long()
    hist = torch.bincount(depths, minlength=steps + 1).tolist() if depths.numel() else [0] * (steps + 1)
    n = int(depths.numel())
    return {"tokens": n, "average": float(depths.float().mean()) if n else float("nan"), "max": steps,
            "histogram": {str(d): int(c) for d, c in enumerate(hist)}}


def format_depths(stats: dict[str, dict]) -> str:
    """One line per routed loop: ``average depth 1.42 of 2 (0: 3, 1: 5, 2: 4 tokens)``."""
    return "\n".join(f"recursion depth per token ({loop}): average {s['average']:.2f} of {s['max']} ("
                     + ", ".join(f"{d}: {c}" for d, c in s["histogram"].items()) + " tokens)"
                     for loop, s in stats.items())


def calibrate(router: Router, logits: list[torch.Tensor]) -> list[float]:
    """Set an expert-choice router's thresholds so that, on the given per-step logits of tokens
    that reached each step (``logits[r]``: a 1-D tensor), step r keeps the fraction
    ``capacity[r] / capacity[r-1]`` of them (the top-k capacity, as a per-token rule)."""
    out = []
    for r, z in enumerate(logits[:router.spec.steps]):
        prev = router.spec.capacity[r - 1] if r else 1.0
        frac = router.spec.capacity[r] / prev
        if frac >= 1 or z.numel() == 0:
            t = float("-inf")
        else:
            t = float(torch.quantile(z.float(), 1 - frac))
        router.threshold[r] = t
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------
# Execution of a routed loop


@dataclass
class Unit:
    """Depths that run one after the other on one set of tokens: ``step`` None for straight
    depths (every token), else the recursion step whose tokens run them."""

    depths: list[int]
    indices: list[int]   # execution indices within the call
    step: int | None


def units(rec) -> list[Unit]:
    """The loop's schedule at its current count, cut into routed units (see the module doc)."""
    from loopify.nn.sharing import pieces

    sched = rec.depth_schedule()
    out: list[Unit] = []
    if rec.deepen:
        per = rec.spec.layers
        for i in range(0, len(sched), per):
            out.append(Unit(sched[i:i + per], list(range(i, i + per)), i // per))
        return out
    where: dict[int, tuple[int, int | None]] = {}
    for p, (kind, piece) in enumerate(pieces(rec.spec.sharing, rec.spec.layers, rec.spec.blocks)):
        n = rec.spec.max_loops if kind == "loop" else 1
        for step in range(n):
            for k in range(piece.per):
                where[piece.offset + step * piece.stride + k] = (p, step if kind == "loop" else None)
    for i, d in enumerate(sched):
        p, step = where[d]
        if out and out[-1].step == step and where[out[-1].depths[-1]][0] == p and step is not None:
            out[-1].depths.append(d)
            out[-1].indices.append(i)
        else:
            out.append(Unit([d], [i], step))
    return out


def _gather_tokens(x, idx: torch.Tensor, batch: int, seq: int):
    """Gather the sequence entries ``idx`` [B, m] of every tensor of ``x`` that runs along the
    sequence (shape [B or 1, S, ...]); tuples and lists recursively; other values as they are."""
    if isinstance(x, torch.Tensor):
        if x.dim() >= 2 and x.shape[1] == seq and x.shape[0] in (1, batch):
            x = x.expand(batch, *x.shape[1:])
            view = idx.view(batch, idx.shape[1], *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
            return x.gather(1, view)
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_gather_tokens(v, idx, batch, seq) for v in x)
    return x


def _token_valid(mask, batch: int, seq: int, base: int, device) -> torch.Tensor:
    """[B, S] whether each current token is a real one (not padding), read off the model's 4-D
    mask at its own column (HF masks padded keys); all True without a mask."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    i = torch.arange(seq, device=device)
    cols = (base + i).clamp(max=mask.shape[-1] - 1)
    diag = mask[:, 0, i.clamp(max=mask.shape[-2] - 1), cols]  # [B, S]
    ok = diag if diag.dtype == torch.bool else diag == 0
    return ok.expand(batch, seq)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """[B, q, k] bool -> [B, 1, q, k] additive mask (0 allowed, the dtype's minimum not)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


def _cache_of(kwargs: dict):
    from transformers.cache_utils import Cache

    for k in ("cache", "past_key_values", "past_key_value"):
        c = kwargs.get(k)
        if isinstance(c, Cache):
            return c
    return None


def run(rec, args: list, kwargs: dict, where: str, s):
    """The routed forward of ``rec`` (called by :meth:`Recursion.forward`): returns the last
    block output, the new hidden state and the number of block calls."""
    from loopify.nn.recursion import _tracing

    router: Router = rec.router
    box = args if where == "arg" else kwargs
    h = box[s]
    batch, seq = h.shape[0], h.shape[1]
    cache = _cache_of(kwargs)
    routed_cache = cache if hasattr(cache, "routed") else None
    if cache is not None and routed_cache is None:
        raise ValueError(f"loop {rec.key}: a routed loop decodes with loopify's LoopCache, not {type(cache).__name__}")
    base = routed_cache.routed.get(rec.key, 0) if routed_cache is not None else 0
    valid_tok = _token_valid(kwargs.get("attention_mask"), batch, seq, base, h.device)
    tracing = _tracing()
    if not tracing:
        router.record = []
    steps_run = max((u.step for u in units(rec) if u.step is not None), default=-1) + 1
    plan = _Decisions(router, steps_run, torch.ones(batch, seq, dtype=torch.bool, device=h.device), valid_tok)
    runs = [0] * len(rec.blocks)
    out, calls = None, 0
    for unit in units(rec):
        r = unit.step
        keep, scale = plan.at(r, h)
        if keep is None or (routed_cache is None and (tracing or bool(keep.all()))):
            x, idx, valid, call_kwargs = h, None, None, kwargs
        else:
            gathered = _gather_active(h, keep, kwargs, valid_tok)
            if gathered is None:  # no token of any row takes this step (nor a later one: the sets are nested)
                for depth in unit.depths:
                    runs[rec.block_for_depth(depth)] += 1
                continue
            x, idx, valid, call_kwargs = gathered
        routed = None if idx is None else (routed_cache, base + idx, valid)
        out, y, n = _call_unit(rec, unit, x, args, where, s, call_kwargs, routed, runs)
        calls += n
        h = y if r is None else _update(h, x, y, keep, scale, idx, valid, tracing)
    if routed_cache is not None:
        routed_cache.routed[rec.key] = base + seq
    if not tracing:
        router.last_depth = plan.depth_taken.detach()
    box[s] = h
    return out, h, calls


class _Decisions:
    """The router's decisions of one routed forward, step by step: token-choice decides every
    token's depth at the first step, expert-choice keeps a subset of the tokens still active at
    each step; ``depth_taken`` counts the steps each token takes."""

    def __init__(self, router, steps_run: int, active: torch.Tensor, valid_tok: torch.Tensor):
        self.router, self.steps_run, self.active, self.valid_tok = router, steps_run, active, valid_tok
        self.decided: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.token_plan = None
        self.depth_taken = torch.zeros(active.shape, dtype=torch.long, device=active.device)

    def at(self, r, h):
        """(keep [B, S] bool, scale [B, S]) of recursion step ``r``; (None, None) outside steps."""
        if r is None:
            return None, None
        if r in self.decided:
            return self.decided[r]
        if self.router.kind == "token":
            if self.token_plan is None:
                self.token_plan = self.router.token_depths(h, self.steps_run)
            depth, scale = self.token_plan
            keep = depth > r
        else:
            keep, scale = self.router.expert_step(h, r, self.active, self.valid_tok)
            self.active = keep
        self.decided[r] = (keep, scale)
        self.depth_taken = self.depth_taken + keep.long()
        return keep, scale


def _gather_active(h, keep, kwargs: dict, valid_tok):
    """The active tokens of each row, first and in order: (x [B, m, ..], idx [B, m], valid
    [B, m], the block's keyword arguments gathered alike), or None when no token is active."""
    batch, seq = h.shape[0], h.shape[1]
    count = keep.sum(-1)
    m = int(count.max())
    if m == 0:
        return None
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # active tokens first, in order
    idx = order[:, :m]
    valid = torch.arange(m, device=h.device).unsqueeze(0) < count.unsqueeze(-1)
    valid = valid & valid_tok.gather(1, idx)
    call_kwargs = {k: (v if k == "attention_mask" else _gather_tokens(v, idx, batch, seq)) for k, v in kwargs.items()}
    return _gather_tokens(h, idx, batch, seq), idx, valid, call_kwargs


def _call_unit(rec, unit, y, args: list, where: str, s, call_kwargs: dict, routed, runs: list):
    """The unit's depths on ``y`` (the gathered active tokens when ``routed`` = (cache, query
    positions, valid) is given, with the routed attention mask); returns (last output, new
    state, calls)."""
    from loopify.nn.recursion import _CURRENT, Depth

    r = unit.step
    out, calls = None, 0
    for depth, index in zip(unit.depths, unit.indices):
        b = rec.block_for_depth(depth)
        d = Depth(rec.key, index, r if r is not None else 0, b, depth, runs[b])
        kw = dict(call_kwargs)
        tok = None
        a = list(args)
        if routed is not None:
            routed_cache, q_index, valid = routed
            put_mask(rec.blocks[b], a, kw, _routed_mask(routed_cache, d, q_index, valid, y.dtype))
            tok = _ROUTED.set((q_index, valid))
        if where == "arg":
            a[s] = y
        else:
            kw[s] = y
        token = _CURRENT.set(d)
        try:
            factors = rec.lora_factors(lambda stacked, dd=depth: stacked[dd]) if rec.lora_forms else None
            out = rec.call_block(b, rec.depth_overrides(depth), tuple(a), kw, factors)
        finally:
            _CURRENT.reset(token)
            if tok is not None:
                _ROUTED.reset(tok)
        runs[b] += 1
        calls += 1
        y = out[0] if isinstance(out, tuple) else out
    return out, y, calls


#: per block class: the position of ``attention_mask`` among its forward's parameters (-1: none)
_MASK_AT: dict[type, int] = {}


def mask_position(block) -> int:
    """Where ``attention_mask`` is among ``block.forward``'s parameters (-1: not there); cached
    per class (call it once outside traced code: a ``cond`` branch cannot run ``inspect``)."""
    import inspect

    cls = type(block)
    if cls not in _MASK_AT:
        try:
            names = list(inspect.signature(block.forward).parameters)
        except (TypeError, ValueError):
            names = []
        _MASK_AT[cls] = names.index("attention_mask") if "attention_mask" in names else -1
    return _MASK_AT[cls]


def put_mask(block, args: list, kwargs: dict, mask) -> None:
    """Put ``mask`` in a block call's attention-mask argument: in its place among ``args`` where
    the model passes it positionally (CLIP's encoder layers), else by keyword."""
    at = _MASK_AT[type(block)] if type(block) in _MASK_AT else mask_position(block)
    if 0 <= at < len(args):
        args[at] = mask
    else:
        kwargs["attention_mask"] = mask


def _update(h, x, y, keep, scale, idx, valid, tracing: bool):
    """The hidden state after a routed step: each kept token's update ``y - x`` scaled by its
    router score, the others unchanged (scattered back when only the active tokens ran)."""
    if idx is None:
        upd = y + (scale.unsqueeze(-1).to(y.dtype) - 1) * (y - h)
        return torch.where(keep.unsqueeze(-1), upd, h) if tracing or not bool(keep.all()) else upd
    sc = scale.gather(1, idx).unsqueeze(-1).to(y.dtype)
    upd = y + (sc - 1) * (y - x)
    upd = torch.where(valid.unsqueeze(-1), upd, x)
    return h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]), upd)


def _routed_mask(cache, d, q_index: torch.Tensor, valid: torch.Tensor, dtype) -> torch.Tensor:
    """Additive mask [B, 1, m, keys] of a routed depth: query i sees key j when j is valid and
    not after it. Keys: the gathered tokens (no cache), or what the depth's cache slot holds
    (its earlier tokens, with the current ones appended unless the slot is only read)."""
    if cache is None:
        k_index, k_valid = q_index, valid
    else:
        k_index, k_valid = cache.routed_keys(d, q_index, valid)
    allowed = k_valid.unsqueeze(1) & (k_index.unsqueeze(1) <= q_index.unsqueeze(-1))
    return _additive(allowed, dtype)


# ----------------------------------------------------------------------------------------------
# Router losses (training)


def router_losses(router: Router) -> dict[str, torch.Tensor]:
    """The router losses of the last forward (from ``router.record``):

    * ``aux`` (expert): MoR's auxiliary BCE, ``BCE(sigmoid(z_r), kept_r)`` over the tokens
      eligible at step r: it teaches the per-token score to predict the top-k decision, which
      is what makes the decode-safe threshold rule match the capacity;
    * ``aux`` (token): the balancing loss ``N * sum_i f_i P_i`` (f_i: fraction of tokens given
      depth i + 1, P_i: their mean softmax probability; 1 when balanced);
    * ``z``: the router z-loss, mean ``logsumexp(z)^2`` (token) or ``z^2`` (expert), which keeps
      the logits small.

    Empty when the last forward recorded nothing (no routed step ran)."""
    rec = router.record
    if not rec:
        return {}
    if router.kind == "token":
        z = rec[0]["logits"].reshape(-1, rec[0]["logits"].shape[-1])
        n = z.shape[-1]
        frac = torch.bincount(rec[0]["choice"].reshape(-1), minlength=n).float() / z.shape[0]
        prob = torch.softmax(z, -1).mean(0)
        zl = torch.logsumexp(z, -1).pow(2).mean()
        if router.balance == "bias":  # loss-free balancing: the bias does it, no auxiliary loss
            return {"z": zl}
        return {"aux": n * (frac.detach() * prob).sum(), "z": zl}
    aux, zl, count = 0.0, 0.0, 0
    for r in rec:
        m = r["eligible"]
        if not bool(m.any()):
            continue
        z = r["logits"][m]
        aux = aux + torch.nn.functional.binary_cross_entropy_with_logits(z, r["keep"][m].float())
        zl = zl + z.pow(2).mean()
        count += 1
    if not count:
        return {}
    return {"aux": aux / count, "z": zl / count}


def routers(module: nn.Module) -> dict[str, Router]:
    """Every router of a module's loops, by loop path."""
    from loopify.nn.recursion import recursions

    return {p: r.router for p, r in recursions(module).items() if r.router is not None}


def calibrate_on(module: nn.Module, batches: list[dict]) -> dict[str, list[float]]:
    """Calibrate every expert router of ``module`` on ``batches`` (keyword inputs of the model):
    run them with top-k selection at the loops' full count, then set each step's threshold so
    that the per-token rule keeps the capacity (:func:`calibrate`); the routers are left on
    ``threshold`` selection (decode-safe). Returns the thresholds per loop."""
    from loopify.nn.recursion import recursions

    experts = {p: r for p, r in routers(module).items() if r.kind == "expert"}
    if not experts or not batches:
        return {}
    saved = {p: r.loops for p, r in recursions(module).items()}
    for p, r in recursions(module).items():
        r.loops = r.spec.max_loops
    seen: dict[str, list[list[torch.Tensor]]] = {p: [[] for _ in range(r.spec.steps)] for p, r in experts.items()}
    try:
        for r in experts.values():
            r.select = "topk"
        with torch.no_grad():
            for b in batches:
                module(**b)
                real = b.get("attention_mask")
                for p, r in experts.items():
                    for e in r.record:
                        keep = e["eligible"]
                        if real is not None and real.shape == keep.shape:  # padding does not count
                            keep = keep & real.bool()
                        seen[p][min(e["step"], r.spec.steps - 1)].append(e["logits"][keep])
    finally:
        for p, r in recursions(module).items():
            r.loops = saved[p]
        for r in experts.values():
            r.select = "threshold"
    return {p: calibrate(r, [torch.cat(z) if z else torch.zeros(0) for z in seen[p]]) for p, r in experts.items()}
