"""MetaSchedule tuning on top of loopify's default schedules, with a persistent database.

Facts this follows (DESIGN.md, measured on this 2-core machine): ``extract_tasks`` finds nothing
until the module is legalised and fused, so tuning runs on exactly the module the pipeline
builds (after FuseTIR) and the database is applied to that same module; workers pay 7-13 s of
``import tvm`` each and the default 30 s builder timeout expires, so candidates are built
in-process (no worker) with a long timeout; and short tuning alone does not beat a good
default schedule. So, per task, the tuned best is used only where it measured faster than
loopify's default schedule for that function (both timed the same way); the decision per
task is recorded in the manifest.

The database directory (``tuning_db``) is reused when present: records already there are
applied without re-measuring (``trials=0`` tunes nothing and only applies), new trials extend it.
``rpc="host:port:key"`` measures candidates and defaults on a remote device registered with a
TVM RPC tracker (e.g. an arm64 board running ``python -m tvm.exec.rpc_server --tracker``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import CompileError

log = logging.getLogger(__name__)


def parse_rpc(spec: str) -> tuple[str, int, str]:
    """``"host:port:key"`` -> (host, port, key)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
        raise CompileError(f"rpc must be 'host:port:key' (a TVM RPC tracker), got {spec!r}")
    return parts[0], int(parts[1]), parts[2]


def check_rpc(spec: str, timeout: float = 10.0) -> dict:
    """Fail early, in one line, when the tracker is unreachable or has no free device for the key.

    Returns the key's queue summary (``{"free": ..., "pending": ...}``).
    """
    import socket

    host, port, key = parse_rpc(spec)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise CompileError(f"cannot reach the RPC tracker at {host}:{port} ({e.strerror or e})") from None
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"the RPC tracker at {host}:{port} does not answer as a TVM tracker "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    queues = summary.get("queue_info", {})
    if key not in queues:
        have = ", ".join(sorted(queues)) or "none"
        raise CompileError(f"the RPC tracker at {host}:{port} has no device registered as {key!r} (keys: {have})")
    return queues[key]


def _export(rt_mod, target, path: str) -> str:
    from .targets import fcompile_for

    tdict = {"kind": target.kind.name}
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        tdict["mtriple"] = "aarch64-linux-gnu"
    rt_mod.export_library(path, fcompile=fcompile_for(tdict))
    return path


def _in_process_builder(target):
    """A MetaSchedule builder that compiles candidates in this process (no worker start-up)."""
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    rt_mod = default_build(bi.mod, bi.target, None)
                    # One directory per candidate: MetaSchedule's RemoveBuildArtifact callback
                    # deletes the artifact's whole parent directory (never put it in /tmp itself).
                    path = os.path.join(tempfile.mkdtemp(prefix="loopify-ms-"), "candidate.so")
                    _export(rt_mod, bi.target, path)
                    results.append(BuilderResult(path, None))
                except Exception as e:  # noqa: BLE001 - a failed candidate, not a failed tune
                    results.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def _runner(options):
    from tvm.s_tir import meta_schedule as ms

    if options.rpc:
        host, port, key = parse_rpc(options.rpc)
        cfg = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                  session_timeout_sec=120)
        return ms.runner.RPCRunner(rpc_config=cfg, max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=120)


