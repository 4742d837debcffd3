"""CPU schedule rules for matmuls and row reductions of any shapes: static-shape models, and the
generation entry points ``prefill`` (T symbolic) and ``decode`` (P symbolic; see
:mod:`.generation`). :func:`.cpu_rules.default_rules` tries them first.

Weights are parameters in their PyTorch layout ``W [out, in]``: ``FuseTransposeMatmul`` (see
:func:`.schedules.legalize_passes`) turns ``x @ W.T`` into an "NT" matmul reading W as it is
(k contiguous in both operands). The rules:

* :class:`MatmulLike` - every ``C[.., (i), j] += A[.., (i), k] * B[..]`` block (one reduction,
  innermost; injective producers inlined, epilogues computed per tile), any extent symbolic:

  - **GEMV-NT** (no i, M = 1 normalised away: decode linears, the 49152 x 576 lm head): one
    row of W at a time read contiguously, k split into vector lanes by ``rfactor`` (a vector
    accumulator in registers), the lane sum per row; parallel over coarse chunks of rows.
    Measured (cold weights, 1 thread): 1 row at a time beat 2-8 interleaved rows, and a
    parallel loop per row cost ~30% (its body becomes a closure).
  - **GEMV-NN** (no i, j contiguous in B: decode P.V and Q.K^T over the cache): j tiled by
    vectors (padded when symbolic), k serial, a local accumulator.
  - **NT matmul** (prefill linears and lm head, symbolic M): a register-blocked dot-product
    kernel, ``MI`` rows x ``NJ`` columns of vector accumulators along k (MI + NJ loads per
    MI * NJ FMAs), lane sums per tile, j tiles outermost (a W panel stays in L1), no packing.
    A symbolic M is padded to the row tile (``pad_einsum``: A copied into a padded buffer, C
    written back from one): with a predicate instead, LLVM kept the accumulators in memory.
  - **NN matmul** (every linear of a static-shape model, whose weights are stored transposed;
    prefill attention, M / N / K symbolic): loopify's outer-product kernel, M and N padded to
    the tile when they do not divide it.

* :class:`RowReduction` - norms and softmax with symbolic rows or row lengths, or unit rows
  (decode): every block computed under one row loop; DLight's ``cpu.Reduction`` made each
  output of a decode RMSNorm recompute the whole reduction. Static rows stay with DLight.

Every rule runs under :class:`.cpu_rules.Guarded`: a schedule error means "does not apply".
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .cpu_rules import _buffer, _const, _is_cpu, _lanes, _largest_divisor, _split_symbolic, _vars_in

log = logging.getLogger(__name__)


#: The scope of accumulator tiles. TVM 0.27 places a CPU buffer on the stack only in "global"
#: scope (constant size under 1 KB); a "local" one is a heap workspace, which LLVM cannot keep in
#: registers: the kernels stored every accumulator after every FMA (and reloaded A, which might
#: alias it). As stack arrays with constant indices (unrolled tiles) they become registers.
_REGISTERS = "global"


def _alive(sch, block_rv) -> bool:
    try:
        sch.get(block_rv)
        return True
    except Exception:  # noqa: BLE001
        return False


def _load_buffer(e):
    """The buffer a load expression reads (``TensorLoad.source`` in TVM 0.27), else None."""
    if not hasattr(e, "indices"):
        return None
    src = getattr(e, "source", None)
    return src if src is not None else getattr(e, "buffer", None)


def _is_mac(stmt) -> bool:
    """``C[..] = C[..] + X * Y`` (casts allowed around the product)."""
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False
    a, b = body.value.a, body.value.b
    la, lb = _load_buffer(a), _load_buffer(b)
    if lb is not None and lb.same_as(body.buffer):
        a, b, la = b, a, lb
    if la is None or not la.same_as(body.buffer):
        return False
    while isinstance(b, tirx.Cast):
        b = b.value
    return isinstance(b, tirx.Mul)


class _Matmul:
    """What :func:`_analyse` found: the reduction block and the roles of its loops."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _analyse(sch):
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reds = [b for b in infos if not b.is_injective()]
    if len(reds) != 1:
        return None
    main = reds[0]
    kinds = main.dom_kind()
    if kinds.count("R") != 1 or not kinds.endswith("R") or len(kinds) < 2:
        return None
    stmt = sch.get(main.block_rv)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or not _is_mac(stmt):
        return None
    c_buf = _buffer(stmt.writes[0])
    if any(_buffer(r).same_as(c_buf) for r in stmt.reads):
        return None
    iters = [iv.var for iv in stmt.iter_vars]
    k = iters[-1]
    loops = sch.get_loops(main.block_rv)
    if len(loops) != len(iters):
        return None
    ext = {v: sch.get(lp).extent for v, lp in zip(iters, loops)}
    c_regs = [_vars_in(r.min) for r in stmt.writes[0].region]
    if not c_regs or len(c_regs[-1]) != 1:
        return None
    (j,) = c_regs[-1]
    if j is k or iters.index(j) != len(iters) - 2:
        return None
    reads = [[_vars_in(r.min) for r in rd.region] for rd in stmt.reads]
    flat = [set().union(*rg) if rg else set() for rg in reads]
    # i: the var of C's second-to-last index, unless it is a unit loop or shared with B (batch)
    i = None
    if len(c_regs) >= 2 and len(c_regs[-2]) == 1:
        (cand,) = c_regs[-2]
        if cand in iters and iters.index(cand) == len(iters) - 3 and _const(ext[cand]) != 1:
            if sum(1 for f in flat if cand in f) == 1:
                i = cand
    a_pos = b_pos = None
    for p, f in enumerate(flat):
        if k in f and j not in f:
            a_pos = p
        elif k in f and j in f and (i is None or i not in f):
            b_pos = p
    if a_pos is None or b_pos is None or a_pos == b_pos:
        return None
    if i is not None and i not in flat[a_pos]:
        return None
    a_regs, b_regs = reads[a_pos], reads[b_pos]
    if not a_regs or a_regs[-1] != {k}:
        return None
    if len(b_regs) >= 2 and b_regs[-1] == {k} and j in b_regs[-2]:
        layout = "NT"
    elif len(b_regs) >= 2 and b_regs[-1] == {j} and k in b_regs[-2]:
        layout = "NN"
    else:
        return None
    return _Matmul(infos=infos, main=main, stmt=stmt, iters=iters, k=k, j=j, i=i, a_pos=a_pos,
                   b_pos=b_pos, layout=layout, ext=ext)


