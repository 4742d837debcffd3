"""Capture: load a model file or directory as a torch.export program with its example inputs.

* :mod:`~loopify.capture.loader`: telling formats apart by content, loading each safely, export and
  its check against eager, export archives;
* :mod:`~loopify.capture.hf`: Hugging Face directories (transformers classes and a small
  registry of others);
* :mod:`~loopify.capture.gguf`: GGUF files (dequantised through transformers' GGUF loader);
* :mod:`~loopify.capture.inputs`: inputs files and the dummy inputs made from a config;
* :mod:`~loopify.capture.masks`: the SDPA mask guard;
* :mod:`~loopify.capture.captured`: the :class:`Captured` result.
"""

from loopify.errors import CaptureError, ExportMismatchError
from loopify.capture.captured import Captured, ExportCheck, describe_inputs, flat_inputs
from loopify.capture.inputs import load_inputs
from loopify.capture.loader import (INFO_FILE, check_export, export_module, json_info, load, read_archive,
                                  save_program, sniff, write_program)

__all__ = ["CaptureError", "ExportMismatchError", "Captured", "ExportCheck", "INFO_FILE", "check_export", "describe_inputs", "export_module",
           "flat_inputs", "json_info", "load", "load_inputs", "read_archive", "save_program", "sniff",
           "write_program"]
