"""Vector math for CPU targets: ``exp``, ``sigmoid``, ``tanh`` and ``erf`` of float32 tensors
(and the activations made of them: SiLU, GELU with erf or tanh) as TVM's polynomial
approximations (``topi.fast_exp`` / ``fast_tanh`` / ``fast_erf``).

LLVM has no vector ``exp``: a vectorised loop over ``T.sigmoid`` or ``T.exp`` becomes one libm
call per element. SmolLM2's SiLU (``x * sigmoid(x) * up``, [128, 1536]) took 1.32 ms at one
thread; with ``fast_exp`` it is one vector loop, 0.12 ms, and the whole 128-token prefill spent
5% of its time there before. Accuracy, measured on 300k points in [-30, 30]: exp within 1.1e-6
relative (about 9 float32 ulps), sigmoid 1.1e-6 relative (9e-8 absolute), tanh 3.5e-7 and erf
4.2e-7 absolute; as activations, SiLU within 1.3e-6 absolute (libm: the same), GELU (erf)
1.2e-6 and GELU (tanh) 8.6e-7 absolute (libm: 4.5e-7, 5.2e-7). Artifacts are validated against
PyTorch at 1e-4 relative either way.

Softmax is left to its own legalisation (TVM's ``fast_softmax`` materialises two full-size
intermediates, which measured no faster than the row-wise schedule of :mod:`.sym_rules`).
"""

from __future__ import annotations


def vector_math_pass():
    """The Relax pass (a module pass over every Relax function)."""
    import math

    import tvm
    from tvm import relax, topi
    from tvm.relax import PyExprMutator, expr_functor

    def c(v, x):
        return tvm.tirx.const(v, x.dtype)

    def sigmoid(x):
        return topi.divide(c(1.0, x), topi.add(c(1.0, x), topi.fast_exp(topi.negative(x))))

    def gelu(x):  # as TVM legalises relax.nn.gelu, with fast_erf
        return x * (c(0.5, x) + topi.fast_erf(x * c(0.5 ** 0.5, x)) * c(0.5, x))

    def gelu_tanh(x):  # as TVM legalises relax.nn.gelu_tanh, with fast_tanh
        inner = c(math.sqrt(2.0 / math.pi), x) * x * (c(1.0, x) + c(0.044715, x) * x * x)
        return c(0.5, x) * x * (c(1.0, x) + topi.fast_tanh(inner))

    def softmax(x, axis):
        # max, then the sum of fast_exp(x - max), then fast_exp(x - max) / sum: the exponentials
        # are recomputed in the normalisation (a vector polynomial) instead of stored full size
        mx = topi.max(x, axis=axis, keepdims=True)
        e = topi.fast_exp(topi.subtract(x, mx))
        return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))

    fast = {"relax.exp": (topi.fast_exp, "fast_exp"), "relax.sigmoid": (sigmoid, "fast_sigmoid"),
            "relax.tanh": (topi.fast_tanh, "fast_tanh"), "relax.erf": (topi.fast_erf, "fast_erf"),
            "relax.nn.silu": (lambda x: topi.multiply(x, sigmoid(x)), "fast_silu"),
            "relax.nn.gelu": (gelu, "fast_gelu"), "relax.nn.gelu_tanh": (gelu_tanh, "fast_gelu_tanh")}

    @expr_functor.mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            op = getattr(call.op, "name", None)
            if op == "relax.nn.softmax" and _float32(call.args[0]):
                ndim = len(call.args[0].ty.shape)
                if int(call.attrs.axis) % ndim == ndim - 1:  # a row softmax (the row rules' shape)
                    return self.builder_.call_te(softmax, call.args[0], ndim - 1, primfunc_name_hint="fast_softmax")
            if op in fast and len(call.args) == 1 and _float32(call.args[0]):
                fn, name = fast[op]
                return self.builder_.call_te(fn, call.args[0], primfunc_name_hint=name)
            return call

    @tvm.transform.module_pass(opt_level=0, name="LoopifyVectorMath")
    class VectorMath:
        def transform_module(self, mod, ctx):
            rw = _Rewrite(mod)
            for gv, func in mod.functions_items():
                if isinstance(func, relax.Function):
                    rw.builder_.update_func(gv, rw.visit_expr(func))
            return rw.builder_.get()

    return VectorMath()


def _float32(expr) -> bool:
    return getattr(expr.ty, "dtype", None) == "float32"  # TVM 0.27: a relax.TensorType
