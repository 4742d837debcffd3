"""Multi-resolution recursion (SpiralFormer, arXiv 2602.11698): loop steps on a pooled sequence.

A loop with a *resolution schedule* ``(r_0, ..., r_{N-1})`` (coarse to fine, e.g. 4, 2, 1) runs
its recursion step i on the sequence pooled by factor r_i; r_i = 1 steps are the ordinary loop.

**Pooling**: mean over groups of r consecutive tokens (the last group of a row may be partial:
the mean of what it holds), taken over the group's real tokens (padding is left out; a group of
padding only is never a key and gives no update). Groups never cross a modality boundary: for a
VLM (the loop's modality mask: image positions) each run of image or text tokens is cut into
groups of r from its own start, so no group mixes image and text tokens.

**Coarse step**: the step's blocks run on the pooled sequence ``x`` ([B, G, D]), through the
routers' machinery for running a block on a shorter sequence (:func:`loopify.nn.routing._call_unit`;
the arguments that run along the sequence are gathered with
:func:`loopify.nn.routing._gather_tokens`). A group's position is its *last real* token's
position (``position_ids``, and the rotary tables gathered there): a real position of the model,
which a mean would not be for rotary tables, and the one at which a causal group is complete
(decoding runs a group when its last token arrives, whose rotary table the call has). The model's 4-D attention mask is pooled consistently:
group q may attend to group k when some token of q may attend to some token of k (a causal mask
stays causal over groups, padding groups are never keys); a group with no key at all attends to
itself. The update ``y - x`` is *unpooled* by repeat (every token of a group gets its group's
update) and added to the full-resolution state with a per-coarse-step gate ``g_i`` ([D]) that
starts at zero: ``h + g_i * unpool(y - x)`` is exactly ``h`` at insertion, so a lossless plan
still verifies.

**Causality** (``causal``): for a causal model a group may only inform positions after it ends:
the unpooled update is shifted by one group (a token of group j gets group j - 1's update, the
first group gets none), so no token sees a later one. Non-causal models (encoders) take their
own group's update.

**Loop counts**: at run-time count k <= N the loop runs the *last* k entries of the schedule,
so every count ends at full resolution and count 1 is the ordinary one-step loop; a deepened loop
run past the schedule's length adds full-resolution steps at the end.

**Decoding with a KV cache** (:func:`run_cached`; causal loops, one row, no image positions,
KV policy per-depth): a coarse step runs a group when its last token arrives. Per loop and
schedule position the cache keeps the sum of the step's input ``h`` over the current group's
earlier tokens and the update ``u`` of the latest complete group. A call (prefill or one decoded
token) pools the groups that complete in it (the kept sum added to the first), runs them through
the step's blocks against the coarse depth's cache slot (which holds one entry per complete
group, causal over groups), and gives each of its tokens the update of the group before its own
(the kept ``u`` or one computed in this call): exactly what the cache-free forward gives every
token of the whole sequence, since a causal group's update reaches only tokens after it ends.

Shapes: without image positions a coarse step has ceil(S / r) groups, static, so an exported
program saves the compute too. With image positions the group count depends on where the
image is; an exported program (torch.export) then runs each coarse step over S group slots
(the unused ones empty and masked), which computes the same outputs at full-resolution cost.
A compiled artifact runs each schedule position as its own stage (:mod:`loopify.staging`: a
body per position, of its own static shapes, chosen by the run-time count); a generation
artifact carries the decode state above as an input and an output of its entry points
(:mod:`loopify.generate.export`). Not supported yet (refused in one line): decoding a batch of
several rows, image positions or the KV policies that share slots between recursions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpiralSpec:
    """A loop's resolution schedule (JSON-able, stored in its skeleton).

    Attributes:
        schedule: pooling factor of each recursion step, coarse to fine (1: full resolution).
        dim: hidden size (the gates' width).
        causal: shift coarse updates by one group (causal models).
    """

    schedule: tuple[int, ...]
    dim: int
    causal: bool

    def __post_init__(self):
        if not self.schedule:
            raise ValueError("a resolution schedule needs one pooling factor per recursion step")
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.schedule):
            raise ValueError(f"pooling factors must be integers >= 1, got {':'.join(map(str, self.schedule))}")
        if all(r == 1 for r in self.schedule):
            raise ValueError("the schedule has no coarse step (every factor is 1): nothing to do")

    @property
    def coarse(self) -> list[int]:
        """Schedule positions with a factor > 1 (each has a gate)."""
        return [i for i, r in enumerate(self.schedule) if r > 1]

    def factors(self, steps: int) -> list[tuple[int, int]]:
        """(schedule position, factor) of each of ``steps`` recursion steps: the last ``steps``
        entries, then full-resolution steps past the schedule's length (position -1)."""
        n = len(self.schedule)
        if steps <= n:
            return [(i, self.schedule[i]) for i in range(n - steps, n)]
        return [(i, r) for i, r in enumerate(self.schedule)] + [(-1, 1)] * (steps - n)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = list(self.schedule)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SpiralSpec":
        return cls(tuple(int(r) for r in d["schedule"]), int(d["dim"]), bool(d["causal"]))


class Spiral(nn.Module):
    """A loop's resolution schedule and its gates: ``gate[j]`` ([D], zero at insertion) scales
    the update of the j-th coarse schedule position."""

    def __init__(self, spec: SpiralSpec):
        super().__init__()
        self.spec = spec
        self.gate = nn.Parameter(torch.zeros(len(spec.coarse), spec.dim))

    def gate_at(self, position: int) -> torch.Tensor:
        return self.gate[self.spec.coarse.index(position)]

    def extra_repr(self) -> str:
        return f"schedule={':'.join(map(str, self.spec.schedule))}, causal={self.spec.causal}"


# ----------------------------------------------------------------------------------------------
# Pooling


class Pooling:
    """The groups of one factor on one batch: ``gid`` [B, S] (each token's group), ``weights``
    [B, G, S] (the mean over each group's real tokens), ``anchor`` [B, G] (each group's last real
    token: where it runs), ``valid`` [B, G] (groups holding a real token)."""

    def __init__(self, factor: int, valid_tok: torch.Tensor, image: torch.Tensor | None, dense: bool):
        batch, seq = valid_tok.shape
        dev = valid_tok.device
        pos = torch.arange(seq, device=dev).expand(batch, seq)
        if image is None or image.shape != valid_tok.shape:  # one segment: a static group count
            self.gid = pos // factor
            self.groups = -(-seq // factor)
        else:
            seg_start = torch.ones(batch, seq, dtype=torch.bool, device=dev)
            im = image.long()  # (a bool != compiles to a float compare of i1 in TVM's LLVM codegen)
            seg_start[:, 1:] = im[:, 1:] != im[:, :-1]
            # each token's segment start: the latest segment start at or before it (a running
            # max, written as a max over the earlier positions: TVM has no cummax)
            earlier = pos.unsqueeze(-1) >= pos.unsqueeze(1)  # [B, S(token), S(candidate)]
            first = torch.where(earlier & seg_start.unsqueeze(1), pos.unsqueeze(1), torch.zeros_like(pos).unsqueeze(1)).amax(-1)
            self.gid = torch.cumsum((seg_start | ((pos - first) % factor == 0)).long(), dim=1) - 1
            self.groups = seq if dense else int(self.gid.max()) + 1  # dense: a static count (tracing)
        onehot = self.gid.unsqueeze(1) == torch.arange(self.groups, device=dev).view(1, -1, 1)  # [B, G, S]
        real = onehot & valid_tok.unsqueeze(1)
        count_real = real.sum(-1, keepdim=True)
        use = torch.where(count_real > 0, real, onehot).float()
        self.weights = use / use.sum(-1, keepdim=True).clamp(min=1)
        self.onehot = onehot
        self.valid = count_real.squeeze(-1) > 0
        # each group's anchor: its last real token (its last token when it holds none; slot 0
        # for an empty dense slot): the position the group runs at
        members = torch.where(real, pos.unsqueeze(1), -1).amax(-1)
        self.anchor = torch.where(members >= 0, members, torch.where(onehot, pos.unsqueeze(1), -1).amax(-1)).clamp(min=0)
        self.batch, self.seq, self.dense = batch, seq, dense

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, G, D] group means."""
        return torch.matmul(self.weights.to(h.dtype), h.expand(self.batch, *h.shape[1:]))

    def unpool(self, u: torch.Tensor, shift: bool) -> torch.Tensor:
        """[B, G, D] -> [B, S, D]: each token its group's update (``shift``: the previous group's,
        none for the first group); groups without a real token give none."""
        u = torch.where(self.valid.unsqueeze(-1), u, torch.zeros_like(u))
        if shift:
            u = torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], dim=1)
        return u.gather(1, self.gid.unsqueeze(-1).expand(-1, -1, u.shape[-1]))

    def mask(self, m: torch.Tensor | None, causal: bool, dtype) -> torch.Tensor | None:
        """The model's 4-D mask [B|1, 1, S, S] pooled to [B, 1, G, G] (see the module doc), in its
        own form (bool, or additive). Without a mask (the model relies on the attention's own
        causal flag) it stays None unless some group is empty or padding: then an additive mask
        over the real groups (causal over groups for a causal model)."""
        if m is None:
            if not self.dense and bool(self.valid.all()):
                return None
            g = torch.arange(self.groups, device=self.gid.device)
            allowed = self.valid.unsqueeze(1).expand(-1, self.groups, -1)
            if causal:
                allowed = allowed & (g.view(1, 1, -1) <= g.view(1, -1, 1))
            return _form(self._diagonal(allowed), dtype, additive=True)
        ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        ok = ok[:, 0].expand(self.batch, -1, -1).float()  # [B, S, S]
        one = self.onehot.float()
        allowed = torch.matmul(torch.matmul(one, ok), one.transpose(1, 2)) > 0  # [B, G, G]
        return _form(self._diagonal(allowed), m.dtype, additive=m.dtype != torch.bool)

    def _diagonal(self, allowed: torch.Tensor) -> torch.Tensor:
        """A group row with no key attends to itself (no all-masked softmax rows)."""
        eye = torch.eye(self.groups, dtype=torch.bool, device=allowed.device).unsqueeze(0)
        return allowed | (eye & ~allowed.any(-1, keepdim=True))


def _form(allowed: torch.Tensor, dtype, additive: bool) -> torch.Tensor:
    """[B, q, k] allowed -> a [B, 1, q, k] attention mask: bool, or additive in ``dtype``."""
    if not additive:
        return allowed.unsqueeze(1)
    from loopify.nn.routing import _additive

    return _additive(allowed, dtype)


# ----------------------------------------------------------------------------------------------
# Execution


def _coarse_args(values, names: list[str], pooling: Pooling, causal: bool, dtype, skip=None):
    """The block's call arguments at the coarse resolution: the attention mask (4-D, [.., S, S],
    or the argument named ``attention_mask``) pooled, sequence tensors gathered at each group's
    anchor (its last real token), the rest as they are. ``names``: the block's parameter names (for positional
    arguments)."""
    from loopify.nn.routing import _gather_tokens

    seq = pooling.seq

    def one(k, v):
        is_mask = isinstance(v, torch.Tensor) and v.dim() == 4 and tuple(v.shape[-2:]) == (seq, seq)
        if is_mask or (k == "attention_mask" and v is None):
            return pooling.mask(v, causal, dtype)
        return _gather_tokens(v, pooling.anchor, pooling.batch, seq)

    return _each_arg(values, names, skip, one)


def _each_arg(values, names: list[str], skip, one):
    """``one(name, value)`` of every call argument but the hidden state's (``skip``: its
    keyword, or its index among positional arguments), which passes as it is. Positional
    arguments are named by the block's parameter names (BERT passes its mask second)."""
    if isinstance(values, dict):
        return {k: v if k == skip else one(k, v) for k, v in values.items()}
    return [v if i == skip else one(names[i] if i < len(names) else i, v) for i, v in enumerate(values)]


