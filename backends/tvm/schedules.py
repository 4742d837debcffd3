"""Pass lists per target: prepare, legalise, schedule (see build.py for where each runs)."""

from __future__ import annotations


def prepare_passes(target, options) -> list:
    """Relax-level passes before legalisation: on CPUs, ``exp`` / ``sigmoid`` / ``tanh`` /
    ``erf`` as vectorisable polynomials (:mod:`.fastmath`; LLVM calls libm once per element
    otherwise). Per-depth LoRA needs no pass here: it is merged at compile time or runs
    factored (:mod:`loopify.nn.lora`)."""
    if target.kind.name != "llvm" or not options.fast_math:
        return []
    from .fastmath import vector_math_pass

    return [vector_math_pass()]


def legalize_passes(target, dataflow: bool = True, fuse_transpose: bool = False) -> list:
    """Legalise to TIR and fuse.

    On CPUs two Relax passes come first (GPU pipelines are left as they were):

    * ``ConvertToDataflow``: the importer emits ``cond`` branches (and the generation step's
      ``main``) as plain binding blocks, where ``FuseOps`` fuses nothing: every op (each
      RMSNorm piece, each rotary slice) was its own kernel with its own intermediate buffer
      (``dataflow=False`` leaves it out: the build falls back to that when TVM 0.27's FuseTIR
      fails on the larger groups, as it does for a Gemma decoder);
    * ``FuseTransposeMatmul``: ``matmul(x, permute_dims(W))`` becomes one "NT" matmul reading
      ``W [out, in]`` as it is (k contiguous in both operands), which the CPU rules schedule
      (:mod:`.sym_rules`); otherwise a transpose kernel copied every weight on every call.
      Static-shape models pre-transpose their weights, so they get loopify's NN matmul kernel.
      Quantised weights (``fuse_transpose``) get it on every target: their dequantisation is
      fused into the NT matmul, where a transpose in between would materialise the weight.
    """
    from tvm import relax

    front = []
    if getattr(getattr(target, "kind", None), "name", None) == "llvm":
        front = ([relax.transform.ConvertToDataflow()] if dataflow else []) + [relax.transform.FuseTransposeMatmul()]
    elif fuse_transpose:
        front = [relax.transform.FuseTransposeMatmul()]
    return front + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def schedule_passes(target, options) -> list:
    """Default schedules for whatever tuning did not cover."""
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
    if options.schedule == "none":
        return []
    if options.schedule == "dlight":
        return [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
    from . import cpu_rules

    return [dl.ApplyDefaultSchedule(*cpu_rules.default_rules(target, options))]
