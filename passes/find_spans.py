"""find-spans: find the maximal runs of consecutive interchangeable layers in every layer stack.

A *stack* is any module whose children are numbered 0..n-1 (a ModuleList or Sequential: a text
decoder's layers, a vision tower's encoder layers ...). Two consecutive layers i, i+1 of a stack
are interchangeable when

1. their op graphs are the same: the Weisfeiler-Lehman hash of the labelled op graph (ops, output
   shapes and dtypes, constant arguments, parameter names and shapes) agrees, and an exact VF2
   isomorphism that preserves labels and argument positions exists;
2. their interfaces chain: under that isomorphism every external input of layer i+1 is either
   the value layer i received in the same role (a side input: attention mask, rotary tables,
   position ids ...) or an output of layer i (the hidden state), and the outputs of layer i are
   used by layer i+1 only;
3. they hold no depth-specific state: buffers and constants with the same name are equal.

Where single layers do not repeat, *groups* of p consecutive layers may: Gemma2 alternates
sliding-window and full attention (p = 2), SmolLM3 leaves RoPE out of every fourth layer (p = 4).
Layer i and layer i+p are then compared as above, with the hidden state of layer i+p coming from
layer i+p-1, and a run of at least two interchangeable groups is a span with ``period`` p (every
position of a group keeps its own op graph and side inputs). Per stack the pass takes the period
whose spans cover the most layers, the smallest on a tie (1, plain layers, first).

Layers that break a run are reported with the reason. For every run the pass also measures how
alike its layers are: weight residual against the run's mean (relative Frobenius norm) and cosine
to that mean; and on the example inputs, the angular distance between each layer's input and
output hidden state (Gromov et al.) and ShortGPT's block influence (1 - cosine between them).

This is an analysis pass: the module is returned unchanged, the result is in
``state.analyses["spans"]`` and in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from loopify.graphs import (LayerGraph, ProgramIndex, explain_difference, find_stacks, isomorphisms,
                            layer_graph, module_paths)
from loopify.pipeline import Pass, PassResult, State


@dataclass
class PairCheck:
    ok: bool
    reason: str = ""
    state_inputs: list[str] = field(default_factory=list)   # names in layer i+1 fed by layer i
    side_inputs: list[str] = field(default_factory=list)    # names shared by both layers
    sides: tuple[str, str] | None = None  # the differing side inputs (layer i's, layer i+1's)


@dataclass
class Span:
    """A run of interchangeable layers, or (``period`` p > 1) of interchangeable groups of p
    consecutive layers; ``length`` counts layers (a multiple of p), ``why_groups`` says why
    single layers do not repeat there."""

    stack: str
    start: int
    length: int
    layers: list[str]
    params_per_layer: int
    side_inputs: list[str]
    similarity: dict[str, Any]
    period: int = 1
    why_groups: str = ""
    sides: tuple[str, str] | None = field(default=None, repr=False)  # why_groups' side inputs (to name)

    @property
    def groups(self) -> int:
        return self.length // self.period

    def to_dict(self) -> dict:
        return {"stack": self.stack, "start": self.start, "length": self.length, "layers": self.layers,
                "params_per_layer": self.params_per_layer, "side_inputs": self.side_inputs,
                "similarity": self.similarity, "period": self.period, "why_groups": self.why_groups}


@dataclass
class StackReport:
    path: str
    layers: list[str]
    params_per_layer: list[int]
    hashes: list[str]
    spans: list[Span]
    refused: list[dict]
    matrices: dict[str, list[list[float]]]  # name -> LxL matrix for heatmaps
    hidden: dict[str, list[float]]           # per-layer activation metrics (NaN where unknown)

    def to_dict(self) -> dict:
        return {"path": self.path, "num_layers": len(self.layers), "params_per_layer": self.params_per_layer,
                "runs": [[s.start, s.length] for s in self.spans], "hashes": self.hashes,
                "hidden": self.hidden, "matrices": self.matrices}


@dataclass
class SharedLoop:
    """A module the model already runs several times in a chain with the same weights (ALBERT's
    shared layer group): a loop as it is, with nothing to fold."""

    module: str
    calls: int

    def to_dict(self) -> dict:
        return {"module": self.module, "calls": self.calls}


@dataclass
class SpanAnalysis:
    stacks: list[StackReport]
    shared: list[SharedLoop] = field(default_factory=list)

    @property
    def spans(self) -> list[Span]:
        return [s for st in self.stacks for s in st.spans]

    @property
    def refused(self) -> list[dict]:
        return [r for st in self.stacks for r in st.refused]

    def to_dict(self) -> dict:
        return {"spans": [s.to_dict() for s in self.spans], "refused": self.refused,
                "stacks": [st.to_dict() for st in self.stacks], "shared": [x.to_dict() for x in self.shared]}


# ----------------------------------------------------------------------------------------------


def _check_pair(index: ProgramIndex, a: LayerGraph, b: LayerGraph, feeder: LayerGraph | None = None) -> PairCheck:
    """Whether ``b`` can take ``a``'s place one step later; ``feeder`` is the layer whose output
    is ``b``'s hidden state (``a`` itself for consecutive layers, the layer before ``b`` for
    groups)."""
    feeder = feeder or a
    if a.num_ops == 0 or b.num_ops == 0:
        return PairCheck(False, "layer has no ops in the captured graph (unused)")
    if a.wl_hash != b.wl_hash:
        return PairCheck(False, explain_difference(a, b))
    a_out = set(feeder.outputs)
    a_nodes, b_nodes = set(feeder.nodes), set(b.nodes)
    # Outputs of the feeder that escape to anything but layer b: the hidden state is tapped mid-run.
    for o in feeder.outputs:
        for u in o.users:
            if u not in b_nodes and u.op != "output" and u not in a_nodes:
                where = module_paths(u)[-1] if module_paths(u) else u.name
                return PairCheck(False, f"output of the previous layer is also used outside the stack (by {where or u.name})")
            if u.op == "output":
                return PairCheck(False, "output of the previous layer is also a model output")
    by_name_a = {n.name: n for n in a.inputs}
    by_name_b = {n.name: n for n in b.inputs}
    found_any = False
    last_reason = "no isomorphism preserves the interface"
    last_sides = None
    for mapping in isomorphisms(a, b):
        found_any = True
        state_in, side, bad = [], [], ""
        for ka, kb in mapping.items():
            if not ka.startswith("ext::"):
                continue
            na, nb = by_name_a.get(ka[5:]), by_name_b.get(kb[5:])
            if na is None or nb is None:
                continue  # parameter/buffer: matched by relative name through the label
            if nb in a_out:
                state_in.append(nb.name)
            elif na is nb:
                side.append(na.name)
            else:
                bad = f"different side inputs ({na.name} vs {nb.name}, {_shape(na)})"
                last_sides = (na.name, nb.name)
                break
        if bad:
            last_reason = bad
            continue
        if not state_in:
            last_reason = "does not consume the previous layer's output"
            continue
        # The outputs of a must play the role in a that b's outputs play in b.
        out_b = {n.name for n in b.outputs}
        if any(mapping.get(o.name) not in out_b for o in a.outputs):
            last_reason = "outputs play different roles in consecutive layers"
            continue
        mismatch = _depth_specific_state(index, a, b)
        if mismatch:
            return PairCheck(False, mismatch)
        return PairCheck(True, "", sorted(state_in), sorted(side))
    if not found_any:
        return PairCheck(False, explain_difference(a, b) if a.graph.number_of_nodes() == b.graph.number_of_nodes()
                         else f"different op graph ({a.num_ops} vs {b.num_ops} ops)")
    return PairCheck(False, last_reason, sides=last_sides if last_reason.startswith("different side") else None)


def _shape(n: torch.fx.Node) -> str:
    v = n.meta.get("val")
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _depth_specific_state(index: ProgramIndex, a: LayerGraph, b: LayerGraph) -> str:
    for rel, (kind, fqn_a) in a.state.items():
        if kind == "param" or rel.startswith("<outside>"):
            continue
        kind_b, fqn_b = b.state[rel]
        ta, tb = index.state_tensor(kind, fqn_a), index.state_tensor(kind_b, fqn_b)
        if ta.shape != tb.shape or not torch.equal(ta, tb):
            return f"depth-specific {kind} '{rel}' differs between the layers"
    return ""


def _param_vector(index: ProgramIndex, lg: LayerGraph) -> tuple[tuple, torch.Tensor | None]:
    # Matrices only: they are what sharing and LoRA act on; norm scales and biases (vectors of
    # ones and zeros at init) would otherwise dominate the cosine of randomly initialised layers.
    own = sorted(r for r, (k, _f) in lg.state.items() if k == "param" and not r.startswith("<outside>"))
    names = [r for r in own if index.state_tensor("param", lg.state[r][1]).dim() >= 2] or own
    if not names:
        return (), None
    tensors = [index.state_tensor("param", lg.state[r][1]).detach().double().flatten() for r in names]
    key = tuple((r, tuple(index.state_tensor("param", lg.state[r][1]).shape)) for r in names)
    return key, torch.cat(tensors)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def _static_shape(n: torch.fx.Node) -> tuple[int, ...] | None:
    """A node's tensor shape if every dimension is a plain int (data-dependent sizes are not)."""
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor) or not all(isinstance(d, int) for d in v.shape):
        return None
    return tuple(v.shape)


