"""Split a converted model into stages: straight programs and loop bodies with a run-time count.

A converted model (a module hierarchy holding :class:`~loopify.nn.recursion.Recursion` loops, in
either form) becomes ``[straight, loop, straight, loop, ..., straight]``. Every stage maps a flat
tuple of tensors (the *carry*) to the next; a loop stage's program takes ``(step, *carry)``
(``step`` an int64 0-d tensor) and returns a carry of the same shapes, and runs n times with n
chosen at run time. This is what the TVM backend compiles into a prologue / loop body / epilogue
sharing one set of weights; :func:`run_stages` runs the same stages in PyTorch.

How: the whole model is exported once with every loop replaced by an opaque ``loopify::boundary``
op (which receives the loop's tensor arguments: positional and keyword, flattened), and the flat
graph is cut at those nodes; the values live across a cut form the carry. Each loop body is
exported on its own from a module that holds only the loop, under the loop's own module path, so
that parameter names match the converted model's and a weight shared by several stages is
recognisable by name.

Loop bodies select per-depth state (LoRA factors, per-depth norms) with the step tensor
(``depth = step * K + k``, see :func:`loopify.nn.sharing.pieces`), so one compiled body serves
every iteration. Connectors read the previous step's taps from the carry; the taps start at zero,
which makes every connector kind exactly neutral at step 0, as in eager mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from loopify.errors import LoopifyError
from loopify.graphs import record_values
from loopify.nn.connectors import current_modality
from loopify.nn.recursion import Recursion, recursions
from loopify.nn.sharing import Piece

STAGE_KINDS = ("straight", "loop")


@torch.library.custom_op("loopify::boundary", mutates_args=())
def boundary(xs: list[torch.Tensor], index: int, state: int) -> torch.Tensor:
    """Stands for loop ``index`` in the outer program: returns its hidden-state argument."""
    return xs[state].clone()


@boundary.register_fake
def _(xs, index, state):
    return torch.empty_like(xs[state])


class StagingError(LoopifyError):
    """The converted model cannot be split into stages."""


@dataclass(frozen=True)
class Stage:
    """One stage of a converted model.

    Attributes:
        kind: ``"straight"`` (runs once) or ``"loop"`` (runs ``n`` times, ``n`` given at run time).
        program: the stage's torch.export program. A loop stage's first input is the int64
            0-d ``step`` tensor; its outputs have the shapes and dtypes of its other inputs.
        name: a label for reports and the manifest.
        min_loops / max_loops / default_loops: the loop-count range recorded in the artifact
            manifest and enforced at run time (loop stages only; ``max_loops`` None: no limit).
        example: the program's flat example inputs (the few imports that must look at values
            need them: boolean-mask sizes).
        group: loop stages with the same group share one run-time count (the per-block loops of
            a sequence-shared span); None: the stage has its own count.
        step_params: a loop stage's parameters that take another tensor at each step:
            ``{state-dict name: [(name, tensor) at step 0, step 1, ...]}`` (merged per-depth LoRA
            matrices: the program reads step 0's; a backend binds step i's at iteration i).
        position: ``(j, N)`` for the stages of a loop with a resolution schedule of N positions
            (:mod:`loopify.nn.spiral`): j >= 0, the body of schedule position j, runs once when
            the group's count n >= N - j, as step ``j - N + min(n, N)``; j = -1, the
            full-resolution steps past the schedule (steps N..n-1, deepened loops). None: an
            ordinary loop stage (steps 0..n-1).
    """

    kind: str
    program: torch.export.ExportedProgram
    name: str = ""
    min_loops: int = 1
    max_loops: int | None = None
    default_loops: int | None = None
    example: tuple | None = None
    group: str | None = None
    step_params: dict = field(default_factory=dict)
    position: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise StagingError(f"stage kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.position is not None and self.kind != "loop":
            raise StagingError("only a loop stage has a schedule position")

    def steps_at(self, n: int) -> list[int]:
        """The steps this loop stage runs when its group's count is ``n``."""
        if self.position is None:
            return list(range(n))
        j, total = self.position
        if j < 0:
            return list(range(total, n))
        return [j - total + min(n, total)] if n >= total - j else []


