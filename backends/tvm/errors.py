"""Errors of the TVM backend (one-line :class:`loopify.errors.LoopifyError` subclasses)."""

from __future__ import annotations

from loopify.errors import LoopifyError


class CompileError(LoopifyError):
    """A program could not be imported into TVM, built, or linked for its target."""


class TargetError(LoopifyError):
    """An unknown target name or option, or a toolchain the target needs is missing."""
