"""Carry compiled CUDA device code inside ``lib.so``.

TVM 0.27 keeps CUDA kernels as CUDA C source in the built module (format ``cuda``) and compiles
them when the library is *loaded*, through ``tvm_callback_cuda_compile`` (NVRTC by default, which
needs cuda-bindings on the deployment machine). loopify compiles the source here with nvcc into a
fatbin for the requested arch and rewrites the serialized import blob that ``export_library``
embeds (``__tvm_ffi__library_bin``) so the CUDA module is stored as ``fatbin``: the artifact then
runs on a machine with only the CUDA driver.

Blob layout (tvm-ffi library_bin, little-endian u64 lengths)::

    u64 nbytes | vec<u64> import_tree_row_ptr | vec<u64> import_tree_child |
    per module: str kind, then (kind != "_lib") bytes payload
    cuda payload: str fmt | fmap (opaque here) | bytes data
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

_U64 = struct.Struct("<Q")


class _Reader:
    def __init__(self, b: bytes):
        self.b, self.pos = b, 0

    def u64(self) -> int:
        v = _U64.unpack_from(self.b, self.pos)[0]
        self.pos += 8
        return v

    def vec(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def bytes_(self) -> bytes:
        n = self.u64()
        r = self.b[self.pos:self.pos + n]
        if len(r) != n:
            raise ValueError("truncated module blob")
        self.pos += n
        return r


def _pstr(b: bytes) -> bytes:
    return _U64.pack(len(b)) + b


def rewrite_cuda_payloads(blob: bytes, compile_source) -> tuple[bytes, list[bytes]]:
    """Replace every ``cuda`` module's source by ``compile_source(source) -> fatbin``.

    Returns the new blob and the device binaries (for the manifest / tests).
    """
    r = _Reader(blob)
    r.u64()  # total size, recomputed below
    row_ptr, child = r.vec(), r.vec()
    n_modules = len(row_ptr) - 1
    out = [_U64.pack(len(row_ptr))] + [_U64.pack(v) for v in row_ptr]
    out += [_U64.pack(len(child))] + [_U64.pack(v) for v in child]
    binaries = []
    for _ in range(n_modules):
        kind = r.bytes_()
        out.append(_pstr(kind))
        if kind == b"_lib":
            continue
        payload = r.bytes_()
        if kind == b"cuda":
            p = _Reader(payload)
            fmt = p.bytes_()
            fmap_start = p.pos
            # data is the last field: find its length prefix from the end
            data_len_pos = None
            for cand in range(len(payload) - 8, fmap_start - 1, -1):
                if _U64.unpack_from(payload, cand)[0] == len(payload) - cand - 8:
                    data_len_pos = cand
                    break
            if data_len_pos is None:
                raise ValueError("cannot locate the CUDA module's data in the blob")
            fmap = payload[fmap_start:data_len_pos]
            data = payload[data_len_pos + 8:]
            if fmt in (b"cuda", b"cu"):
                binary = bytes(compile_source(data.decode()))
                binaries.append(binary)
                payload = _pstr(b"fatbin") + fmap + _pstr(binary)
        out.append(_pstr(payload))
    if r.pos != len(blob):
        raise ValueError("unexpected trailing bytes in the module blob")
    body = b"".join(out)
    return _U64.pack(len(body)) + body, binaries


def make_fpack_imports(arch: str, record: dict):
    """An ``export_library(fpack_imports=...)`` that embeds nvcc-compiled CUDA code."""

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        import tvm_ffi
        from tvm.support import nvcc

        blob_t = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod)
        blob = bytes(blob_t.numpy().tobytes())

        import tvm

        def compile_source(src):
            # IEEE math (no --use_fast_math): results comparable with PyTorch at 1e-4.
            old = os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH")
            os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = "1"
            try:
                with tvm.target.Target({"kind": "cuda", "arch": arch}):
                    return nvcc.compile_cuda(
                        src, target_format="fatbin", compiler="nvcc",
                        arch=["-gencode", f"arch=compute_{arch[3:]},code=sm_{arch[3:]}"])
            finally:
                if old is None:
                    os.environ.pop("TVM_CUDA_NVCC_NO_FAST_MATH", None)
                else:
                    os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = old

        blob, binaries = rewrite_cuda_payloads(blob, compile_source)
        record["fatbins"] = binaries
        bin_path = Path(workspace_dir) / "devc.bin"
        bin_path.write_bytes(blob)
        sym = f"{prefix}__tvm_ffi__library_bin"
        asm = Path(workspace_dir) / "devc.S"
        asm.write_text(
            f'  .section .rodata\n  .balign 16\n  .globl {sym}\n  .type {sym}, @object\n'
            f'{sym}:\n  .incbin "{os.fspath(bin_path)}"\n  .size {sym}, {len(blob)}\n'
            '  .section .note.GNU-stack,"",@progbits\n')
        return str(asm)

    return fpack