def _hidden_io(lg: LayerGraph) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """The layer's hidden-state input and output: the largest float input and the last output
    of the same static shape."""
    def is_float(n):
        v = n.meta.get("val")
        return isinstance(v, torch.Tensor) and v.is_floating_point() and _static_shape(n) is not None

    outs = [o for o in lg.outputs if is_float(o)]
    for inp in sorted((i for i in lg.inputs if is_float(i)), key=lambda n: -math.prod(_static_shape(n))):
        same = [o for o in outs if _static_shape(o) == _static_shape(inp)]
        if same:
            return inp, same[-1]
    return None, None


def _record_values(program: torch.export.ExportedProgram, args, kwargs, names: set[str]) -> dict[str, torch.Tensor]:
    """Run the program on the example inputs and keep the values of the named nodes."""
    from loopify.capture import flat_inputs

    gm = program.module()
    kept: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                kept[n.name] = out.detach()
            return out

    flat = flat_inputs(program, args, kwargs)  # the interpreter feeds placeholders directly
    with torch.no_grad():
        Recorder(gm).run(*flat)
    return kept


def _token_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.double().reshape(-1, x.shape[-1])
    y = y.double().reshape(-1, y.shape[-1])
    return torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0)


def _angular(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.arccos(_token_cos(x, y)) / math.pi).mean())