@dataclass
class LoopCall:
    """How one loop was called: the pytree of its ``([(args, kwargs) per group position],
    extras)`` with the tensor leaves taken out (they cross the boundary, each distinct tensor
    once), the non-tensor leaves by position, and where the state is."""

    spec: object                  # pytree TreeSpec of ([(args, kwargs), ...], extras)
    n_leaves: int
    constants: dict               # leaf position -> non-tensor value
    tensor_leaves: list[int]      # leaf positions of the tensors
    slots: list[int]              # for each of those, its index among the distinct tensors (boundary order)
    n_tensors: int                # distinct tensors crossing the boundary
    state: int                    # index of the hidden state among them
    modality: bool                # a modality mask (module form) travels after the tensors

    def rebuild(self, tensors) -> tuple[list[tuple[list, dict]], tuple]:
        """``(phases, extras)``: each group position's ``(args, kwargs)`` and the graph form's
        trailing connector arguments."""
        leaves = [None] * self.n_leaves
        for k, v in self.constants.items():
            leaves[k] = v
        for k, slot in zip(self.tensor_leaves, self.slots):
            leaves[k] = tensors[slot]
        phases, extras = pytree.tree_unflatten(leaves, self.spec)
        return [(list(a), dict(kw)) for a, kw in phases], tuple(extras)


