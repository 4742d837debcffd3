"""Apache TVM backend: import torch.export programs, compile staged / looped models, write artifacts.

Everything TVM is imported lazily: importing this package does not import tvm.

    from loopify.backends.tvm import Stage, compile_stages, compile_program, target_for
    res = compile_program(ep, "x86", "out/model.x86")
    art = loopify.runtime.load(res.path)
"""

from __future__ import annotations

import loopify.runtime  # noqa: F401 - sizes TVM's CPU thread pool before anything runs (see there)

from .errors import CompileError, TargetError
from .staging import Stage
from .targets import TARGET_NAMES, target_for

__all__ = ["Stage", "CompileError", "TargetError", "TARGET_NAMES", "target_for", "import_program",
           "compile_stages", "compile_program", "CompileOptions", "validate"]


def import_program(ep, **kw):
    """See :func:`loopify.backends.tvm.importer.import_program`."""
    from .importer import import_program as f

    return f(ep, **kw)


def compile_stages(stages, target="x86", out=None, **kw):
    """See :func:`loopify.backends.tvm.build.compile_stages`."""
    from .build import compile_stages as f

    return f(stages, target, out, **kw)


def compile_program(ep, target="x86", out=None, **kw):
    """See :func:`loopify.backends.tvm.build.compile_program`."""
    from .build import compile_program as f

    return f(ep, target, out, **kw)


def __getattr__(name):
    if name == "CompileOptions":
        from .build import CompileOptions

        return CompileOptions
    if name == "validate":
        from loopify.runtime import validate

        return validate
    raise AttributeError(name)