def find_spans(captured, *, min_length: int = 2, stacks: tuple[str, ...] = (), similarity: bool = True,
               groups: bool = True) -> SpanAnalysis:
    """Find spans of interchangeable layers in a captured program (see the module docstring)."""
    program = captured.program
    index = ProgramIndex.build(program)
    all_stacks = find_stacks(index.all_module_paths())
    if stacks:
        missing = [s for s in stacks if s not in all_stacks]
        if missing:
            raise ValueError(f"no layer stack '{missing[0]}'; stacks found: {', '.join(all_stacks) or 'none'}")
        all_stacks = {s: all_stacks[s] for s in stacks}
    layer_graphs = _layer_graphs(index, program, all_stacks)
    reports = []
    wanted_values: set[str] = set()
    hidden_nodes: dict[str, tuple] = {}
    for stack, layers in all_stacks.items():
        lgs = [layer_graphs[p] for p in layers]
        reports.append(_stack_report(index, stack, layers, lgs, min_length, groups))
        for lg in lgs:
            hin, hout = _hidden_io(lg)
            hidden_nodes[lg.path] = (hin, hout)
            if hin is not None:
                wanted_values.update({hin.name, hout.name})
    sides = {n for rep in reports for r in rep.refused for n in r.get("sides", [])}
    sides |= {n for rep in reports for sp in rep.spans for n in (sp.sides or ())}
    if (similarity and wanted_values) or sides:
        values = _record_values(program, captured.args, captured.kwargs,
                                (wanted_values if similarity else set()) | sides)
        if similarity:
            for rep in reports:
                _hidden_similarity(rep, hidden_nodes, values)
        for rep in reports:
            _name_side_inputs(rep, values)
    return SpanAnalysis(reports, shared_loops(program))


