"""loopify's CPU schedule rules really schedule: every matmul of a decode step (M = 1, a GEMV),
of a symbolic-length prefill and of a matmul + bias + GELU epilogue leaves the schedule passes
parallel or vectorised, and the built function computes what numpy does.

Why this exists: the rules run under ``cpu_rules.Guarded``, which drops any schedule its
well-formedness check rejects. A checker that rejected every schedule (TIR's verifier does not
accept s_tir blocks) made every CPU build silently unscheduled, 6x slower, with no test failing.
Tolerance: float32 sums of 256 products reordered by the schedule (tiles, vector lanes): 1e-4
relative to the output's scale.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from loopify.backends.tvm import schedules  # noqa: E402
from loopify.backends.tvm.build import CompileOptions, build_executable_module, front_passes  # noqa: E402
from loopify.backends.tvm.targets import target_for  # noqa: E402

K, N = 256, 192


def _linear(m, *, gelu: bool):
    """``y = x @ W.T (+ b, gelu)`` with ``x [m, K]`` (m an int or a symbolic name)."""
    bb = relax.BlockBuilder()
    rows = tirx.Var(m, "int64") if isinstance(m, str) else m
    x = relax.Var("x", relax.TensorType([rows, K], "float32"))
    w = relax.Var("w", relax.TensorType([N, K], "float32"))
    b = relax.Var("b", relax.TensorType([N], "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            if gelu:
                y = bb.emit(relax.op.nn.gelu(relax.op.add(y, b)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _scheduled(mod, target, options):
    with target:
        mod = tvm.transform.Sequential(front_passes(target, options))(mod)
        return tvm.transform.Sequential(schedules.schedule_passes(target, options))(mod)


@pytest.mark.parametrize("rows", [1, "n"], ids=["decode-gemv", "symbolic-prefill"])
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "bias-gelu"])
def test_every_matmul_is_scheduled_and_correct(rows, gelu):
    target = tvm.target.Target(target_for("x86"))
    options = CompileOptions()
    mod = _linear(rows, gelu=gelu)
    sched = _scheduled(mod, target, options)
    matmuls = {gv.name_hint: f.script() for gv, f in sched.functions.items()
               if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint}
    assert matmuls, "no matmul kernel after legalisation"
    for name, script in matmuls.items():
        assert "T.parallel" in script or "T.vectorized" in script, f"{name} left unscheduled"
    ex = build_executable_module(mod, target_for("x86"), options)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    m = 1 if rows == 1 else 7
    x, w, b = (rng.standard_normal(s).astype("float32") for s in ((m, K), (N, K), (N,)))
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b))).numpy()
    ref = x @ w.T
    if gelu:
        from math import erf, sqrt

        z = ref + b
        ref = z * 0.5 * (1 + np.vectorize(lambda v: erf(v / sqrt(2)))(z))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))



def test_per_row_matrix_products_build_and_match():
    """A mixture-of-experts layer's gathered weights ``[S, out, in] @ [S, in, 1]`` (each row its
    own matrix): DLight's GEMV schedule of it never finished LLVM's code generation, so
    ``cpu_rules.Unbatched`` keeps it off; the build must finish and match numpy (same
    tolerance as above), and an ordinary GEMV still gets the GEMV rule."""
    from loopify.backends.tvm.cpu_rules import _batched_matrix

    s, out, inn = 48, 256, 64
    bb = relax.BlockBuilder()
    w = relax.Var("w", relax.TensorType([s, out, inn], "float32"))
    x = relax.Var("x", relax.TensorType([s, inn, 1], "float32"))
    with bb.function("main", [w, x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(w, x)))
        bb.emit_func_output(y)
    mod = bb.get()
    target = tvm.target.Target(target_for("x86"))
    with target:
        legal = tvm.transform.Sequential(front_passes(target, CompileOptions()))(mod)
    prims = [f for f in legal.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert [_batched_matrix(f) for f in prims] == [True]
    plain = _linear(1, gelu=False)
    with target:
        plain = tvm.transform.Sequential(front_passes(target, CompileOptions()))(plain)
    assert not any(_batched_matrix(f) for f in plain.functions.values() if isinstance(f, tirx.PrimFunc))
    ex = build_executable_module(mod, target_for("x86"), CompileOptions())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((s, out, inn)).astype("float32"), rng.standard_normal((s, inn, 1)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    ref = a @ b
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


# -- vector math (backends/tvm/fastmath.py) ----------------------------------------------------
# Tolerances: TVM's polynomial exp is within 1.1e-6 relative (about 9 float32 ulps) on
# [-30, 30], erf and tanh within 5e-7 absolute; the activations built from them (SiLU, GELU)
# within 2e-6 absolute of float64 PyTorch on inputs of scale 4 (measured 1.3e-6 at most).

ACTIVATIONS = {
    "exp": (relax.op.exp, "exp"), "sigmoid": (relax.op.sigmoid, "sigmoid"), "tanh": (relax.op.tanh, "tanh"),
    "erf": (relax.op.erf, "erf"), "silu": (relax.op.nn.silu, "silu"), "gelu": (relax.op.nn.gelu, "gelu"),
    "gelu_tanh": (relax.op.nn.gelu_tanh, "gelu_tanh"),
}


def _unary(op, dtype="float32", n=4096):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([n], dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(op(x))
        bb.emit_func_output(y)
    return bb.get()


def _torch_ref(name, x):
    import torch

    t = torch.from_numpy(x).double()
    f = torch.nn.functional
    return {"exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "erf": torch.erf, "silu": f.silu,
            "gelu": f.gelu, "gelu_tanh": lambda v: f.gelu(v, approximate="tanh")}[name](t).numpy()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_vector_math_replaces_libm_and_stays_accurate(name):
    """On CPU targets the prepare pass swaps each op for its polynomial form (a libm call per
    element otherwise), and the built function matches float64 PyTorch."""
    op, _ = ACTIVATIONS[name]
    tgt = tvm.target.Target(target_for("x86"))
    passes = schedules.prepare_passes(tgt, CompileOptions())
    rewritten = tvm.transform.Sequential(passes)(_unary(op))
    assert f"fast_{name}" in rewritten.script()
    assert schedules.prepare_passes(tgt, CompileOptions(fast_math=False)) == []
    x = (np.random.default_rng(0).standard_normal(4096) * 4).astype("float32")
    ex = build_executable_module(_unary(op), target_for("x86"), CompileOptions())
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = _torch_ref(name, x)
    if name == "exp":
        assert np.max(np.abs(got - want) / want) <= 2e-6
    else:
        assert np.max(np.abs(got - want)) <= 2e-6


def test_vector_math_leaves_other_dtypes_and_gpus_alone():
    """float16 keeps TVM's own lowering (fast_exp is float32-only); CUDA gets no prepare pass."""
    tgt = tvm.target.Target(target_for("x86"))
    out = tvm.transform.Sequential(schedules.prepare_passes(tgt, CompileOptions()))(_unary(relax.op.sigmoid, "float16"))
    assert "fast_" not in out.script()
    assert schedules.prepare_passes(tvm.target.Target(target_for("cuda")), CompileOptions()) == []