def block_parameters(block: nn.Module) -> list[str]:
    """The names of a block's forward parameters, in order."""
    import inspect

    try:
        return list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return []


def _units(rec):
    """(step index, schedule position, pooling factor, the step's :class:`~loopify.nn.routing.Unit`)
    of each recursion step at the loop's current count."""
    from loopify.nn.routing import Unit

    steps, index = rec.steps(), 0
    for i, ((position, factor), step) in enumerate(zip(rec.spiral.spec.factors(len(steps)), steps)):
        yield i, position, factor, Unit(list(step), list(range(index, index + len(step))), i)
        index += len(step)


def valid_tokens(args: list, kwargs: dict, h: torch.Tensor) -> torch.Tensor:
    """[B, S] whether each token of a loop call is a real one, read off the call's 4-D mask (the
    ``attention_mask`` keyword or a 4-D positional argument); all True without one."""
    from loopify.nn.routing import _token_valid

    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4), None)
    return _token_valid(mask, h.shape[0], h.shape[1], 0, h.device)


def coarse_step(spiral: Spiral, position: int, pool: Pooling, h: torch.Tensor, args: list, kwargs: dict,
                where: str, s, names: list[str], blocks):
    """One coarse recursion step at schedule position ``position``: ``blocks(x, c_args, c_kwargs)
    -> (last block output, y)`` runs the step's blocks on the pooled state ``x`` with the call's
    arguments at the coarse resolution; returns (that output, ``h + g * unpool(y - x)``). Shared
    by the eager loop (:func:`run`) and the staged loop bodies of a compiled artifact
    (:mod:`loopify.staging`)."""
    x = pool.pool(h)
    c_args = _coarse_args(args, names, pool, spiral.spec.causal, h.dtype, skip=s if where == "arg" else None)
    c_kwargs = _coarse_args(kwargs, names, pool, spiral.spec.causal, h.dtype, skip=s if where == "kw" else None)
    out, y = blocks(x, c_args, c_kwargs)
    return out, h + spiral.gate_at(position).to(h.dtype) * pool.unpool(y - x, spiral.spec.causal)


