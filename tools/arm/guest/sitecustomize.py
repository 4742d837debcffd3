"""Imported at start-up by the emulated aarch64 Python (tools/arm/python puts this directory first
on its path). Without binfmt_misc the host kernel cannot execute an aarch64 binary, so a child
started with ``sys.executable`` (TVM's RPC server starts its worker that way, multiprocessing
too) must go through qemu again: point ``sys.executable`` at the tools/arm/python wrapper."""

import os
import sys

if os.environ.get("LOOPIFY_ARM_PYTHON"):
    sys.executable = os.environ["LOOPIFY_ARM_PYTHON"]
