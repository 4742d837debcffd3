"""loopify's default CPU schedule rules (DLight-style ``ScheduleRule`` s for llvm targets).

TVM 0.27's CPU pipeline schedules nothing; its DLight CPU rules cover GEMV and row reductions
(softmax, norms) but not matmul, which is where a transformer spends its time. The rules here:

* :class:`.sym_rules.MatmulLike` - every matmul and GEMV, static or symbolic: for
  ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` (j contiguous in B and C, which weight
  pre-transposition makes true of every linear layer of a static-shape model) a
  register-blocked outer-product micro-kernel. Per tile, ``MI`` rows x ``NJ`` columns of C
  live in a local accumulator (``MI * NJ / lanes`` vector registers), each step over k
  broadcasts ``MI`` values of A and loads ``NJ / lanes`` vectors of B; the k loop is blocked
  for L1; the outer tile loops run in parallel. ``A[.., i, k] * B[.., j, k]`` (both contiguous
  in k) gets a dot-product kernel instead (k split into vector lanes by rfactor); decode's
  matrix-vector products get GEMV kernels.
* :class:`.sym_rules.RowReduction` - norms and softmax with symbolic or unit rows.
* :class:`Elementwise` - injective functions: outer loops fused and parallel, innermost
  vectorised; also loop nests with symbolic extents.
* DLight's ``cpu.GEMV`` and ``cpu.Reduction`` for the rest.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target


def vector_bits(target: Target) -> int:
    """SIMD register width in bits for an llvm target (from its CPU features, not LLVM's
    "vector width" query, which answers 512 for AVX2-only CPUs such as znver3)."""
    import tvm

    llvm_cpu_has_feature = tvm.get_global_func("target.llvm_cpu_has_feature")

    triple = str(target.attrs.get("mtriple", ""))
    if "aarch64" in triple or "arm" in triple:
        return 128
    try:
        if llvm_cpu_has_feature("avx512f", target):
            return 512
        if llvm_cpu_has_feature("avx2", target) or llvm_cpu_has_feature("avx", target):
            return 256
    except Exception:  # noqa: BLE001
        pass
    return 128


def _lanes(target: Target, bits: int = 32) -> int:
    return max(vector_bits(target) // bits, 1)


def _is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def _one_reduction(func):
    """``(schedule, block infos, the reduction block)`` of a PrimFunc with exactly one
    reduction block, else None."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [b for b in infos if not b.is_injective()]
    return (sch, infos, reductions[0]) if len(reductions) == 1 else None


def _const(e) -> int | None:
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _largest_divisor(n: int, candidates) -> int | None:
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return None


def _buffer(region):
    """The buffer of a block's read/write region (``TensorRegion.source`` in TVM 0.27; an
    older ``BufferRegion.buffer`` raised here, so every matmul with a producer block, such as
    a squeezed per-depth bias, fell through to an unscheduled loop nest)."""
    src = getattr(region, "source", None)
    return src if src is not None else region.buffer


def _vars_in(expr) -> set:
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    return collect_vars_used_in_prim_expr(expr)


class Elementwise(ScheduleRule):
    """Injective functions: fuse the outer loops in parallel, vectorise the innermost."""

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not all(b.is_injective() for b in infos):
            return None
        lanes = _lanes(target)
        for info in reversed(infos[:-1]):
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001
                pass
        blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root"))]
        for b in blocks:
            loops = sch.get_loops(b)
            if not loops:
                continue
            extents = [_const(sch.get(lp).extent) for lp in loops]
            if any(e is None for e in extents):
                _symbolic_elementwise(sch, loops, extents, lanes)
                continue
            inner = loops[-1]
            if len(loops) > 1 and extents[-1] % lanes == 0 and extents[-1] >= lanes:
                _, v = sch.split(inner, [None, lanes])
                sch.vectorize(v)
                outer_loops = loops[:-1]
            else:
                outer_loops = loops[:-1] if len(loops) > 1 else loops
            if outer_loops and (len(outer_loops) > 1 or len(loops) > 1):
                sch.parallel(sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])
            elif len(loops) == 1 and extents[0] >= 4 * lanes and extents[0] % lanes == 0:
                o, v = sch.split(loops[0], [None, lanes])
                sch.vectorize(v)
                sch.parallel(o)
        return sch


