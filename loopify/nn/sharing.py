"""Sharing maps: which block each depth position of a loop uses, and which depths run.

Relaxed Recursive Transformers (arXiv 2410.20672), for a run of L layers folded into K unique
blocks and N = L/K loops:

* ``cycle``: layer l uses block ``l mod K`` (the K-block body is looped N times);
* ``sequence``: layer l uses block ``l // N`` (each block is repeated N times in a row);
* ``middle-cycle`` / ``middle-sequence``: the first and last layers keep blocks of their own and
  the L-2 middle layers share K-2 blocks by cycle / sequence.

Initialisations of the K blocks from the L layers: ``stepwise`` (layers at
``round(linspace(0, L-1, K))``), ``average`` (mean of the tied layers), ``lower`` (first K),
``upper`` (last K).

At run time a loop count n (1..N) selects the depth positions that run (:func:`schedule`); the
same schedule cut into compiled pieces (one loop body per block for sequence sharing, straight
first and last layers for the middle variants) is :func:`pieces`. Everything that knows a
sharing map lives here: the loop module, the fold pass and staging all ask this module.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARING = ("cycle", "sequence", "middle-cycle", "middle-sequence")
INITS = ("stepwise", "average", "lower", "upper")


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


def max_loops(kind: str, layers: int, blocks: int) -> int:
    """N: the loop count that runs every depth position of the map."""
    if kind in ("cycle", "sequence"):
        return layers // blocks
    return (layers - 2) // (blocks - 2)


def schedule(kind: str, layers: int, blocks: int, loops: int) -> list[int]:
    """Depth positions (indices into the original run) executed with ``loops`` loops, in order.

    With the full loop count this is ``range(layers)``. Fewer loops keep a prefix of each
    block's repetitions.
    """
    full = max_loops(kind, layers, blocks)
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


def default_blocks(length: int) -> int:
    """Halve the unique layers: the largest divisor of L that is at most L/2."""
    for k in range(length // 2, 0, -1):
        if length % k == 0:
            return k
    return 1


def linspace(a: float, b: float, n: int) -> list[float]:
    return [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]


def init_sources(init: str, tied: list[list[int]], length: int, blocks: int) -> list[list[int]]:
    """For each block, the original layers whose weights initialise it (averaged if several)."""
    if init == "average":
        return tied
    if init == "stepwise":
        return [[round(x)] for x in linspace(0, length - 1, blocks)]
    if init == "lower":
        return [[k] for k in range(blocks)]
    if init == "upper":
        return [[length - blocks + k] for k in range(blocks)]
    raise ValueError(f"init must be one of {', '.join(INITS)}")


def block_sources(kind: str, init: str, length: int, blocks: int) -> list[list[int]]:
    """The layers (offsets into the run) that initialise each block under ``kind`` sharing.

    The middle variants keep layer 0 and layer L-1 as their own blocks and initialise the middle
    blocks from the middle layers.
    """
    smap = sharing_map(kind, length, blocks)
    tied = [[l for l in range(length) if smap[l] == b] for b in range(blocks)]
    if not kind.startswith("middle-"):
        return init_sources(init, tied, length, blocks)
    inner = init_sources(init, [[l - 1 for l in t] for t in tied[1:-1]], length - 2, blocks - 2)
    return [[0]] + [[l + 1 for l in s] for s in inner] + [[length - 1]]


@dataclass(frozen=True)
class Piece:
    """Which depths one pass of a compiled stage runs: ``per`` blocks, the k-th at depth
    ``offset + step * stride + k`` with block ``block0 + k`` (deepen: depth ``k``, stride 0)."""

    offset: int
    stride: int
    per: int
    block0: int


def pieces(kind: str, layers: int, blocks: int, deepen: bool = False) -> list[tuple[str, Piece]]:
    """The stages one loop becomes, in order: ``("loop", piece)`` runs n times (n at run time,
    one count for all of the loop's stages) and ``("straight", piece)`` runs once.

    cycle: one loop over the K blocks; deepen: one loop over the whole span; middle-cycle: the
    first layer, a loop over the K-2 middle blocks, the last layer; sequence: one loop per block
    (block b at depths ``b*n + step``); middle-sequence: the first layer, one loop per middle
    block, the last layer. Matches :func:`schedule` at every loop count.
    """
    if deepen:
        return [("loop", Piece(0, 0, layers, 0))]
    if kind == "cycle":
        return [("loop", Piece(0, blocks, blocks, 0))]
    if kind == "sequence":
        n = layers // blocks
        return [("loop", Piece(b * n, 1, 1, b)) for b in range(blocks)]
    inner_l, inner_k = layers - 2, blocks - 2
    if kind == "middle-cycle":
        middle = [("loop", Piece(1, inner_k, inner_k, 1))]
    else:
        n = inner_l // inner_k
        middle = [("loop", Piece(1 + b * n, 1, 1, 1 + b)) for b in range(inner_k)]
    return [("straight", Piece(0, 0, 1, 0))] + middle + [("straight", Piece(layers - 1, 0, 1, blocks - 1))]
