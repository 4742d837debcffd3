"""The loop: a module that applies K shared blocks over L depth positions.

Which block each depth uses and which depths run at a loop count is the sharing map
(:mod:`loopify.nn.sharing`). At run time the loop count n (1..N; any n >= 0 in deepen mode) is an
attribute, ``loops``.

Per-depth state (LoRA "relaxation", per-depth norm weights) is applied as a parameter override
through ``torch.func.functional_call``: the block's own parameters are the shared ones (the same
``nn.Parameter`` objects at every depth), and depth l sees ``W_shared + scale * B_l @ A_l``
(:mod:`loopify.nn.lora`).

A loop over a run of *groups* (``spec.period`` p > 1: Gemma2's sliding / full attention pairs,
SmolLM3's four layers of which the last has no RoPE) is the same loop: K (a multiple of p) blocks
of one layer each, cycle-shared, so depth d always has a block of group position d % p, and depth
d is called with the side inputs (masks, rotary tables) the model gave to group position d % p.

A loop stands where the layers stood, in either form of a converted model:

* the *module form* (eager Hugging Face models): the loop is an entry of the layer ModuleList and
  is called as the layers were, ``loop(hidden_states, attention_mask=..., ...)``; it runs every
  depth with those keyword arguments, and exposes the attributes the model's own loop reads of
  its layers (``attention_type`` ...);
* the *graph form* (unflattened torch.export programs): one ``call_module`` node with the layers'
  positional arguments (plus trailing extras for the connector).

A group loop in module form takes p entries of the list: p - 1 :class:`GroupInput` entries, which
hand the loop the arguments of group positions 0..p-2 and pass the hidden state through, and
the loop itself at position p-1 (so a model that picks a layer's mask by its list position, as
``config.layer_types[i]``, picks every position's own). In graph form the call node takes the p
calls' arguments one after the other.

While a depth runs, :func:`current_depth` tells which one (the KV cache keys its slots by it).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from loopify.nn import lora, sharing
from loopify.nn.sharing import schedule, sharing_map


@dataclass(frozen=True)
class RecursionSpec:
    """Static description of a loop, stored in manifests."""

    stack: str
    start: int
    layers: int           # L: depth positions of the original run
    blocks: int           # K: unique blocks
    sharing: str
    mode: str             # "compress" or "deepen"
    state_arg: int        # which positional argument of a layer is the hidden state
    max_loops: int        # N (compress) or the default loop count R (deepen)
    depth_paths: tuple[str, ...] = ()  # original module path of each depth position
    state_name: str = ""  # the hidden state's keyword name, when a caller passes it by keyword
    span_layers: tuple[str, ...] = ()    # every layer the loop replaced (kept and dropped)
    block_sources: tuple[str, ...] = ()  # for each block, the layer it was cloned from
    period: int = 1       # p > 1: the run repeats groups of p layers; depth d takes the side inputs of group position d % p
    returns: int = 0      # module form, p > 1: length of the tuple a layer returns (0: a bare tensor)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("depth_paths", "span_layers", "block_sources"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecursionSpec":
        return cls(**{**d, **{k: tuple(d.get(k, ())) for k in ("depth_paths", "span_layers", "block_sources")}})


class Depth(NamedTuple):
    """The depth position a loop is running: which loop, the execution index within this call
    (0.. over the schedule), the recursion step, the block, the original depth, and the
    recursion of the block (how many times this call ran the block before)."""

    loop: str
    index: int
    step: int
    block: int
    depth: int
    recursion: int = 0


_CURRENT = contextvars.ContextVar("loopify_depth", default=None)


def current_depth() -> Depth | None:
    """The depth a loop is running right now (None outside loops)."""
    return _CURRENT.get()


#: Shared-prefix runs (training at several depths, :class:`loopify.train.student.DepthRunner`):
#: a cycle or deepen loop at count k runs exactly the first k recursion steps of the same loop
#: at a larger count, so one forward at the largest count can *record* each loop's output after
#: k steps, and a forward at k can *replay* it instead of running the blocks again.
_PREFIX = contextvars.ContextVar("loopify_prefix", default=None)


class PrefixRun:
    """The state of one shared-prefix run: ``counts`` (the depths to record), ``taps`` (loop key
    -> depth -> the loop's output), ``replay`` (the depth being replayed, or None while
    recording), ``ok`` (False when a loop could not take part: it was called twice in one
    forward, or Hugging Face collected hidden states from it)."""

    def __init__(self, counts):
        self.counts = sorted(set(counts))
        self.taps: dict[str, dict[int, object]] = {}
        self.calls: dict[str, int] = {}
        self.replay: int | None = None
        self.replayed = 0  # loop calls answered from a recording
        self.ok = True

    def want(self, rec, done: int) -> list[int]:
        """The requested depths whose output for ``rec`` is its state after ``done`` steps."""
        return [k for k in self.counts if min(k, rec.spec.max_loops) == done]


@contextlib.contextmanager
def prefix_run(counts):
    """Context for a recording forward: ``with prefix_run([1, 2]) as run: model(...)``, then
    ``run.replay = k`` and forward again for each other k (see :class:`PrefixRun`)."""
    run = PrefixRun(counts)
    token = _PREFIX.set(run)
    try:
        yield run
    finally:
        _PREFIX.reset(token)


#: Attributes a model's own layer loop may read of its layers; a loop answers them from its
#: first block (they are the same for every interchangeable layer).
LAYER_ATTRIBUTES = ("attention_type", "is_sliding", "sliding_window", "layer_type", "use_sliding_window")


class Recursion(nn.Module):
    """Applies shared blocks over a depth schedule; the loop count is an attribute set at run time.

    Args:
        blocks: the K unique blocks; each takes the same arguments as the original layers and
            returns the new hidden state (or a tuple whose first element it is).
        spec: the static description (sharing map, state argument ...).
    """

    def __init__(self, blocks: Sequence[nn.Module], spec: RecursionSpec):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.spec = spec
        self.loops = spec.max_loops
        # Per-depth overrides: depth_params[name] is [L, *shape]; lora[name] = (A [L, r, in], B [L, out, r]).
        self.depth_params = nn.ParameterDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scales: dict[str, float] = {}  # per matrix: alpha / r (1 when alpha is not set)
        #: inference form of each relaxed matrix ("merged" | "factored"), set by :meth:`deploy_lora`;
        #: empty: every depth merges ``W + s * B @ A`` where it runs (training)
        self.lora_forms: dict[str, str] = {}
        self.connector: nn.Module | None = None
        self.n_extra = 0  # trailing call arguments meant for the connector (graph form's modality mask)
        #: image positions are input_ids == this token (module form: the mask is read while the loop
        #: runs; graph form: it is computed in the graph and passed as the trailing argument)
        self.modality_token: int | None = None
        #: Mixture-of-Recursions router (:mod:`loopify.nn.routing`), set by the route pass
        self.router: nn.Module | None = None
        #: multi-resolution schedule (:mod:`loopify.nn.spiral`), set by the multi-resolution pass
        self.spiral: nn.Module | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in LAYER_ATTRIBUTES:
                blocks = self.__dict__.get("_modules", {}).get("blocks")
                at = self.__dict__.get("spec").period - 1 if "spec" in self.__dict__ else 0  # the loop's own position
                if blocks is not None and len(blocks) > at and hasattr(blocks[at], name):
                    return getattr(blocks[at], name)
            raise

    # -- structure -----------------------------------------------------------------------------

    @property
    def deepen(self) -> bool:
        return self.spec.mode == "deepen"

    @property
    def key(self) -> str:
        """A stable name of this loop (its stack and start), for caches and reports."""
        return f"{self.spec.stack}@{self.spec.start}"

    @property
    def stepwise(self) -> bool:
        """Whether the schedule is cut into recursion steps (cycle and deepen loops), between
        which connectors act; sequence and middle-* schedules are one step."""
        return self.deepen or self.spec.sharing == "cycle"

    @property
    def step_len(self) -> int:
        """Depths per recursion step."""
        return self.spec.layers if self.deepen else self.spec.blocks

    def sharing(self) -> list[int]:
        if self.deepen:
            return list(range(self.spec.layers))
        return sharing_map(self.spec.sharing, self.spec.layers, self.spec.blocks)

    def pieces(self) -> list[tuple[str, sharing.Piece]]:
        return sharing.pieces(self.spec.sharing, self.spec.layers, self.spec.blocks, self.deepen)

    def depth_schedule(self, loops: int | None = None) -> list[int]:
        """Depth positions run for ``loops`` loops (default: the current ``self.loops``)."""
        n = self.loops if loops is None else loops
        if self.deepen:  # the whole span is the body; depth positions repeat per loop
            if n < 0:
                raise ValueError("loops must be >= 0")
            return list(range(self.spec.layers)) * n
        return schedule(self.spec.sharing, self.spec.layers, self.spec.blocks, n)

    def steps(self, loops: int | None = None) -> list[list[int]]:
        """The schedule cut into recursion steps (one pass of the body each), for connectors."""
        sched = self.depth_schedule(loops)
        if not self.stepwise:
            return [sched]
        per = self.step_len
        return [sched[i:i + per] for i in range(0, len(sched), per)]

    def block_for_depth(self, depth: int) -> int:
        return self.sharing()[depth]

    def params_at(self, depth: int) -> dict[str, torch.Tensor]:
        """The parameters the block sees at depth position ``depth`` (shared ones by identity)."""
        block = self.blocks[self.block_for_depth(depth)]
        out: dict[str, torch.Tensor] = dict(block.named_parameters())
        out.update(self.depth_overrides(depth))
        return out

    def depth_overrides(self, depth: int) -> dict[str, torch.Tensor]:
        if self.lora_forms:
            return self.deployed_overrides(self.block_for_depth(depth), lambda stacked: stacked[depth], depth)
        if not torch.is_grad_enabled() and self.lora_A and not _tracing():
            return self._merged(depth)
        return self.overrides(self.block_for_depth(depth), lambda stacked: stacked[depth])

    def _merged(self, depth: int) -> dict[str, torch.Tensor]:
        """Inference (no autograd): each depth's merged weights ``W + s * B @ A``, computed once and
        kept until a weight they come from changes (their tensor versions are the key). Merging
        at every call costs a rank-r matmul per matrix and depth: at full rank it made decoding
        20x slower than the original model."""
        cache = self.__dict__.setdefault("_merged_cache", {})
        b = self.block_for_depth(depth)
        tensors = [t for ps in (self.blocks[b].parameters(), self.lora_A.values(), self.lora_B.values(),
                                self.depth_params.values()) for t in ps]
        version = tuple((id(t), t._version) for t in tensors)
        hit = cache.get(depth)
        if hit is None or hit[0] != version:
            with torch.no_grad():
                hit = (version, {k: v.detach() for k, v in
                                 self.overrides(b, lambda stacked: stacked[depth]).items()})
            cache[depth] = hit
        return hit[1]

    # -- inference forms of the relaxation (see lora.FORMS) ---------------------------------------

    def deploy_lora(self, policy: str = "auto", rule: str = "forward", linear_only: bool = False) -> dict[str, dict]:
        """Fix how each relaxed matrix is applied at inference, per matrix by
        :func:`lora.choose_form`: a *merged* matrix gets every depth's ``W + s * B @ A`` computed
        once, now, as a parameter of the loop (``premerged``), which the loop (and any program
        exported from it) then reads as a plain weight; a *factored* one runs as
        ``x @ W.T + s * (x @ A.T) @ B.T`` (:class:`lora.FactoredMode`). Returns the choice per
        matrix. For frozen weights: training afterwards would not update the merged copies.
        ``rule``: ``auto``'s rule (:data:`lora.RULES`); ``linear_only``: a matrix that is not an
        ``nn.Linear``'s weight in every block is merged (generation artifacts factor through
        the linear layers, see :mod:`loopify.generate.export`)."""
        forms, store = {}, nn.ParameterDict()
        for key in self.lora_A.keys():
            name, A, B = unkey(key), self.lora_A[key], self.lora_B[key]
            shape, rank = (int(B.shape[1]), int(A.shape[2])), int(A.shape[1])
            form = lora.choose_form(shape, rank, policy, rule)
            if form == "factored" and linear_only and not self._linear_weight(name):
                form = "merged"
            forms[name] = form
            if form == "merged":
                scale = self.lora_scales.get(name, 1.0)
                for depth in range(self.spec.layers):
                    W = self.blocks[self.block_for_depth(depth)].get_parameter(name)
                    with torch.no_grad():
                        store[_slot(depth, key)] = nn.Parameter(lora.merged(W, A[depth], B[depth], scale),
                                                                requires_grad=False)
        self.premerged = store
        self.lora_forms = forms
        return self.lora_report()

    def lora_report(self) -> dict[str, dict]:
        """Each relaxed matrix's deployed form, as the manifests record it: ``{matrix: {"form",
        "rank", "shape", "overhead"}}``."""
        out = {}
        for key, A in self.lora_A.items():
            shape, rank = (int(self.lora_B[key].shape[1]), int(A.shape[2])), int(A.shape[1])
            out[unkey(key)] = {"form": self.lora_forms[unkey(key)], "rank": rank, "shape": list(shape),
                               "overhead": round(lora.factored_overhead(shape, rank), 4)}
        return out

    def _linear_weight(self, name: str) -> bool:
        """Whether matrix ``name`` is an ``nn.Linear``'s weight in every block."""
        owner, _, p = name.rpartition(".")
        try:
            return p == "weight" and all(isinstance(b.get_submodule(owner), nn.Linear) for b in self.blocks)
        except AttributeError:
            return False

    def deployed_overrides(self, block_index: int, pick, depth: int) -> dict[str, torch.Tensor]:
        """Overrides under :meth:`deploy_lora`: per-depth vectors by ``pick``, and the merged
        matrices of depth ``depth`` (factored ones are left to :meth:`lora_factors`)."""
        over = {unkey(k): pick(stacked) for k, stacked in self.depth_params.items()}
        for key in self.lora_A.keys():
            if self.lora_forms.get(unkey(key)) == "merged":
                over[unkey(key)] = self.premerged[_slot(depth, key)]
        return over

    def lora_factors(self, pick) -> dict[str, tuple]:
        """``{matrix: (A, B, scale)}`` of the factored matrices, one depth's slice by ``pick``."""
        return {unkey(k): (self.factor(k, "A", pick), self.factor(k, "B", pick), self.lora_scales.get(unkey(k), 1.0))
                for k in self.lora_A.keys() if self.lora_forms.get(unkey(k)) == "factored"}

    def factor(self, key: str, which: str, pick) -> torch.Tensor:
        """One depth's slice (by ``pick``) of factor ``which`` ("A" or "B") of matrix ``key``:
        dequantised from its int8 codes where :func:`loopify.nn.quant.quantize_lora_` stored
        them (``codes * scale`` of the slice only), else the float factor's."""
        stacked = self.lora_A[key] if which == "A" else self.lora_B[key]
        codes = self._modules.get("lora_codes")
        if codes is None or f"{which}_{key}" not in codes:
            return pick(stacked)
        q, s = pick(codes[f"{which}_{key}"]), pick(codes[f"{which}_{key}_scale"])
        return q.to(stacked.dtype) * s.to(stacked.dtype).unsqueeze(-1)

    def set_factor_codes(self, key: str, which: str, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Store int8 codes ``q`` ([L, rows, cols]) and scales ([L, rows]) for factor ``which`` of
        matrix ``key`` (read by :meth:`factor`)."""
        if "lora_codes" not in self._modules:
            self.lora_codes = nn.ParameterDict()
        self.lora_codes[f"{which}_{key}"] = nn.Parameter(q, requires_grad=False)
        self.lora_codes[f"{which}_{key}_scale"] = nn.Parameter(scale, requires_grad=False)

    def step_variants(self, piece: sharing.Piece, prefix: str = "") -> dict[str, list[tuple[str, torch.Tensor]]]:
        """For a staged loop body (one program for every step): each merged matrix the body reads
        (``premerged`` of its depth at step 0, named ``prefix + "premerged." + slot``) and the
        ``(name, tensor)`` it stands for at steps 0..max_loops-1. Empty for bodies whose depths
        do not depend on the step."""
        if not piece.stride or not self.lora_forms:
            return {}
        out = {}
        for k in range(piece.per):
            for key in self.lora_A.keys():
                if self.lora_forms.get(unkey(key)) == "merged":
                    slots = [_slot(piece.offset + s * piece.stride + k, key) for s in range(self.spec.max_loops)]
                    out[f"{prefix}premerged.{slots[0]}"] = [(f"{prefix}premerged.{sl}", self.premerged[sl])
                                                            for sl in slots]
        return out

    def overrides(self, block_index: int, pick) -> dict[str, torch.Tensor]:
        """Per-depth parameter overrides for block ``block_index``; ``pick`` takes one depth's
        slice of a [L, ...] tensor (an int index in eager mode, a step tensor in staged bodies)."""
        names = dict(self.blocks[block_index].named_parameters())
        over: dict[str, torch.Tensor] = {}
        for key, stacked in self.depth_params.items():
            over[unkey(key)] = pick(stacked)
        for key in self.lora_A.keys():
            name = unkey(key)
            over[name] = lora.merged(names[name], pick(self.lora_A[key]), pick(self.lora_B[key]),
                                     self.lora_scales.get(name, 1.0))
        return over

    # -- execution -----------------------------------------------------------------------------

    def call_block(self, b: int, over: dict, args: tuple, kwargs: dict, factors: dict | None = None):
        """Run block ``b`` with parameter overrides ``over`` and the factored LoRA ``factors``
        (``{matrix: (A, B, scale)}``, applied by :class:`lora.FactoredMode`)."""
        block = self.blocks[b]
        if factors:
            params = dict(block.named_parameters())  # what the block reads (export's tensors while tracing)
            with lora.FactoredMode({id(params[n]): f for n, f in factors.items()}):
                return self.call_block(b, over, args, kwargs)
        if over:
            return torch.func.functional_call(block, over, args, kwargs, strict=False)
        return block(*args, **kwargs)

    def _state(self, args: list, kwargs: dict):
        """Where the hidden state is in this call: ("arg", i) or ("kw", name)."""
        s = self.spec.state_arg
        if s < len(args):
            return "arg", s
        if self.spec.state_name and self.spec.state_name in kwargs:
            return "kw", self.spec.state_name
        raise TypeError(f"loop {self.key}: the call carries no hidden state (argument {s})")

    def phase_calls(self, args, kwargs: dict) -> list[tuple[list, dict]]:
        """The call arguments of each group position, ``[(args, kwargs)] * p`` (one entry for
        p = 1): module form, positions 0..p-2 from the :class:`GroupInput` entries that ran just
        before the loop; graph form, the call's arguments cut into p equal parts."""
        p = self.spec.period
        if p == 1:
            return [(list(args), kwargs)]
        pending = self.__dict__.get("_pending") or {}
        if pending:
            self.__dict__["_pending"] = {}
            if sorted(pending) != list(range(p - 1)):
                raise RuntimeError(f"loop {self.key}: its group inputs did not all run before it")
            return [(list(pending[j][0]), dict(pending[j][1])) for j in range(p - 1)] + [(list(args), kwargs)]
        if kwargs or len(args) % p:
            raise RuntimeError(f"loop {self.key}: a group loop's call gives the arguments of {p} layers in turn")
        m = len(args) // p
        return [(list(args[j * m:(j + 1) * m]), {}) for j in range(p)]

    def stash(self, phase: int, args: tuple, kwargs: dict) -> None:
        """Keep group position ``phase``'s call arguments for the loop's next call (GroupInput)."""
        self.__dict__.setdefault("_pending", {})[phase] = (args, kwargs)

    def forward(self, *args, **kwargs):
        extras = args[len(args) - self.n_extra:] if self.n_extra else ()
        args = list(args[:len(args) - self.n_extra] if self.n_extra else args)
        if self.modality_token is not None and not self.n_extra:  # module form: read while running
            from loopify.nn.connectors import current_modality

            extras = (current_modality(),)
        phases = self.phase_calls(args, kwargs)
        p = len(phases)
        where, s = self._state(*phases[0])
        h = h_in = (phases[0][0] if where == "arg" else phases[0][1])[s]
        capture = _capture_begin()
        if self.router is not None:
            from loopify.nn import routing

            out, final, calls = routing.run(self, args, kwargs, where, s)
            if capture is not None:
                self._capture_end(capture, calls, {}, final, h)
            self.layer_tail = tuple(t is not None for t in out[1:]) if isinstance(out, tuple) else None
            return (final, *out[1:]) if isinstance(out, tuple) else final
        if self.spiral is not None:
            from loopify.nn import spiral

            out, final = spiral.run(self, args, kwargs, where, s, extras[0] if extras else None)
            if capture is not None:
                self._capture_end(capture, len(self.depth_schedule()), {}, final, h)
            self.layer_tail = tuple(t is not None for t in out[1:]) if isinstance(out, tuple) else None
            return (final, *out[1:]) if isinstance(out, tuple) else final
        prefix = _PREFIX.get()
        if prefix is not None:
            n = prefix.calls[self.key] = prefix.calls.get(self.key, 0) + 1
            if n > 1 or capture is not None:
                prefix.ok = False
            elif prefix.replay is not None and prefix.replay in prefix.taps.get(self.key, {}):
                prefix.replayed += 1
                return prefix.taps[self.key][prefix.replay]
        taps_prev: list[torch.Tensor] | None = None
        out = None
        index = 0
        last_at: dict[int, torch.Tensor] = {}  # the latest state after each depth position
        runs = [0] * len(self.blocks)  # recursions of each block so far
        # record (cycle and deepen loops, whose count-k schedule is the first k steps of this one;
        # a loop that records nothing runs again, in full, when a depth is replayed)
        record = prefix is not None and prefix.replay is None and prefix.ok and self.stepwise
        full = self.depth_schedule() if record else None
        for i, step in enumerate(self.steps()):
            if self.connector is not None and i > 0 and taps_prev is not None:
                h = self.connector(h, taps_prev, i, *extras)
            taps: list[torch.Tensor] = []
            for depth in step:
                b = self.block_for_depth(depth)
                a, kw = phases[depth % p]
                (a if where == "arg" else kw)[s] = h
                token = _CURRENT.set(Depth(self.key, index, i, b, depth, runs[b]))
                try:
                    factors = self.lora_factors(lambda stacked, d=depth: stacked[d]) if self.lora_forms else None
                    out = self.call_block(b, self.depth_overrides(depth), tuple(a), kw, factors)
                finally:
                    _CURRENT.reset(token)
                index += 1
                runs[b] += 1
                h = last_at[depth] = out[0] if isinstance(out, tuple) else out
                taps.append(h)
            taps_prev = taps
            wanted = prefix.want(self, i + 1) if record else ()
            if wanted and full[:len(sched := self.depth_schedule(i + 1))] == sched:
                for k in wanted:  # the loop's output at depth k: this state
                    prefix.taps.setdefault(self.key, {})[k] = (h, *out[1:]) if isinstance(out, tuple) else h
        if capture is not None:
            self._capture_end(capture, index, last_at, h, h_in)
        # What the layers return besides the hidden state (None or a tensor per entry), for
        # staging: its boundary op must give the model the structure the layer gives.
        self.layer_tail = tuple(t is not None for t in out[1:]) if isinstance(out, tuple) else None
        if isinstance(out, tuple):  # a layer that returns (hidden, ...): the loop does too
            return (h, *out[1:])
        return h

    def _capture_end(self, capture, calls: int, last_at: dict, final, first=None) -> None:
        """Hugging Face models collect hidden states by hooks on their layer classes, one entry
        per layer call, and select them by position (``hidden_states[-1]``, a vision tower's
        ``vision_feature_layer``). A loop stands for ``len(span_layers)`` layers whatever its
        count: its entries are the state after each original depth position (the final output
        for positions not run at this count, and for dropped layers). ``first``: the loop's input,
        the initial entry when the loop is the model's first layers and ran none (a deepened
        loop at count 0: the hooks never fired)."""
        hs, n0, sel = capture
        appended = len(hs) - n0
        keep = n0 + (1 if n0 == 0 and appended == calls + 1 else 0)  # the hooks' initial entry
        del hs[keep:]
        if n0 == 0 and calls == 0 and first is not None:
            hs.append(first if sel is None or 0 in sel else None)
        kept = {p: d for d, p in enumerate(self.spec.depth_paths)}
        for path in self.spec.span_layers or self.spec.depth_paths:
            d = kept.get(path)
            x = last_at.get(d, final) if d is not None else final
            hs.append(x if sel is None or len(hs) in sel else None)

    def extra_repr(self) -> str:
        sp = self.spec
        return (f"mode={sp.mode}, sharing={sp.sharing}, layers={sp.layers}, blocks={sp.blocks}, "
                f"loops={self.loops}/{sp.max_loops}")

    # -- skeleton: what rebuilds the loop around fresh blocks -----------------------------------

    def skeleton(self) -> dict:
        """Everything but the weights: the spec, the per-depth tensors' names and shapes, the
        LoRA scales and the connector's configuration (JSON-able)."""
        return {"spec": self.spec.to_dict(), "loops": self.loops,
                "depth_params": {k: list(p.shape) for k, p in self.depth_params.items()},
                "lora": {k: {"A": list(self.lora_A[k].shape), "B": list(self.lora_B[k].shape),
                             "scale": self.lora_scales.get(unkey(k), 1.0)} for k in self.lora_A.keys()},
                "connector": None if self.connector is None else self.connector.config(),
                "n_extra": self.n_extra, "modality_token": self.modality_token,
                "router": None if self.router is None else self.router.spec.to_dict(),
                "spiral": None if self.spiral is None else self.spiral.spec.to_dict()}

    @classmethod
    def from_skeleton(cls, blocks: Sequence[nn.Module], skel: dict) -> "Recursion":
        """A loop with ``skel``'s structure around ``blocks``; per-depth tensors are allocated
        uninitialised (the weights are loaded afterwards)."""
        from loopify.nn.connectors import from_config

        rec = cls(blocks, RecursionSpec.from_dict(skel["spec"]))
        rec.loops = int(skel.get("loops", rec.spec.max_loops))
        for k, shape in skel["depth_params"].items():
            rec.depth_params[k] = nn.Parameter(torch.empty(shape))
        for k, d in skel["lora"].items():
            rec.lora_A[k] = nn.Parameter(torch.empty(d["A"]))
            rec.lora_B[k] = nn.Parameter(torch.empty(d["B"]))
            rec.lora_scales[unkey(k)] = float(d["scale"])
        if skel.get("connector") is not None:
            rec.connector = from_config(skel["connector"])
        rec.n_extra = int(skel.get("n_extra", 0))
        rec.modality_token = skel.get("modality_token")
        if skel.get("router") is not None:
            from loopify.nn.routing import Router, RouterSpec

            rec.router = Router(RouterSpec.from_dict(skel["router"]))
        if skel.get("spiral") is not None:
            from loopify.nn.spiral import Spiral, SpiralSpec

            rec.spiral = Spiral(SpiralSpec.from_dict(skel["spiral"]))
        return rec


class GroupInput(nn.Module):
    """A module-list entry standing for group position ``phase`` (< p - 1) of a group loop: it
    hands the loop its call arguments and passes the hidden state through, in the structure the
    layers return. The loop is not a submodule (it is its own entry of the list)."""

    def __init__(self, loop: Recursion, phase: int):
        super().__init__()
        self.__dict__["loop"] = loop
        self.phase = phase

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            loop = self.__dict__.get("loop")  # absent while a copy is being built
            if name in LAYER_ATTRIBUTES and loop is not None and hasattr(loop.blocks[self.phase], name):
                return getattr(loop.blocks[self.phase], name)
            raise

    def forward(self, *args, **kwargs):
        loop = self.__dict__["loop"]
        loop.stash(self.phase, args, kwargs)
        where, s = loop._state(list(args), kwargs)
        h = args[s] if where == "arg" else kwargs[s]
        return (h, *[None] * (loop.spec.returns - 1)) if loop.spec.returns else h

    def extra_repr(self) -> str:
        return f"group position {self.phase} of {self.__dict__['loop'].key}"


def group_inputs(loop: Recursion) -> list[GroupInput]:
    """The p - 1 entries that precede a group loop in its module list (none for p = 1)."""
    return [GroupInput(loop, j) for j in range(loop.spec.period - 1)]


def _slot(depth: int, key: str) -> str:
    """Name of depth ``depth``'s merged matrix ``key`` in a loop's ``premerged``."""
    return f"d{depth}_{key}"


def deploy_lora(module: nn.Module, policy: str = "auto", rule: str = "forward",
                linear_only: bool = False) -> dict[str, dict]:
    """:meth:`Recursion.deploy_lora` on every relaxed loop of ``module``: ``{loop path: {matrix:
    {"form", "rank", "shape", "overhead"}}}`` (what the manifests record)."""
    return {path: r.deploy_lora(policy, rule, linear_only) for path, r in recursions(module).items() if r.lora_A}


def _tracing() -> bool:
    """Under torch.export / torch.compile: no Python-side caches (the merge must be in the graph)."""
    try:
        return bool(torch.compiler.is_compiling()) or bool(torch.compiler.is_exporting())
    except AttributeError:  # pragma: no cover - older torch
        return False


def _capture_begin():
    """(hidden-state list, its length, selection) of Hugging Face's active output collector, or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - transformers not installed
        return None
    col = _active_collector.get()
    if not col or "hidden_states" not in col:
        return None
    return col["hidden_states"], len(col["hidden_states"]), col.get("_hidden_states_layers")


def key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "__")


def unkey(k: str) -> str:
    return k.replace("__", ".")


def recursions(module: nn.Module) -> dict[str, Recursion]:
    """All loops in a module hierarchy, by module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, Recursion)}


def set_loops(module: nn.Module, loops: int | Sequence[int] | None) -> None:
    """Set the loop count of every loop (one int for all, or one per loop in path order)."""
    loops_by = recursions(module)
    if loops is None:
        for r in loops_by.values():
            r.loops = r.spec.max_loops
        return
    counts = [loops] * len(loops_by) if isinstance(loops, int) else list(loops)
    if len(counts) != len(loops_by):
        raise ValueError(f"{len(counts)} loop counts given for {len(loops_by)} loops")
    for (name, r), n in zip(loops_by.items(), counts):
        r.depth_schedule(n)  # validates
        r.loops = n