def _symbolic_elementwise(sch, loops, extents, lanes) -> None:
    """A loop nest with symbolic extents (generation entry points): the innermost loop
    vectorised (a symbolic one by :func:`_split_symbolic`: whole vectors unpredicated), the
    others fused and parallel."""
    inner = loops[-1]
    n = extents[-1]
    outer_loops = loops[:-1]
    if n is None:
        _split_symbolic(sch, inner, lanes)
    elif n % lanes == 0 and n >= lanes:
        _, v = sch.split(inner, [None, lanes])
        sch.vectorize(v)
    elif 2 <= n < lanes:
        sch.vectorize(inner)
    if outer_loops:
        sch.parallel(sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])


def _split_symbolic(sch, loop, lanes: int):
    """Split a loop of symbolic extent by ``lanes`` and vectorise the inner part; the outer
    loop carries TVM's partition hint, so lowering (``LoopPartition``) runs whole vectors
    without a predicate and only the last partial one under it. Without the hint the
    predicate stayed in every iteration and the vector loop was scalarised: a softmax over
    rows of symbolic length (prefill attention) ran 6x slower than at a static length.
    Returns ``(outer, inner)``."""
    o, v = sch.split(loop, [None, lanes])
    sch.vectorize(v)
    sch.annotate(o, "pragma_loop_partition_hint", 1)
    return o, v


def default_rules(target, options=None) -> list:
    """The CPU rules in the order they are tried."""
    from tvm.s_tir import dlight as dl

    from . import sym_rules

    return [Guarded(sym_rules.MatmulLike()), Guarded(sym_rules.RowReduction()),
            Guarded(Unbatched(dl.cpu.GEMV())), Guarded(dl.cpu.Reduction()), Guarded(Elementwise())]


class Unbatched(ScheduleRule):
    """A rule for matrix-vector products, kept off *batched* ones whose matrix differs per batch
    row: a mixture-of-experts layer gathers each token's expert weights ``[S, out, in]`` and
    multiplies them by ``[S, in, 1]``. DLight's CPU GEMV schedule of that function never
    finished in LLVM's code generation (Mixtral, S = 48: stopped after 10 minutes); the reduction
    rule after it schedules it in well under a second."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        if isinstance(func, tirx.PrimFunc) and _batched_matrix(func):
            return None
        return self.rule.apply(func, target, tunable)


def _batched_matrix(func) -> bool:
    """Whether ``func`` is one reduction whose two operands are both indexed by the same leading
    spatial iterator of extent > 1 in their first dimension (a per-row matrix)."""
    found = _one_reduction(func)
    if found is None:
        return False
    sch, _infos, main = found
    stmt = sch.get(main.block_rv)
    if len(stmt.reads) != 2 or not stmt.iter_vars:
        return False
    lead = stmt.iter_vars[0]
    if lead.iter_type != tirx.IterVar.DataPar or _const(lead.dom.extent) in (None, 1):
        return False
    return all(len(r.region) >= 3 and lead.var in _vars_in(r.region[0].min) for r in stmt.reads)


class Guarded(ScheduleRule):
    """Run a rule; a schedule error means "rule does not apply" (logged), never a failed build.

    The result must also be well formed: inlining an epilogue that reads the matmul's output
    twice (``matmul + bias + gelu``, fused once the branches are dataflow) left a reference to a
    buffer that no longer exists, without any schedule error, and the build failed at lowering."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        import logging

        from tvm.s_tir.analysis import verify_well_formed

        try:
            sch = self.rule.apply(func, target, tunable)
            for one in (sch if isinstance(sch, list) else [sch] if sch is not None else []):
                if not verify_well_formed(one.mod, assert_mode=False):
                    raise ValueError("the schedule is not well formed")
            return sch
        except Exception as e:  # noqa: BLE001
            logging.getLogger(__name__).debug("%s skipped a function: %s", type(self.rule).__name__,
                                              str(e).splitlines()[-1] if str(e) else e)
            return None