def _name_side_inputs(rep: StackReport, values: dict) -> None:
    """Refusals for differing side inputs, said as a person would: which mask each layer uses
    (read from the example values), instead of the graph's node names."""
    for r in rep.refused:
        a, b = r.pop("sides", (None, None))
        if a in values and b in values:
            i = r["layer"]
            r["reason"] = f"breaks the run at layer {i} (vs layer {i - 1}): {_uses(i, values[b], i - 1, values[a])}"
    for sp in rep.spans:
        a, b = sp.sides or (None, None)
        if a in values and b in values:
            i = int(sp.why_groups.split()[1])
            sp.why_groups = f"layer {i} differs from layer {i - 1}: {_uses(i, values[b], i - 1, values[a])}"


def _uses(i: int, mask_i: torch.Tensor, j: int, mask_j: torch.Tensor) -> str:
    return f"layer {i} uses {describe_mask(mask_i)}, layer {j} {describe_mask(mask_j)}"


def describe_mask(t: torch.Tensor) -> str:
    """What an attention mask (boolean, or additive with large negatives) lets a query see:
    the full causal mask, a sliding-window mask of window w, no mask, or another input."""
    if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        return f"another side input of shape {tuple(t.shape)}"
    m = t.reshape(-1, *t.shape[-2:])[0]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    n = m.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if bool(allowed.all()):
        return "no mask (full attention)"
    if torch.equal(allowed, causal):
        return "the full causal mask"
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    if not bool((allowed & ~causal).any()):
        w = int(dist[allowed].max()) + 1
        if torch.equal(allowed, causal & (dist < w)):
            return f"the sliding-window mask (window {w})"
    return f"another mask ({int(allowed.sum())} of {n * n} positions visible)"


def shared_loops(program: torch.export.ExportedProgram) -> list[SharedLoop]:
    """Modules called two or more times in a chain (each call reads the previous call's output):
    torch.export tells the calls of one module apart by ``@k`` suffixes of their
    ``nn_module_stack`` keys. Only the outermost such module of a nest is reported."""
    calls: dict[str, dict[str, set]] = {}
    for n in program.graph.nodes:
        for key, val in (n.meta.get("nn_module_stack") or {}).items():
            calls.setdefault(val[0], {}).setdefault(key, set()).add(n)
    repeated = {p: list(c.values()) for p, c in calls.items() if len(c) >= 2 and p}
    out = []
    for path, groups in sorted(repeated.items()):
        if any(path.startswith(q + ".") for q in repeated):
            continue
        chained = all(any(a in groups[i] for n in groups[i + 1] for a in n.all_input_nodes)
                      for i in range(len(groups) - 1))
        if chained:
            out.append(SharedLoop(path, len(groups)))
    return out


def _layer_graphs(index: ProgramIndex, program, all_stacks: dict) -> dict[str, LayerGraph]:
    """Every layer's op graph; one sweep over the graph assigns call_function nodes to every
    layer path they run in."""
    layer_paths = {p for layers in all_stacks.values() for p in layers}
    members: dict[str, list[torch.fx.Node]] = {p: [] for p in layer_paths}
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        for p in module_paths(n):
            if p in members:
                members[p].append(n)
    return {p: layer_graph(index, p, members[p]) for p in layer_paths}


