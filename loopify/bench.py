"""``loopify bench``: converted against original, side by side.

Method (what a performance engineer would check):

* every configuration (model x backend x loop count) runs in its own worker process, so peak
  memory is its own: the peak RSS during the timed calls (the peak is reset after loading and
  warm-up, freed heap returned to the OS) minus the RSS after importing the libraries;
* all configurations get identical inputs (the original's example inputs);
* warm-up calls are not counted; then the parent runs *rounds*: each round asks every worker
  in turn for a few timed calls, so A and B are interleaved and share the machine's state;
* thread counts are fixed and printed (torch and TVM alike);
* ratios are computed pair by pair: converted / original for the same backend, at equal depth
  (the default loop count) and at every smaller loop count;
* fidelity (cosine, max abs error, KL for logits) is measured against the original's PyTorch
  output for every configuration.
"""

from __future__ import annotations

import contextlib

import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from loopify.errors import LoopifyError

BACKENDS = ("eager", "compile", "tvm")


@dataclass(frozen=True)
class Config:
    model: str        # "original" | "converted"
    backend: str      # eager | compile | tvm
    loops: int | None  # None for the original


@dataclass
class BenchSpec:
    original: str
    converted: str
    artifacts: list[str] = field(default_factory=list)   # [original_dir, converted_dir] for tvm
    backends: tuple[str, ...] = ("eager", "compile", "tvm")
    loops: tuple[int, ...] | None = None                  # default: 1..max
    threads: int = 1
    warmup: int = 2
    rounds: int = 5
    per_round: int = 3
    seq: int | None = None                                 # text length (HF sources); default: the capture's
    batch: int | None = None                               # batch size (HF sources); default: the capture's
    lora_form: str = "auto"                                # per-depth LoRA form of the eager converted model


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return info


def _status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _release_freed() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it resident otherwise), so
    that what loading built and dropped (the converted model is rebuilt from its source) does
    not count as the model's memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _reset_peak() -> None:
    """Reset VmHWM (Linux: writing 5 to clear_refs resets the peak RSS of this process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Worker


def original_capture_options(spec: BenchSpec, manifest: dict) -> dict:
    """Capture options that give the original the inputs the converted model was captured
    with: ``--seq``/``--batch`` when given, else (when ORIGINAL is the recorded Hugging Face
    source) the recorded text length and batch."""
    from loopify.converted import source_text_len

    src = manifest["source"]
    hf_same = Path(spec.original).resolve() == Path(src["path"]) and src.get("format") == "hf-dir"
    # (before 2026-12-07 only "text_len" was read, which a text-only source does not record: a model
    # converted with --seq-len 64 met its original at the default length, an "internal error")
    return {"seq_len": spec.seq or (source_text_len(src) if hf_same else None),
            "batch": spec.batch or (src.get("batch") if hf_same else None)}


def _build(cfg: Config, spec: BenchSpec):
    """Return (callable() -> outputs, params, bytes_on_disk, unit_count)."""
    import torch

    torch.set_num_threads(spec.threads)
    from loopify import capture
    from loopify.convert import load_converted, read_manifest, source_bytes, unique_params
    from loopify.converted import Bundle
    from loopify.nn import deploy_lora, set_loops

    if cfg.model == "original":
        cap = capture.load(spec.original, **original_capture_options(spec, read_manifest(spec.converted)))
        program = cap.program
        params = unique_params(program.state_dict)[0]
        disk = source_bytes(Path(spec.original))
    else:
        module, cap, manifest = load_converted(spec.converted, seq_len=spec.seq, batch=spec.batch)
        set_loops(module, cfg.loops)
        deploy_lora(module, spec.lora_form)  # as compile does: merged matrices once, or factored
        program = torch.export.export(module, tuple(cap.args), dict(cap.kwargs), strict=False)
        params = manifest["params"]["converted"]
        disk = Bundle.of(spec.converted).weights.stat().st_size
    flat = cap.flat_inputs()
    tokens = _tokens(cap)
    args, kwargs = cap.args, cap.kwargs
    flops = count_flops(program, args, kwargs)
    if cfg.model == "converted":  # drop the eager loop module
        import gc

        del module, cap
        gc.collect()
    if cfg.backend in ("eager", "compile"):
        gm = program.module()
        fn = gm if cfg.backend == "eager" else torch.compile(gm, dynamic=False)

        def call():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return call, params, disk, tokens, flops
    # tvm
    from loopify import runtime

    idx = 0 if cfg.model == "original" else 1
    if len(spec.artifacts) <= idx:
        raise LoopifyError("tvm backend: give the artifact directories (original, converted)")
    art = runtime.load(spec.artifacts[idx], num_threads=spec.threads)
    disk = sum(f.stat().st_size for f in Path(spec.artifacts[idx]).iterdir() if f.is_file())
    loops = cfg.loops if cfg.model == "converted" else None

    def call():
        return art(*flat, loops=loops)
    return call, params, disk, tokens, flops


def count_flops(program, args, kwargs) -> int:
    """FLOPs of one call of the exported program (torch's FlopCounterMode: matrix products,
    convolutions and attention, which dominate a transformer; elementwise ops are not counted).
    The same count for every backend: it is the program's work, not a backend's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        program.module()(*args, **kwargs)
    return int(counter.get_total_flops())


