"""The loop: a leaf module that applies K shared blocks over L depth positions.

Sharing maps (Relaxed Recursive Transformers, arXiv 2410.20672), for L layers, K blocks, N = L/K
loops:

* ``cycle``: layer l uses block ``l mod K`` (the K-block body is looped N times);
* ``sequence``: layer l uses block ``l // N`` (each block is repeated N times in a row);
* ``middle-cycle`` / ``middle-sequence``: the first and last layers keep blocks of their own and
  the L-2 middle layers share K-2 blocks by cycle / sequence.

At run time the loop count n (1..N; any n >= 0 in deepen mode) selects the depth positions that
run: cycle runs the body n times, sequence repeats each block n times, the middle variants wrap
that between their unique first and last block.

Per-depth state (LoRA "relaxation", per-depth norm weights) is applied as a parameter override
through ``torch.func.functional_call``: the block's own parameters are the shared ones (the same
``nn.Parameter`` objects at every depth), and depth l sees ``W_shared + scale * B_l @ A_l``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

SHARING = ("cycle", "sequence", "middle-cycle", "middle-sequence")


def sharing_map(kind: str, layers: int, blocks: int) -> list[int]:
    """Block index used by each of ``layers`` depth positions.

    Raises:
        ValueError: when the counts do not fit the map.
    """
    if kind not in SHARING:
        raise ValueError(f"sharing must be one of {', '.join(SHARING)}, not {kind!r}")
    if blocks < 1 or blocks > layers:
        raise ValueError(f"blocks must be between 1 and the span length {layers}, not {blocks}")
    if kind in ("cycle", "sequence"):
        if layers % blocks:
            raise ValueError(f"{layers} layers do not split into {blocks} blocks evenly")
        n = layers // blocks
        return [l % blocks if kind == "cycle" else l // n for l in range(layers)]
    if blocks < 3 or layers < 3:
        raise ValueError(f"{kind} keeps the first and last layer unique: it needs at least 3 blocks and 3 layers")
    inner_l, inner_k = layers - 2, blocks - 2
    if inner_l % inner_k:
        raise ValueError(f"{kind}: the {inner_l} middle layers do not split into {inner_k} middle blocks evenly")
    inner = sharing_map(kind.removeprefix("middle-"), inner_l, inner_k)
    return [0] + [1 + b for b in inner] + [blocks - 1]


def schedule(kind: str, layers: int, blocks: int, loops: int) -> list[int]:
    """Depth positions (indices into the original run) executed with ``loops`` loops, in order.

    With the full loop count this is ``range(layers)``. Fewer loops keep a prefix of each
    block's repetitions.
    """
    full = layers // blocks if kind in ("cycle", "sequence") else (layers - 2) // (blocks - 2)
    if loops < 0:
        raise ValueError("loops must be >= 0")
    if loops > full:
        raise ValueError(f"loops must be at most {full} for this compressed span")
    if kind == "cycle":
        return list(range(loops * blocks))
    if kind == "sequence":
        return [b * full + j for b in range(blocks) for j in range(loops)]
    inner = schedule(kind.removeprefix("middle-"), layers - 2, blocks - 2, loops)
    return [0] + [1 + d for d in inner] + [layers - 1]


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

    def to_dict(self) -> dict:
        return asdict(self)


class Recursion(nn.Module):
    """Applies shared blocks over a depth schedule; the loop count is an attribute set at run time.

    Args:
        blocks: the K unique blocks; each takes the same positional arguments as the original
            layers and returns the new hidden state.
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
        self.connector: nn.Module | None = None
        self.n_extra = 0  # trailing call arguments meant for the connector (modality mask)

    # -- structure -----------------------------------------------------------------------------

    @property
    def deepen(self) -> bool:
        return self.spec.mode == "deepen"

    @property
    def stepwise(self) -> bool:
        """Whether the schedule is cut into recursion steps (cycle and deepen loops), between
        which connectors act; sequence and middle-* schedules are one step."""
        return self.deepen or self.spec.sharing == "cycle"

    def sharing(self) -> list[int]:
        if self.deepen:
            return list(range(self.spec.layers))
        return sharing_map(self.spec.sharing, self.spec.layers, self.spec.blocks)

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
        per = self.spec.layers if self.deepen else self.spec.blocks
        return [sched[i:i + per] for i in range(0, len(sched), per)]

    def block_for_depth(self, depth: int) -> int:
        return self.sharing()[depth]

    def params_at(self, depth: int) -> dict[str, torch.Tensor]:
        """The parameters the block sees at depth position ``depth`` (shared ones by identity)."""
        block = self.blocks[self.block_for_depth(depth)]
        out: dict[str, torch.Tensor] = dict(block.named_parameters())
        over = self._overrides(depth)
        out.update(over)
        return out

    def _overrides(self, depth: int) -> dict[str, torch.Tensor]:
        return self.overrides(self.block_for_depth(depth), lambda stacked: stacked[depth])

    def overrides(self, block_index: int, pick) -> dict[str, torch.Tensor]:
        """Per-depth parameter overrides for block ``block_index``; ``pick`` takes one depth's
        slice of a [L, ...] tensor (an int index in eager mode, a step tensor in staged bodies)."""
        names = dict(self.blocks[block_index].named_parameters())
        over: dict[str, torch.Tensor] = {}
        for key, stacked in self.depth_params.items():
            over[_unkey(key)] = pick(stacked)
        for key in self.lora_A.keys():
            name = _unkey(key)
            A, B = pick(self.lora_A[key]), pick(self.lora_B[key])  # [r, in], [out, r]
            over[name] = names[name] + self.lora_scales.get(name, 1.0) * (B @ A)
        return over

    # -- execution -----------------------------------------------------------------------------

    def run_depth(self, depth: int, args: tuple) -> torch.Tensor:
        block = self.blocks[self.block_for_depth(depth)]
        over = self._overrides(depth)
        if over:
            return torch.func.functional_call(block, over, args, strict=False)
        return block(*args)

    def forward(self, *args):
        extras = args[len(args) - self.n_extra:] if self.n_extra else ()
        args = list(args[:len(args) - self.n_extra] if self.n_extra else args)
        s = self.spec.state_arg
        taps_prev: list[torch.Tensor] | None = None
        for i, step in enumerate(self.steps()):
            if self.connector is not None and i > 0 and taps_prev is not None:
                args[s] = self.connector(args[s], taps_prev, i, *extras)
            taps: list[torch.Tensor] = []
            for depth in step:
                args[s] = self.run_depth(depth, tuple(args))
                taps.append(args[s])
            taps_prev = taps
        return args[s]

    def extra_repr(self) -> str:
        sp = self.spec
        return (f"mode={sp.mode}, sharing={sp.sharing}, layers={sp.layers}, blocks={sp.blocks}, "
                f"loops={self.loops}/{sp.max_loops}")


def _key(name: str) -> str:
    """ParameterDict keys may not contain dots."""
    return name.replace(".", "__")


def _unkey(key: str) -> str:
    return key.replace("__", ".")


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
