"""Compilation targets: names -> TVM 0.27 JSON-dict targets, plus how each is linked.

TVM 0.27 takes targets as dicts (``tvm.target.Target(dict)``), not strings. Three names:

* ``x86``   ``{"kind": "llvm", "mcpu": <host>}``: the host CPU (``mcpu`` from LLVM's host
  detection, so AVX2 / AVX-512 code is generated where the machine has it; pass ``mcpu`` to
  build for another x86 machine);
* ``arm64`` ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}`` linked
  with ``aarch64-linux-gnu-gcc`` (Debian package gcc-aarch64-linux-gnu);
* ``cuda``  ``{"kind": "cuda", "arch": "sm_90", "host": <x86>}``: device code compiled by nvcc
  into a fatbin carried inside ``lib.so`` (NVRTC / cuda-bindings is not installed here).
"""

from __future__ import annotations

import difflib
import platform
import re
import shutil

from .errors import TargetError

TARGET_NAMES = ("x86", "arm64", "cuda")
ARM_LINKER = "aarch64-linux-gnu-gcc"


def host_mcpu() -> str | None:
    """LLVM's name for this machine's CPU (e.g. ``znver3``), or None when unknown."""
    try:
        import tvm

        f = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName", True)
        name = str(f()) if f is not None else None
    except Exception:  # noqa: BLE001 - detection is best-effort
        name = None
    return name if name and name != "generic" else None


def check_mcpu(mcpu: str, triple: str, name: str) -> None:
    """Refuse a CPU name LLVM does not know for ``triple`` (LLVM would warn per function and build
    generic code, and the manifest would record the bogus name)."""
    try:
        import tvm
        from tvm.target import codegen

        known = {str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}))}
    except Exception:  # noqa: BLE001 - a TVM without LLVM cannot build CPU code anyway
        return
    if known and mcpu not in known:
        close = difflib.get_close_matches(mcpu, sorted(known), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(sorted(known)[:3])} ..."
        raise TargetError(f"--mcpu {mcpu!r} is not a CPU LLVM knows for {name} ({triple}); {hint} ({len(known)} "
                          f"names: `llc -mtriple={triple} -mcpu=help`)")


def target_for(name: str, *, arch: str | None = None, mcpu: str | None = None,
               num_cores: int | None = None) -> dict:
    """The TVM target dict for a loopify target name.

    Args:
        name: ``"x86"``, ``"arm64"`` or ``"cuda"``.
        arch: CUDA architecture (``"sm_90"`` default, ``"sm_80"`` ...); only for ``cuda``.
        mcpu: LLVM CPU name; ``x86`` defaults to the host's, ``arm64`` to generic AArch64
            (e.g. ``"cortex-a76"``, ``"neoverse-n1"`` for a specific board).
        num_cores: the CPU target's core count (used by schedules / MetaSchedule).

    Raises:
        TargetError: unknown name, or an option that does not apply to the target.
    """
    if name not in TARGET_NAMES:
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    if arch is not None and name != "cuda":
        raise TargetError(f"arch={arch!r} applies only to the cuda target, not {name}")
    if mcpu is not None:
        check_mcpu(mcpu, "aarch64-linux-gnu" if name == "arm64" else "x86_64-linux-gnu", name)
    if name == "x86":
        t = {"kind": "llvm"}
        if platform.machine() in ("x86_64", "AMD64") or mcpu is not None:
            m = mcpu or host_mcpu()
            if m:
                t["mcpu"] = m
        if num_cores:
            t["num-cores"] = int(num_cores)
        return t
    if name == "arm64":
        t = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        if mcpu:
            t["mcpu"] = mcpu
        if num_cores:
            t["num-cores"] = int(num_cores)
        return t
    arch = arch or "sm_90"
    if not re.fullmatch(r"sm_[1-9]\d{1,2}[af]?", arch):
        raise TargetError(f"CUDA arch must look like 'sm_90' (sm_ and the compute capability), got {arch!r}")
    return {"kind": "cuda", "arch": arch, "host": target_for("x86", mcpu=mcpu)}


def target_name(target: dict) -> str:
    """The loopify name of a target dict (inverse of :func:`target_for`)."""
    if target.get("kind") == "cuda":
        return "cuda"
    if "aarch64" in str(target.get("mtriple", "")):
        return "arm64"
    return "x86"


def is_gpu(target: dict) -> bool:
    return target.get("kind") in ("cuda", "rocm", "vulkan", "metal", "opencl")


def check_toolchain(target: dict) -> None:
    """Raise :class:`TargetError` when a tool the target's build needs is missing."""
    name = target_name(target)
    if name == "arm64" and shutil.which(ARM_LINKER) is None:
        raise TargetError(f"arm64 linking needs {ARM_LINKER}: "
                          "apt-get install -y gcc-aarch64-linux-gnu")
    if name == "cuda" and shutil.which("nvcc") is None:
        raise TargetError("the cuda target needs nvcc on PATH to compile device code "
                          "(NVRTC is not used)")


def fcompile_for(target: dict):
    """The ``export_library`` link function for a target (None: TVM's default host compiler)."""
    if target_name(target) == "arm64":
        from tvm.support import cc

        return cc.cross_compiler(ARM_LINKER)
    return None
