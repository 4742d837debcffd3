"""Pass lists per target: prepare, legalise, schedule (see build.py for where each runs)."""

from __future__ import annotations


def prepare_passes(target, options) -> list:
    """Relax-level passes before legalisation."""
    return []


def legalize_passes(target) -> list:
    """Legalise to TIR and fuse (the same on every target)."""
    from tvm import relax

    return [
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
