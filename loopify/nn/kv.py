"""KV caches for loops: which cache slot each executed depth reads and writes.

A converted loop run k times executes K*k depth positions; a cache keyed by layer index (as
Hugging Face's DynamicCache is) gives the shared block one slot, so its later recursions would
attend to its earlier recursions' keys (Ouro's known cache bug). The policies:

* ``per-depth`` (default, exact): one slot per executed depth position; a lossless plan decodes
  exactly as the original model;
* ``share-first`` (Mixture-of-Recursions' recursive KV sharing, arXiv 2507.10524): one slot per
  block, written by its first recursion; later recursions attend to those keys and values and
  write nothing (``K`` slots instead of ``K*k``);
* ``last`` (Ouro's decode-time sharing): one slot per block holding its latest recursion's keys
  and values: each recursion replaces the current tokens' entries, so past tokens are seen as
  their last recursion left them.

Layers outside loops keep one slot each, keyed by their layer index. The policy decides
*where*; the caches that hold tensors (the eager :class:`loopify.generate.cache.LoopCache`, the
compiled decode step's explicit KV tensors) ask :func:`slot`.
"""

from __future__ import annotations

from typing import NamedTuple

from loopify.nn.recursion import Depth

POLICIES = ("per-depth", "share-first", "last")


class Slot(NamedTuple):
    """Where one attention call's keys and values go, and how: ``append`` (the current tokens are
    added), ``read`` (attend to what the slot holds, write nothing) or ``replace`` (the current
    tokens' entries, added by an earlier recursion of this call, are replaced)."""

    key: tuple
    mode: str


def slot(policy: str, depth: Depth | None, layer_idx: int) -> Slot:
    if policy not in POLICIES:
        raise ValueError(f"KV policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if depth is None:
        return Slot(("layer", int(layer_idx)), "append")
    if policy == "per-depth":
        return Slot(("loop", depth.loop, depth.index), "append")
    mode = "append" if depth.recursion == 0 else ("read" if policy == "share-first" else "replace")
    return Slot(("loop", depth.loop, depth.block), mode)


def slots_per_token(policy: str, loops: list[tuple[int, int]], outside: int) -> int:
    """KV slots a token occupies: ``loops`` holds (blocks K, executed depths) per loop,
    ``outside`` counts the attention layers outside loops."""
    per_loop = (executed if policy == "per-depth" else min(k, executed) for k, executed in loops)
    return outside + sum(per_loop)
