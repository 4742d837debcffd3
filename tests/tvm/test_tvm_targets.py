"""Targets: names -> TVM target dicts; arm64 builds an aarch64 shared object; cuda builds carry
nvcc-compiled device code for the requested arch inside lib.so."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess

import pytest

pytest.importorskip("tvm")

from loopify.backends.tvm import TargetError, compile_stages, target_for  # noqa: E402
from loopify.backends.tvm.testing import llama_loop_split  # noqa: E402

EM_AARCH64 = 183


def test_target_dicts():
    assert target_for("x86")["kind"] == "llvm"
    arm = target_for("arm64", mcpu="cortex-a76")
    assert arm == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                   "mcpu": "cortex-a76"}
    assert target_for("cuda")["arch"] == "sm_90"
    assert target_for("cuda", arch="sm_80")["arch"] == "sm_80"


@pytest.mark.parametrize("bad", [dict(name="riscv"), dict(name="x86", arch="sm_90"),
                                 dict(name="cuda", arch="90")])
def test_bad_targets_are_refused(bad):
    name = bad.pop("name")
    with pytest.raises(TargetError):
        target_for(name, **bad)


@pytest.fixture(scope="module")
def split():
    return llama_loop_split(max_loops=3)


def test_arm64_build_is_an_aarch64_shared_object(split, tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu)")
    res = compile_stages(split.stages, "arm64", tmp_path / "arm")
    head = (res.path / "lib.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit
    assert struct.unpack_from("<H", head, 16)[0] == 3  # ET_DYN: a shared object
    assert struct.unpack_from("<H", head, 18)[0] == EM_AARCH64
    assert json.loads((res.path / "manifest.json").read_text())["target_name"] == "arm64"


def test_cuda_build_carries_sm90_device_code(split, tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the cuda target compiles device code with nvcc")
    res = compile_stages(split.stages, "cuda", tmp_path / "cuda")
    dc = res.manifest["device_code"]
    assert dc["format"] == "fatbin" and dc["arch"] == "sm_90" and dc["modules"]
    lib = (res.path / "lib.so").read_bytes()
    # The fatbin recorded in the manifest is embedded in lib.so, byte for byte.
    magic = struct.pack("<I", 0xBA55ED50)
    found = []
    for mod in dc["modules"]:
        pos = lib.find(magic)
        while pos != -1:
            blob = lib[pos:pos + mod["bytes"]]
            if hashlib.sha256(blob).hexdigest() == mod["sha256"]:
                found.append(blob)
                break
            pos = lib.find(magic, pos + 1)
    assert len(found) == len(dc["modules"])
    # And it is code for sm_90 (cuobjdump lists the ELF images of a fatbin).
    if shutil.which("cuobjdump"):
        fb = tmp_path / "k.fatbin"
        fb.write_bytes(found[0])
        out = subprocess.run(["cuobjdump", "-lelf", str(fb)], capture_output=True, text=True)
        assert "sm_90" in out.stdout, out.stdout + out.stderr
    # no CUDA source is left for run-time compilation
    assert b"extern \"C\" __global__" not in lib