def run(rec, args: list, kwargs: dict, where: str, s, image: torch.Tensor | None):
    """The multi-resolution forward of ``rec`` (called by :meth:`Recursion.forward`): returns the
    last block output and the new hidden state."""
    from loopify.nn.recursion import _tracing
    from loopify.nn.routing import _cache_of, _call_unit

    spiral: Spiral = rec.spiral
    cache = _cache_of(kwargs)
    if cache is not None:
        return run_cached(rec, args, kwargs, where, s, image, cache)
    box = args if where == "arg" else kwargs
    h = box[s]
    valid_tok = valid_tokens(args, kwargs, h)
    names = block_parameters(rec.blocks[0])
    poolings: dict[int, Pooling] = {}
    runs = [0] * len(rec.blocks)
    out = None
    for _i, position, factor, unit in _units(rec):
        if factor == 1:
            out, h, _ = _call_unit(rec, unit, h, args, where, s, kwargs, None, runs)
            continue
        if factor not in poolings:
            poolings[factor] = Pooling(factor, valid_tok, image, dense=_tracing())

        def blocks(x, c_args, c_kwargs, _unit=unit):
            o, y, _ = _call_unit(rec, _unit, x, c_args, where, s, c_kwargs, None, runs)
            return o, y
        out, h = coarse_step(spiral, position, poolings[factor], h, args, kwargs, where, s, names, blocks)
    box[s] = h
    return out, h