def _tokens(cap) -> tuple[int, str]:
    ids = cap.kwargs.get("input_ids") if cap.kwargs else None
    if ids is not None:
        return int(ids.numel()), "tokens/s"
    pix = cap.kwargs.get("pixel_values") if cap.kwargs else None
    if pix is not None:
        return int(pix.shape[0]), "images/s"
    return 1, "calls/s"


@contextlib.contextmanager
def worker_session(conn):
    """The frame of a spawned benchmark worker: library warnings off (a spawned process starts
    afresh), any failure sent to the parent as one line, the pipe closed at the end."""
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        conn.send({"error": f"{type(e).__name__}: {first[:300]}"})
    finally:
        conn.close()


def _worker(conn, cfg: Config, spec: BenchSpec):
    with worker_session(conn):
        # The baseline is taken after the libraries are imported: what is measured is the model
        # (weights, activations, compiled code), not torch's or TVM's own footprint.
        import torch  # noqa: F401

        import loopify.capture  # noqa: F401
        if cfg.backend == "tvm":
            import tvm.runtime  # noqa: F401
        base = _rss_mb()
        call, params, disk, (units, unit), flops = _build(cfg, spec)
        for _ in range(spec.warmup):
            call()
        _release_freed()
        _reset_peak()
        conn.send({"ready": True, "params": params, "disk": disk, "units": units, "unit": unit, "flops": flops})
        while True:
            msg = conn.recv()
            if msg == "stop":
                break
            if msg == "outputs":
                from loopify.verify import flat_tensors

                conn.send([t.detach().float().cpu() for t in flat_tensors(call())])
                continue
            times = []
            for _ in range(int(msg)):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            conn.send({"times": times, "peak_mb": max(_peak_mb(), _rss_mb()) - base})


# ----------------------------------------------------------------------------------------------


def configs(spec: BenchSpec, max_loops: int) -> list[Config]:
    loops = list(spec.loops) if spec.loops else list(range(1, max_loops + 1))
    out = []
    for b in spec.backends:
        out.append(Config("original", b, None))
        out += [Config("converted", b, k) for k in loops]
    return out


def run(spec: BenchSpec, progress=None) -> dict:
    """Measure every configuration; returns the report dict (schema in the README)."""
    from loopify.convert import read_manifest

    unknown = [b for b in spec.backends if b not in BACKENDS]
    if unknown:
        raise LoopifyError(f"unknown backend {unknown[0]!r}; backends: {', '.join(BACKENDS)}")
    man = read_manifest(spec.converted)
    max_loops = max((l["max"] or l["default"]) for l in man["loops"])
    notes = []
    tmpdir = None
    if "tvm" in spec.backends and len(spec.artifacts) < 2:
        # Compiled on the fly for the host (default schedules, no tuning).
        import tempfile

        from loopify.compile import compile_model

        tmpdir = tempfile.mkdtemp(prefix="loopify-bench-")
        if progress:
            progress("compiling TVM artifacts for the host")
        spec.artifacts = [str(compile_model(spec.original, Path(tmpdir) / "original", validate=False,
                                            capture_options=original_capture_options(spec, man)).path),
                          str(compile_model(spec.converted, Path(tmpdir) / "converted", validate=False,
                                            capture_options={"seq_len": spec.seq, "batch": spec.batch}).path)]
        notes.append("tvm artifacts compiled on the fly for the host (default schedules, untuned)")
    try:
        import torch

        if not torch.cuda.is_available():
            notes.append("cuda: no GPU on this machine; CUDA backends skipped")
    except ImportError:  # pragma: no cover
        pass
    try:
        return _run(spec, progress, man, max_loops, notes)
    finally:
        if tmpdir:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)