def _runs(stack: str, lgs: list, checks: list) -> tuple[list[tuple[int, int]], list[dict]]:
    """Maximal runs (start, length) between the refused pairs, and the refusals with reasons."""
    runs, start, refused = [], 0, []
    for i, chk in enumerate(checks):
        if not chk.ok:
            runs.append((start, i + 1 - start))
            refused.append({"stack": stack, "layer": i + 1,
                            "reason": f"breaks the run at layer {i + 1} (vs layer {i}): {chk.reason}"})
            if chk.sides:
                refused[-1]["sides"] = list(chk.sides)
            start = i + 1
    runs.append((start, len(lgs) - start))
    for i, lg in enumerate(lgs):
        if lg.num_ops == 0 and not any(r["layer"] == i for r in refused):
            refused.append({"stack": stack, "layer": i, "reason": "layer has no ops in the captured graph (unused)"})
    return runs, refused


def _group_runs(n: int, p: int, ok, min_groups: int) -> list[tuple[int, int]]:
    """Non-overlapping runs (start, length) of at least ``min_groups`` groups of ``p`` layers,
    greedily from the left; ``ok(i)`` says whether layer i+p can take layer i's place."""
    runs, i = [], 0
    while i < n - p:
        j = i
        while j < n - p and ok(j):
            j += 1
        groups = (j - i + p) // p
        if j > i and groups >= min_groups:
            runs.append((i, groups * p))
            i += groups * p
        else:
            i = max(j, i + 1)
    return runs


