"""Split a converted model into stages: straight programs and loop bodies with a run-time count.

A converted model (a module hierarchy holding :class:`~loopify.recursion.Recursion` loops)
becomes ``[straight, loop, straight, loop, ..., straight]``. Every stage maps a flat tuple of
tensors (the *carry*) to the next; a loop stage's program takes ``(step, *carry)`` (``step`` an
int64 0-d tensor) and returns a carry of the same shapes, and runs n times with n chosen at run
time. This is what the TVM backend compiles into a prologue / loop body / epilogue sharing one
set of weights; :func:`run_stages` runs the same stages in PyTorch.

How: the whole model is exported once with every loop replaced by an opaque ``loopify::boundary``
op (which receives the loop's arguments), and the flat graph is cut at those nodes; the values
live across a cut form the carry. Each loop body is exported on its own from a module that holds
only the loop, under the loop's own module path, so that parameter names match the converted
model's and a weight shared by several stages is recognisable by name.

Loop bodies select per-depth state (LoRA factors, per-depth norms) with the step tensor
(``depth = step * K + k``), so one compiled body serves every iteration. Connectors read the
previous step's taps from the carry; the taps start at zero, which makes every connector kind
exactly neutral at step 0, as in eager mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from loopify.errors import LoopifyError
from loopify.graphs import record_values
from loopify.recursion import Recursion, recursions


@torch.library.custom_op("loopify::boundary", mutates_args=())
def boundary(xs: list[torch.Tensor], index: int, state: int) -> torch.Tensor:
    """Stands for loop ``index`` in the outer program: returns its hidden-state argument."""
    return xs[state].clone()


@boundary.register_fake
def _(xs, index, state):
    return torch.empty_like(xs[state])


class StagingError(LoopifyError):
    """The converted model cannot be split into stages."""


@dataclass
class StageProgram:
    """One stage: ``kind`` is "straight" or "loop"; loops carry their run-time count range."""

    kind: str
    program: torch.export.ExportedProgram
    name: str
    min_loops: int = 1
    max_loops: int | None = None
    default_loops: int | None = None
    example: tuple = ()
    #: loop stages with the same group share one run-time count (the loops of one Recursion)
    group: str | None = None


@contextlib.contextmanager
def _markers(loops: dict[str, Recursion], constants: dict[int, tuple[int, dict]]):
    """Replace each loop's call by a boundary op over its tensor arguments.

    Non-tensor arguments (``None`` masks, flags) cannot cross a stage boundary; they are
    recorded in ``constants[i] = (number of arguments, {position: value})`` and put back in
    the loop body.
    """
    saved = {}
    try:
        for i, (path, rec) in enumerate(loops.items()):
            saved[path] = rec.__dict__.get("forward")

            def fwd(*args, _i=i, _rec=rec):
                tensors = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
                if _rec.spec.state_arg not in tensors:
                    raise StagingError(f"loop {_i}: its hidden-state argument is not a tensor")
                constants[_i] = (len(args), {k: a for k, a in enumerate(args) if k not in tensors})
                return torch.ops.loopify.boundary([args[k] for k in tensors], _i,
                                                  tensors.index(_rec.spec.state_arg))

            rec.forward = fwd
        yield
    finally:
        for path, rec in loops.items():
            if saved[path] is None:
                rec.__dict__.pop("forward", None)
            else:
                rec.forward = saved[path]


def _tap_count(rec: Recursion) -> int:
    if rec.connector is None or not rec.stepwise:  # connectors act between steps only
        return 0
    return len(getattr(rec.connector, "positions", []))


@dataclass(frozen=True)
class Piece:
    """Which depths one pass of a stage runs: ``per`` blocks, the k-th at depth
    ``offset + step * stride + k`` with block ``block0 + k`` (deepen: depth ``k``, stride 0)."""

    offset: int
    stride: int
    per: int
    block0: int


def pieces(rec: Recursion) -> list[tuple[str, Piece]]:
    """The stages one loop becomes, in order: ``("loop", piece)`` runs n times (n at run time,
    one count for all of the loop's stages) and ``("straight", piece)`` runs once.

    cycle: one loop over the K blocks; deepen: one loop over the whole span; middle-cycle: the
    first layer, a loop over the K-2 middle blocks, the last layer; sequence: one loop per block
    (block b at depths ``b*n + step``); middle-sequence: the first layer, one loop per middle
    block, the last layer. Matches :func:`loopify.recursion.schedule` at every loop count.
    """
    sp = rec.spec
    if rec.deepen:
        return [("loop", Piece(0, 0, sp.layers, 0))]
    if sp.sharing == "cycle":
        return [("loop", Piece(0, sp.blocks, sp.blocks, 0))]
    if sp.sharing == "sequence":
        n = sp.layers // sp.blocks
        return [("loop", Piece(b * n, 1, 1, b)) for b in range(sp.blocks)]
    inner_l, inner_k = sp.layers - 2, sp.blocks - 2
    if sp.sharing == "middle-cycle":
        middle = [("loop", Piece(1, inner_k, inner_k, 1))]
    else:
        n = inner_l // inner_k
        middle = [("loop", Piece(1 + b * n, 1, 1, 1 + b)) for b in range(inner_k)]
    return [("straight", Piece(0, 0, 1, 0))] + middle + [("straight", Piece(sp.layers - 1, 0, 1, sp.blocks - 1))]


def loop_step(rec: Recursion, n_args: int, step: torch.Tensor, *carry, piece: Piece | None = None) -> tuple:
    """One recursion step of ``rec``, with the depth taken from the step tensor.

    The carry is the loop's ``n_args`` call arguments, then the connector's taps of the previous
    step, then values passed through unchanged. ``piece``: which blocks and depths the step runs
    (default: the whole body of a cycle or deepen loop, see :func:`pieces`).
    """
    if piece is None:
        piece = pieces(rec)[0][1]
    n_taps = _tap_count(rec)
    args = list(carry[:n_args])
    taps = list(carry[n_args:n_args + n_taps])
    rest = carry[n_args + n_taps:]
    extras = tuple(args[len(args) - rec.n_extra:]) if rec.n_extra else ()
    layer_args = args[:len(args) - rec.n_extra] if rec.n_extra else args
    s = rec.spec.state_arg
    h = layer_args[s]
    if rec.connector is not None and rec.stepwise:
        h = _connector_step(rec.connector, h, taps, step, extras)
    new_taps = []
    positions = getattr(rec.connector, "positions", []) if n_taps else []
    for k in range(piece.per):
        depth = ((step * piece.stride + piece.offset + k).reshape(1) if piece.stride
                 else torch.full((1,), piece.offset + k, dtype=torch.long))
        b = piece.block0 + k
        over = rec.overrides(b, lambda stacked, d=depth: stacked.index_select(0, d).squeeze(0))
        layer_args[s] = h
        block = rec.blocks[b]
        h = torch.func.functional_call(block, over, tuple(layer_args), strict=False) if over else block(*layer_args)
        if k in positions:
            new_taps.append(h)
    layer_args[s] = h
    out = list(layer_args) + list(extras) + new_taps + list(rest)
    return tuple(out)


def _connector_step(connector, h, taps, step, extras):
    kind = getattr(connector, "kind", "")
    if kind == "recursive":
        return connector(h, taps, 0, *extras)  # zero taps at step 0 make it exactly h
    if kind == "embedding":
        idx = step.clamp(max=connector.embedding.shape[0] - 1).reshape(1)
        e = connector.embedding.index_select(0, idx).squeeze(0)
        return h + e * (step > 0).to(h.dtype)
    return h


class _StepAt(nn.Module):
    """Holds only the loop, at the loop's own module path, so parameter names match the model's."""

    def __init__(self, path: str, rec: Recursion, n_args: int, constants: dict | None = None,
                 piece: Piece | None = None, straight: bool = False):
        super().__init__()
        cur: nn.Module = self
        parts = path.split(".")
        for p in parts[:-1]:
            child = nn.Module()
            cur.add_module(p, child)
            cur = child
        cur.add_module(parts[-1], rec)
        self._path = path
        self._n_args = n_args
        self._constants = dict(constants or {})  # argument position -> non-tensor value
        self._piece = piece
        self._straight = straight  # a once-run piece (no step input)

    def forward(self, *carry):
        if self._straight:
            step = torch.zeros((), dtype=torch.long)
        else:
            step, carry = carry[0], carry[1:]
        n_tensors = self._n_args - len(self._constants)
        given = iter(carry[:n_tensors])
        args = [self._constants[k] if k in self._constants else next(given) for k in range(self._n_args)]
        out = loop_step(self.get_submodule(self._path), self._n_args, step, *args, *carry[n_tensors:],
                        piece=self._piece)
        return tuple(o for k, o in enumerate(out[:self._n_args]) if k not in self._constants) + \
            tuple(out[self._n_args:])


def stages_of(module: nn.Module, captured) -> list[StageProgram]:
    """Split a converted model into stage programs (see the module docstring)."""
    from loopify.capture import flat_inputs

    loops = recursions(module)
    if not loops:
        raise StagingError("the model has no loop to stage")
    # Record each loop's call arguments (the body's example carry starts with them).
    constants: dict[int, tuple[int, dict]] = {}
    with _markers(loops, constants):
        try:
            outer = torch.export.export(module, tuple(captured.args), dict(captured.kwargs), strict=False)
        except Exception as e:
            raise StagingError(f"exporting the outer program failed: {str(e).splitlines()[0][:300]}") from e
        if any(isinstance(v, torch.SymInt) for _, c in constants.values() for v in c.values()):
            # export saw symbolic sizes: one eager pass records their values at the example
            with torch.no_grad():
                module(*captured.args, **captured.kwargs)
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
    carries = []  # per boundary: (marker args, taps count, passthrough nodes)
    baked: dict[torch.fx.Node, object] = {}  # non-tensor values crossing a boundary -> constants
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

    stages: list[StageProgram] = []
    for s in range(len(markers) + 1):
        start = pos[markers[s - 1]] if s > 0 else -1
        end = pos[markers[s]] if s < len(markers) else len(nodes)
        stages.append(_straight_stage(gm, nodes, pos, s, start, end, markers, carries, values, flat, baked))
        if s < len(markers):
            path, rec = loop_list[s]
            margs, n_taps, live = carries[s]
            carry_vals = [values[n] for n in margs] + [torch.zeros_like(values[margs[markers[s].args[2]]])] * n_taps + \
                         [values[n] for n in live]
            step = torch.zeros((), dtype=torch.long)
            n_args, consts = constants[s]
            for j, (kind, piece) in enumerate(pieces(rec)):
                body = _StepAt(path, rec, n_args, consts, piece, straight=kind == "straight")
                example = (step, *carry_vals) if kind == "loop" else tuple(carry_vals)
                try:
                    prog = torch.export.export(body, example, strict=False)
                except Exception as e:
                    raise StagingError(f"exporting the body of {path} failed: {str(e).splitlines()[0][:300]}") from e
                stages.append(StageProgram(kind, prog, f"{kind}:{path}:{j}" if j else f"{kind}:{path}",
                                           min_loops=0 if rec.deepen else 1,
                                           max_loops=None if rec.deepen else rec.spec.max_loops,
                                           default_loops=rec.loops, example=example, group=path))
    return stages


def _straight_stage(gm, nodes, pos, s, start, end, markers, carries, values, flat, baked) -> StageProgram:
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
    return StageProgram("straight", prog, f"straight:{s}", example=tuple(example))


def _flatten_output(out):
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.fx.Node)]


def _missing(node, s):
    raise KeyError(f"stage {s} uses {node.name}, which is not in its carry")


def run_stages(stages: list[StageProgram], inputs: list, loops: list[int] | None = None) -> tuple:
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
            for i in range(n):
                carry = tuple(mod(torch.tensor(i, dtype=torch.long), *carry))
    return carry
