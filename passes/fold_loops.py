"""fold-loops: replace each run of L interchangeable layers by a loop of K shared blocks.

Compress mode (Relaxed Recursive Transformers, arXiv 2410.20672): L = K x N; a sharing map says
which block each depth uses (cycle, sequence, middle-cycle, middle-sequence) and an
initialisation builds the blocks from the original layers:

* ``stepwise``: block k is layer ``round(linspace(0, L-1, K))[k]``;
* ``average``: block k is the mean of the layers tied to it;
* ``lower``: block k is layer k; ``upper``: block k is layer L-K+k.

(The middle variants keep layer 0 and layer L-1 as their own blocks and initialise the middle
blocks from the middle layers.) When K does not divide L the pass says so and offers the even
subsampling ``subsample=true``: keep K*floor(L/K) layers at ``round(linspace(0, L-1, .))`` and
drop the others.

A run of *groups* of p layers (find-spans' ``period``: Gemma2's sliding / full pairs) is folded
as a loop whose body is whole groups: K = p x (blocks per group), cycle sharing, so every block
is one group position's layer and is shared by that position of the groups it stands for; the
initialisations pick or average whole groups. ``blocks`` counts layers (a multiple of p).

Deepen mode (RecursiveVLM, arXiv 2602.09080): the run keeps its own weights (K = L) and is looped
``repeat`` times; the loop count is chosen at run time, 1 reproduces the original model.

The loop is a :class:`loopify.recursion.Recursion` leaf module registered in the module that
called the layers; every depth uses the very same ``nn.Parameter`` objects of its block. Norm
parameters can stay per depth (``norms=per-depth``), stored as [L, ...] tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from loopify.hierarchy import (clone, install_in_graph, install_in_modules, is_graph_form, locate_calls,
                               locate_module_calls)
from loopify.nn.recursion import Recursion, RecursionSpec, group_inputs, key, recursions
from loopify.nn.sharing import block_sources, default_blocks, linspace, max_loops, sharing_map
from loopify.pipeline import Pass, PassResult, State, mark_node, require

__all__ = ["FoldLoops", "default_blocks", "norm_param_names"]


def norm_param_names(block: nn.Module) -> list[str]:
    """Parameters of normalisation modules (class name contains 'Norm'), relative to ``block``."""
    names = []
    for path, mod in block.named_modules():
        ty = getattr(mod, "_ty", None) or type(mod).__name__
        if "Norm" in str(ty).rpartition(".")[2]:
            prefix = f"{path}." if path else ""
            names += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
    return names


@dataclass(frozen=True)
class FoldLoops(Pass):
    """Fold runs of interchangeable layers into loops with shared weights.

    Precondition: the ``spans`` analysis of find-spans.

    Attributes:
        blocks: unique blocks K per run (0: half the run, see :func:`default_blocks`).
        loops: loops N per run instead of ``blocks`` (0: not given).
        sharing: cycle, sequence, middle-cycle or middle-sequence.
        init: stepwise, average, lower or upper.
        norms: ``shared`` (norm weights belong to the block) or ``per-depth`` (kept per layer).
        mode: ``compress`` (tie layers) or ``deepen`` (loop the run with its own weights).
        repeat: deepen mode: default loop count R.
        stacks: only runs in these stacks (``:``-separated module paths); empty: all.
        subsample: when K does not divide L, keep an evenly spaced K*floor(L/K) layers.
        keep_first / keep_last: cut the run: its first / last layers stay unique, outside the
            loop (a layer of high block influence, as SmolLM2's layer 0); the loop folds the rest.
    """

    name: ClassVar[str] = "fold-loops"
    requires: ClassVar[tuple[str, ...]] = ("spans",)
    blocks: int = 0
    loops: int = 0
    sharing: Literal["cycle", "sequence", "middle-cycle", "middle-sequence"] = "cycle"
    init: Literal["stepwise", "average", "lower", "upper"] = "average"
    norms: Literal["shared", "per-depth"] = "shared"
    mode: Literal["compress", "deepen"] = "compress"
    repeat: int = 2
    stacks: tuple[str, ...] = ()
    subsample: bool = False
    keep_first: int = 0
    keep_last: int = 0

    def __post_init__(self):
        if self.blocks < 0 or self.loops < 0:
            raise ValueError("blocks and loops must be >= 1 (or 0 for the default)")
        if self.blocks and self.loops:
            raise ValueError("give blocks or loops, not both")
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")
        if self.keep_first < 0 or self.keep_last < 0:
            raise ValueError("keep_first and keep_last must be >= 0")
        if self.mode == "deepen" and (self.blocks or self.loops or self.sharing != "cycle"):
            raise ValueError("deepen mode keeps every layer's weights: blocks, loops and sharing do not apply (use repeat)")

    def run(self, state: State) -> PassResult:
        require(self, state)  # the spans analysis is never empty once find-spans ran
        found = state.analyses["spans"].spans
        spans = [self._cut(s) for s in found if not self.stacks or s.stack in self.stacks]
        if self.stacks:
            known = {s.stack for s in found}
            missing = [s for s in self.stacks if s not in known]
            if missing:
                raise ValueError(f"no foldable run in stack '{missing[0]}'; stacks with runs: {', '.join(sorted(known)) or 'none'}")
        folded = {(r.spec.stack, r.spec.start) for r in recursions(state.module).values()}
        already = [s for s in spans if (s.stack, s.start) in folded]
        spans = [s for s in spans if s not in already]
        if not spans:
            note = "every span is folded already" if already else "no span of interchangeable layers to fold"
            return PassResult(state, False, {"loops": [], "note": note})
        module = clone(state.module)
        # Later spans of a stack first: folding shifts the module-list indices after a span.
        reports = [self._fold(module, span, state) for span in sorted(spans, key=lambda s: (s.stack, -s.start))]
        reports.sort(key=lambda r: (r["stack"], r["start"]))
        paths = {(r.spec.stack, r.spec.start): p for p, r in recursions(module).items()}
        for r in reports:  # a fold earlier in a module list moves the loops after it
            r["module"] = paths[(r["stack"], r["start"])]
        return PassResult(state.replace(module=module), True, {"loops": reports})

    # ------------------------------------------------------------------------------------------

    def _cut(self, span):
        """The span without its ``keep_first`` first and ``keep_last`` last layers (whole groups)."""
        if not (self.keep_first or self.keep_last):
            return span
        p, a, b = span.period, self.keep_first, span.length - self.keep_last
        if a % p or self.keep_last % p:
            raise ValueError(f"{span.stack}: a run of groups of {p} layers is cut by whole groups: keep_first and "
                             f"keep_last must be multiples of {p}")
        if b - a < 2 * p:
            raise ValueError(f"{span.stack}[{span.start}:{span.start + span.length}]: keeping {a} first and "
                             f"{self.keep_last} last layers leaves {max(b - a, 0)} to fold (at least {2 * p} needed)")
        sim = {k: v[a:b] if isinstance(v, list) and len(v) == span.length else v for k, v in span.similarity.items()}
        return dataclasses.replace(span, start=span.start + a, length=b - a, layers=list(span.layers[a:b]),
                                   similarity=sim)

    def _plan(self, length: int, period: int = 1) -> tuple[int, list[int]]:
        """(K, kept layer offsets) for a run of ``length`` layers (``period``: in groups of p)."""
        if self.mode == "deepen":
            return length, list(range(length))
        if period > 1:
            return self._group_plan(length, period), list(range(length))
        k = self.blocks or (length // self.loops if self.loops else default_blocks(length))
        if self.loops and length % self.loops:
            k = max(1, length // self.loops)
        kept = list(range(length))
        try:
            sharing_map(self.sharing, length, k)
        except ValueError as e:
            if not self.subsample or k > length:
                divisors = [d for d in range(1, length + 1) if length % d == 0]
                hint = (f"; choose blocks in {{{', '.join(map(str, divisors))}}}" if k <= length else
                        f"; the run has only {length} layers, so choose blocks in {{{', '.join(map(str, divisors))}}}")
                if k <= length:
                    hint += f" or pass subsample=true to keep {k * (length // k)} evenly spaced layers"
                raise ValueError(f"{e}{hint}") from None
            n = length // k
            kept = sorted({round(x) for x in linspace(0, length - 1, k * n)})
            sharing_map(self.sharing, len(kept), k)
        return k, kept

    def _group_plan(self, length: int, p: int) -> int:
        """K for a run of ``length // p`` groups of ``p`` layers: whole groups per loop body."""
        groups = length // p
        if self.sharing != "cycle":
            raise ValueError(f"a run of groups of {p} layers folds with cycle sharing only (each block must stay "
                             f"at one position of the group); {self.sharing} would tie layers of different positions")
        if self.subsample:
            raise ValueError(f"subsample does not apply to a run of groups of {p} layers (it would drop single layers)")
        per_group = (self.blocks // p if self.blocks else groups // self.loops if self.loops else default_blocks(groups))
        valid = [d * p for d in range(1, groups + 1) if groups % d == 0]
        if (self.blocks and self.blocks % p) or (self.loops and groups % self.loops) or groups % max(per_group, 1):
            asked = f"blocks={self.blocks}" if self.blocks else f"loops={self.loops}"
            raise ValueError(f"{asked} does not fit a run of {groups} groups of {p} layers: the loop body must be "
                             f"whole groups; choose blocks in {{{', '.join(map(str, valid))}}}")
        return per_group * p

    def _blocks(self, layers: list[nn.Module], k: int, period: int = 1) -> tuple[list[nn.Module], list[list[int]], str, int]:
        """The K blocks (initialised from the layers), their sources, the sharing and N."""
        length = len(layers)
        if self.mode == "deepen":
            sources, sharing = [[i] for i in range(length)], "cycle"
        elif period > 1:  # choose whole groups: block g*p + j comes from position j of its groups
            grouped = block_sources(self.sharing, self.init, length // period, k // period)
            sources = [[g * period + j for g in src] for src in grouped for j in range(period)]
            sharing = self.sharing
        else:
            sources, sharing = block_sources(self.sharing, self.init, length, k), self.sharing
        blocks = []
        for src in sources:
            block = clone(layers[src[0]])
            if len(src) > 1:
                with torch.no_grad():
                    named = [dict(layers[i].named_parameters()) for i in src]
                    for name, p in block.named_parameters():
                        p.copy_(torch.stack([n[name].detach() for n in named]).mean(0))
            blocks.append(block)
        n = self.repeat if self.mode == "deepen" else max_loops(sharing, length, k)
        return blocks, sources, sharing, n

    def _fold(self, root: nn.Module, span, state: State) -> dict:
        period = getattr(span, "period", 1)
        k, kept = self._plan(span.length, period)
        layer_paths = [span.layers[i] for i in kept]
        dropped = [span.layers[i] for i in range(span.length) if i not in kept]
        graph = is_graph_form(root)
        returns = 0
        if graph:
            site = locate_calls(root, span.layers, period)
            state_arg, state_name = site.state_arg, ""
        else:
            msite = locate_module_calls(root, span.layers, lambda: root(*state.captured.args, **state.captured.kwargs),
                                        period)
            check_layer_types(root, msite, span.length, period)
            state_arg, state_name, returns = msite.state_arg, msite.state_name, msite.returns
        layers = [root.get_submodule(p) for p in layer_paths]
        blocks, sources, sharing, n = self._blocks(layers, k, period)
        spec = RecursionSpec(stack=span.stack, start=span.start, layers=len(kept), blocks=k, sharing=sharing,
                             mode=self.mode, state_arg=state_arg, max_loops=n, depth_paths=tuple(layer_paths),
                             state_name=state_name, span_layers=tuple(span.layers),
                             block_sources=tuple(layer_paths[s[0]] for s in sources), period=period,
                             returns=returns if period > 1 else 0)
        rec = Recursion(blocks, spec)
        if self.norms == "per-depth" and self.mode == "compress":
            for name in norm_param_names(blocks[0]):
                stacked = torch.stack([dict(l.named_parameters())[name].detach() for l in layers])
                rec.depth_params[key(name)] = nn.Parameter(stacked.clone())
        before = sum(p.numel() for pth in span.layers for p in root.get_submodule(pth).parameters())
        if graph:
            leaf = span.stack.rpartition(".")[2] or "layers"
            path = install_in_graph(root, site, f"{leaf}_loop", rec, span.layers,
                                    lambda node, origin: mark_node(node, self.name, origin), period)
        else:
            path = install_in_modules(root, msite, span.start, span.length, rec, group_inputs(rec))
        after = sum(p.numel() for p in rec.parameters())
        return {"stack": span.stack, "start": span.start, "layers": span.length, "kept": len(kept),
                "dropped": dropped, "blocks": k, "loops": n, "sharing": sharing, "init": self.init,
                "mode": self.mode, "norms": self.norms, "module": path,
                "block_sources": [[span.layers[kept[i]] for i in s] for s in sources],
                "params_before": int(before), "params_after": int(after), "state_arg": state_arg,
                "period": period}


def check_layer_types(root: nn.Module, site, length: int, period: int = 1) -> None:
    """Refuse a fold that would give the layers after the loop another entry of a config's
    ``layer_types`` (models that look up a layer's mask by its list position, as Qwen2 does):
    the loop takes ``period`` entries (its group inputs and itself), so the later layers move up
    by ``length - period``."""
    stack_len = len(root.get_submodule(site.stack))
    start = site.indices[0]
    for m in root.modules():
        types = getattr(getattr(m, "config", None), "layer_types", None)
        if not isinstance(types, (list, tuple)) or len(types) != stack_len:
            continue
        after = list(types[start + length:])
        if after != list(types[start + period:start + period + len(after)]):
            raise ValueError(f"{site.stack}: the layers after the run have other layer types than the ones "
                             "their new positions would give them (the model looks them up by position)")