def _inline_producers(sch, mm) -> bool:
    reads = [_buffer(r) for r in mm.stmt.reads]
    for b in mm.infos:
        if b is mm.main or not _alive(sch, b.block_rv):
            continue
        if any(_buffer(w).same_as(r) for w in sch.get(b.block_rv).writes for r in reads):
            if not b.is_injective():
                return False
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001
                return False
    return True


def _epilogues(sch, mm):
    """The injective blocks that (transitively) read the matmul's result, in program order, to be
    computed per tile. An injective block that does not is a *side producer* of an epilogue's
    other input (the float32 cast of a float16 bias, added to a float32 product): computed at a
    tile it would produce only the tile's slice of a value every tile reads, so it is inlined
    into its consumers instead (measured: the zoo LLaVA's float16 vision tower was wrong by 0.43
    relative before). One that cannot be inlined refuses the rule."""
    blocks = [b for b in mm.infos if b is not mm.main and b.is_injective() and _alive(sch, b.block_rv)]
    dependent = [_buffer(w) for w in mm.stmt.writes]
    out = []
    for b in blocks:
        st = sch.get(b.block_rv)
        if any(_buffer(r).same_as(d) for r in st.reads for d in dependent):
            out.append(b)
            dependent += [_buffer(w) for w in st.writes]
        else:
            sch.compute_inline(b.block_rv)  # raises when it cannot: the rule does not apply
    return out


