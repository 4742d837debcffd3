"""Load and run a compiled loopify artifact (see :mod:`loopify.artifact` for the layout).

    art = loopify.runtime.load("out/model.x86")
    logits, = art(input_ids, attention_mask, loops=3)       # one count per loop stage, or an int

Only TVM's runtime (the Relax VM) and safetensors are used here: no torch.export, no passes,
no compiler. Loading verifies the manifest version and the sha256 of every file, and refuses,
with one line, an artifact built for a target this machine cannot run (arm64 on x86, CUDA
without a GPU).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from loopify import artifact as _artifact
from loopify.artifact import ArtifactError, LoopCountError  # noqa: F401 - re-exported
from loopify.bounds import check_inputs
from loopify.errors import LoopifyError

log = logging.getLogger(__name__)


class ValidationError(LoopifyError):
    """A compiled artifact does not reproduce its reference within tolerance."""


def _machine_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _ensure_cuda_runtime() -> None:
    """Load TVM's CUDA runtime sidecar library (runtime-only TVM does not load it itself)."""
    import tvm.base

    if "tvm_runtime_cuda" in tvm.base._LOADED_LIBS:
        return
    try:
        from tvm_ffi.libinfo import load_lib_ctypes

        runtime_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
    except (OSError, RuntimeError, KeyError, ImportError) as e:
        log.debug("TVM CUDA runtime not loadable: %s", e)


def _check_runnable(manifest: dict, root: Path) -> str:
    """The device kind to run on ("cpu" / "cuda"), or ArtifactError when this machine cannot."""
    target = manifest.get("target", {})
    name = manifest.get("target_name") or target.get("kind")
    if target.get("kind") == "cuda":
        import tvm.runtime

        _ensure_cuda_runtime()
        if not tvm.runtime.cuda(0).exist:
            raise ArtifactError(f"{root}: built for CUDA ({target.get('arch', '?')}); no CUDA GPU "
                                "is visible on this machine")
        return "cuda"
    triple = str(target.get("mtriple", ""))
    built = "aarch64" if "aarch64" in triple or name == "arm64" else "x86_64"
    here = _machine_arch()
    if built != here:
        raise ArtifactError(f"{root}: built for {name} ({built}), this machine is {here}; run it "
                            f"on a {built} machine or rebuild for this one")
    need = manifest.get("requires_cpu_flags") or []
    have = _cpu_flags()
    missing = [f for f in need if have is not None and f not in have]
    if missing:
        raise ArtifactError(f"{root}: built for a CPU with {', '.join(missing)} "
                            f"(mcpu={target.get('mcpu')}), which this one lacks; rebuild with "
                            "target_for('x86', mcpu=...) for this machine")
    return "cpu"