class _Timer:
    """Times one PrimFunc locally or on the RPC device, the same way for default and tuned."""

    def __init__(self, target, options):
        self.target = target
        self.options = options
        self._session = None
        self._uploads = 0

    def session(self):
        if self.options.rpc and self._session is None:
            from tvm import rpc

            host, port, key = parse_rpc(self.options.rpc)
            self._session = rpc.connect_tracker(host, port).request(key, session_timeout=120)
        return self._session

    def __call__(self, func) -> float | None:
        import tvm

        try:
            mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            rt_mod = tvm.tirx.build(mod, self.target)
            sess = self.session()
            if sess is not None:
                tmpdir = tempfile.mkdtemp(prefix="loopify-ms-time-")
                # One remote name per upload: the session keeps one directory, and overwriting a
                # library the server has loaded crashes it (seen on the emulated arm64 server).
                self._uploads += 1
                path = os.path.join(tmpdir, f"timed{self._uploads}.so")
                _export(rt_mod, self.target, path)
                sess.upload(path)
                rt_mod = sess.load_module(os.path.basename(path))
                shutil.rmtree(tmpdir, ignore_errors=True)
                dev = sess.cpu(0)
            else:
                dev = tvm.cpu(0)
            from tvm.s_tir.meta_schedule.arg_info import ArgInfo

            args = []
            for info in ArgInfo.from_prim_func(func):
                shape = [int(s) for s in info.shape]
                dtype = str(info.dtype)
                arr = (np.random.uniform(-1, 1, shape).astype(dtype) if "float" in dtype
                       else np.zeros(shape, dtype))
                args.append(tvm.runtime.tensor(arr, dev))
            f = rt_mod.time_evaluator("main", dev, number=3, repeat=3, min_repeat_ms=20)
            return float(np.median(f(*args).results))
        except Exception as e:  # noqa: BLE001
            log.warning("timing a schedule failed: %s", str(e).splitlines()[-1] if str(e) else e)
            return None


def tune_and_apply(mod, target, options, work_dir: Path | None):
    """Tune the legalised + fused ``mod`` and apply the database where it wins (module pass body).

    Returns the module with the chosen functions scheduled (marked ``tirx.is_scheduled`` so the
    default rules leave them alone); the per-task decisions go to ``options._tuning_report``.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from . import schedules

    if options.rpc:
        queue = check_rpc(options.rpc)
        log.info("tuning through the RPC tracker %s: %s", options.rpc, queue)
    db_dir = Path(options.tuning_db) if options.tuning_db else Path(work_dir or tempfile.mkdtemp()) / "tuning"
    db_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # Tune only functions with a reduction (matmul, softmax, norms): injective ones are cheap.
    heavy = [t for t in tasks if _has_reduction(t.dispatched[0]["main"])]
    log.info("tuning: %d of %d tasks, %d trials, database %s", len(heavy), len(tasks),
             options.trials, db_dir)
    if heavy and options.trials > 0:
        ms_dir = str(db_dir / "logs")
        # A small evolutionary search: the default population (512, 4 generations) costs minutes
        # per task on two cores before the first measurement.
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=64, init_min_unmeasured=16, genetic_num_iters=2)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            heavy, ms_dir, strategy=strategy,
            num_threads=int(options.num_threads or os.cpu_count() or 1))
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=ms_dir,
                      max_trials_global=int(options.trials),
                      num_trials_per_iter=min(16, int(options.trials)),
                      builder=_in_process_builder(target), runner=_runner(options),
                      database=database)

    # Per function: the tuned record if it beats loopify's default schedule. TVM's own pass
    # matches functions to database records (the same normalisation as at extraction).
    from tvm import relax

    with target, database:
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    timer = _Timer(target, options)
    defaults = schedules.schedule_passes(target, options)
    report = []
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        tuned = applied[gv.name_hint]
        if tuned.same_as(func) or "tirx.is_scheduled" not in (tuned.attrs or {}):
            continue
        one = tvm.IRModule({"main": func})
        with target:
            default_mod = tvm.transform.Sequential(defaults)(one) if defaults else one
        t_default = timer(default_mod["main"])
        t_tuned = timer(tuned)
        use = t_tuned is not None and (t_default is None or t_tuned < t_default)
        report.append({"function": gv.name_hint, "default_ms": _ms(t_default),
                       "tuned_ms": _ms(t_tuned), "chosen": "tuned" if use else "default"})
        if use:
            mod[gv] = tuned
    options._tuning_report = report
    return mod


def _ms(t):
    return None if t is None else round(t * 1e3, 4)


def _has_reduction(func) -> bool:
    import tvm

    found = []

    def visit(block):
        if any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in block.iter_vars):
            found.append(block)

    try:
        import tvm_ffi

        tvm_ffi.structural_walk(func.body, (tvm.s_tir.SBlock, visit), order="post")
    except Exception:  # noqa: BLE001 - fall back to the printed form
        return "T.axis.reduce" in func.script() or "\"SSR" in func.script()
    return bool(found)