def _run(spec: BenchSpec, progress, man: dict, max_loops: int, notes: list[str]) -> dict:
    cfgs = configs(spec, max_loops)
    ctx = mp.get_context("spawn")
    workers = {}
    try:
        for cfg in cfgs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, cfg, spec), daemon=True)
            p.start()
            workers[cfg] = (p, parent)
            hello = parent.recv()  # load one at a time: loading is not what is measured
            if "error" in hello:
                notes.append(f"{cfg.model}/{cfg.backend}/{cfg.loops}: {hello['error']}")
                parent.send("stop")
                p.join(5)
                del workers[cfg]
                continue
            workers[cfg] = (p, parent, hello)
            if progress:
                progress(f"loaded {cfg.model} {cfg.backend} loops={cfg.loops}")
        ref_cfg = next((c for c in workers if c.model == "original"), None)
        if ref_cfg is None:
            raise LoopifyError("the original model could not be run: " + "; ".join(notes))
        workers[ref_cfg][1].send("outputs")
        reference = workers[ref_cfg][1].recv()
        times = {c: [] for c in workers}
        peaks = {c: 0.0 for c in workers}
        for r in range(spec.rounds):
            order = list(workers) if r % 2 == 0 else list(reversed(list(workers)))
            for c in order:
                _, conn, _ = workers[c]
                conn.send(spec.per_round)
                msg = conn.recv()
                if "error" in msg:
                    raise LoopifyError(f"{c.model}/{c.backend}: {msg['error']}")
                times[c] += msg["times"]
                peaks[c] = max(peaks[c], msg["peak_mb"])
            if progress:
                progress(f"round {r + 1}/{spec.rounds}")
        results = []
        for c, (_, conn, hello) in workers.items():
            conn.send("outputs")
            outs = conn.recv()
            ts = sorted(times[c])
            med = statistics.median(ts)
            results.append({
                "model": c.model, "backend": c.backend, "loops": c.loops,
                "throughput": hello["units"] / (med / 1e3), "unit": hello["unit"], "units_per_call": hello["units"],
                "flops_per_unit": hello["flops"] / max(hello["units"], 1),
                "latency_ms": {"median": med, "p90": ts[min(len(ts) - 1, math.ceil(0.9 * len(ts)) - 1)],
                               "min": ts[0], "max": ts[-1], "n": len(ts)},
                "peak_mb": peaks[c], "params": hello["params"], "bytes_on_disk": hello["disk"],
                "fidelity": _fidelity(reference, outs, man),
            })
    finally:
        for c, w in workers.items():
            try:
                w[1].send("stop")
            except (BrokenPipeError, OSError):
                pass
            w[0].join(5)
    return {"machine": {**machine(), "threads": spec.threads}, "method": {
        "warmup": spec.warmup, "rounds": spec.rounds, "per_round": spec.per_round, "seq": spec.seq, "batch": spec.batch,
        "interleaved": True, "process_per_config": True},
        "results": results, "ratios": ratios(results), "notes": notes}


def _fidelity(reference, outs, manifest) -> dict:
    from loopify.verify import ShapeMismatch, report

    names = manifest.get("source", {}).get("output_names")
    try:
        v = report(list(reference), list(outs), names)
    except ShapeMismatch as e:
        raise LoopifyError(f"the original and the converted model ran on inputs of different shapes ({e}); give "
                           "--seq / --batch to run both at one shape") from None
    return {"cosine": v["cosine"], "max_abs_err": v["max_abs_err"], "kl": v["kl"],
            **{k: v[k] for k in ("top1_agreement", "top5_overlap") if k in v}}