def _cpu_flags() -> set | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _size_pool_from_cpus() -> None:
    """TVM creates its CPU thread pool once, at the first parallel call, with TVM_NUM_THREADS
    workers, else with the core count *halved* on x86 (it assumes hyper-threading): one worker on
    a 2-core machine, and ``config_threadpool`` cannot add workers later. Measured on the
    benchmark Llama: 105 ms whatever was asked, against 54-70 ms with two workers. So unless
    the user set it, the pool gets every CPU this process may use; :func:`set_num_threads`
    then picks how many run."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(_available_cpus())


_size_pool_from_cpus()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads of TVM's CPU pool (the artifact's parallel loops use it); at most the
    pool's size (TVM_NUM_THREADS, by default every CPU available)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, int(n))


def _host(inputs) -> list:
    """Inputs as host arrays (torch tensors detached to CPU; numpy and lists as they are)."""
    return [x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in inputs]


class OutputCheck(NamedTuple):
    """One output of :func:`validate`."""

    ok: bool
    max_abs_err: float
    rel_err: float


#: safetensors dtypes -> numpy
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
              "BOOL": "bool"}


def params_on_device(path: Path, names: list, ties: dict, device) -> list:
    """The weights ``names`` of an artifact (``ties``: a name -> the stored name it shares), as
    device tensors in that order, each stored tensor loaded once. Read one tensor at a time with
    plain reads, so loading holds the device copies and one host array: reading the whole file
    first (or mapping it) added the model's size again to every run's peak memory."""
    import tvm.runtime

    from loopify.io import safetensors_header

    file = path / _artifact.PARAMS
    try:
        header, start = safetensors_header(file)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: unreadable {_artifact.PARAMS}: {e}") from None
    missing = [n for n in names if ties.get(n, n) not in header]
    if missing:
        raise ArtifactError(f"{path}: {_artifact.PARAMS} lacks {len(missing)} parameter(s) the manifest lists, "
                            f"e.g. {missing[0]!r}")
    out: dict = {}
    with open(file, "rb") as fh:
        for n in names:
            key = ties.get(n, n)
            if key in out:
                continue
            info = header[key]
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ArtifactError(f"{path}: {key} in {_artifact.PARAMS} has dtype {info.get('dtype')!r}, "
                                    "which this runtime does not read")
            b, e = info["data_offsets"]
            fh.seek(start + b)
            count = int(np.prod(info["shape"], dtype=np.int64))
            a = np.fromfile(fh, dtype=dtype, count=count)
            if a.nbytes != e - b:
                raise ArtifactError(f"{path}: {key} in {_artifact.PARAMS} is truncated")
            out[key] = tvm.runtime.tensor(a.reshape(info["shape"]), device)
    return [out[ties.get(n, n)] for n in names]


class Artifact:
    """A loaded artifact: call it like the model, with ``loops=`` for the loop stages."""

    def __init__(self, path, *, device_id: int = 0, verify: bool = True):
        import tvm.runtime
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(path)
        self.manifest = _artifact.read_manifest(self.path, verify=verify)
        kind = _check_runnable(self.manifest, self.path)
        self.device = tvm.runtime.cuda(device_id) if kind == "cuda" else tvm.runtime.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(self.path / _artifact.LIBRARY))
        except Exception as e:  # noqa: BLE001 - a loader failure is one line for the user
            raise ArtifactError(f"{self.path}: cannot load {_artifact.LIBRARY}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self._vm = VirtualMachine(lib, self.device)
        self._main = self._vm["main"]
        self.params = self._load_params()
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]

    def _load_params(self) -> list:
        return params_on_device(self.path, self.manifest.get("params", []), {}, self.device)

    @property
    def loops(self) -> list[dict]:
        return self.manifest.get("loops", [])

    def example_inputs(self) -> list | None:
        """The example inputs stored in the artifact (numpy arrays, in input order), or None
        when it has none (built before they were stored)."""
        from safetensors.numpy import load_file

        if _artifact.EXAMPLE_INPUTS not in self.manifest.get("files", {}):
            return None
        arrays = load_file(str(self.path / _artifact.EXAMPLE_INPUTS))
        if any(s["name"] not in arrays for s in self.inputs):
            return None
        return [arrays[s["name"]] for s in self.inputs]

    def _to_tvm(self, i: int, x) -> Any:
        import tvm.runtime

        spec = self.inputs[i]
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().contiguous().numpy()
        x = np.ascontiguousarray(x)
        if list(x.shape) != list(spec["shape"]) or str(x.dtype) != spec["dtype"]:
            raise LoopifyError(f"input {i} ({spec['name']}): expected {spec['dtype']}"
                               f"{list(spec['shape'])}, got {x.dtype}{list(x.shape)}")
        return tvm.runtime.tensor(x, self.device)

    def _args(self, inputs, loops) -> list:
        """The VM's arguments: every input checked (count, shape, dtype, and the value range of
        index inputs: the compiled gather clamps an id past its table to the last row, silently
        wrong), then the loop counts."""
        import tvm.runtime

        if len(inputs) != len(self.inputs):
            raise LoopifyError(f"expected {len(self.inputs)} inputs "
                               f"({', '.join(s['name'] for s in self.inputs)}), got {len(inputs)}")
        counts = _artifact.loop_counts(self.manifest, loops)
        args = [self._to_tvm(i, x) for i, x in enumerate(inputs)]
        ranges = {i: s["range"] for i, s in enumerate(self.inputs) if s.get("range")}
        check_inputs(ranges, [np.asarray(x) if i in ranges else None for i, x in enumerate(_host(inputs))],
                     [s["name"] for s in self.inputs], str(self.path))
        return args + [tvm.runtime.tensor(np.array(k, dtype="int64"), self.device) for k in counts]

    def run_tvm(self, *inputs, loops=None):
        """Run and return TVM tensors (no conversion)."""
        out = self._main(*self._args(inputs, loops), *self.params)
        return list(out) if not hasattr(out, "numpy") else [out]

    def __call__(self, *inputs, loops=None, output: str | None = None):
        """Run the model. ``output``: ``"torch"`` or ``"numpy"``; by default torch tensors where
        torch is installed, else numpy arrays (a board runs artifacts with numpy and TVM alone).
        Returns a tuple."""
        outs = self.run_tvm(*inputs, loops=loops)
        arrays = [o.numpy() for o in outs]
        self._check_assumptions(arrays)
        if output == "numpy" or (output is None and importlib.util.find_spec("torch") is None):
            return tuple(arrays)
        import torch

        return tuple(torch.from_numpy(a) for a in arrays)

    def _check_assumptions(self, arrays) -> None:
        """A compile-time assumption (a boolean mask's count, see the manifest's ``assumptions``)
        that these inputs break makes the artifact's float outputs NaN: say so in one line."""
        assumed = self.manifest.get("assumptions") or []
        if not assumed:
            return
        if any(a.dtype.kind == "f" and np.isnan(a).any() for a in arrays):
            what = "; ".join(f"{a['node']}: a boolean mask of shape {a['mask_shape']} with {a['count']} true "
                             f"({a.get('source', '')})" for a in assumed)
            raise LoopifyError(f"{self.path}: NaN outputs: these inputs likely break what the artifact was "
                               f"compiled for ({what}); compile again with such inputs")

    def benchmark(self, *inputs, loops=None, repeat: int = 10, warmup: int = 2) -> dict:
        """Median / min wall time of one call in ms (inputs converted once, outside the timing)."""
        args = self._args(inputs, loops)
        times = []
        for r in range(warmup + repeat):
            t = time.perf_counter()
            self._main(*args, *self.params)
            self.device.sync()
            if r >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
        return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)),
                "repeat": repeat}


