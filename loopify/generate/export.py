"""The decode step as one exportable program: explicit KV tensors in and out, a symbolic token
count and past length, and each loop's count as an input.

``Step(wrapper, layout)`` is a module whose ``forward(input_ids [B, T], attention_mask [B, P+T],
position_ids [B, T], past_k [S, B, H, P, D], past_v, loops [n_loops] int64) -> (logits [B, T, V],
new_k [S, B, H, T, D], new_v)`` runs the model's own code. Its cache (:class:`ExportKV`) reads slot
``i`` of ``past_k`` and records the new tokens' keys and values per slot (the importer drops
in-place writes, so they are outputs). The S slots are laid out by :func:`layout`: the attention
layers outside loops, then each loop's slots under the KV policy.

A loop is unrolled to its maximum count, each recursion step under ``torch.cond(step < n, ...)``
with the step's slots and the loop's carry as explicit operands, so the compiled program takes
the loop count at run time (TVM imports ``cond`` as ``relax.If``) and stores the shared weights
once. A step that does not run leaves its hidden state and writes zero keys (never read: those
slots belong to depths that did not run).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from transformers.cache_utils import Cache

from loopify.nn import kv
from loopify.nn.recursion import _CURRENT, Depth, Recursion, _capture_begin, _slot, recursions, unkey


@dataclass(frozen=True)
class Layout:
    """Where each cache slot lives in the stacked KV tensors."""

    outside: tuple[int, ...]                 # layer indices of attention layers outside loops
    loops: tuple[tuple[str, int, int], ...]  # (loop key, first slot, slots) in model order
    policy: str
    #: the coarse schedule positions of multi-resolution loops, (loop key, position, factor): each
    #: has a decode state (the open group's partial sum, the last group's update) in ``spiral_state``
    spiral: tuple[tuple[str, int, int], ...] = ()
    #: loops with a Mixture-of-Recursions router: the steps take and return each slot's validity
    #: per token (``route_valid``, recursion-wise KV caching) and return each token's depth
    routed: tuple[str, ...] = ()

    @property
    def slots(self) -> int:
        return len(self.outside) + sum(n for _, _, n in self.loops)

    def index(self, key: tuple) -> int:
        if key[0] == "layer":
            return self.outside.index(key[1])
        for loop, first, n in self.loops:
            if loop == key[1]:
                return first + key[2]
        raise KeyError(key)

    def to_dict(self) -> dict:
        return {"outside": list(self.outside), "loops": [list(l) for l in self.loops], "policy": self.policy,
                "slots": self.slots, "spiral": [list(c) for c in self.spiral], "routed": list(self.routed)}


def layout(module, policy: str, outside: list[int], cached: set[str] | None = None) -> Layout:
    """The slot layout of a model: ``outside`` = the layer indices of its attention layers that
    are not in loops (as the attention modules' ``layer_idx`` says); each loop that uses the
    cache (``cached``: their keys; default all) then has a slot per depth it runs at its maximum
    count (per-depth) or per block (shared policies)."""
    loops, first, coarse, routed = [], len(outside), [], []
    for rec in recursions(module).values():
        if cached is not None and rec.key not in cached:
            continue
        if rec.router is not None:
            _routed_decodable(rec, policy)
            routed.append(rec.key)
        n = len(rec.depth_schedule(rec.spec.max_loops)) if policy == "per-depth" else len(rec.blocks)
        loops.append((rec.key, first, n))
        first += n
        if rec.spiral is not None:
            _spiral_decodable(rec, policy)
            coarse += [(rec.key, j, r) for j, r in enumerate(rec.spiral.spec.schedule) if r > 1]
    return Layout(tuple(outside), tuple(loops), policy, tuple(coarse), tuple(routed))


def _routed_decodable(rec: Recursion, policy: str) -> None:
    """A routed loop in a generation artifact: a decode-safe decision (token-choice, or
    expert-choice by threshold), KV policy per-depth or share-first, no connector. Else
    NotImplementedError (one line at the CLI)."""
    why = None
    if policy == "last":
        why = "KV policy 'last' rewrites entries a routed depth does not hold for every token: use per-depth or share-first"
    elif rec.router.kind == "expert" and rec.router.select != "threshold":
        why = "top-k selection reads the whole sequence (not decode-safe): calibrate thresholds (loopify train does)"
    elif rec.connector is not None:
        why = "routers with connectors are not combined"
    elif rec.spiral is not None:
        why = "routers with a resolution schedule are not combined"
    if why:
        raise NotImplementedError(f"loop {rec.key}: a routed generation artifact: {why}")


def _spiral_decodable(rec: Recursion, policy: str) -> None:
    """A multi-resolution loop in a generation artifact: one slot per schedule position
    (per-depth), no per-depth parameters (a position's step index depends on the run-time
    count), the schedule as long as the loop's maximum count. Else NotImplementedError (one
    line at the CLI)."""
    why = None
    if policy != "per-depth":
        why = f"KV policy {policy!r} shares slots between recursions, whose coarse and full-resolution entries differ"
    elif rec.depth_params or rec.lora_A:
        why = "per-depth parameters (LoRA, per-depth norms) with a resolution schedule are not compiled for generation yet"
    elif len(rec.spiral.spec.schedule) != rec.spec.max_loops:
        why = "the schedule must be as long as the loop's maximum count"
    elif not rec.spiral.spec.causal:
        why = "a non-causal loop does not decode"
    if why:
        raise NotImplementedError(f"loop {rec.key}: a multi-resolution generation artifact: {why}")


class ExportKV(Cache):
    """Explicit KV for export: slot ``i`` reads ``past[i]``; the new tokens' entries per slot
    are kept in ``new`` (index -> (keys, values)) to be returned."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor, lay: Layout, index_of=None, plan=None,
                 state: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 attn: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.past_k, self.past_v, self.lay = past_k, past_v, lay
        # routed loops: each slot's validity per past token [S, B, P] (1 where the token ran the
        # slot's depth), the call's new validity per slot and each routed loop's depth per token;
        # ``attn``: the step's 2-D attention mask [B, P + T]
        self.valid, self.attn = valid, attn
        self.rows: list | None = None  # routed loops' gathered buckets (Step's route_rows)
        self.levels = 0
        self.new_valid: dict[int, torch.Tensor] = {}
        self.depths: dict[str, torch.Tensor] = {}
        self.state = state  # [Q, B, 2, D] multi-resolution decode states (see Layout.spiral)
        self.new_state: dict[int, torch.Tensor] = {}
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.index_of = index_of or lay.index
        # Inside a cond branch the slots come in call order (the branch is traced by dynamo,
        # which cannot follow the loop's context variable): one attention call per depth.
        self.plan = list(plan) if plan is not None else None
        self.calls = 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.plan is not None:
            where = self.plan[self.calls]
            self.calls += 1
        else:
            where = kv.slot(self.lay.policy, _CURRENT.get(), layer_idx)
        i = self.index_of(where.key)
        pk, pv = self.past_k[i], self.past_v[i]
        if where.mode == "read":
            k, v = self.new[i]
            return torch.cat([pk, k], -2), torch.cat([pv, v], -2)
        self.new[i] = (key_states, value_states)
        return torch.cat([pk, key_states], -2), torch.cat([pv, value_states], -2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_k.shape[-2]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.past_k.shape[-2] + query_length, 0

    def stacked(self, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, B, H, T, D] keys and values of the new tokens (zeros for slots nothing wrote)."""
        b, h, _, d = like.shape[1:]
        zero = like.new_zeros((b, h, t, d))
        ks = [self.new.get(i, (zero, zero))[0] for i in range(self.lay.slots)]
        vs = [self.new.get(i, (zero, zero))[1] for i in range(self.lay.slots)]
        return torch.stack(ks), torch.stack(vs)


_COUNTS: dict = {}
#: per loop: the shapes its tensor arguments had on the example (eager), to pin sizes that export
#: can only see as data-dependent (Idefics3's count of real images) inside cond branches
_SHAPES: dict = {}
_CACHE_SLOT = object()  # where the cache sits among a loop call's arguments
_STATE_SLOT = object()  # where the hidden state sits (it is the branches' first operand)


@contextlib.contextmanager
def _unrolled(module, counts: dict[str, torch.Tensor]):
    """Run every loop of ``module`` as its unrolled, cond-guarded form while exporting."""
    loops = recursions(module)
    saved = {}
    try:
        for rec in loops.values():
            saved[id(rec)] = rec.__dict__.get("forward")
            rec.forward = _cond_forward.__get__(rec)
        _COUNTS.clear()
        _COUNTS.update(counts)
        yield
    finally:
        for rec in loops.values():
            if saved[id(rec)] is None:
                rec.__dict__.pop("forward", None)
            else:
                rec.forward = saved[id(rec)]
        _COUNTS.clear()


def _groups(rec: Recursion) -> list[list[Depth]]:
    """The loop's depths at its maximum count, in order, cut where the guard changes: a depth
    runs at count n iff its block's recursion index is below n (cycle: its step; sequence: its
    repetition; middle-*: the first and last layers always), so consecutive depths with the same
    recursion index share one ``cond``."""
    out: list[list[Depth]] = []
    runs = [0] * len(rec.blocks)
    steps = rec.steps(rec.spec.max_loops)
    index = 0
    for i, step in enumerate(steps):
        for depth in step:
            b = rec.block_for_depth(depth)
            d = Depth(rec.key, index, i, b, depth, runs[b])
            index += 1
            runs[b] += 1
            if out and out[-1][-1].recursion == d.recursion and out[-1][-1].step == d.step:
                out[-1].append(d)
            else:
                out.append([d])
    return out


def _cond_forward(rec: Recursion, *args, **kwargs):
    """``rec.forward`` unrolled over its maximum count, each group of depths under
    ``cond(recursion < n)`` with its KV slots as explicit operands."""
    n = _COUNTS[rec.key]
    # a group loop (period p): depth d takes the arguments of group position d % p
    boxes = [(list(a), dict(kw)) for a, kw in rec.phase_calls(list(args), kwargs)]
    where, s = rec._state(*boxes[0])
    h = (boxes[0][0] if where == "arg" else boxes[0][1])[s]
    for a, kw in boxes:
        (a if where == "arg" else kw)[s] = _STATE_SLOT
    paths, spec = pytree.tree_flatten_with_path(boxes)
    leaves = [x for _, x in paths]
    # the cache (by keyword, or positional as nanoGPT passes it): replaced by a local one in branches
    caches = [x for x in leaves if isinstance(x, ExportKV)]
    cache = caches[0] if caches else None
    if cache is not None and rec.key not in {k for k, _, _ in cache.lay.loops}:
        cache = None
    leaves = [_CACHE_SLOT if isinstance(x, ExportKV) else x for x in leaves]
    tensor_at = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    # the side operands that run along the tokens (a routed step gathers them with its tokens)
    along = [j for j, i in enumerate(tensor_at)
             if {getattr(k, "key", None) for k in paths[i][0]} & {"position_embeddings", "position_ids"}]
    h, *side = _pin_data_dependent_sizes(rec, [h, *[leaves[i] for i in tensor_at]])
    # branches get every tensor as an operand: none may hide in what they close over
    leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    capture = _capture_begin()
    h_in = h
    from loopify.nn.routing import mask_position

    for block in rec.blocks:  # (outside the branches, which cannot run inspect)
        mask_position(block)
    with _without_capture_hooks(rec):
        if rec.router is not None:
            h, after = _routed_groups(rec, h, side, leaves, spec, tensor_at, where, s, cache, n, along)
        elif rec.spiral is not None:
            h, after = _spiral_groups(rec, h, side, leaves, spec, tensor_at, where, s, cache, n)
        else:
            h, after = _cond_groups(rec, h, side, leaves, spec, tensor_at, where, s, cache, n)
    if capture is not None:  # what the hooks would have added (the first call adds its input too) ...
        calls = sum(len(g) for g in _groups(rec))
        capture[0].extend(([h_in] if capture[1] == 0 else []) + [None] * calls)
        rec._capture_end(capture, calls, after, h)  # ... rewritten as the loop does in eager mode
    return h


def _pin_data_dependent_sizes(rec: Recursion, tensors: list) -> list:
    """A size export only knows as data-dependent (an unbacked symbol: a boolean mask's count)
    cannot flow into a cond branch. Its value on the example is read off the hidden state's
    shape in eager mode (recorded by :func:`record_shapes`), and every tensor whose shape holds
    it is reshaped to the concrete size, as the importer pins boolean-mask counts (the
    manifest's assumptions; a mask with another count at run time makes the selection NaN)."""
    import sympy
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    shape = _SHAPES.get(rec.key)
    if shape is None:
        return tensors
    values = {}
    for d, v in zip(tensors[0].shape, shape):
        if isinstance(d, torch.SymInt) and free_unbacked_symbols(d) and isinstance(d.node.expr, sympy.Symbol):
            values[d.node.expr] = v
    if not values:
        return tensors
    out = []
    for t in tensors:
        if any(isinstance(d, torch.SymInt) and free_unbacked_symbols(d) for d in t.shape):
            sizes = [int(d.node.expr.subs(values)) if isinstance(d, torch.SymInt) and free_unbacked_symbols(d) else d
                     for d in t.shape]
            t = t.reshape(sizes)
        out.append(t)
    return out


@contextlib.contextmanager
def record_shapes(module):
    """Record, on one eager run, the shapes of every loop's tensor arguments (for
    :func:`_pin_data_dependent_sizes`)."""
    handles = []
    for rec in recursions(module).values():
        def hook(mod, args, kwargs):
            where, s = mod._state(list(args), kwargs)
            _SHAPES[mod.key] = tuple((args[s] if where == "arg" else kwargs[s]).shape)
        handles.append(rec.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _without_capture_hooks(rec: Recursion):
    """Hugging Face's output-capturing hooks on the blocks append to a list outside the ``cond``
    branches (which must not have side effects); the loop records its hidden states itself."""
    saved = []
    for block in rec.blocks:
        for m in block.modules():
            for k, fn in list(m._forward_hooks.items()):
                if getattr(fn, "__name__", "") == "output_capturing_hook":
                    saved.append((m, k, fn))
                    del m._forward_hooks[k]
    try:
        yield
    finally:
        for m, k, fn in saved:
            m._forward_hooks[k] = fn


def _group_slots(rec, cache, group):
    """(slot of each depth, the group's slot indices (contiguous), the indices it only reads)."""
    slots = [kv.slot(cache.lay.policy, d, 0) for d in group]
    idx = sorted({cache.index_of(sk.key) for sk in slots})
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"loop {rec.key}: the slots of one step are not contiguous ({idx})")
    reads = sorted({cache.index_of(sk.key) for sk in slots if sk.mode == "read"})
    return slots, idx, reads


def _cond_groups(rec, h, side, leaves, spec, tensor_at, where, s, cache, n):
    """The groups under cond; returns the hidden state and the state after each depth (the
    output of the depth's group: a group that does not run passes its input through)."""
    after: dict[int, torch.Tensor] = {}
    steps = rec.steps(rec.spec.max_loops)
    for group in _groups(rec):
        conn = _connector_operands(rec, group, after, steps)
        taps = len(group) if rec.connector is not None and group[0].step + 1 < len(steps) else 0
        if cache is None:  # a loop without a KV cache (a vision tower): the hidden state alone
            run = _Run((rec, group, None, (), leaves, spec, tensor_at, where, s, None), conn, taps)
            out = torch.cond(n > group[0].recursion, run, _Skip(len(side) + len(conn), 0, taps=taps),
                             (h, *side, *conn))
            h = _record_after(after, group, out, taps)
            continue
        slots, idx, reads = _group_slots(rec, cache, group)
        # slots an earlier recursion wrote and this one replaces (Ouro's "last"): when the step
        # does not run, they keep the earlier entries (not zeros)
        held = [j for j in idx if j not in reads and j in cache.new]
        # the whole past goes in (each branch reads its slots inside): a slice taken out here
        # was a new buffer of a new size at every decode step, outside any memory plan
        ops = (h, *side, *conn, cache.past_k, cache.past_v,
               *[cache.new[j][0].clone() for j in reads], *[cache.new[j][1].clone() for j in reads],
               *[cache.new[j][0].clone() for j in held], *[cache.new[j][1].clone() for j in held])
        ctx = (rec, group, idx, reads, leaves, spec, tensor_at, where, s, cache)
        skip = _Skip(len(side) + len(conn), len(idx), 2 * len(reads), [idx.index(j) for j in held], taps)
        out = torch.cond(n > group[0].recursion, _Run(ctx, conn, taps), skip, ops)
        h, nk, nv = _record_after(after, group, out[:1] + out[3:], taps), out[1], out[2]
        for q, j in enumerate(idx):
            if j not in reads:
                cache.new[j] = (nk[q], nv[q])
    return h, after


def _spiral_groups(rec, h, side, leaves, spec, tensor_at, where, s, cache, n):
    """A multi-resolution loop unrolled over its schedule: position j (one recursion step)
    runs when n > N - 1 - j (the last n positions, as in eager mode); a full-resolution
    position is an ordinary step, a coarse one a :class:`_CoarseRun` with its decode state as
    an operand and an output. Slots are per position (the layout's per-depth slots at the
    maximum count)."""
    if cache is None:
        raise NotImplementedError(f"loop {rec.key}: a multi-resolution loop without a KV cache (a vision tower) is "
                                  "not compiled for generation yet")
    after: dict[int, torch.Tensor] = {}
    sched = rec.spiral.spec.schedule
    for group in _groups(rec):
        j = group[0].step
        if any(d.step != j for d in group):
            raise NotImplementedError(f"loop {rec.key}: a schedule position must be one recursion step")
        idx = sorted({cache.index_of(kv.slot(cache.lay.policy, d, 0).key) for d in group})
        ops = (h, *side, cache.past_k, cache.past_v)
        ctx = (rec, group, idx, [], leaves, spec, tensor_at, where, s, cache)
        runs = n > len(sched) - 1 - j
        if sched[j] == 1:
            out = torch.cond(runs, _Run(ctx), _Skip(len(side), len(idx)), ops)
        else:
            q, r = cache.lay.spiral.index((rec.key, j, sched[j])), sched[j]
            # a call in which no group ends (most decoded tokens) needs no block: only the
            # previous group's update and the open group's sum (a second, cheap branch)
            # ((P + T) // r > P // r, from the sizes: a reduction over the positions here made TVM
            # 0.27's FuseTIR fail on the whole step, "VarRemapGet(source) == nullptr")
            p_, t_ = cache.past_k.shape[3], h.shape[1]
            zero = torch.zeros((), dtype=torch.long, device=h.device)
            ends = (zero + (p_ + t_) // r) > (zero + p_ // r)
            base = torch.zeros(1, dtype=torch.long, device=h.device) + p_  # the past length, a tensor (see _CoarseRun)
            out = torch.cond(runs & ends, _CoarseRun(ctx, r), _CoarseSkip(len(side), len(idx)),
                             ops + (cache.state[q], base))
            out = torch.cond(runs & ~ends, _CoarseOpen(rec, j), _PassThrough(), tuple(out))
            cache.new_state[q] = out[3]
        h, nk, nv = out[0], out[1], out[2]
        after.update({d.depth: h for d in group})
        for pos, slot in enumerate(idx):
            cache.new[slot] = (nk[pos], nv[pos])
    return h, after


def _routed_units(rec: Recursion) -> list[tuple[int | None, list[Depth]]]:
    """The loop's routed units (:func:`loopify.nn.routing.units`) at its maximum count, each as
    (recursion step or None for straight depths, its depths)."""
    from loopify.nn.routing import units

    saved = rec.loops
    rec.loops = rec.spec.max_loops
    try:
        us = units(rec)
    finally:
        rec.loops = saved
    runs = [0] * len(rec.blocks)
    out = []
    for u in us:
        ds = []
        for depth, index in zip(u.depths, u.indices):
            b = rec.block_for_depth(depth)
            ds.append(Depth(rec.key, index, u.step if u.step is not None else 0, b, depth, runs[b]))
            runs[b] += 1
        out.append((u.step, ds))
    return out




def _routed_groups(rec, h, side, leaves, spec, tensor_at, where, s, cache, n, along=()):
    """A routed loop (Mixture-of-Recursions) unrolled over its maximum count, batch 1.

    Each routed unit (recursion step r) takes the router's decision from the state entering it,
    exactly as :func:`loopify.nn.routing.run` does (token-choice: every token's depth at the
    first step, its argmax over the first n logits; expert-choice: ``z_r >= threshold[r]`` among
    the tokens still active), and runs under ``cond(n > r and any token kept)``: a decoded token
    the router stops runs none of the step's blocks (the compute saved). Inside, the blocks run
    on the call's tokens with the recursion-wise attention mask: a key is a token the step kept
    (its slot's validity: ``route_valid`` for the past, the decision for the call's tokens) at or
    before the query; a kept token gets ``h + s (f(h) - h)``, the others keep ``h``. The slot's
    validity for the call's tokens is an output (``new_valid``), and each token's depth (the
    steps it took) too. Straight units (middle-* first and last layers) run as unrouted groups."""
    router = rec.router
    after: dict[int, torch.Tensor] = {}
    b, t = h.shape[0], h.shape[1]
    active_box = [torch.ones(b, t, dtype=torch.bool, device=h.device)]
    taken = torch.zeros(b, t, dtype=torch.long, device=h.device)
    token_plan_box, decided, taken_at = [None], {}, set()
    for r, group in _routed_units(rec):
        runs = n > (r if r is not None else 0)
        keep, scale = _decide(router, r, h, n, decided, token_plan_box, active_box)
        if r is not None and r not in taken_at:
            taken_at.add(r)
            taken = taken + (keep & runs).long()
        pred = runs if r is None else runs & (keep.long().sum() > 0)  # (TVM imports no aten.any)
        if scale is None:
            scale = torch.ones(b, t, dtype=h.dtype, device=h.device)
        if cache is None:  # a loop without KV (a vision tower): the call's tokens are all there is
            ar = torch.arange(t, device=h.device)
            ok = (keep.unsqueeze(1) & (ar.view(1, -1) <= ar.view(-1, 1))) | (ar.view(1, -1) == ar.view(-1, 1))
            # as eager: when every token is kept the blocks see the model's own mask (a vision
            # tower attends both ways), else the kept tokens at or before the query
            every = keep.long().sum() == b * t
            mask = _mask_form(ok | every, side, h.dtype)
            if _model_mask(side) is not None:
                mask = torch.where(every, _model_mask(side), mask)
            ops = (h, *side, mask, keep, scale)
            ctx = (rec, group, None, [], leaves, spec, tensor_at, where, s, None)
            h = torch.cond(pred, _RoutedRun(ctx, routed=r is not None), _Skip(len(side) + 3, 0), ops)
            after.update({d.depth: h for d in group})
            continue
        slots, idx, reads = _group_slots(rec, cache, group)
        # the keys' validity: the slot's past entries, and for the call's tokens what this step
        # kept (a slot this step only reads: what its writer kept)
        first = cache.index_of(slots[0].key)
        cur = cache.new_valid[first] if slots[0].mode == "read" else keep
        mask = _routed_mask(cache, first, cur, t, side, h.dtype)
        ops = (h, *side, mask, keep, scale, cache.past_k, cache.past_v,
               *[cache.new[j][0].clone() for j in reads], *[cache.new[j][1].clone() for j in reads])
        ctx = (rec, group, idx, reads, leaves, spec, tensor_at, where, s, cache)
        skip = _Skip(len(side) + 3, len(idx), 2 * len(reads))
        if r is not None and cache.rows is not None:
            h, nk, nv = _bucketed(ctx, list(along), cache.levels, pred, keep, ops, skip,
                                  (cache.valid[first], cur, cache.rows))
        else:
            out = torch.cond(pred, _RoutedRun(ctx, routed=r is not None), skip, ops)
            h, nk, nv = out[0], out[1], out[2]
        after.update({d.depth: h for d in group})
        for q, j in enumerate(idx):
            if j not in reads:
                cache.new[j] = (nk[q], nv[q])
                cache.new_valid[j] = keep & runs
    if cache is not None:
        cache.depths[rec.key] = taken
    return h, after


def _decide(router, r, h, n, decided: dict, token_plan_box: list, active_box: list):
    """(keep [B, T] bool, scale [B, T] or None) of routed unit step ``r`` (None: a straight
    unit, every token), as :class:`loopify.nn.routing._Decisions` decides: token-choice every
    token's depth at the first step (argmax over the first n logits, ties to the deepest),
    expert-choice ``z_r >= threshold[r]`` among the tokens still active; a step of sequence
    sharing (several units) is decided at its first unit."""
    b, t = h.shape[0], h.shape[1]
    N = router.spec.steps
    if r is None:
        return torch.ones(b, t, dtype=torch.bool, device=h.device), None
    if r in decided:
        return decided[r]
    if router.kind == "token":
        if token_plan_box[0] is None:
            z = router.logits(h)                                            # [B, T, N]
            j = torch.arange(N, device=h.device)
            zc = (z + router.balance_bias.to(z.dtype)).masked_fill(j >= n, float("-inf"))
            best = zc.amax(-1, keepdim=True)
            # the deepest index at the maximum (the eager argmax of the flipped logits)
            choice = torch.where(zc == best, j, torch.zeros_like(j) - 1).amax(-1)
            token_plan_box[0] = (choice + 1, router.scale(z.gather(-1, choice.unsqueeze(-1)).squeeze(-1)))
        depth, scale = token_plan_box[0]
        keep = depth > r
    else:
        z = router.logits(h)[..., min(r, N - 1)]
        keep = active_box[0] & (z >= router.threshold[min(r, N - 1)])
        active_box[0] = keep
        scale = router.scale(z)
    decided[r] = (keep, scale)
    return keep, scale


def _routed_mask(cache, slot: int, current: torch.Tensor, t: int, side, dtype) -> torch.Tensor:
    """[B, 1, T, P + T] attention mask of a routed unit in the model's mask form: query i sees
    the past keys valid in ``slot`` (``route_valid``: every past token is before every query),
    and the call's key j <= i when it is valid (``current`` [B, T]: what the step kept, or its
    writer kept); a query also sees its own key, so that a token the step did not keep has no
    empty softmax row (its result is discarded); padding (the step's 2-D mask) never. Built
    without the past length as a value (``arange(T) + P`` in a kernel broke TVM 0.27's FuseTIR,
    see :class:`_CoarseRun`)."""
    past = cache.valid[slot] > 0.5                                        # [B, P]
    ar = torch.arange(t, device=current.device)
    causal = ar.view(1, -1) <= ar.view(-1, 1)                             # [T, T]: key j <= query i
    own = ar.view(1, -1) == ar.view(-1, 1)
    now = (current.unsqueeze(1) & causal) | own                           # [B, T, T]
    ok = torch.cat([past.unsqueeze(1).expand(-1, t, -1), now], -1)        # [B, T, P + T]
    if cache.attn is not None:
        ok = ok & (cache.attn > 0).unsqueeze(1)
    return _mask_form(ok, side, dtype)


def _mask_form(ok: torch.Tensor, side, dtype) -> torch.Tensor:
    """[B, q, k] allowed -> the model's 4-D mask form (bool, or additive in its dtype)."""
    from loopify.nn.spiral import _form

    model_mask = _model_mask(side)
    if model_mask is None:
        return _form(ok, dtype, additive=True)
    return _form(ok, model_mask.dtype, additive=model_mask.dtype != torch.bool)


def _model_mask(side):
    """The model's 4-D attention mask among a block call's tensor arguments (None: it passed none)."""
    return next((x for x in side if isinstance(x, torch.Tensor) and x.dim() == 4), None)


def _record_after(after: dict, group, out, taps: int) -> torch.Tensor:
    """Note the state after each depth of a group (the per-depth states a connector's taps need,
    else the group's output for each) and return the group's output."""
    if not taps:
        h = out if isinstance(out, torch.Tensor) else out[0]
        after.update({d.depth: h for d in group})
        return h
    h, states = out[0], out[1]
    after.update({d.depth: states[q] for q, d in enumerate(group)})
    return h


def _connector_operands(rec, group, after: dict, steps: list[list[int]]) -> list[torch.Tensor]:
    """What the connector reads before a group that starts recursion step i > 0: the states
    after each depth of step i - 1 (its taps), then the modality mask where the loop has one
    (module form: read off the model's run, :func:`loopify.nn.connectors.current_modality`)."""
    if rec.connector is None or group[0].step == 0:
        return []
    step = steps[group[0].step]
    if group[0].depth != step[0] or len(group) != len(step):
        raise NotImplementedError(f"loop {rec.key}: compiled generation of a connector needs each recursion "
                                  "step to run as a whole (a cycle schedule); generate in PyTorch (the .pt2)")
    # clones: the states are views of one stacked branch output, and cond operands may not alias
    taps = [after[d].clone() for d in steps[group[0].step - 1]]
    if rec.modality_token is not None:
        from loopify.nn.connectors import current_modality

        mask = current_modality()
        if mask is not None:
            taps.append(mask)
    return taps


class _Run:
    """The true branch: the group's depths, with a cache over the group's slots (and first the
    connector, on the ``n_conn`` operands after the side inputs: see :func:`_connector_operands`)."""

    def __init__(self, ctx, conn: list | None = None, taps: int = 0):
        self.ctx, self.n_conn, self.taps = ctx, len(conn or []), taps
        self.masked = bool(conn) and conn[-1].dtype == torch.bool  # the modality mask follows the taps

    def __call__(self, h, *rest):
        rec, group, idx, reads, leaves, spec, tensor_at, where, s, cache = self.ctx
        at = len(tensor_at) + self.n_conn
        side = rest[:len(tensor_at)]
        if self.n_conn:
            taps = list(rest[len(tensor_at):at])
            mask = [taps.pop()] if self.masked else [None] * (rec.modality_token is not None)
            h = rec.connector(h, taps, group[0].step, *mask)
        if cache is None:
            h, states = self._blocks(h, side, None)
            return (h, torch.stack(states)) if self.taps else h
        pk, pv = rest[at], rest[at + 1]
        prev = rest[at + 2:at + 2 + 2 * len(reads)]
        plan = [kv.slot(cache.lay.policy, d, 0) for d in group]
        local = ExportKV(pk, pv, cache.lay, index_of=cache.index_of, plan=plan)
        for j, k_, v_ in zip(reads, prev[:len(reads)], prev[len(reads):]):
            local.new[j] = (k_, v_)
        h, states = self._blocks(h, side, local)
        zero = pk.new_zeros((pk.shape[1], pk.shape[2], h.shape[-2], pk.shape[4]))
        # a slot this group only reads (share-first's later recursions) returns zeros, never its
        # operand: a cond branch may not return an input (aliasing), and the caller keeps the
        # writer's entry anyway
        got = [None if j in reads else local.new.get(j) for j in idx]
        return (h, torch.stack([g[0] if g is not None else zero for g in got]),
                torch.stack([g[1] if g is not None else zero for g in got]), *([torch.stack(states)] if self.taps else []))

    def _blocks(self, h, side, cache, mask=None):
        """The group's depths on ``h``, the block call's other arguments rebuilt from the
        branch operands (``cache`` in the cache's place: None for a loop without KV; ``mask``,
        when given, in the 4-D attention mask's place)."""
        rec, group, _idx, _reads, leaves, spec, tensor_at, where, s, _cache = self.ctx
        lv = [cache if x is _CACHE_SLOT else x for x in leaves]
        for pos, t in zip(tensor_at, side):
            lv[pos] = mask if mask is not None and t.dim() == 4 else t
        phases = pytree.tree_unflatten(lv, spec)
        states = []
        for d in group:
            a, kw = phases[d.depth % len(phases)]
            box = a if where == "arg" else kw
            from loopify.nn.routing import mask_position, put_mask

            if mask is not None and (mask_position(rec.blocks[d.block]) >= 0 or "attention_mask" in kw):
                a = list(a)  # (the model may have passed None: its attention's causal flag)
                put_mask(rec.blocks[d.block], a, kw, mask)
                box = a if where == "arg" else kw
            box[s] = h
            out = rec.call_block(d.block, _overrides(rec, d), tuple(a), kw)
            h = out[0] if isinstance(out, tuple) else out
            states.append(h)
        return h, states


class _Skip:
    """The false branch: the hidden state unchanged, zero keys for the group's slots, except
    the ``held`` ones (positions in the group's slots), which keep the entries passed in after
    the ``n_reads`` read operands; ``taps``: the per-depth states too (all ``h``)."""

    def __init__(self, n_side: int, n_slots: int, n_reads: int = 0, held: list[int] | None = None, taps: int = 0):
        self.n_side, self.n_slots, self.n_reads, self.held = n_side, n_slots, n_reads, list(held or [])
        self.taps = taps

    def __call__(self, h, *rest):
        states = [torch.stack([h] * self.taps)] if self.taps else []
        if not self.n_slots:
            return (h.clone(), *states) if self.taps else h.clone()
        pk = rest[self.n_side]
        shape = (pk.shape[1], pk.shape[2], h.shape[-2], pk.shape[4])
        at = self.n_side + 2 + self.n_reads
        n = len(self.held)
        keys = {q: rest[at + i] for i, q in enumerate(self.held)}
        vals = {q: rest[at + n + i] for i, q in enumerate(self.held)}
        ks = [keys[q].clone() if q in keys else pk.new_zeros(shape) for q in range(self.n_slots)]
        vs = [vals[q].clone() if q in vals else pk.new_zeros(shape) for q in range(self.n_slots)]
        return h.clone(), torch.stack(ks), torch.stack(vs), *states


class _RoutedRun(_Run):
    """A routed unit's true branch: the unit's depths on every token of the call with the
    recursion-wise mask, then the scaled update of the kept tokens (:func:`_routed_groups`)."""

    def __init__(self, ctx, routed: bool):
        super().__init__(ctx)
        self.routed = routed

    def __call__(self, h, *rest):
        rec, group, idx, reads, leaves, spec, tensor_at, where, s, cache = self.ctx
        nt = len(tensor_at)
        side = rest[:nt]
        if cache is None:  # no KV: the state alone
            mask, keep, scale = rest[nt:nt + 3]
            y, _states = self._blocks(h, side, None, mask if self.routed else None)
            return self._update(h, y, keep, scale)
        mask, keep, scale, pk, pv = rest[nt:nt + 5]
        prev = rest[nt + 5:nt + 5 + 2 * len(reads)]
        plan = [kv.slot(cache.lay.policy, d, 0) for d in group]
        local = ExportKV(pk, pv, cache.lay, index_of=cache.index_of, plan=plan)
        for j, k_, v_ in zip(reads, prev[:len(reads)], prev[len(reads):]):
            local.new[j] = (k_, v_)
        y, _states = self._blocks(h, side, local, mask if self.routed else None)
        y = self._update(h, y, keep, scale)
        zero = pk.new_zeros((pk.shape[1], pk.shape[2], h.shape[-2], pk.shape[4]))
        got = [None if j in reads else local.new.get(j) for j in idx]
        return (y, torch.stack([g[0] if g is not None else zero for g in got]),
                torch.stack([g[1] if g is not None else zero for g in got]))

    def _update(self, h, y, keep, scale):
        """A kept token gets ``h + s (f(h) - h)``, the others keep ``h`` (a straight unit: f(h))."""
        if not self.routed:
            return y
        upd = y + (scale.unsqueeze(-1).to(y.dtype) - 1) * (y - h)
        return torch.where(keep.unsqueeze(-1), upd, h)


class _GatheredRun(_Run):
    """A routed unit on the kept tokens only, gathered into the bucket's m rows (``route_rows``'
    length; taken when no more than m tokens are kept): the blocks run on ``[B, m, D]``, not on
    the call's T tokens. Selection is by 0/1 matrices over the call's tokens (kept tokens first,
    in order; gathers and a cumsum inside a branch made TVM 0.27's FuseTIR fail on the
    multi-resolution steps, see :class:`_CoarseRun`): the rows' states, their rotary embeddings
    and positions, and the new keys and values scattered back to their token's place (a token
    not kept gets zeros, and its slot validity is 0). A row sees the past keys valid in its slot
    and the kept rows of tokens at or before its own, as :func:`_routed_mask`."""

    def __init__(self, ctx, gathered: list[int]):
        super().__init__(ctx)
        self.gathered = gathered  # side operands that run along the tokens

    def __call__(self, h, *rest):
        valid_past, valid_now, rows, rest = rest[-3], rest[-2], rest[-1], rest[:-3]
        rec, group, idx, reads, leaves, spec, tensor_at, where, s, cache = self.ctx
        nt = len(tensor_at)
        side = list(rest[:nt])
        _mask, keep, scale, pk, pv = rest[nt:nt + 5]
        prev = rest[nt + 5:nt + 5 + 2 * len(reads)]
        f = h.dtype
        b, t = h.shape[0], h.shape[1]
        m = rows.shape[0]  # the bucket's rows (rows past the call's tokens select nothing)
        # rank of each token among the kept ones (kept first, in order), then the others
        # (prefix counts as a matmul with a triangular 0/1 matrix: a cumsum in a branch broke FuseTIR)
        kept = keep.to(f)
        ar = torch.arange(t, device=h.device)
        upper = (ar.view(-1, 1) <= ar.view(1, -1)).to(f)                                   # [T, T]: j <= i
        before = torch.matmul(kept.unsqueeze(1), upper).squeeze(1)                         # kept at or before i
        rank = torch.where(keep, before - 1, kept.sum(-1, keepdim=True) + (ar + 1).to(f) - before - 1)
        sel = (rank.unsqueeze(1) == torch.arange(m, device=h.device).to(f).view(1, -1, 1)).to(f)   # [B, m, T]
        x = torch.matmul(sel, h)                                                          # [B, m, D]
        gkeep = torch.matmul(sel, kept.unsqueeze(-1)).squeeze(-1) > 0.5                   # [B, m]
        tok = torch.matmul(sel, ar.to(f).view(1, -1, 1).expand(b, -1, -1)).squeeze(-1)   # [B, m]: each row's token
        for i in self.gathered:
            side[i] = _select_rows(side[i], sel)
        plan = [kv.slot(cache.lay.policy, d, 0) for d in group]
        local = ExportKV(pk, pv, cache.lay, index_of=cache.index_of, plan=plan)
        for j, k_, v_ in zip(reads, prev[:len(reads)], prev[len(reads):]):
            local.new[j] = (k_, v_)
        # keys: the past (valid in the slot; before every query), then the call's: the gathered
        # rows (their tokens' order decides causality; a row also sees itself) or, for a slot
        # this step only reads, the writer's entries of every token of the call
        first = plan[0]
        past = valid_past > 0.5                                                            # [B, P]
        if first.mode == "read":  # valid_now: what the writer kept, [B, T]
            kt = ar.to(f).view(1, 1, -1)
            now = (valid_now.unsqueeze(1) & (kt <= tok.unsqueeze(-1))) | (kt == tok.unsqueeze(-1))
        else:
            rows_ = torch.arange(m, device=h.device)
            own = (rows_.view(1, -1) == rows_.view(-1, 1)).unsqueeze(0)
            now = (gkeep.unsqueeze(1) & (tok.unsqueeze(1) <= tok.unsqueeze(-1))) | own
        ok = torch.cat([past.unsqueeze(1).expand(-1, m, -1), now], -1)
        mask = _mask_form(ok, side, f)
        y, _states = self._blocks(x, side, local, mask)
        sc = torch.matmul(sel, scale.to(f).unsqueeze(-1))                                  # [B, m, 1]
        upd = torch.where(gkeep.unsqueeze(-1), y + (sc - 1) * (y - x), x)
        back = sel.transpose(1, 2)                                                        # [B, T, m]
        out = h + torch.matmul(back, upd - x)
        zero = pk.new_zeros((b, pk.shape[2], t, pk.shape[4]))
        ks, vs = [], []
        for j in idx:
            g = None if j in reads else local.new.get(j)
            if g is None:
                ks.append(zero), vs.append(zero)
                continue
            # [B, H, m, D] -> [B, H, T, D]: each gathered row back at its token's place
            ks.append(torch.matmul(back.unsqueeze(1), g[0]))
            vs.append(torch.matmul(back.unsqueeze(1), g[1]))
        return out, torch.stack(ks), torch.stack(vs)


def _select_rows(x, sel):
    """``x`` ([B or 1, T, ...]: rotary embeddings, positions; tuples of them) at the selected rows
    (``sel`` [B, m, T] 0/1)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_select_rows(v, sel) for v in x)
    if x.is_floating_point():
        flat = x.expand(sel.shape[0], *x.shape[1:]).reshape(sel.shape[0], x.shape[1], -1)
        return torch.matmul(sel.to(x.dtype), flat).reshape(sel.shape[0], sel.shape[1], *x.shape[2:])
    got = torch.matmul(sel, x.expand(sel.shape[0], *x.shape[1:]).to(sel.dtype).unsqueeze(-1)).squeeze(-1)
    return got.round().to(x.dtype)


def _bucketed(ctx, gathered: list[int], levels: int, pred, keep, ops: tuple, skip, extra: tuple):
    """A routed unit with gathered buckets (``route_rows``: one tensor per bucket, whose length is
    its rows, ``j * ceil(T * fraction)`` for j = 1 .. levels: the caller computes them, each its
    own symbolic size: ``j * M`` in the graph broke TVM's iteration-map analysis, "padding factor
    not divisible"): the smallest bucket that holds
    the kept tokens and is smaller than T runs :class:`_GatheredRun` on them, else every token
    runs with the mask (:class:`_RoutedRun`; a decoded token, T = 1, always). One flat ``cond``
    per bucket, exactly one of which runs: nested ``cond`` branches were traced again at every
    level (a 15-block SmolLM2 step with three buckets did not finish exporting in 15 minutes).
    The keys and values are the sum of the branches' (the others return zeros). Returns (h,
    new keys, new values)."""
    valid_past, valid_now, rows = extra
    f = rows[0].dtype
    count = keep.to(f).sum(-1).max()            # (sizes as tensors: TVM's importer cannot compare
    t = (keep.to(f) * 0 + 1).sum(-1).max()      # a tensor with a size)
    h = ops[0]
    taken = torch.zeros((), dtype=torch.bool, device=keep.device)
    nk = nv = None
    branches = []
    for j in range(levels):
        size = (rows[j] + 1).sum()
        here = pred & ~taken & (count <= size) & (size < t)
        taken = taken | here
        branches.append((here, _GatheredRun(ctx, gathered), (valid_past, valid_now, rows[j])))
    branches.append((pred & ~taken, _RoutedRun(ctx, routed=True), ()))
    for cond, run, more in branches:
        out = torch.cond(cond, run, lambda h, *r, n=len(more): skip(h, *(r[:len(r) - n] if n else r)),
                         (h, *ops[1:], *more))
        h = out[0]
        nk = out[1] if nk is None else nk + out[1]
        nv = out[2] if nv is None else nv + out[2]
    return h, nk, nv


class _CoarseRun(_Run):
    """A coarse schedule position (factor r) over the call's T tokens after P cached ones, all
    in the graph (symbolic T and P): token i's query is the mean of its group's tokens up to it
    (the decode state's partial sum added for a group that began before the call), at its own
    position; a key is valid only at a group's last token (the mean of the whole group), so a
    group-end query attends exactly the complete groups up to its own, as the eager decoder's
    coarse slot holds them (other queries also see themselves: no empty softmax row; their
    results are never used). Token i gets the update of the group before its own (computed at
    that group's end in this call, or the state's), and the state moves on to the call's open
    group and last complete group. The K/V entries are written for every token (the masked
    ones never read), so the coarse slots keep the layout's shape."""

    def __init__(self, ctx, factor: int):
        super().__init__(ctx)
        self.r = factor

    def __call__(self, h, *rest):
        rec, group, idx, _reads, leaves, spec, tensor_at, where, s, cache = self.ctx
        side = rest[:len(tensor_at)]
        pk, pv, state, base = rest[len(tensor_at):len(tensor_at) + 4]
        r, p, t = self.r, pk.shape[3], h.shape[1]
        partial, u_last = state[:, 0], state[:, 1]                      # [B, D] each
        # Selections are matmuls with 0/1 matrices over the call's tokens, not gathers or a
        # cumsum: those made TVM 0.27's FuseTIR fail on the branch ("VarRemapGet(source) ==
        # nullptr"), and the fallback without dataflow lost every fused weight transpose.
        f = h.dtype
        # absolute token index: the past length comes in as a tensor (``arange(T) + P`` with the
        # size variable P fused into the branch's kernels also broke FuseTIR)
        pos = torch.arange(t, device=h.device) + base
        g = torch.div(pos, r, rounding_mode="floor")
        same = (g.view(-1, 1) == g.view(1, -1)) & (pos.view(1, -1) <= pos.view(-1, 1))
        opened = (g * r < p).to(f).view(1, -1, 1)                       # the group began before the call
        prefix = torch.matmul(same.to(f), h) + opened * partial.unsqueeze(1)   # [B, T, D]
        x = prefix / (pos - g * r + 1).view(1, -1, 1).to(f)
        mask = self._mask(pos, p, r, side, f)
        local = ExportKV(pk, pv, cache.lay, index_of=cache.index_of, plan=[kv.slot(cache.lay.policy, d, 0) for d in group])
        y, _states = self._blocks(x, side, local, mask)
        # each selection is one matmul over [state row, the call's rows] (a selection matmul
        # plus a masked state term fused into one kernel that FuseTIR failed on)
        u = torch.cat([u_last.unsqueeze(1), y - x], dim=1)               # [B, 1 + T, D]: row 0 the state's
        cols = torch.arange(t + 1, device=h.device).view(1, -1)
        end_prev = g * r - 1 - base                                      # the previous group's end in the call
        upd = torch.matmul((cols == (end_prev + 1).clamp(min=0).view(-1, 1)).to(f), u)   # [B, T, D]
        out = h + rec.spiral.gate_at(group[0].step).to(f) * upd
        last = base + (t - 1)                                            # the call's last token
        last_end = torch.div(last + 1, r, rounding_mode="floor") * r - 1 - base
        new_u = torch.matmul((cols == (last_end + 1).clamp(min=0).view(-1, 1)).to(f), u).squeeze(1)
        rows = torch.cat([torch.zeros_like(partial).unsqueeze(1), prefix], dim=1)   # row 0: nothing open
        open_at = torch.where((last + 1) % r == 0, torch.zeros_like(last), torch.zeros_like(last) + t)
        new_partial = torch.matmul((cols == open_at.view(-1, 1)).to(f), rows).squeeze(1)
        zero = pk.new_zeros((pk.shape[1], pk.shape[2], t, pk.shape[4]))
        got = [local.new.get(j) for j in idx]
        return (out, torch.stack([g_[0] if g_ is not None else zero for g_ in got]),
                torch.stack([g_[1] if g_ is not None else zero for g_ in got]), torch.stack([new_partial, new_u], 1))

    def _mask(self, pos, p: int, r: int, side, dtype):
        """[1, 1, T, P + T]: key k valid for query i when k ends a group and k <= i, or k = i; in
        the model's mask form (bool, or additive in ``dtype``)."""
        keys = torch.arange(pos.shape[0] + p, device=pos.device)
        ok = (((keys + 1) % r == 0).view(1, -1) & (keys.view(1, -1) <= pos.view(-1, 1))) | (keys.view(1, -1) == pos.view(-1, 1))
        return _mask_form(ok.unsqueeze(0), side, dtype)


class _CoarseOpen:
    """A coarse position in a call where no group ends (all its tokens in one open group): each
    token gets the last complete group's update and the open group's sum grows; no block runs."""

    def __init__(self, rec: Recursion, position: int):
        self.rec, self.position = rec, position

    def __call__(self, h, nk, nv, state):
        partial, u_last = state[:, 0], state[:, 1]
        out = h + self.rec.spiral.gate_at(self.position).to(h.dtype) * u_last.unsqueeze(1)
        return out, nk.clone(), nv.clone(), torch.stack([partial + h.sum(1), u_last], 1)


class _PassThrough:
    def __call__(self, *xs):
        return tuple(x.clone() for x in xs)


class _CoarseSkip(_Skip):
    """A coarse position that does not run at this count: the state passes through."""

    def __call__(self, h, *rest):
        state = rest[self.n_side + 2]
        return (*super().__call__(h, *rest[:self.n_side + 2]), state.clone())


def _overrides(rec: Recursion, d: Depth) -> dict:
    """A depth's parameter overrides inside an unrolled step, under the loop's deployed LoRA
    (:func:`deploy`): its own vectors (slices), its merged matrices (``premerged``, parameters of
    the loop), and for each factored matrix the depth's factors in the placeholders of its
    :class:`_FactoredLinear` (``x @ W.T + s * (x @ A.T) @ B.T``: an override, not the
    torch-function mode of forward artifacts, which a ``cond`` branch may not enter). Before
    2026-12-07 a low-rank matrix was merged in the graph, ``W + s * B @ A`` per matrix, depth and
    token: a rank-r product over the whole matrix, r times the work of its decode GEMV."""
    over = {unkey(k): st[d.depth] for k, st in rec.depth_params.items()}
    # slot names looked up, not formatted: inside a branch the depth may be symbolic
    for name, slot in rec.__dict__.get("_merged_at", {}).get(d.depth, {}).items():
        over[name] = rec.premerged[slot]
    for key in rec.lora_A.keys():
        if rec.lora_forms.get(unkey(key)) == "factored":
            owner = unkey(key).rpartition(".")[0]
            pick = lambda stacked: stacked[d.depth]  # noqa: E731
            over[f"{owner}.lora_A"], over[f"{owner}.lora_B"] = rec.factor(key, "A", pick), rec.factor(key, "B", pick)
    return over


def deploy(wrapper, policy: str = "auto") -> dict:
    """Fix how each relaxed matrix of ``wrapper``'s loops runs in the steps (unless it already is):
    :func:`loopify.nn.deploy_lora` with the ``decode`` rule (merged only when the factors are at
    least half the matrix), factored only through ``nn.Linear`` layers. Returns the manifest's
    ``lora`` ({} without LoRA): ``{"policy", "rule", "loops": {loop: {matrix: {"form", "rank",
    "shape", "overhead"}}}}``."""
    from loopify.nn import deploy_lora

    loops = {p: r for p, r in recursions(wrapper).items() if r.lora_A}
    if not loops:
        return {}
    if not all(r.lora_forms for r in loops.values()):
        deploy_lora(wrapper, policy, rule="decode", linear_only=True)
    for rec in loops.values():
        rec.__dict__["_merged_at"] = {depth: {unkey(k): _slot(depth, k) for k in rec.lora_A.keys()
                                              if rec.lora_forms[unkey(k)] == "merged"}
                                      for depth in range(rec.spec.layers)}
    return {"policy": policy, "rule": "decode", "loops": {p: r.lora_report() for p, r in loops.items()}}


class _FactoredLinear(torch.nn.Module):
    """An ``nn.Linear`` of a shared block with a factored per-depth LoRA, while a step is
    exported: the block's own weight and bias (the same parameters), and placeholders for the
    depth's factors that every call overrides (:func:`_overrides`)."""

    def __init__(self, linear: torch.nn.Linear, rank: int, scale: float):
        super().__init__()
        self.weight, self.bias, self.scale = linear.weight, linear.bias, float(scale)
        w = linear.weight
        self.register_buffer("lora_A", w.new_zeros(rank, w.shape[1]), persistent=False)
        self.register_buffer("lora_B", w.new_zeros(w.shape[0], rank), persistent=False)

    def forward(self, x):
        F = torch.nn.functional
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


@contextlib.contextmanager
def _factored_linears(wrapper):
    """Swap every factored matrix's ``nn.Linear`` for a :class:`_FactoredLinear` in each block of
    its loop while the steps are exported."""
    swapped = []
    try:
        for rec in recursions(wrapper).values():
            for key, A in rec.lora_A.items():
                name = unkey(key)
                if rec.lora_forms.get(name) != "factored":
                    continue
                owner = name.rpartition(".")[0]
                parent_path, _, attr = owner.rpartition(".")
                for block in rec.blocks:
                    parent = block.get_submodule(parent_path) if parent_path else block
                    lin = getattr(parent, attr)
                    setattr(parent, attr, _FactoredLinear(lin, int(A.shape[1]), rec.lora_scales.get(name, 1.0)))
                    swapped.append((parent, attr, lin))
        yield
    finally:
        for parent, attr, lin in reversed(swapped):
            setattr(parent, attr, lin)


class Step(torch.nn.Module):
    """The decode step (see the module docstring) of a wrapped model (an ExportWrapper)."""

    def __init__(self, wrapper, lay: Layout, route_bucket: float = 0.0):
        super().__init__()
        self.wrapper = wrapper
        self.lay = lay
        # routed prefill: gathered buckets of j quanta (route_rows' length) for j * bucket < 1
        self.route_levels = math.ceil(1 / route_bucket) - 1 if route_bucket else 0
        self.keys = [r.key for r in recursions(wrapper).values()]  # one count per loop, KV or not

    @property
    def head(self):
        """The output embedding (the LM head), which :meth:`forward`'s ``logit_rows`` restricts,
        or None for a model that does not name one."""
        get = getattr(self.wrapper.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return head if isinstance(head, torch.nn.Module) else None

    def forward(self, input_ids, attention_mask, position_ids, past_k, past_v, loops, token_type_ids=None,
                pixel_values=None, logit_rows=None, spiral_state=None, route_valid=None, route_rows=None):
        """``logit_rows`` ([L] int64 positions among the T new tokens): the LM head runs on those
        rows only (a prompt's prefill needs the last one; scoring needs all). ``spiral_state``
        ([Q, B, 2, D], multi-resolution loops: :attr:`Layout.spiral`): the decode states in, the
        new ones a fourth output. ``route_valid`` ([S, B, P] 0/1, routed loops:
        :attr:`Layout.routed`): each slot's validity per past token in; the call's tokens'
        validity ``[S, B, T]`` and each routed loop's depth per token ``[R, B, T]`` (int64) are
        the last two outputs. ``route_rows`` (a list of ``route_levels`` tensors [M_j], values
        unused): a routed step whose kept tokens fit in M_j rows (the smallest such bucket, M_j <
        T) runs its blocks on those rows only (gathered); the caller sizes them, ``M_j = max(2,
        j * ceil(T * route_bucket))``."""
        torch._check(attention_mask.shape[1] == past_k.shape[3] + input_ids.shape[1])
        cache = ExportKV(past_k, past_v, self.lay, state=spiral_state, valid=route_valid,
                         attn=attention_mask if self.lay.routed else None)
        cache.rows, cache.levels = (list(route_rows) if route_rows is not None else None), self.route_levels
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        with _unrolled(self.wrapper, {k: loops[j] for j, k in enumerate(self.keys)}), _rows(self.head, logit_rows):
            out = self.wrapper.run_model(inputs, use_cache=True, cache=cache)
        logits = out if isinstance(out, torch.Tensor) else out["logits"]
        new_k, new_v = cache.stacked(input_ids.shape[1], past_k)
        if self.lay.routed:
            t = input_ids.shape[1]
            ones = torch.ones(input_ids.shape[0], t, dtype=past_k.dtype, device=past_k.device)
            valid = torch.stack([cache.new_valid[i].to(past_k.dtype) if i in cache.new_valid else ones
                                 for i in range(self.lay.slots)])
            zero = torch.zeros(input_ids.shape[0], t, dtype=torch.long, device=input_ids.device)
            depths = torch.stack([cache.depths.get(k, zero) for k in self.lay.routed])
            return logits, new_k, new_v, valid, depths
        if self.lay.spiral:
            states = [cache.new_state.get(q, spiral_state[q]) for q in range(len(self.lay.spiral))]
            # (one state: unsqueeze, not a one-element stack, whose concat of one input made TVM
            # 0.27's FuseTIR fail on the whole step: "VarRemapGet(source) == nullptr")
            return logits, new_k, new_v, states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)
        return logits, new_k, new_v


@contextlib.contextmanager
def _rows(head, rows):
    """While the step runs, ``head`` reads only hidden-state rows ``rows`` (None: all)."""
    if head is None or rows is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda mod, args: (args[0].index_select(-2, rows), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def kv_users(wrapper, inputs: dict, image_token_id=None) -> tuple[list[int], set[str]]:
    """Which attention layers outside loops (their layer indices) and which loops (their keys)
    use the cache: the slots a loop cache opens on one text-only run."""
    from loopify.generate.cache import LoopCache

    cache = LoopCache()
    row = inputs["input_ids"][0]
    ids = (row[row != image_token_id] if image_token_id is not None else row)[:4].reshape(1, -1)
    with torch.no_grad(), _every_token_routed(wrapper):
        wrapper.run_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, use_cache=True, cache=cache)
    return sorted(k[1] for k in cache.index if k[0] == "layer"), {k[1] for k in cache.index if k[0] == "loop"}


@contextlib.contextmanager
def _router_parameters(wrapper):
    """While the steps export: each router's thresholds and balancing bias as (frozen)
    parameters, so that they are weights of the artifact (``params.safetensors``), not constants
    folded into its code: a capacity re-calibrated after compiling is a new value of
    ``...router.threshold``, not a new compile."""
    saved = []
    for rec in recursions(wrapper).values():
        r = rec.router
        if r is None:
            continue
        for name in ("threshold", "balance_bias"):
            t = r._buffers.pop(name)
            r.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
            saved.append((r, name, t))
    try:
        yield
    finally:
        for r, name, t in saved:
            del r._parameters[name]
            r.register_buffer(name, t)


@contextlib.contextmanager
def _every_token_routed(wrapper):
    """While probing which loops use the cache: every expert router keeps every token (a trained
    threshold may stop a short probe's tokens before any of the loop's attention runs)."""
    saved = []
    for rec in recursions(wrapper).values():
        if rec.router is not None:
            saved.append((rec.router, rec.router.threshold.clone()))
            rec.router.threshold.fill_(float("-inf"))
    try:
        yield
    finally:
        for router, t in saved:
            router.threshold.copy_(t)


@dataclass
class Exported:
    """The exported decode step (and, for a vision-language model, the prefill step that takes an
    image) and what their inputs are."""

    program: torch.export.ExportedProgram
    layout: Layout
    heads: int
    head_dim: int
    vocab: int
    loops: list[dict]
    max_context: int
    example: tuple
    token_types: bool = False                      # the steps take token_type_ids (prefix-LM models)
    logit_rows: bool = False                       # the steps take logit_rows (the head's rows), last
    image: torch.export.ExportedProgram | None = None
    image_example: tuple | None = None
    image_tokens: int = 0
    pixel_shape: list | None = None
    dtype: str = "float32"                         # of the weights, activations and KV cache
    spiral_dim: int = 0                            # width of the multi-resolution decode state
    lora: dict = field(default_factory=dict)  # each relaxed matrix's form (:func:`deploy`)
    route_bucket: float = 0.0                      # routed prefill's gathered buckets (Step's route_rows) ...
    route_levels: int = 0                          # ... and how many


def float_dtype(module) -> torch.dtype:
    """The floating dtype of ``module``'s weights (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def kv_shape(wrapper, inputs: dict, lay: Layout, image_token_id=None) -> tuple[int, int]:
    """(KV heads, head dim) of the model's attention, read off one prefill's cache."""
    from loopify.generate.cache import LoopCache

    cache = LoopCache(lay.policy)
    row = inputs["input_ids"][0]
    ids = (row[row != image_token_id] if image_token_id is not None else row)[:2].reshape(1, -1)
    with torch.no_grad(), _every_token_routed(wrapper):
        wrapper.run_model({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, use_cache=True, cache=cache)
    k = cache.layers[0].keys
    return int(k.shape[1]), int(k.shape[3])


def export_step(wrapper, inputs: dict, policy: str, max_context: int, image_token_id: int | None = None,
                lora_form: str = "auto", route_bucket: float = 0.0) -> Exported:
    """torch.export of the decode step (see :class:`Step`) with symbolic token count T in
    [1, max_context] and past length P in [0, max_context - 1] (one program serves prefill and
    decode: the compiler binds T = 1 or P = 0 to specialise), batch 1. A vision-language model
    (``pixel_values`` in ``inputs``) also gets the prefill step that takes an image (P = 0, at
    least its image tokens plus one)."""
    import inspect

    from torch.export import Dim

    from loopify.nn import recursions

    outside, cached = kv_users(wrapper, inputs, image_token_id)
    lay = layout(wrapper, policy, outside, cached)
    if lay.routed:
        # a fresh dynamo state: what earlier exports in this process left (code caches of the same
        # branch classes) broke routed steps' branches ("lift_tracked_freevar_to_input should not
        # be called on root SubgraphTracer", after the other generation tests in one process)
        torch._dynamo.reset()
    heads, hd = kv_shape(wrapper, inputs, lay, image_token_id)
    lora_info = deploy(wrapper, lora_form)
    if not 0 <= route_bucket < 1:
        raise ValueError(f"route_bucket must be in [0, 1), got {route_bucket}")
    step = Step(wrapper, lay, route_bucket if lay.routed else 0.0).eval()
    loops = [{"key": r.key, "min": 0 if r.deepen else 1, "max": r.spec.max_loops, "default": r.loops}
             for r in recursions(wrapper).values()]
    token_types = "token_type_ids" in inspect.signature(wrapper.model.forward).parameters
    counts = torch.tensor([max(1, l["default"]) for l in loops], dtype=torch.long)
    t, p = 3, 5  # example sizes >= 2: export specialises 0 and 1
    row = inputs["input_ids"][0]
    text = row[row != image_token_id] if image_token_id is not None else row
    ids = text.repeat(t)[:t].reshape(1, t)
    dt = float_dtype(wrapper)
    kv0 = torch.zeros(lay.slots, 1, heads, p, hd, dtype=dt)
    example = (ids, torch.ones(1, p + t, dtype=torch.long), torch.arange(p, p + t).reshape(1, t), kv0, kv0.clone(),
               counts)
    kw = {"token_type_ids": torch.zeros_like(ids)} if token_types else {}
    T, P = Dim("T", min=1, max=max_context), Dim("P", min=0, max=max_context - 1)
    ds = {"input_ids": {1: T}, "attention_mask": {1: Dim.AUTO}, "position_ids": {1: T}, "past_k": {3: P},
          "past_v": {3: P}, "loops": None, **({"token_type_ids": {1: T}} if token_types else {})}
    if step.head is not None:
        _with_logit_rows(kw, ds, t, max_context)
    if lay.spiral:
        if image_token_id is not None:
            raise NotImplementedError("a multi-resolution loop in a vision-language model is not compiled for "
                                      "generation yet (groups that stop at the image's boundary)")
        kw["spiral_state"] = torch.zeros(len(lay.spiral), 1, 2, spiral_dim(wrapper), dtype=dt)
        ds["spiral_state"] = None
    if lay.routed:
        kw["route_valid"] = torch.ones(lay.slots, 1, p, dtype=dt)
        ds["route_valid"] = {2: P}
    if lay.routed and step.route_levels:  # (example sizes apart: export must not tie the symbols)
        kw["route_rows"] = [torch.zeros(2 + j) for j in range(step.route_levels)]
        ds["route_rows"] = [{0: Dim(f"M{j}", min=2, max=max(max_context, 2 + j))} for j in range(step.route_levels)]
    from loopify.generate.attention import grouped

    with torch.no_grad(), _factored_linears(wrapper), _router_parameters(wrapper), grouped(wrapper):
        ep = torch.export.export(step, example, kw, dynamic_shapes=ds, strict=False)
        logits = step(*example, **kw)[0]
    out = Exported(ep, lay, heads, hd, int(logits.shape[-1]), loops, max_context, example + tuple(kw.values()),
                   token_types, logit_rows="logit_rows" in kw, dtype=str(dt).replace("torch.", ""),
                   spiral_dim=spiral_dim(wrapper) if lay.spiral else 0,
                   lora=lora_info, route_bucket=float(route_bucket) if "route_rows" in kw else 0.0,
                   route_levels=step.route_levels if "route_rows" in kw else 0)
    if "pixel_values" in inputs:
        # (sdpa's own attention here: with no past the keys' length is T, and the grouped form's
        # reshapes made export guard on it, "min(T, T*T) == T")
        with _factored_linears(wrapper), _router_parameters(wrapper):
            _export_image_step(out, step, inputs, image_token_id, counts)
    return out


def spiral_dim(wrapper) -> int:
    """The hidden size of a model's multi-resolution loops (their gates' width; 0 without)."""
    dims = {r.spiral.spec.dim for r in recursions(wrapper).values() if r.spiral is not None}
    if len(dims) > 1:
        raise NotImplementedError("multi-resolution loops of different widths are not compiled for generation yet")
    return dims.pop() if dims else 0


def _with_logit_rows(kw: dict, ds: dict, t: int, max_context: int) -> None:
    """Add the ``logit_rows`` input (L symbolic; 2 rows on the example of ``t`` tokens: export
    would specialise 1) to a step's example keywords and dynamic shapes."""
    from torch.export import Dim

    kw["logit_rows"] = torch.arange(t - 2, t)
    ds["logit_rows"] = {0: Dim("L", min=1, max=max_context)}


def _export_image_step(out: Exported, step: Step, inputs: dict, image_token_id, counts) -> None:
    """The prefill step with an image: the example prompt (its image tokens where the model
    expects them) and pixel values of the example's shape; T symbolic from the image tokens up."""
    from torch.export import Dim

    ids = inputs["input_ids"][:1]
    n_img = int((ids == image_token_id).sum()) if image_token_id is not None else 0
    t = ids.shape[1]
    kv0 = torch.zeros(out.layout.slots, 1, out.heads, 0, out.head_dim, dtype=getattr(torch, out.dtype))
    pixels = inputs["pixel_values"][:1].to(getattr(torch, out.dtype))
    ex = (ids, torch.ones(1, t, dtype=torch.long), torch.arange(t).reshape(1, t), kv0, kv0.clone(), counts)
    kw = {**({"token_type_ids": torch.zeros_like(ids)} if out.token_types else {}), "pixel_values": pixels}
    T = Dim("T", min=n_img + 1, max=out.max_context)
    ds = {"input_ids": {1: T}, "attention_mask": {1: T}, "position_ids": {1: T}, "past_k": None, "past_v": None,
          "loops": None, **({"token_type_ids": {1: T}} if out.token_types else {}), "pixel_values": None}
    if out.logit_rows:
        _with_logit_rows(kw, ds, t, out.max_context)
    if out.layout.routed:
        kw["route_valid"] = torch.zeros(out.layout.slots, 1, 0, dtype=getattr(torch, out.dtype))
        ds["route_valid"] = None
        if out.route_levels:
            kw["route_rows"] = [torch.zeros(2 + j) for j in range(out.route_levels)]
            ds["route_rows"] = [{0: Dim(f"M{j}", min=2, max=max(out.max_context, 2 + j))}
                                for j in range(out.route_levels)]
    with torch.no_grad(), record_shapes(step.wrapper):
        step(*ex, **kw)  # eager: the loops' argument shapes on the example
    with torch.no_grad():
        out.image = torch.export.export(step, ex, kw, dynamic_shapes=ds, strict=False)
    out.image_example = ex + tuple(kw.values())
    out.image_tokens = n_img
    out.pixel_shape = list(pixels.shape)