def _call_of(rec: Recursion, args: tuple, kwargs: dict) -> tuple[LoopCall, list]:
    args = list(args)
    extras = tuple(args[len(args) - rec.n_extra:]) if rec.n_extra else ()
    if rec.n_extra:
        args = args[:len(args) - rec.n_extra]
    phases = rec.phase_calls(args, kwargs)
    leaves, spec = pytree.tree_flatten(([(tuple(a), dict(kw)) for a, kw in phases], extras))
    tensors = [k for k, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
    where, s = rec._state(*phases[0])
    state_obj = phases[0][0][s] if where == "arg" else phases[0][1][s]
    if not isinstance(state_obj, torch.Tensor):
        raise StagingError(f"loop {rec.key}: its hidden-state argument is not a tensor")
    values: list[torch.Tensor] = []
    slots = []
    for k in tensors:  # a tensor several group positions take (a mask, the state) crosses once
        at = next((i for i, v in enumerate(values) if v is leaves[k]), None)
        if at is None:
            at = len(values)
            values.append(leaves[k])
        slots.append(at)
    state = next(i for i, v in enumerate(values) if v is state_obj)
    call = LoopCall(spec, len(leaves), {k: a for k, a in enumerate(leaves) if k not in tensors}, tensors, slots,
                    len(values), state, rec.modality_token is not None and not rec.n_extra)
    if call.modality:
        mask = current_modality()
        if mask is None:
            raise StagingError(f"loop {rec.key}: the model gave its loop no modality mask")
        values.append(mask)
    return call, values


@contextlib.contextmanager
def _markers(loops: dict[str, Recursion], calls: dict[int, LoopCall]):
    """Replace each loop's call by a boundary op over its tensor arguments (recorded in
    ``calls``): non-tensor arguments (``None`` masks, flags) cannot cross a stage boundary and
    are put back in the loop body."""
    saved = {}
    try:
        for i, (path, rec) in enumerate(loops.items()):
            saved[path] = rec.__dict__.get("forward")

            def fwd(*args, _i=i, _rec=rec, **kwargs):
                calls[_i], values = _call_of(_rec, args, kwargs)
                h = torch.ops.loopify.boundary(values, _i, calls[_i].state)
                _capture_final(_rec, values[calls[_i].state], h)
                return _as_layer_output(_rec, h)

            rec.forward = fwd
        yield
    finally:
        for path, rec in loops.items():
            if saved[path] is None:
                rec.__dict__.pop("forward", None)
            else:
                rec.forward = saved[path]


def _as_layer_output(rec: Recursion, h: torch.Tensor):
    """The boundary's hidden state in the structure the loop's layers return: ``(h, None, ...)``
    for layers that return a tuple (Falcon's ``outputs[0]`` would otherwise index the batch)."""
    tail = getattr(rec, "layer_tail", None)
    if tail is None:
        return h
    if any(tail):
        raise StagingError(f"loop {rec.key}: its layers return tensors besides the hidden state "
                           "(attention weights?), which cannot cross a stage boundary")
    return (h, *[None] * len(tail))


def _capture_final(rec: Recursion, x: torch.Tensor, h: torch.Tensor) -> None:
    """Hugging Face's hidden-state collector (a vision tower's ``vision_feature_layer``) gets
    one entry per layer the loop stands for, as :meth:`Recursion._capture_end` gives it; across
    a stage boundary only the loop's final state exists, so a selected earlier entry is refused."""
    from loopify.nn.recursion import _capture_begin

    cap = _capture_begin()
    if cap is None:
        return
    hs, _n0, sel = cap
    if not hs:  # the hooks' initial entry: the first layer's input (here the loop's, ``x``)
        hs.append(x if sel is None or 0 in sel else None)
    n = len(rec.spec.span_layers or rec.spec.depth_paths)
    for i in range(n):
        idx = len(hs)
        wanted = sel is None or idx in sel
        if wanted and sel is not None and i < n - 1:
            raise StagingError(f"loop {rec.key}: the model reads the hidden state of layer {i} inside the loop "
                               "(e.g. a vision_feature_layer other than the last); a loop stage gives only its "
                               "final state")
        hs.append(h if wanted else None)


def _tap_count(rec: Recursion) -> int:
    if rec.connector is None or not rec.stepwise:  # connectors act between steps only
        return 0
    return len(getattr(rec.connector, "positions", []))


def loop_step(rec: Recursion, phases: list[tuple[list, dict]], step: torch.Tensor, taps: list, extras: tuple,
              piece: Piece) -> tuple[torch.Tensor, list]:
    """One pass of ``piece`` of ``rec`` with the depth taken from the step tensor: returns the new
    hidden state and the connector's taps of this step. ``phases``: each group position's call
    arguments (one entry unless the loop runs groups of layers)."""
    where, s = rec._state(*phases[0])
    h = (phases[0][0] if where == "arg" else phases[0][1])[s]
    if rec.connector is not None and rec.stepwise:
        h = rec.connector.staged(h, taps, step, extras)
    new_taps = []
    positions = getattr(rec.connector, "positions", []) if taps else []
    for k in range(piece.per):
        depth = ((step * piece.stride + piece.offset + k).reshape(1) if piece.stride
                 else torch.full((1,), piece.offset + k, dtype=torch.long))
        b = piece.block0 + k
        pick = lambda stacked, d=depth: stacked.index_select(0, d).squeeze(0)  # noqa: E731
        factors = None
        if rec.lora_forms:  # merged matrices: step 0's (see Stage.step_params); factored: sliced factors
            over, factors = rec.deployed_overrides(b, pick, piece.offset + k), rec.lora_factors(pick)
        else:
            over = rec.overrides(b, pick)
        # every step starts at a group boundary (the body is whole groups), so the position is static
        args, kwargs = phases[(piece.offset + k) % len(phases)]
        (args if where == "arg" else kwargs)[s] = h
        out = rec.call_block(b, over, tuple(args), kwargs, factors)
        h = out[0] if isinstance(out, tuple) else out
        if k in positions:
            new_taps.append(h)
    return h, new_taps


class _StepAt(nn.Module):
    """Holds only the loop, at the loop's own module path, so parameter names match the model's.

    Carry: the loop call's tensors (then the modality mask, module form), the connector's taps,
    then values passed through unchanged."""

    def __init__(self, path: str, rec: Recursion, call: LoopCall, piece: Piece, straight: bool = False,
                 coarse: tuple[int, int] | None = None):
        super().__init__()
        cur: nn.Module = self
        parts = path.split(".")
        for p in parts[:-1]:
            child = nn.Module()
            cur.add_module(p, child)
            cur = child
        cur.add_module(parts[-1], rec)
        self._path, self._call, self._piece = path, call, piece
        self._straight = straight  # a once-run piece (no step input)
        self._coarse = coarse  # (schedule position, pooling factor) of a multi-resolution step

    def forward(self, *carry):
        if self._straight:
            step = torch.zeros((), dtype=torch.long)
        else:
            step, carry = carry[0], carry[1:]
        rec = self.get_submodule(self._path)
        n = self._call.n_tensors
        tensors = list(carry[:n])
        mask = [carry[n]] if self._call.modality else []
        n_taps = _tap_count(rec)
        taps = list(carry[n + len(mask):n + len(mask) + n_taps])
        rest = carry[n + len(mask) + n_taps:]
        phases, extras = self._call.rebuild(tensors)
        if not rec.n_extra:  # graph form: the modality mask is the trailing argument (in extras)
            extras = tuple(mask)
        if self._coarse is not None:
            h, new_taps = self._coarse_step(rec, phases, step, mask), []
        else:
            h, new_taps = loop_step(rec, phases, step, taps, extras, self._piece)
        tensors[self._call.state] = h
        return tuple(tensors) + tuple(mask) + tuple(new_taps if n_taps else ()) + tuple(rest)


    def _coarse_step(self, rec: Recursion, phases, step: torch.Tensor, mask: list) -> torch.Tensor:
        """A multi-resolution step: the piece's blocks on the pooled sequence (static group
        count; S group slots with image positions), its gated update unpooled."""
        from loopify.nn import spiral

        position, factor = self._coarse
        (args, kwargs), = phases
        where, s = rec._state(args, kwargs)
        h = (args if where == "arg" else kwargs)[s]
        image = mask[0] if mask else None
        pool = spiral.Pooling(factor, spiral.valid_tokens(args, kwargs, h), image, dense=True)

        def blocks(x, c_args, c_kwargs):
            c_args, c_kwargs = list(c_args), dict(c_kwargs)
            (c_args if where == "arg" else c_kwargs)[s] = x
            y, _ = loop_step(rec, [(c_args, c_kwargs)], step, [], (), self._piece)
            return None, y
        return spiral.coarse_step(rec.spiral, position, pool, h, args, kwargs, where, s,
                                  spiral.block_parameters(rec.blocks[0]), blocks)[1]


def _export_outer(module: nn.Module, captured, loops) -> tuple[torch.export.ExportedProgram, dict[int, LoopCall]]:
    calls: dict[int, LoopCall] = {}
    if any(not hasattr(rec, "layer_tail") for rec in loops.values()):
        with torch.no_grad():  # one eager pass records what the layers return (_as_layer_output)
            module(*captured.args, **captured.kwargs)
    with _markers(loops, calls):
        try:
            outer = torch.export.export(module, tuple(captured.args), dict(captured.kwargs), strict=False)
        except Exception as e:
            raise StagingError(f"exporting the outer program failed: {str(e).splitlines()[0][:300]}") from e
        if any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for c in calls.values()
               for v in c.constants.values()):
            # export saw symbolic sizes: one eager pass records their values at the example
            with torch.no_grad():
                module(*captured.args, **captured.kwargs)
    return outer, calls