class KVPool:
    """Where a decoder's cache lives between calls: per cache tensor, two 64-byte-aligned host
    buffers, reused. The cache after a call (the one before it with the call's new tokens
    appended) is written into the buffer the one before it does not occupy, and a CPU artifact
    reads it in place (DLPack, no copy). Before, each decode step copied the whole cache twice
    more into freshly allocated memory (the append, then the copy into a TVM tensor): at 512
    tokens of context, 16.5 of the SmolLM2 artifact's 55 ms per token (1 thread)."""

    ALIGN = 64

    def __init__(self):
        self._bufs: dict[str, list] = {}

    def append(self, name: str, old: np.ndarray, new: np.ndarray, axis: int) -> np.ndarray:
        shape = list(old.shape)
        shape[axis] += new.shape[axis]
        n = math.prod(shape)
        bufs = self._bufs.setdefault(name, [None, None])
        i = 1 if bufs[0] is not None and np.may_share_memory(old, bufs[0]) else 0
        if bufs[i] is None or bufs[i].size < n or bufs[i].dtype != old.dtype:
            bufs[i] = _aligned_empty(max(n, n * 3 // 2), old.dtype, self.ALIGN)  # room to grow
        out = bufs[i][:n].reshape(shape)
        np.concatenate([old, new], axis=axis, out=out)
        return out


_DLPACK_CPU = 1  # DLPack's kDLCPU: host memory a CPU artifact can read in place


def _aligned_empty(n: int, dtype, align: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n * dtype.itemsize].view(dtype)


class GenerationArtifact:
    """A generation artifact: ``prefill`` and ``decode`` entry points over one set of weights
    (see :mod:`loopify.backends.tvm.generation`). Each takes ``(input_ids, attention_mask,
    position_ids, past_k, past_v, loops)`` and returns ``(logits, new_k, new_v)``; the caller
    keeps the cache (:class:`loopify.generate.compiled.TVMDecoder`)."""

    def __init__(self, path, *, device_id: int = 0, verify: bool = True):
        import tvm.runtime
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(path)
        self.manifest = _artifact.read_manifest(self.path, verify=verify)
        self.gen = self.manifest["generation"]
        kind = _check_runnable(self.manifest, self.path)
        self.device = tvm.runtime.cuda(device_id) if kind == "cuda" else tvm.runtime.cpu(0)
        self._vms = {}
        for entry, lib in self.gen["entries"].items():
            try:
                mod = tvm.runtime.load_module(str(self.path / lib))
            except Exception as e:  # noqa: BLE001
                raise ArtifactError(f"{self.path}: cannot load {lib}: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            self._vms[entry] = VirtualMachine(mod, self.device)["main"]
        self.params = self._load_params()

    def _load_params(self) -> list:
        return params_on_device(self.path, self.manifest["params"], self.manifest.get("param_ties") or {},
                                self.device)

    @property
    def loops(self) -> list[dict]:
        return self.manifest.get("loops", [])

    def tensor(self, x, dtype: str | None = None):
        import tvm.runtime

        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x if dtype is None else np.asarray(x, dtype=dtype))
        if self.device.dlpack_device_type() == _DLPACK_CPU and x.size and x.ctypes.data % KVPool.ALIGN == 0:
            try:  # a CPU artifact reads an aligned host array in place (a cache: KVPool)
                return tvm.runtime.from_dlpack(x)
            except Exception:  # noqa: BLE001 - copied below
                pass
        return tvm.runtime.tensor(x, self.device)

    def run(self, entry: str, *args):
        """Run ``prefill`` or ``decode`` on TVM tensors; returns TVM tensors. The token ids (the
        first argument) are checked against the vocabulary first: the compiled gather clamps an
        id past the table to its last row (clip mode), which would be silently wrong."""
        vocab = self.gen.get("vocab")
        if vocab and args:
            check_inputs({0: (0, int(vocab))}, [args[0].numpy()], ["input_ids"], str(self.path))
        return self._vms[entry](*args, *self.params)

    def empty_cache(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of no token, ``[S, 1, H, 0, D]``, to prefill a prompt against."""
        shape = (self.gen["layout"]["slots"], 1, self.gen["kv_heads"], 0, self.gen["head_dim"])
        dt = np.dtype(self.gen.get("dtype", "float32"))
        return np.zeros(shape, dt), np.zeros(shape, dt)

    def empty_state(self) -> np.ndarray | None:
        """The decode state of an artifact with multi-resolution loops before any token
        (``[Q, 1, 2, D]`` zeros: the open group's partial sum and the last group's update per
        coarse schedule position, :attr:`loopify.generate.export.Layout.spiral`); None without."""
        if not self.has_state:
            return None
        coarse = self.gen["layout"]["spiral"]
        return np.zeros((len(coarse), 1, 2, int(self.gen["spiral_dim"])), np.dtype(self.gen.get("dtype", "float32")))

    @property
    def has_state(self) -> bool:
        """Whether the entry points take and return a multi-resolution decode state."""
        return bool(self.gen["layout"].get("spiral"))

    @property
    def routed(self) -> list[str]:
        """The loops with a Mixture-of-Recursions router (the entry points then take and return
        each KV slot's validity per token, and return each token's depth per routed loop)."""
        return list(self.gen["layout"].get("routed") or [])

    def empty_valid(self) -> np.ndarray | None:
        """Slot validity of no token, ``[S, 1, 0]``, for a routed artifact; None without."""
        if not self.routed:
            return None
        return np.zeros((self.gen["layout"]["slots"], 1, 0), np.dtype(self.gen.get("dtype", "float32")))

    def step(self, entry: str, ids, mask, pos, k, v, loops, types=None, pixels=None, last: bool = False,
             state=None, valid=None, pool: KVPool | None = None):
        """One call of ``entry`` on numpy (or torch) inputs and the cache ``k``, ``v``; returns
        ``(logits [B, T, V], k, v)`` with the new tokens' keys and values appended. ``types``:
        token types of prefix-LMs (default 0); ``loops``: one count per loop; ``last``: the
        logits of the last token only (``[B, 1, V]``: an artifact with ``logit_rows`` then runs
        its LM head on that row alone). ``state``: the decode state of an artifact with
        multi-resolution loops (:meth:`empty_state` before the prompt); the new one is then
        returned fourth. ``valid``: the slots' validity per cached token of an artifact with
        routed loops (:meth:`empty_valid` before the prompt); the extended one and the call's
        tokens' depths ``[R, B, T]`` (one row per routed loop) are then returned last.
        ``pool``: where the extended cache (and validity) is written (:class:`KVPool`; new arrays
        without)."""
        if (state is None) == self.has_state:
            raise ArtifactError(f"{self.path}: " + ("this artifact has multi-resolution loops: give their decode "
                                                    "state (empty_state() before a prompt)" if state is None else
                                                    "this artifact has no multi-resolution decode state"))
        if (valid is None) == bool(self.routed):
            raise ArtifactError(f"{self.path}: " + ("this artifact has routed loops: give the slots' validity "
                                                    "(empty_valid() before a prompt)" if valid is None else
                                                    "this artifact has no routed loops"))
        args = [self.tensor(ids, "int64"), self.tensor(mask, "int64"), self.tensor(pos, "int64"),
                self.tensor(k), self.tensor(v), self.tensor(loops, "int64")]
        if self.gen.get("token_types"):
            args.append(self.tensor(types if types is not None else np.zeros_like(np.asarray(ids)), "int64"))
        if pixels is not None:
            args.append(self.tensor(pixels, self.gen.get("dtype", "float32")))
        t = np.asarray(ids).shape[1]
        if self.gen.get("logit_rows"):
            args.append(self.tensor(np.arange(t - 1 if last else 0, t), "int64"))
        if state is not None:
            args.append(self.tensor(state))
        if valid is not None:
            args.append(self.tensor(valid))
            bucket = self.gen.get("route_bucket")
            for j in range(1, int(self.gen.get("route_levels", 0)) + 1):  # the gathered buckets' rows
                args.append(self.tensor(np.zeros(max(2, j * math.ceil(t * bucket)), np.float32)))  # (lengths only)
        logits, nk, nv, *rest = (o.numpy() for o in self.run(entry, *args))
        if logits.dtype != np.float32:  # a float16 artifact: sampling and scores in float32
            logits = logits.astype(np.float32)
        if pool is not None:
            k, v = pool.append("k", k, nk, 3), pool.append("v", v, nv, 3)
        else:
            k, v = np.concatenate([k, nk], axis=3), np.concatenate([v, nv], axis=3)
        out = (logits, k, v)
        if state is not None:
            out += (rest.pop(0),)
        if valid is not None:
            new_valid, depth = rest
            valid = pool.append("valid", valid, new_valid, 2) if pool is not None else np.concatenate(
                [valid, new_valid], axis=2)
            out += (valid, depth)
        return out


def load(path, *, device_id: int = 0, verify: bool = True, num_threads: int | None = None):
    """Load an artifact directory (checks its manifest, files and target first).

    Args:
        path: the artifact directory.
        device_id: which GPU for a CUDA artifact.
        verify: check every file's sha256 against the manifest (default on).
        num_threads: size of TVM's CPU thread pool (default: TVM's own choice, or
            ``TVM_NUM_THREADS``).

    Raises:
        loopify.artifact.ArtifactError: missing / corrupt / wrong version / wrong target.

    Returns an :class:`Artifact`, or a :class:`GenerationArtifact` for ``kind: generation``.
    """
    if num_threads:
        os.environ["TVM_NUM_THREADS"] = str(num_threads)
    kind = _artifact.read_manifest(Path(path), verify=False).get("kind")
    art = (GenerationArtifact if kind == "generation" else Artifact)(path, device_id=device_id, verify=verify)
    if num_threads:
        set_num_threads(num_threads)
    return art


def validate(artifact_or_dir, reference_fn: Callable, inputs, loops=None, *, rtol: float = 1e-4,
             raise_on_fail: bool = False) -> list[OutputCheck]:
    """Run an artifact and a reference on the same inputs and compare every output.

    Args:
        artifact_or_dir: an :class:`Artifact` or its directory.
        reference_fn: ``reference_fn(*inputs)`` -> tensor or tuple of tensors, the expected
            outputs for these loop counts.
        inputs: the model inputs (torch tensors or numpy arrays).
        loops: loop counts (int, or one per loop stage; None: the manifest's defaults).
        rtol: relative tolerance, max abs error / max abs reference value. The default 1e-4 is
            the float32 reordering allowance used for export (TVM fuses and reorders float32
            reductions: ~1e-6 relative per layer), with room for a few dozen layers.
        raise_on_fail: raise one :class:`ValidationError` naming every failing output.

    Returns:
        One :class:`OutputCheck` (ok, max_abs_err, rel_err) per output, in order.
    """
    art = artifact_or_dir if isinstance(artifact_or_dir, Artifact) else load(artifact_or_dir)
    got = art(*inputs, loops=loops, output="numpy")
    ref = reference_fn(*inputs)
    if not isinstance(ref, (tuple, list)):
        ref = (ref,)
    ref = [r.detach().cpu().numpy() if hasattr(r, "detach") else np.asarray(r) for r in ref]
    if len(ref) != len(got):
        raise ValidationError(f"reference has {len(ref)} outputs, the artifact {len(got)}")
    checks = []
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            checks.append(OutputCheck(False, float("inf"), float("inf")))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        err = float(np.abs(a64 - b64).max()) if a.size else 0.0
        scale = float(np.abs(a64).max()) if a.size else 0.0
        rel = err / max(scale, 1e-12)
        checks.append(OutputCheck(bool(rel <= rtol), err, rel))
    if raise_on_fail and not all(c.ok for c in checks):
        bad = "; ".join(f"output {i}: max abs {c.max_abs_err:.3g}, rel {c.rel_err:.3g}"
                        for i, c in enumerate(checks) if not c.ok)
        raise ValidationError(f"{art.path}: outputs differ from the reference beyond rtol={rtol}: {bad}")
    return checks