@pytest.mark.parametrize("rows", [1, 17])
def test_a_side_producer_of_an_epilogue_is_not_computed_per_tile(rows):
    """``half(matmul_f32(x, W) + float(bias))``, one PrimFunc as fusion makes it for a float16
    linear with a bias: the bias cast reads no part of the product. The matmul rule computed it
    per tile, as if it were an epilogue, so each tile saw only its slice of the bias (the zoo
    LLaVA's float16 vision tower was 0.43 off); it is inlined into the add now. Against numpy
    with float32 accumulation: one float16 rounding of the result (tolerance 2 ulps)."""
    from tvm import te

    from loopify.backends.tvm import sym_rules

    n, k = 128, 64
    x = te.placeholder((rows, k), "float16", name="x")
    w = te.placeholder((n, k), "float16", name="w")
    b = te.placeholder((n,), "float16", name="b")
    r = te.reduce_axis((0, k), name="k")
    mm = te.compute((rows, n), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"), axis=r),
                    name="NT_matmul")
    bc = te.compute((n,), lambda j: b[j].astype("float32"), name="compute")
    add = te.compute((rows, n), lambda i, j: mm[i, j] + bc[j], name="T_add")
    out = te.compute((rows, n), lambda i, j: add[i, j].astype("float16"), name="compute1")
    f = te.create_prim_func([x, w, b, out]).with_attr("global_symbol", "main")
    tgt = tvm.target.Target(target_for("x86"))
    sch = sym_rules.MatmulLike().apply(f, tgt, False)
    assert sch is not None
    lib = tvm.tirx.build(sch.mod, tgt)
    rng = np.random.default_rng(0)
    xs, ws, bs = (rng.standard_normal(s).astype(np.float16) for s in ((rows, k), (n, k), (n,)))
    res = tvm.runtime.tensor(np.zeros((rows, n), np.float16))
    lib["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ws), tvm.runtime.tensor(bs), res)
    want = (xs.astype(np.float32) @ ws.astype(np.float32).T + bs.astype(np.float32)).astype(np.float16)
    np.testing.assert_allclose(res.numpy().astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_a_dataflow_failure_in_one_function_keeps_dataflow_in_the_others(monkeypatch):
    """When the front passes fail on the dataflow form of one Relax function (TVM 0.27's FuseTIR
    on some fused groups), only that function goes without dataflow: the others keep their
    fused kernels (a whole-module fallback transposed every weight on every call)."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from loopify.backends.tvm import build

    @tvm.script.ir_module
    class Mod:
        @R.function
        def bad(x: R.Tensor((4, 4), "float32")) -> R.Tensor((4, 4), "float32"):
            y = R.add(x, x)
            return y

        @R.function
        def main(x: R.Tensor((4, 4), "float32")) -> R.Tensor((4, 4), "float32"):
            y = R.multiply(x, x)
            z = R.add(y, x)
            return z

    @tvm.transform.module_pass(opt_level=0, name="FailOnDataflowBad")
    def fail_on_bad(mod, _ctx):
        if any(isinstance(b, relax.DataflowBlock) for b in mod["bad"].body.blocks):
            raise RuntimeError("Check failed: (VarRemapGet(source) == nullptr) is false")
        return mod

    seen = {}

    @tvm.transform.module_pass(opt_level=0, name="Record")
    def record(mod, _ctx):
        seen.update({gv.name_hint: any(isinstance(b, relax.DataflowBlock) for b in f.body.blocks)
                     for gv, f in mod.functions.items() if isinstance(f, relax.Function)})
        return mod

    real = build.front_passes
    monkeypatch.setattr(build, "front_passes",
                        lambda tgt, options, dataflow=True: ([relax.transform.ConvertToDataflow()] if dataflow else [])
                        + [fail_on_bad, record])
    tgt = tvm.target.Target({"kind": "llvm"})
    _mod, skipped = build._front_skipping_dataflow(Mod, tgt, build.CompileOptions())
    assert skipped == ["bad"] and seen == {"bad": False, "main": True}
    assert real is not build.front_passes


def test_softmax_over_rows_of_symbolic_length_is_vectorised_and_right():
    """A prefill's attention softmax (``where(mask, scores, min)`` then softmax, row length
    ``S`` symbolic): the exponentials are TVM's vector polynomial (libm once per element
    otherwise), the row loops are split by vectors with the partition hint (lowering then runs
    whole vectors without a predicate: without it the vector loops were scalarised, 6x slower
    than at a static length), and the result matches PyTorch at lengths that are and are not
    multiples of the vector width, including rows that end in a partial vector and a row of
    one. Tolerance: the polynomial exp is within 1.1e-6 relative; 2e-6 absolute on
    probabilities."""
    import torch

    t, s = tirx.Var("T", "int64"), tirx.Var("S", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, t, s], "float32"))
    m = relax.Var("m", relax.TensorType([1, 1, t, s], "bool"))
    with bb.function("main", [x, m]):
        with bb.dataflow():
            y = bb.emit(relax.op.where(m, x, relax.const(float(np.finfo(np.float32).min), "float32")))
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(y, axis=-1)))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target(target_for("x86"))
    options = CompileOptions()
    with target:
        sched = tvm.transform.Sequential(schedules.prepare_passes(target, options) + front_passes(target, options)
                                         + schedules.schedule_passes(target, options))(mod)
    scripts = [f.script() for f in sched.functions.values() if isinstance(f, tirx.PrimFunc)]
    soft = [sc for sc in scripts if "fast_exp" in sc or "T.max(T.reinterpret" in sc]
    assert soft, "softmax did not get the vector exp"
    assert all("pragma_loop_partition_hint" in sc and "T.vectorized" in sc for sc in scripts)
    vm = relax.VirtualMachine(build_executable_module(mod, target_for("x86"), options), tvm.cpu())
    rng = np.random.default_rng(0)
    for rows, length in [(1, 1), (2, 15), (3, 16), (5, 17), (4, 100), (2, 128)]:
        xs = (rng.standard_normal((1, 3, rows, length)) * 4).astype("float32")
        ms = np.tril(np.ones((rows, length), bool), k=length - rows)[None, None]
        got = vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ms)).numpy()
        want = torch.softmax(torch.where(torch.from_numpy(ms), torch.from_numpy(xs).double(),
                                         torch.tensor(float(np.finfo(np.float32).min), dtype=torch.float64)), -1).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f"rows {rows}, length {length}")