class DecodeState:
    """What a coarse step keeps between calls while decoding (one row): ``seen`` tokens so far,
    ``partial`` the sum of the step's input over the current group's earlier tokens ([1, D]),
    ``u_last`` the latest complete group's update ([1, D]; zero before the first)."""

    def __init__(self):
        self.seen = 0
        self.partial: torch.Tensor | None = None
        self.u_last: torch.Tensor | None = None


def decode_refusal(rec, cache, batch: int, image) -> str | None:
    """Why ``rec`` cannot decode this call against ``cache`` (None when it can)."""
    if not rec.spiral.spec.causal:
        return "a non-causal loop (an encoder) does not decode"
    if getattr(cache, "policy", "per-depth") != "per-depth":
        return (f"KV policy {cache.policy!r} shares slots between recursions, whose coarse and full-resolution "
                "entries differ: use per-depth")
    if batch != 1:
        return "decode one prompt at a time (groups of a left-padded row would start at its padding)"
    if image is not None and bool(image.any()):
        return "image positions (groups that stop at a modality boundary) do not decode yet"
    return None


def run_cached(rec, args: list, kwargs: dict, where: str, s, image, cache):
    """The multi-resolution forward of one call against a KV cache (prefill, or decoded tokens):
    see the module docstring. The full-resolution steps run as in :func:`run`; each coarse
    step runs only the groups that complete in this call."""
    from loopify.nn.routing import _call_unit

    spiral: Spiral = rec.spiral
    box = args if where == "arg" else kwargs
    h = box[s]
    why = decode_refusal(rec, cache, h.shape[0], image)
    if why:
        raise ValueError(f"loop {rec.key}: a multi-resolution loop cannot decode here: {why}")
    states = cache.__dict__.setdefault("spiral", {})
    names = block_parameters(rec.blocks[0])
    runs = [0] * len(rec.blocks)
    out = None
    for i, position, factor, unit in _units(rec):
        if factor == 1:
            out, h, _ = _call_unit(rec, unit, h, args, where, s, kwargs, None, runs)
            continue
        st = states.setdefault((rec.key, i), DecodeState())
        o, h = _coarse_cached(spiral, position, factor, st, h, args, kwargs, where, s, names,
                              lambda x, a, kw, _unit=unit: _call_unit(rec, _unit, x, a, where, s, kw, None, runs)[:2])
        out = o if o is not None else out
    box[s] = h
    if out is None:  # no block ran in this call (every coarse group still incomplete, no fine step)
        tail = getattr(rec, "layer_tail", None)
        out = (h, *[None] * len(tail)) if tail else h
    return out, h


