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

Deepen mode (RecursiveVLM, arXiv 2602.09080): the run keeps its own weights (K = L) and is looped
``repeat`` times; the loop count is chosen at run time, 1 reproduces the original model.

The loop is a :class:`loopify.recursion.Recursion` leaf module registered in the module that
called the layers; every depth uses the very same ``nn.Parameter`` objects of its block. Norm
parameters can stay per depth (``norms=per-depth``), stored as [L, ...] tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from loopify.hierarchy import clone, locate_calls, refresh, remove_submodule, unique_name
from loopify.pipeline import Pass, PassResult, State, mark_node
from loopify.recursion import Recursion, RecursionSpec, _key, sharing_map

INITS = ("stepwise", "average", "lower", "upper")


def default_blocks(length: int) -> int:
    """Halve the unique layers: the largest divisor of L that is at most L/2."""
    for k in range(length // 2, 0, -1):
        if length % k == 0:
            return k
    return 1


def init_sources(init: str, tied: list[list[int]], length: int, blocks: int) -> list[list[int]]:
    """For each block, the original layers whose weights initialise it (averaged if several)."""
    if init == "average":
        return tied
    if init == "stepwise":
        return [[round(x)] for x in _linspace(0, length - 1, blocks)]
    if init == "lower":
        return [[k] for k in range(blocks)]
    if init == "upper":
        return [[length - blocks + k] for k in range(blocks)]
    raise ValueError(f"init must be one of {', '.join(INITS)}")


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]


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
    """

    name: ClassVar[str] = "fold-loops"
    blocks: int = 0
    loops: int = 0
    sharing: Literal["cycle", "sequence", "middle-cycle", "middle-sequence"] = "cycle"
    init: Literal["stepwise", "average", "lower", "upper"] = "average"
    norms: Literal["shared", "per-depth"] = "shared"
    mode: Literal["compress", "deepen"] = "compress"
    repeat: int = 2
    stacks: tuple[str, ...] = ()
    subsample: bool = False

    def __post_init__(self):
        if self.blocks < 0 or self.loops < 0:
            raise ValueError("blocks and loops must be >= 1 (or 0 for the default)")
        if self.blocks and self.loops:
            raise ValueError("give blocks or loops, not both")
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")
        if self.mode == "deepen" and (self.blocks or self.loops or self.sharing != "cycle"):
            raise ValueError("deepen mode keeps every layer's weights: blocks, loops and sharing do not apply (use repeat)")

    def run(self, state: State) -> PassResult:
        if "spans" not in state.analyses:
            from loopify.passes.find_spans import find_spans

            state = state.replace(analyses={**state.analyses, "spans": find_spans(state.captured, similarity=False)})
        spans = [s for s in state.analyses["spans"].spans if not self.stacks or s.stack in self.stacks]
        if self.stacks:
            known = {s.stack for s in state.analyses["spans"].spans}
            missing = [s for s in self.stacks if s not in known]
            if missing:
                raise ValueError(f"no foldable run in stack '{missing[0]}'; stacks with runs: {', '.join(sorted(known)) or 'none'}")
        present = {name for name, _ in state.module.named_modules()}
        already = [s for s in spans if any(p not in present for p in s.layers)]
        spans = [s for s in spans if s not in already]
        if not spans:
            note = "every span is folded already" if already else "no span of interchangeable layers to fold"
            return PassResult(state, False, {"loops": [], "note": note})
        module = clone(state.module)
        reports = [self._fold(module, span) for span in spans]
        return PassResult(state.replace(module=module), True, {"loops": reports})

    # ------------------------------------------------------------------------------------------

    def _plan(self, length: int) -> tuple[int, list[int]]:
        """(K, kept layer offsets) for a run of ``length`` layers."""
        if self.mode == "deepen":
            return length, list(range(length))
        k = self.blocks or (length // self.loops if self.loops else default_blocks(length))
        if self.loops and length % self.loops:
            k = max(1, length // self.loops)
        kept = list(range(length))
        try:
            sharing_map(self.sharing, length, k)
        except ValueError as e:
            if not self.subsample or k > length:
                divisors = [d for d in range(1, length + 1) if length % d == 0]
                raise ValueError(f"{e}; choose blocks in {{{', '.join(map(str, divisors))}}} or pass "
                                 f"subsample=true to keep {k * (length // k) if k <= length else 0} evenly spaced layers") from None
            n = length // k
            kept = sorted({round(x) for x in _linspace(0, length - 1, k * n)})
            sharing_map(self.sharing, len(kept), k)
        return k, kept

    def _fold(self, root: nn.Module, span) -> dict:
        k, kept = self._plan(span.length)
        layer_paths = [span.layers[i] for i in kept]
        dropped = [span.layers[i] for i in range(span.length) if i not in kept]
        site = locate_calls(root, span.layers)
        length = len(kept)
        layers = [root.get_submodule(p) for p in layer_paths]
        if self.mode == "deepen":
            tied = [[i] for i in range(length)]
            sources = tied
            sharing = "cycle"
        else:
            smap = sharing_map(self.sharing, length, k)
            tied = [[l for l in range(length) if smap[l] == b] for b in range(k)]
            sharing = self.sharing
            if sharing.startswith("middle-"):
                inner = init_sources(self.init, [[l - 1 for l in t] for t in tied[1:-1]], length - 2, k - 2)
                sources = [[0]] + [[l + 1 for l in s] for s in inner] + [[length - 1]]
            else:
                sources = init_sources(self.init, tied, length, k)
        blocks = []
        for src in sources:
            block = clone(layers[src[0]])
            if len(src) > 1:
                with torch.no_grad():
                    named = [dict(layers[i].named_parameters()) for i in src]
                    for name, p in block.named_parameters():
                        p.copy_(torch.stack([n[name].detach() for n in named]).mean(0))
            blocks.append(block)
        max_loops = self.repeat if self.mode == "deepen" else (
            length // k if sharing in ("cycle", "sequence") else (length - 2) // (k - 2))
        spec = RecursionSpec(stack=span.stack, start=span.start, layers=length, blocks=k, sharing=sharing,
                             mode=self.mode, state_arg=site.state_arg, max_loops=max_loops,
                             depth_paths=tuple(layer_paths))
        rec = Recursion(blocks, spec)
        norm_names = norm_param_names(blocks[0])
        if self.norms == "per-depth" and self.mode == "compress":
            for name in norm_names:
                stacked = torch.stack([dict(l.named_parameters())[name].detach() for l in layers])
                rec.depth_params[_key(name)] = nn.Parameter(stacked.clone())

        before = sum(p.numel() for pth in span.layers for p in root.get_submodule(pth).parameters())
        caller = site.caller
        leaf = span.stack.rpartition(".")[2] or "layers"
        attr = unique_name(caller, f"{leaf}_loop")
        caller.add_module(attr, rec)
        first, last = site.nodes[0], site.nodes[-1]
        with caller.graph.inserting_before(first):
            new = caller.graph.call_module(attr, tuple(first.args))
        new.meta = {k2: v for k2, v in last.meta.items() if k2 in ("val", "tensor_meta")}
        mark_node(new, self.name, [n.target for n in site.nodes])
        last.replace_all_uses_with(new)
        for n in reversed(site.nodes):
            caller.graph.erase_node(n)
        refresh(caller)
        for p in span.layers:
            remove_submodule(root, p)
        after = sum(p.numel() for p in rec.parameters())
        return {"stack": span.stack, "start": span.start, "layers": span.length, "kept": length,
                "dropped": dropped, "blocks": k, "loops": max_loops, "sharing": sharing, "init": self.init,
                "mode": self.mode, "norms": self.norms, "module": f"{site.caller_path}.{attr}".lstrip("."),
                "block_sources": [[span.layers[kept[i]] for i in s] for s in sources],
                "params_before": int(before), "params_after": int(after), "state_arg": site.state_arg}

