"""loopify's default CPU schedule rules (DLight-style ``ScheduleRule`` s for llvm targets).

TVM 0.27's CPU pipeline schedules nothing; its DLight CPU rules cover GEMV and row reductions
(softmax, norms) but not matmul, which is where a transformer spends its time. The rules here:

* :class:`Matmul` - ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` (j contiguous in B and C,
  which weight pre-transposition makes true of every linear layer): a register-blocked
  outer-product micro-kernel. Per tile, ``MI`` rows x ``NJ`` columns of C live in a local
  accumulator (``MI * NJ / lanes`` vector registers), each step over k broadcasts ``MI``
  values of A and loads ``NJ / lanes`` vectors of B; the k loop is blocked for L1; the outer
  tile loops run in parallel. ``A[.., i, k] * B[.., j, k]`` (both contiguous in k) gets a
  dot-product kernel instead (k split into vector lanes by rfactor).
* :class:`Elementwise` - injective functions: outer loops fused and parallel, innermost
  vectorised.
* :mod:`.sym_rules` (after ``Matmul``): NT / GEMV / symbolic-shape matmuls and row reductions
  of the generation entry points (``prefill`` / ``decode``); :class:`Elementwise` also
  schedules loop nests with symbolic extents.
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


class Matmul(ScheduleRule):
    """Register-blocked matmul for CPUs (see the module docstring)."""

    def __init__(self, mi: int | None = None, nj_vectors: int = 2, kb: int = 256):
        self.mi = mi
        self.nj_vectors = nj_vectors
        self.kb = kb

    def apply(self, func, target: Target, _tunable: bool):  # noqa: C901 - one decision tree
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        found = _one_reduction(func)
        if found is None:
            return None
        sch, infos, main = found
        kinds = main.dom_kind()
        if kinds.count("R") != 1 or not kinds.endswith("R") or len(kinds) < 3:
            return None
        stmt = sch.get(main.block_rv)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1:
            return None
        # Only a plain multiply-accumulate: C = C + A * B (possibly with casts).
        if not isinstance(stmt.body, tirx.BufferStore):
            return None
        iters = [iv.var for iv in stmt.iter_vars]
        k = iters[-1]
        c_idx = list(stmt.writes[0].region)
        if len(c_idx) < 2:
            return None
        i_var, j_var = (list(_vars_in(c_idx[-2].min)), list(_vars_in(c_idx[-1].min)))
        if len(i_var) != 1 or len(j_var) != 1:
            return None
        i_var, j_var = i_var[0], j_var[0]
        if iters.index(j_var) != len(iters) - 2 or iters.index(i_var) != len(iters) - 3:
            return None
        # Which read is A (has i and k) and which B (has j and k); B's layout.
        reads = [[_vars_in(r.min) for r in rd.region] for rd in stmt.reads]
        a_pos = b_pos = None
        for p, regs in enumerate(reads):
            flat = set().union(*regs) if regs else set()
            if i_var in flat and k in flat and j_var not in flat:
                a_pos = p
            elif j_var in flat and k in flat and i_var not in flat:
                b_pos = p
        if a_pos is None or b_pos is None:
            return None
        b_regs = reads[b_pos]
        if j_var in b_regs[-1] and k in b_regs[-2]:
            layout = "NN"
        elif k in b_regs[-1] and j_var in b_regs[-2]:
            layout = "NT"
        else:
            return None
        a_regs = reads[a_pos]
        if not (k in a_regs[-1]):
            return None  # A transposed: leave it to other rules / tuning
        # Producers (reshape/broadcast of inputs) are inlined into the matmul's reads.
        for b in infos:
            if b is main:
                continue
            if _buffer(sch.get(b.block_rv).writes[0]) in [_buffer(r) for r in stmt.reads]:
                try:
                    sch.compute_inline(b.block_rv)
                except Exception:  # noqa: BLE001
                    return None
        loops = sch.get_loops(main.block_rv)
        extents = [_const(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents):
            return None
        lanes = _lanes(target)
        if layout == "NN":
            return self._outer_product(sch, main.block_rv, loops, extents, lanes, infos, main)
        return None  # NT: pre-transposed weights avoid it; left to tuning

    # ------------------------------------------------------------------------------------------
    def _epilogues(self, sch, infos, main):
        return [b for b in infos if b is not main and b.is_injective()
                and self._alive(sch, b.block_rv)]

    @staticmethod
    def _alive(sch, block_rv) -> bool:
        try:
            sch.get(block_rv)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _outer_product(self, sch, block, loops, extents, lanes, infos, main):
        *batch, li, lj, lk = loops
        *bext, M, N, K = extents
        nj = _largest_divisor(N, [lanes * v for v in (self.nj_vectors, 1)]) or None
        if nj is None:
            return None
        # registers: MI * NJ/lanes accumulators + NJ/lanes B vectors + 1 broadcast <= 16 (x86)
        max_acc = 12 if lanes >= 8 else 24
        mi_cands = [m for m in (self.mi,) if m] or [6, 4, 3, 2, 1]
        mi_cands = [m for m in mi_cands if m * (nj // lanes) <= max_acc]
        mi = _largest_divisor(M, mi_cands) or 1
        kb = _largest_divisor(K, [self.kb, 128, 64, 32, 16, 8]) or K
        io, ii = sch.split(li, [None, mi])
        jo, ji = sch.split(lj, [None, nj])
        ko, ki = sch.split(lk, [None, kb])
        # j tiles outermost: one B panel (K x NJ) stays in L1/L2 while all rows of A pass.
        sch.reorder(*batch, jo, io, ko, ki, ii, ji)
        outer = sch.fuse(*batch, jo) if batch else jo
        cache = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(cache, io, preserve_unit_loops=True)
        sch.unroll(ii)
        sch.vectorize(ji)
        sch.parallel(outer)
        init = sch.decompose_reduction(block, ko)
        # write-back and epilogues
        for ep in self._epilogues(sch, infos, main):
            try:
                sch.reverse_compute_inline(ep.block_rv)
            except Exception:  # noqa: BLE001
                pass
        wl = sch.get_loops(cache)
        if len(wl) >= 2 and _const(sch.get(wl[-1]).extent) in (lanes, 2 * lanes, 4 * lanes):
            sch.vectorize(wl[-1])
        il = sch.get_loops(init)
        sch.vectorize(il[-1])
        return sch


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
    vectorised when its extent is a static multiple of the vector width (a symbolic innermost
    stays scalar: a predicated vector loop would be scalarised anyway), the others fused and
    parallel."""
    inner = loops[-1]
    n = extents[-1]
    outer_loops = loops[:-1]
    if n is not None and n % lanes == 0 and n >= lanes:
        _, v = sch.split(inner, [None, lanes])
        sch.vectorize(v)
    elif n is not None and 2 <= n < lanes:
        sch.vectorize(inner)
    if outer_loops:
        sch.parallel(sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])


def default_rules(target, options=None) -> list:
    """The CPU rules in the order they are tried."""
    from tvm.s_tir import dlight as dl

    from . import sym_rules

    return [Guarded(Matmul()), Guarded(sym_rules.MatmulLike()), Guarded(sym_rules.RowReduction()),
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