def stages_of(module: nn.Module, captured) -> list[Stage]:
    """Split a converted model into stage programs (see the module docstring)."""
    from loopify.capture import flat_inputs

    loops = recursions(module)
    if not loops:
        raise StagingError("the model has no loop to stage")
    outer, calls = _export_outer(module, captured, loops)
    gm = outer.module()
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    markers = [n for n in nodes if n.op == "call_function" and n.target is torch.ops.loopify.boundary.default]
    markers.sort(key=lambda n: n.args[1])
    if [m.args[1] for m in markers] != list(range(len(loops))) or any(pos[a] > pos[b] for a, b in zip(markers, markers[1:])):
        raise StagingError("loops do not appear once each, in order, in the exported program")
    flat = flat_inputs(outer, captured.args, captured.kwargs)
    by_name = record_values(gm, flat)
    values = {n: by_name[n.name] for n in nodes if n.name in by_name}
    loop_list = list(loops.items())
    carries, baked = _carries(nodes, pos, markers, values, loop_list)
    stages: list[Stage] = []
    for s in range(len(markers) + 1):
        start = pos[markers[s - 1]] if s > 0 else -1
        end = pos[markers[s]] if s < len(markers) else len(nodes)
        stages.append(_straight_stage(gm, nodes, pos, s, start, end, markers, carries, values, flat, baked))
        if s < len(markers):
            stages += _loop_stages(loop_list[s], calls[s], carries[s], markers[s], values)
    return stages