def _periodic(index: ProgramIndex, stack: str, lgs: list, min_length: int, covered: int):
    """The smallest period p >= 2 whose group runs cover more than ``covered`` layers:
    (p, runs, checks by layer), or None."""
    n, best = len(lgs), None
    for p in range(2, n // 2 + 1):
        # Op-graph hashes first (cheap): they bound what the exact checks can find.
        bound = _group_runs(n, p, lambda i: lgs[i].wl_hash == lgs[i + p].wl_hash and lgs[i].num_ops > 0, min_length)
        if sum(length for _s, length in bound) <= covered:
            continue
        checks: dict[int, PairCheck] = {}

        def ok(i, p=p, checks=checks):
            if i not in checks:
                checks[i] = _check_pair(index, lgs[i], lgs[i + p], feeder=lgs[i + p - 1])
            return checks[i].ok
        runs = _group_runs(n, p, ok, min_length)
        total = sum(length for _s, length in runs)
        if total > covered:
            best, covered = (p, runs, checks), total
            if total == n:
                break
    return best


def _stack_report(index: ProgramIndex, stack: str, layers: list[str], lgs: list, min_length: int,
                  groups: bool = True) -> StackReport:
    checks = [_check_pair(index, lgs[i], lgs[i + 1]) for i in range(len(lgs) - 1)]
    runs, refused = _runs(stack, lgs, checks)
    runs = [(s, length, 1) for s, length in runs if length >= min_length]
    covered = sum(length for _s, length, _p in runs)
    group = _periodic(index, stack, lgs, min_length, covered) if groups and covered < len(lgs) else None
    if group is not None:
        p, gruns, gchecks = group
        runs = [(s, length, p) for s, length in gruns]
        inside = {i for s, length, _p in runs for i in range(s, s + length)}
        # The single-layer refusals inside a group run are why it is a group run (kept on the
        # span); layers outside every run keep theirs.
        refused = [r for r in refused if r["layer"] not in inside]
    params, vectors = [], []
    for lg in lgs:
        vectors.append(_param_vector(index, lg))
        params.append(sum(index.state_tensor("param", f).numel() for r, (k, f) in lg.state.items()
                          if k == "param" and not r.startswith("<outside>")))
    n = len(lgs)
    wcos = [[_cos(vectors[i][1], vectors[j][1]) if vectors[i][1] is not None and vectors[j][1] is not None
             and vectors[i][0] == vectors[j][0] else float("nan") for j in range(n)] for i in range(n)]
    spans = []
    for s, length, p in runs:
        sim: dict[str, Any] = {}
        vecs = [vectors[i] for i in range(s, s + length)]
        if all(v[1] is not None for v in vecs):
            # Against the mean of the layers at the same position of their groups (all the run's
            # layers for p = 1): those are the layers a block can be shared by.
            means = [torch.stack([vecs[i][1] for i in range(j, length, p)]).mean(0)
                     if len({vecs[i][0] for i in range(j, length, p)}) == 1 else None for j in range(p)]
            if all(m is not None for m in means):
                sim["weight_residual"] = [float((v[1] - means[i % p]).norm() / v[1].norm().clamp_min(1e-30))
                                          for i, v in enumerate(vecs)]
                sim["weight_cosine_to_mean"] = [_cos(v[1], means[i % p]) for i, v in enumerate(vecs)]
        if p == 1:
            side, why, sides = (checks[s].side_inputs if s < len(checks) else []), "", None
        else:
            side = sorted({x for j in range(p) for x in gchecks[s + j].side_inputs})
            broken = next((i for i in range(s, s + p - 1) if not checks[i].ok), None)
            why = "" if broken is None else f"layer {broken + 1} differs from layer {broken}: {checks[broken].reason}"
            sides = None if broken is None else checks[broken].sides
        spans.append(Span(stack, s, length, layers[s:s + length], params[s], side, sim, p, why, sides))
    return StackReport(stack, layers, params, [lg.wl_hash[:12] for lg in lgs], spans, refused,
                       {"weight_cosine": wcos}, {})


def _hidden_similarity(rep: StackReport, hidden_nodes: dict, values: dict) -> None:
    """Per layer on the example inputs: angular distance and block influence between its input
    and output hidden states; between layers: angular distance of their outputs."""
    ang, bi, outs = [], [], []
    for p in rep.layers:
        hin, hout = hidden_nodes[p]
        if hin is not None and hin.name in values and hout.name in values:
            c = _token_cos(values[hin.name], values[hout.name])
            ang.append(float((torch.arccos(c) / math.pi).mean()))
            bi.append(float(1.0 - c.mean()))
            outs.append(values[hout.name])
        else:
            ang.append(float("nan"))
            bi.append(float("nan"))
            outs.append(None)
    rep.hidden = {"angular_distance": ang, "block_influence": bi}
    n = len(outs)
    rep.matrices["hidden_angular_distance"] = [
        [_angular(outs[i], outs[j]) if outs[i] is not None and outs[j] is not None and outs[i].shape == outs[j].shape
         else float("nan") for j in range(n)] for i in range(n)]
    for sp in rep.spans:
        sl = slice(sp.start, sp.start + sp.length)
        sp.similarity["angular_distance"] = ang[sl]
        sp.similarity["block_influence"] = bi[sl]


@dataclass(frozen=True)
class FindSpans(Pass):
    """Find runs of interchangeable layers (analysis only; the module is not changed).

    Attributes:
        min_length: shortest run reported as a span (in groups, for a run of groups).
        groups: also look for runs of repeating groups of p > 1 layers where single layers do
            not repeat (the period covering the most layers is taken, the smallest on a tie).
        stacks: restrict to these stack module paths (``:``-separated in a spec); empty = all.
        similarity: also measure activation similarity on the example inputs.
    """

    name: ClassVar[str] = "find-spans"
    min_length: int = 2
    stacks: tuple[str, ...] = ()
    similarity: bool = True
    groups: bool = True

    def __post_init__(self):
        if self.min_length < 2:
            raise ValueError("min_length must be >= 2 (a span of one layer has nothing to share)")

    def run(self, state: State) -> PassResult:
        analysis = find_spans(state.captured, min_length=self.min_length, stacks=self.stacks,
                              similarity=self.similarity, groups=self.groups)
        new = state.replace(analyses={**state.analyses, "spans": analysis})
        return PassResult(new, False, analysis.to_dict())
