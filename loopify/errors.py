"""User-facing errors.

Every failure a user can cause (a bad file, a bad option, a model that cannot be captured) is a
:class:`LoopifyError`: its message is one line that names the thing and the reason. The CLI prints
it and exits with status 2; a traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class LoopifyError(Exception):
    """An error caused by the user's input, reported as one line."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the cause carried.
        super().__init__(" ".join(str(message).split()))


class CaptureError(LoopifyError):
    """A model file or directory could not be loaded or exported."""


class PipelineError(LoopifyError):
    """A pipeline spec is malformed or a pass failed."""


class ExportMismatchError(CaptureError):
    """The exported program does not reproduce the eager model."""