def _carries(nodes, pos, markers, values, loop_list):
    """Per boundary: (marker args, taps count, passthrough nodes); and the non-tensor values that
    cross a boundary (baked into the later stage as constants)."""
    carries, baked = [], {}
    for s, m in enumerate(markers):
        margs = list(m.args[0])
        live = [n for n in nodes if pos[n] < pos[m] and n.op not in ("get_attr", "output") and n not in margs
                and any(pos[u] > pos[m] for u in n.users)]
        for n in margs:
            if not isinstance(values[n], torch.Tensor):
                raise StagingError(f"a non-tensor value ({n.name}) crosses loop {s}'s boundary")
        # A size or flag computed before the loop and used after it: every stage is exported at
        # the example's static shapes, so it is a constant there (baked into the later stage).
        for n in live:
            if not isinstance(values[n], torch.Tensor):
                if not isinstance(values[n], (int, float, bool)):
                    raise StagingError(f"a non-tensor value ({n.name}) crosses loop {s}'s boundary")
                baked[n] = values[n]
        live = [n for n in live if n not in baked]
        carries.append((margs, _tap_count(loop_list[s][1]), live))
    return carries, baked


def _loop_stages(item, call: LoopCall, carry, marker, values) -> list[Stage]:
    path, rec = item
    margs, n_taps, live = carry
    state = values[margs[marker.args[2]]]
    carry_vals = [values[n] for n in margs] + [torch.zeros_like(state)] * n_taps + [values[n] for n in live]
    step = torch.zeros((), dtype=torch.long)
    out = []
    pieces = rec.pieces()
    if rec.spiral is not None and [k for k, _ in pieces] != ["loop"]:
        raise StagingError(f"loop {path}: a resolution schedule is staged for one loop piece (cycle sharing or "
                           "deepen mode)")
    for j, (kind, piece) in enumerate(pieces):
        example = (step, *carry_vals) if kind == "loop" else tuple(carry_vals)

        def export(coarse=None, _kind=kind, _piece=piece, _example=example):
            body = _StepAt(path, rec, call, _piece, straight=_kind == "straight", coarse=coarse)
            try:
                return torch.export.export(body, _example, strict=False)
            except Exception as e:
                raise StagingError(f"exporting the body of {path} failed: {str(e).splitlines()[0][:300]}") from e
        variants = rec.step_variants(piece, path + ".") if kind == "loop" else {}
        common = dict(min_loops=0 if rec.deepen else 1, max_loops=None if rec.deepen else rec.spec.max_loops,
                      default_loops=rec.loops, example=example, group=path, step_params=variants)
        if rec.spiral is None:
            out.append(Stage(kind, export(), f"{kind}:{path}:{j}" if j else f"{kind}:{path}", **common))
            continue
        # one stage per schedule position (its own shapes), chosen by the count; the
        # full-resolution positions and the steps past the schedule share one program
        sched = rec.spiral.spec.schedule
        fine = None
        for q, r in enumerate(sched):
            if r == 1 and fine is None:
                fine = export()
            prog = fine if r == 1 else export(coarse=(q, r))
            out.append(Stage("loop", prog, f"loop:{path}:pos{q}/{r}", position=(q, len(sched)), **common))
        if common["max_loops"] is None or common["max_loops"] > len(sched):
            out.append(Stage("loop", fine if fine is not None else export(), f"loop:{path}:rest", position=(-1, len(sched)), **common))
    return out