def _coarse_cached(spiral: Spiral, position: int, r: int, st: DecodeState, h, args, kwargs, where, s, names, blocks):
    t_len = h.shape[1]
    p0 = st.seen
    g0, g_last = p0 // r, (p0 + t_len - 1) // r
    n_groups = g_last - g0 + 1
    t = torch.arange(p0, p0 + t_len, device=h.device)
    rel = t // r - g0                                              # [T] each token's group, from g0
    onehot = (rel.unsqueeze(0) == torch.arange(n_groups, device=h.device).unsqueeze(1)).to(h.dtype)
    sums = torch.matmul(onehot, h[0])                              # [G, D]
    if st.partial is not None:
        sums[0] = sums[0] + st.partial[0]
    complete = n_groups if (g_last + 1) * r - 1 <= p0 + t_len - 1 else n_groups - 1
    u_last = st.u_last if st.u_last is not None else torch.zeros_like(h[:, 0])
    out = None
    if complete:
        x = (sums[:complete] / r).unsqueeze(0)                     # [1, n, D]
        ends = (torch.arange(g0, g0 + complete, device=h.device) + 1) * r - 1 - p0   # each group's anchor in the call
        c_args, c_kwargs = _cached_args(args, kwargs, names, ends, t_len, g0, complete, h.dtype, s if where == "arg" else None,
                                        s if where == "kw" else None)
        out, y = blocks(x, c_args, c_kwargs)
        u = (y - x)[0]                                             # [n, D]
        table = torch.cat([u_last, u], dim=0)                      # index j: the update of group g0 + j - 1
        st.u_last = u[-1:]
    else:
        table = u_last
    upd = table[rel].unsqueeze(0)                                  # token of group g gets group g - 1's
    st.partial = sums[complete:complete + 1] if complete < n_groups else None
    st.seen = p0 + t_len
    return out, h + spiral.gate_at(position).to(h.dtype) * upd


def _cached_args(args, kwargs, names, ends, seq, g0, n, dtype, skip_arg, skip_kw):
    """The block's arguments for ``n`` complete groups anchored at call positions ``ends``: the
    sequence tensors gathered there, the attention mask over the coarse slot's ``g0`` cached
    groups and the new ones (causal over groups, in the model's mask form), ``cache_position``
    the groups' indices."""
    from loopify.nn.routing import _gather_tokens

    idx = ends.view(1, -1)
    allowed = torch.arange(g0 + n, device=ends.device).view(1, -1) <= (g0 + torch.arange(n, device=ends.device)).view(-1, 1)

    def one(k, v):
        if k == "cache_position":
            return torch.arange(g0, g0 + n, device=ends.device)
        is_mask = k == "attention_mask" or (isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-2] == seq)
        if is_mask:
            given = isinstance(v, torch.Tensor)
            return _form(allowed.unsqueeze(0), v.dtype if given else dtype, additive=not given or v.dtype != torch.bool)
        return _gather_tokens(v, idx, 1, seq)

    return _each_arg(args, names, skip_arg, one), _each_arg(kwargs, names, skip_kw, one)


def spirals(module: nn.Module) -> dict[str, Spiral]:
    """Every resolution schedule of a module's loops, by loop path."""
    from loopify.nn.recursion import recursions

    return {p: r.spiral for p, r in recursions(module).items() if r.spiral is not None}


def coarse_flops_fraction(schedule: tuple[int, ...], steps: int) -> float:
    """The loop's block FLOPs at ``steps`` steps relative to full-resolution steps (token-wise
    work scales with 1/r; attention's S^2 part with 1/r^2, ignored here: an upper bound)."""
    return sum(1 / r for _, r in SpiralSpec(schedule, 1, False).factors(steps)) / steps
