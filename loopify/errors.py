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


#: Optional dependencies: top-level module -> (the extra that installs it, what needs it).
EXTRAS = {"tvm": ("tvm", "compiling and running artifacts"), "tvm_ffi": ("tvm", "compiling and running artifacts"),
          "transformers": ("hf", "Hugging Face models"), "accelerate": ("hf", "Hugging Face models"),
          "gguf": ("hf", "GGUF files"), "matplotlib": ("plot", "plots"), "psutil": ("tvm", "tuning"),
          "xgboost": ("tvm", "tuning"), "tornado": ("tvm", "tuning over RPC"), "PIL": ("hf", "images")}


class MissingDependencyError(LoopifyError):
    """An optional dependency is not installed."""


def missing_dependency(e: ImportError) -> MissingDependencyError | None:
    """The one-line error naming the extra to install for ``e``, or None for a module that is
    not one of loopify's optional dependencies (a real bug)."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra, what = EXTRAS[top]
    return MissingDependencyError(f"{what} needs the Python package {top!r}, which is not installed: "
                                  f"pip install 'loopify[{extra}]'")