def _straight_stage(gm, nodes, pos, s, start, end, markers, carries, values, flat, baked) -> Stage:
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    example = []
    if s == 0:
        for n in nodes:
            if n.op == "placeholder":
                env[n] = g.placeholder(n.name)
                env[n].meta = dict(n.meta)
        example = list(flat)
    else:
        margs, n_taps, live = carries[s - 1]
        prev = markers[s - 1]
        for i, n in enumerate(margs):
            p = g.placeholder(f"carry_{n.name}")
            env[n] = p
            example.append(values[n])
        state_node = margs[prev.args[2]]
        env[prev] = env[state_node]  # after the loop, the state slot holds the loop's result
        for i in range(n_taps):
            g.placeholder(f"tap_{i}")
            example.append(torch.zeros_like(values[state_node]))
        for n in live:
            env[n] = g.placeholder(f"carry_{n.name}")
            example.append(values[n])
    def lookup(x):
        if x in baked and x not in env and s > 0:
            return baked[x]
        if x not in env:
            if x.op != "get_attr":  # parameters are re-read by name in each stage
                _missing(x, s)
            env[x] = g.get_attr(x.target)
            env[x].meta = dict(x.meta)
        return env[x]

    for n in nodes[start + 1:end]:
        # Parameters are created on first use (lookup): an unused get_attr would make the stage
        # carry weights it never reads, which the backend then also lays out for this stage.
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            g.output(tuple(lookup(x) for x in _flatten_output(n.args[0])))
            break
        try:
            env[n] = g.node_copy(n, lookup)
        except KeyError as e:
            raise StagingError(str(e)) from None
    else:
        margs, n_taps, live = carries[s]
        outs = [lookup(x) for x in margs]
        state = env[margs[markers[s].args[2]]]
        taps = [g.call_function(torch.ops.aten.zeros_like.default, (state,)) for _ in range(n_taps)]
        outs += taps + [lookup(x) for x in live]
        g.output(tuple(outs))
    sub = torch.fx.GraphModule(gm, g)
    try:
        prog = torch.export.export(sub, tuple(example), strict=False)
    except Exception as e:
        raise StagingError(f"exporting straight stage {s} failed: {str(e).splitlines()[0][:300]}") from e
    return Stage("straight", prog, f"straight:{s}", example=tuple(example))


def _flatten_output(out):
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.fx.Node)]


def _missing(node, s):
    raise KeyError(f"stage {s} uses {node.name}, which is not in its carry")


def run_stages(stages: list[Stage], inputs: list, loops: list[int] | None = None) -> tuple:
    """Run stages in PyTorch: the reference for compiled artifacts, with run-time loop counts."""
    counts = iter(loops or [])
    carry = tuple(inputs)
    group_counts: dict = {}
    for st in stages:
        mod = st.program.module()
        if st.kind == "straight":
            carry = tuple(mod(*carry))
        else:
            key = st.group if st.group is not None else id(st)
            if key not in group_counts:
                group_counts[key] = next(counts, st.default_loops)
            n = group_counts[key]
            for i in st.steps_at(n):
                step = torch.tensor(i, dtype=torch.long)
                if st.step_params:
                    over = {name: ts[i][1] for name, ts in st.step_params.items()}
                    carry = tuple(torch.func.functional_call(mod, over, (step, *carry), strict=False))
                else:
                    carry = tuple(mod(step, *carry))
    return carry