def ratios(results: list[dict]) -> list[dict]:
    """converted / original per backend, at every loop count."""
    out = []
    orig = {r["backend"]: r for r in results if r["model"] == "original"}
    for r in results:
        if r["model"] != "converted" or r["backend"] not in orig:
            continue
        o = orig[r["backend"]]
        out.append({"backend": r["backend"], "loops": r["loops"],
                    "throughput": r["throughput"] / o["throughput"],
                    "latency": r["latency_ms"]["median"] / o["latency_ms"]["median"],
                    "peak_mb": (r["peak_mb"] / o["peak_mb"]) if o["peak_mb"] > 0 else None,
                    "params": r["params"] / o["params"], "bytes_on_disk": r["bytes_on_disk"] / o["bytes_on_disk"],
                    "cosine": r["fidelity"]["cosine"]})
    return out


def format_table(report: dict) -> str:
    lines = [f"machine: {report['machine'].get('cpu')} ({report['machine'].get('cores')} cores), "
             f"threads {report['machine']['threads']}, torch {report['machine'].get('torch')}"]
    rows = [("model", "backend", "loops", "throughput", "median ms", "p90 ms", "min-max ms", "MFLOP/unit", "peak MB",
             "params", "cosine", "x thr", "x lat")]
    rat = {(r["backend"], r["loops"]): r for r in report["ratios"]}
    for r in report["results"]:
        q = rat.get((r["backend"], r["loops"])) if r["model"] == "converted" else None
        lat = r["latency_ms"]
        rows.append((r["model"], r["backend"], "-" if r["loops"] is None else str(r["loops"]),
                     f"{r['throughput']:,.0f} {r['unit']}", f"{lat['median']:.2f}", f"{lat['p90']:.2f}",
                     f"{lat['min']:.2f}-{lat['max']:.2f}", f"{r.get('flops_per_unit', 0) / 1e6:,.2f}",
                     f"{r['peak_mb']:.0f}", f"{r['params']:,}",
                     f"{r['fidelity']['cosine']:.4f}", f"{q['throughput']:.2f}" if q else "", f"{q['latency']:.2f}" if q else ""))
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    for n in report.get("notes", []):
        lines.append(f"note: {n}")
    lines.append("x thr / x lat: converted / original, same backend (throughput >1 and latency <1 are better); "
                 "MFLOP/unit: matrix products and attention of one call per token (or image), FlopCounterMode")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or one line naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoopifyError("--plot needs matplotlib: pip install 'loopify[plot]'") from None
    return plt


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def save_figure(plt, fig, path: Path) -> Path:
    """Lay out, write the PNG atomically, close."""
    from loopify.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def plot(report: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in sorted({r["backend"] for r in report["results"]}):
        conv = sorted((r for r in report["results"] if r["backend"] == b and r["model"] == "converted"),
                      key=lambda r: r["loops"])
        orig = [r for r in report["results"] if r["backend"] == b and r["model"] == "original"]
        line, = a1.plot([r["loops"] for r in conv], [r["throughput"] for r in conv], marker="o", label=f"converted ({b})")
        if orig:
            a1.axhline(orig[0]["throughput"], linestyle="--", color=line.get_color(), label=f"original ({b})")
        a2.scatter([r["throughput"] for r in conv], [r["fidelity"]["cosine"] for r in conv], color=line.get_color(),
                   label=f"converted ({b})")
        for r in conv:
            a2.annotate(f"k={r['loops']}", (r["throughput"], r["fidelity"]["cosine"]), fontsize=7)
        if orig:
            a2.scatter([orig[0]["throughput"]], [1.0], marker="*", s=120, color=line.get_color(), label=f"original ({b})")
    unit = report["results"][0]["unit"] if report["results"] else ""
    ks = sorted({r["loops"] for r in report["results"] if r["loops"] is not None})
    a1.set_xticks(ks)
    label_axes(a1, "loops", f"throughput ({unit})", "throughput against loop count")
    label_axes(a2, f"throughput ({unit})", "cosine to original", "fidelity against throughput (Pareto view)")
    return save_figure(plt, fig, path)


def write_json(report: dict, path: Path) -> Path:
    from loopify.io import write_json as _w

    return _w(path, report)