def _sum_lanes(sch, mm, rf, r_ko, at):
    """The common tail of the rfactor kernels (GEMV-NT, NT dot): the vector partial sums
    ``rf`` in a local buffer initialised before ``r_ko``; the lane sum (the original block)
    and the epilogues computed at ``at``."""
    sch.set_scope(rf, 0, _REGISTERS)
    init = sch.decompose_reduction(rf, r_ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(mm.main.block_rv, at, preserve_unit_loops=True)
    _unroll_below(sch, mm.main.block_rv, at)
    for ep in _epilogues(sch, mm):
        sch.reverse_compute_at(ep.block_rv, at, preserve_unit_loops=True)
    return sch


def _unroll_below(sch, block_rv, at) -> None:
    """Unroll the lane sum's loops under ``at``: with constant indices into the partial sums
    LLVM keeps them in vector registers. A lane loop indexing them made the buffer memory, and
    the kernel stored every accumulator after every FMA (and reloaded A, which might alias):
    SmolLM2's [128, 576] x [576, 1536] ran at 24 GFLOP/s against PyTorch's 70 at one thread."""
    loops = sch.get_loops(block_rv)
    stmt = sch.get(at)
    pos = next((i for i, lp in enumerate(loops) if sch.get(lp).same_as(stmt)), None)
    for lp in loops[pos + 1:] if pos is not None else []:
        sch.unroll(lp)


def _accumulate_in_registers(sch, mm, outer, tile, ji, kloop, nj: int):
    """The common tail of the register-tiled kernels: C's tile accumulated in a local buffer
    written back at ``tile``, ``outer`` parallel, the column loop ``ji`` (and the init and
    write-back loops) vectorised, the reduction initialised before ``kloop``, and each
    epilogue inlined into the write-back (or computed per tile when it cannot be)."""
    block = mm.main.block_rv
    cache = sch.cache_write(block, 0, _REGISTERS)
    sch.reverse_compute_at(cache, tile, preserve_unit_loops=True)
    sch.vectorize(ji)
    sch.parallel(outer)
    init = sch.decompose_reduction(block, kloop)
    sch.vectorize(sch.get_loops(init)[-1])
    wl = sch.get_loops(cache)
    if _const(sch.get(wl[-1]).extent) == nj:
        sch.vectorize(wl[-1])
    for ep in _epilogues(sch, mm):
        if not _alive(sch, ep.block_rv):
            continue
        try:
            sch.reverse_compute_inline(ep.block_rv)
        except Exception:  # noqa: BLE001
            sch.reverse_compute_at(ep.block_rv, tile, preserve_unit_loops=True)
    return sch


class MatmulLike(ScheduleRule):
    """Matmul / GEMV blocks with any symbolic extent (see the module docstring)."""

    def __init__(self, gemv_rows: int = 1, gemv_vectors: int = 1, mi: int = 4, nj: int = 3,
                 gemv_parallel: bool = True, gemv_unroll: int = 0, gemv_chunks: int = 32):
        """``gemv_rows``: W rows per GEMV tile; ``gemv_vectors``: vectors of k per step;
        ``gemv_chunks``: parallel chunks of rows (``gemv_parallel``: a parallel loop per tile
        when chunking does not apply); ``gemv_unroll``: unroll hint on GEMV's k loop;
        ``mi`` x ``nj``: the NT matmul tile (rows of A x rows of B)."""
        self.gemv_rows = gemv_rows
        self.gemv_vectors = gemv_vectors
        self.gemv_parallel = gemv_parallel
        self.gemv_unroll = gemv_unroll
        self.gemv_chunks = gemv_chunks
        self.mi = mi
        self.nj = nj

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        try:
            return self._apply(func, target, late_inline=False)
        except Exception:  # noqa: BLE001
            # pad_einsum needs plain indices: a dequantised weight (:mod:`.quant`), once inlined,
            # reads its codes at q[j, k // 32 * 16 + k % 16]; pad first, then inline
            return self._apply(func, target, late_inline=True)

    def _apply(self, func, target: Target, late_inline: bool):
        sch = s_tir.Schedule(func)
        mm = _analyse(sch)
        if mm is None:
            return None
        mm.late_inline = late_inline
        if not late_inline and not _inline_producers(sch, mm):
            return None
        lanes = _lanes(target)
        if mm.i is None:
            if mm.layout == "NT":
                return self._gemv_nt(sch, mm, lanes)
            return self._gemv_nn(sch, mm, lanes)
        if mm.layout == "NT":
            return self._dot(sch, mm, lanes)
        return self._outer(sch, mm, lanes)

    def _pad(self, sch, block, factors, lanes):
        """``pad_einsum`` the block to ``factors`` and schedule the copies it adds; the block's
        loops afterwards."""
        root = sch.get_sblock("root")
        before = set(str(sch.get(b).name_hint) for b in sch.get_child_blocks(root))
        sch.pad_einsum(block, factors)
        for b in sch.get_child_blocks(root):
            if str(sch.get(b).name_hint) not in before:
                self._pad_copy(sch, b, lanes)
        return sch.get_loops(block)

    @staticmethod
    def _late(sch, mm):
        """In late-inline mode, inline the producers now (after any padding)."""
        if getattr(mm, "late_inline", False):
            mm.late_inline = False
            if not _inline_producers(sch, mm):
                raise ValueError("a producer of the matmul cannot be inlined")

    # -- M = 1 --------------------------------------------------------------------------------
    def _gemv_nt(self, sch, mm, lanes):
        self._late(sch, mm)
        block = mm.main.block_rv
        loops = sch.get_loops(block)
        *batch, lj, lk = loops
        K = _const(sch.get(lk).extent)
        if K is None:
            return None
        vl = _largest_divisor(K, [lanes * self.gemv_vectors, lanes, lanes // 2, lanes // 4])
        if vl is None or vl < 4:
            return None
        N = _const(sch.get(lj).extent)
        rows = _largest_divisor(N, [self.gemv_rows, 2, 1]) if N is not None else 1
        ji = sch.split(lj, [None, rows])[1] if rows > 1 else None
        ko, kv = sch.split(lk, [None, vl])
        ndim = len(mm.stmt.writes[0].region)
        rf = sch.rfactor(kv, factor_axis=ndim)
        rl = sch.get_loops(rf)
        # rf loops: batch.., jo, (ji), ko, kv
        nb = len(batch)
        if ji is not None:
            r_batch, r_jo, r_ji, r_ko, r_kv = rl[:nb], rl[nb], rl[nb + 1], rl[nb + 2], rl[nb + 3]
            sch.reorder(r_ko, r_ji)
        else:
            r_batch, r_jo, r_ko, r_kv = rl[:nb], rl[nb], rl[nb + 1], rl[nb + 2]
            r_ji = None
        outer = sch.fuse(*r_batch, r_jo) if r_batch else r_jo
        n_outer = _const(sch.get(outer).extent)
        chunks = _largest_divisor(n_outer, [self.gemv_chunks, 16, 8, 4, 2]) if (
            self.gemv_chunks and n_outer is not None) else None
        if chunks and chunks < n_outer:
            # coarse parallel chunks: a parallel loop per row made the row loop ~30% slower
            # (its body is outlined into a closure; measured at one thread)
            po, outer = sch.split(outer, [chunks, None])
            sch.parallel(po)
        elif self.gemv_parallel:
            sch.parallel(outer)
        sch.vectorize(r_kv)
        if r_ji is not None:
            sch.unroll(r_ji)
        if self.gemv_unroll:
            sch.annotate(r_ko, "pragma_auto_unroll_max_step", self.gemv_unroll)
            sch.annotate(r_ko, "pragma_unroll_explicit", 1)
        return _sum_lanes(sch, mm, rf, r_ko, outer)

    def _gemv_nn(self, sch, mm, lanes):
        block = mm.main.block_rv
        loops = sch.get_loops(block)
        *batch, lj, lk = loops
        N = _const(sch.get(lj).extent)
        nj = _largest_divisor(N, [2 * lanes, lanes, lanes // 2]) if N is not None else None
        if nj is None:
            nj = lanes
            *batch, lj, lk = self._pad(sch, block, [1] * len(batch) + [nj, 1], lanes)
        self._late(sch, mm)
        jo, ji = sch.split(lj, [None, nj])
        sch.reorder(jo, lk, ji)
        outer = sch.fuse(*batch, jo) if batch else jo
        return _accumulate_in_registers(sch, mm, outer, outer, ji, lk, nj)

    # -- M > 1, NT ------------------------------------------------------------------------------
    def _dot(self, sch, mm, lanes):
        """C[i, j] = sum_k A[i, k] B[j, k]: MI x NJ vector accumulators along k per tile (one
        A and one B vector load per row / column and k step, MI * NJ FMAs), lane sums at the
        end of k. j tiles outermost so a B panel (NJ rows of k) stays in L1 while A's rows
        pass; a symbolic M only predicates the last row tile."""
        block = mm.main.block_rv
        loops = sch.get_loops(block)
        *batch, li, lj, lk = loops
        K = _const(sch.get(lk).extent)
        if K is None:
            return None
        vl = _largest_divisor(K, [lanes, lanes // 2, lanes // 4])
        if vl is None or vl < 4:
            return None
        N = _const(sch.get(lj).extent)
        nj = _largest_divisor(N, [self.nj, 4, 3, 2, 1]) if N is not None else self.nj
        M = _const(sch.get(li).extent)
        mi = self.mi if M is None else (_largest_divisor(M, [self.mi, 4, 3, 2, 1]) or 1)
        nb = len(batch)
        if M is None or M % mi or N is None:
            # a symbolic M (or N: attention's scores over the keys, grouped query heads as rows)
            # padded to the tile (the operand copied into a padded buffer, C written back from
            # one): the kernel then has no predicate, which kept its accumulators in memory (a
            # conditional store per FMA); a symbolic N at one column per tile ran 12x slower
            *batch, li, lj, lk = self._pad(sch, block, [1] * nb + [mi if (M is None or M % mi) else 1,
                                                                     nj if N is None else 1, 1], lanes)
        self._late(sch, mm)
        io, ii = sch.split(li, [None, mi])
        jo, ji = sch.split(lj, [None, nj])
        ko, kv = sch.split(lk, [None, vl])
        ndim = len(mm.stmt.writes[0].region)
        rf = sch.rfactor(kv, factor_axis=ndim)
        rl = sch.get_loops(rf)
        r_b, (r_io, r_ii, r_jo, r_ji, r_ko, r_kv) = rl[:nb], rl[nb:nb + 6]
        sch.reorder(r_jo, r_io, r_ko, r_ii, r_ji, r_kv)
        blocks = self._row_blocks(sch, r_io, mi, K)
        if blocks is not None:
            # rows in blocks that stay in L2 while the B panels pass (A streamed from memory once
            # per block, not once per panel: at 512 rows of K = 1536 it was per panel)
            r_io0, r_io = sch.split(r_io, [None, blocks])
            sch.reorder(r_io0, r_jo)
            r_jo = sch.fuse(r_io0, r_jo)
        outer = sch.fuse(*r_b, r_jo) if r_b else r_jo
        sch.parallel(outer)
        sch.vectorize(r_kv)
        sch.unroll(r_ji)
        sch.unroll(r_ii)
        return _sum_lanes(sch, mm, rf, r_ko, r_io)

    @staticmethod
    def _row_blocks(sch, io, mi: int, k: int, l2_bytes: int = 256 * 1024):
        """Row tiles per L2 block of A (None: A fits, no blocking). A static count takes a
        divisor of at least half the block (no tail); else, as a symbolic count, the last block
        runs under a predicate (a divisor of 1 would stream every weight panel per row tile)."""
        tiles = max(1, l2_bytes // (mi * k * 4))
        n = _const(sch.get(io).extent)
        if n is not None and n <= tiles:
            return None
        return (_largest_divisor(n, range(tiles, (tiles + 1) // 2 - 1, -1)) if n is not None else None) or tiles

    # -- M > 1, NN ------------------------------------------------------------------------------
    def _outer(self, sch, mm, lanes):
        """C[i, j] = sum_k A[i, k] B[k, j] (j contiguous in B): loopify's outer-product kernel
        (MI rows x NJ columns of C in vector registers, MI broadcasts of A and NJ / lanes vector
        loads of B per k step), with M and N padded to the tile when symbolic."""
        block = mm.main.block_rv
        loops = sch.get_loops(block)
        *batch, li, lj, lk = loops
        nb = len(batch)
        M, N, K = (_const(sch.get(lp).extent) for lp in (li, lj, lk))
        nj = _largest_divisor(N, [2 * lanes, lanes]) if N is not None else None
        if nj is None:
            nj = 2 * lanes if N is None else lanes
        mi = 6 if nj == 2 * lanes else 12
        if lanes < 8:
            mi = 4
        if M is not None:
            mi = _largest_divisor(M, [mi, 6, 4, 3, 2]) or mi
        pad = [1] * nb + [mi if (M is None or M % mi) else 1, nj if (N is None or N % nj) else 1, 1]
        if any(p > 1 for p in pad):
            *batch, li, lj, lk = self._pad(sch, block, pad, lanes)
        self._late(sch, mm)
        io, ii = sch.split(li, [None, mi])
        jo, ji = sch.split(lj, [None, nj])
        kb = _largest_divisor(K, [256, 128, 64, 32, 16, 8]) if K is not None else None
        if kb is not None and kb < K:
            ko, ki = sch.split(lk, [None, kb])
            sch.reorder(*batch, jo, io, ko, ki, ii, ji)
            kouter = ko
        else:
            sch.reorder(*batch, jo, io, lk, ii, ji)
            kouter = lk
        outer = sch.fuse(*batch, jo) if batch else jo
        sch.unroll(ii)
        return _accumulate_in_registers(sch, mm, outer, io, ji, kouter, nj)

    @staticmethod
    def _pad_copy(sch, block, lanes):
        """The copies ``pad_einsum`` adds: innermost vectorised, the rest fused and parallel."""
        loops = sch.get_loops(block)
        if not loops:
            return
        n = _const(sch.get(loops[-1]).extent)
        if n is not None and n % lanes == 0:
            _, v = sch.split(loops[-1], [None, lanes])
            sch.vectorize(v)
        if len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))


def _same_extent(a, b) -> bool:
    ca, cb = _const(a), _const(b)
    if ca is not None or cb is not None:
        return ca == cb
    return str(a) == str(b)


def _vectorize_inner(sch, block_rv, lanes: int) -> None:
    """Vectorise a block's innermost loop: by ``lanes`` when its extent is a multiple, whole when
    it is small; a symbolic extent is split by ``lanes`` (the tail tile runs under a predicate)."""
    loops = sch.get_loops(block_rv)
    if not loops:
        return
    inner = loops[-1]
    n = _const(sch.get(inner).extent)
    if n is None:
        _split_symbolic(sch, inner, lanes)
    elif n % lanes == 0 and n > lanes:
        _, v = sch.split(inner, [None, lanes])
        sch.vectorize(v)
    elif 2 <= n <= lanes:
        sch.vectorize(inner)


class RowReduction(ScheduleRule):
    """Norms and softmax: reductions over the innermost axis with injective blocks around them,
    all sharing leading spatial "row" axes. Each row is computed whole under one (parallel) row
    loop: every block at the row, reductions in a row-local buffer, injective blocks
    vectorised. DLight's ``cpu.Reduction`` instead left each output recomputing the whole
    reduction once its row axes were unit (decode, O(H^2) per norm)."""

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2:
            return None
        if all(b.is_injective() for b in infos) or not infos[-1].is_injective():
            return None
        for b in infos:
            if not b.is_injective():
                k = b.dom_kind()
                if not k.endswith("R") or "S" in k[len(k) - len(k.lstrip("S")):]:
                    return None  # a reduction axis that is not trailing
        lanes = _lanes(target)
        last = infos[-1]
        # elementwise chains over the full row (x * rsqrt, then * weight) become one block
        kept = []
        for b in infos[:-1]:
            # (a block read twice, such as a softmax's exponentials by its sum and its
            # normalisation, is computed once at the row instead)
            if (b.is_injective() and len(sch.get_loops(b.block_rv)) == len(sch.get_loops(last.block_rv))
                    and len(sch.get_consumers(b.block_rv)) <= 1):
                try:
                    sch.compute_inline(b.block_rv)
                    continue
                except Exception:  # noqa: BLE001
                    pass
            kept.append(b)
        infos = kept + [last]
        lloops = sch.get_loops(last.block_rv)
        lext = [sch.get(lp).extent for lp in lloops]
        # row axes: leading axes every block has, spatial everywhere, with the same extents
        rows = len(lloops) - 1 if len(lloops) > 0 else 0
        for b in infos[:-1]:
            kinds = b.dom_kind()
            bl = sch.get_loops(b.block_rv)
            n = 0
            while (n < min(rows, len(bl)) and kinds[n] == "S"
                   and _same_extent(sch.get(bl[n]).extent, lext[n])):
                n += 1
            # a block whose every axis is a row axis is a per-row scalar (rsqrt, divide): fine
            rows = n if n < len(bl) or kinds.count("S") != len(kinds) else min(rows, n)
        symbolic = any(_const(sch.get(lp).extent) is None
                       for b in infos for lp in sch.get_loops(b.block_rv))
        if rows > 0 and not symbolic:
            return None  # static rows: DLight's cpu.Reduction (static-shape models keep it)
        if rows > 0:
            row = sch.fuse(*lloops[:rows]) if rows > 1 else lloops[0]
            sch.parallel(row)
        else:
            row = None
        # reductions as vector partial results first (rfactor wants the reduction at the top of
        # its own loop nest), then every block at the row before any is split: a producer
        # computed at a row whose consumer's loop was already split by vectors took the padded,
        # clamped extent of its region (``min(0, (S + 15) // 16 * 16 - 1)`` terms), whose
        # predicate nothing could partition
        partials = {}
        if row is not None:
            for n, b in enumerate(infos[:-1]):
                if not b.is_injective():
                    partials[n] = _rfactor_lanes(sch, b.block_rv, lanes)
            for n in reversed(range(len(infos) - 1)):
                sch.compute_at(infos[n].block_rv, row, preserve_unit_loops=True)
                if partials.get(n) is not None:
                    sch.compute_at(partials[n], row, preserve_unit_loops=True)
        _vectorize_inner_safe(sch, last.block_rv, lanes, rows)
        for n in reversed(range(len(infos) - 1)):
            if infos[n].is_injective():
                _vectorize_inner_safe(sch, infos[n].block_rv, lanes, rows)
            elif partials.get(n) is not None:
                _vector_partials(sch, partials[n], lanes)
        return sch


def _rfactor_lanes(sch, block_rv, lanes: int):
    """A row reduction (sum, max) as ``lanes`` partial results (the rfactor block, returned),
    then their reduction (the block itself): the exponentials of a softmax's sum (and the
    squares of a norm) are computed a vector at a time instead of one by one. None where TVM
    refuses it (the reduction stays serial, and right)."""
    loops = sch.get_loops(block_rv)
    n = _const(sch.get(loops[-1]).extent)
    if n is None or n % lanes or n <= lanes:
        # a symbolic length stays serial: its last vector needs the split's predicate, which
        # compute_at drops from the partial results' block (it read past the row: measured
        # wrong at 100 of 128 columns)
        return None
    try:
        _, ki = sch.split(loops[-1], [None, lanes])
        rf = sch.rfactor(ki, factor_axis=len(sch.get(block_rv).writes[0].region))
        sch.set_scope(rf, 0, _REGISTERS)
        return rf
    except Exception as e:  # noqa: BLE001
        log.debug("row reduction left serial: %s", str(e).splitlines()[-1] if str(e) else e)
        return None


def _vector_partials(sch, rf, lanes: int) -> None:
    """Schedule the partial results of :func:`_rfactor_lanes` once at their row (``compute_at``
    puts the lanes outermost there): the row's vectors (the reduction loop) outside, the lanes
    inside and vectorised, initialised before the row."""
    rl = sch.get_loops(rf)
    red = rl[-1]
    lane = next((lp for lp in reversed(rl[1:-1]) if _const(sch.get(lp).extent) == lanes), None)
    if lane is None:
        return
    sch.reorder(red, lane)
    sch.vectorize(lane)
    init = sch.decompose_reduction(rf, red)
    sch.vectorize(sch.get_loops(init)[-1])


def _vectorize_inner_safe(sch, block_rv, lanes, rows):
    loops = sch.get_loops(block_rv)
    if len(loops) > (1 if rows > 0 else 0):
        _vectorize_inner(sch, block_rv, lanes)
