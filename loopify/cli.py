"""The ``loopify`` command line. A thin layer: parse, build a config, print the resolved settings,
call the library. No logic lives here."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import click

from loopify.errors import LoopifyError

log = logging.getLogger("loopify")


class _Group(click.Group):
    """Turns user errors into one line and exit status 2; tracebacks only with --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoopifyError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"loopify: error: {e}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("loopify: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - last line of defence for the user
            if ctx.obj and ctx.obj.get("debug"):
                raise
            from loopify.errors import missing_dependency

            err = missing_dependency(e) if isinstance(e, ImportError) else None
            if err is not None:  # an optional dependency: name the extra to install
                click.echo(f"loopify: error: {err}", err=True)
                sys.exit(err.exit_code)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"loopify: internal error: {type(e).__name__}: {first[:300]} (run with --debug for the traceback)",
                       err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="Log progress (-v info, -vv debug).")
@click.version_option(package_name="loopify")
@click.pass_context
def cli(ctx, debug, verbose):
    """loopify: fold the repeated layers of a transformer or multimodal model into recursive
    loops with shared weights, compile it with TVM, and measure what it bought.

    \b
    Commands, in the order of the flow:
      inspect   capture a model and report the spans of interchangeable layers
      convert   fold spans into loops with shared weights, verify, write OUT.pt2 + OUT.json
      compile   compile a model or a converted model with TVM into an artifact directory
      run       run an artifact (TVM) or a .pt2 (PyTorch) with the loop count chosen at run time
      bench     converted against original, side by side: throughput, latency, memory, size, fidelity
      train     uptrain a converted model by distillation with the Monotonic Recursion Loss
      generate  generate text with a KV cache (original, converted or compiled), loops per request
      eval      fidelity on a text file at every loop count: perplexity and next-token agreement, or
                sentence cosine and similarity rank correlation (encoders)
      plan      search conversion plans under a parameter or latency budget, without training
    MODEL is a torch.export archive (.pt2/.pt), a Hugging Face directory, a GGUF file, or (with
    --trust-pickle) a pickled nn.Module.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not debug:
        # Library deprecation chatter (torch pytree, networkx hash notes) is not for the user.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("torch", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))


def capture_options(f):
    """Options shared by every command that captures a model."""

    @click.option("--inputs", "inputs", type=click.Path(dir_okay=False, path_type=Path),
                  help="torch.save'd tuple or dict of tensors to use as example inputs (never unpickles code).")
    @click.option("--trust-pickle", is_flag=True,
                  help="Allow loading a pickled nn.Module: this RUNS CODE from the file. Only for files you trust.")
    @click.option("--allow-export-mismatch", is_flag=True,
                  help="Continue when the exported program does not reproduce the eager model.")
    @click.option("--seq-len", type=click.IntRange(min=1), default=None,
                  help="Text length of the dummy inputs built for Hugging Face directories.")
    @click.option("--batch", type=click.IntRange(min=1), default=None,
                  help="Batch size of the dummy inputs built for Hugging Face directories (default 1; "
                       "each row a different text and image).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def pipeline_options(f):
    """Options of the pass runner."""

    @click.option("--print-after", multiple=True, metavar="PASS",
                  help="Print the IR after PASS (repeatable; 'all' for every pass).")
    @click.option("--dump-ir", type=click.Path(file_okay=False, path_type=Path),
                  help="Write numbered IR dumps (000_input.txt, 001_find-spans.txt ...) to this directory.")
    @click.option("--timing", is_flag=True, help="Print the time each pass took.")
    @click.option("--skip", multiple=True, metavar="PASS", help="Skip a pass of the pipeline (repeatable).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _capture(model, inputs, trust_pickle, allow_export_mismatch, seq_len, batch=None):
    from loopify import capture

    click.echo(f"capturing {model} ...", err=True)
    cap = capture.load(model, inputs=inputs, trust_pickle=trust_pickle,
                       allow_export_mismatch=allow_export_mismatch, seq_len=seq_len, batch=batch)
    _echo_captured(cap)
    return cap


def _echo_captured(cap) -> None:
    desc = cap.describe()
    line = f"captured {cap.format}"
    if "architecture" in desc:
        line += f" {desc['architecture']}"
    if cap.info.get("attn_implementation"):
        line += f" (attention: {cap.info['attn_implementation']})"
    if cap.export_check is not None:
        chk = cap.export_check
        line += f"; export vs eager max abs err {chk.max_abs_err:.2e} ({'ok' if chk.ok else 'MISMATCH'})"
    click.echo(line, err=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@capture_options
@pipeline_options
@click.option("--stack", "stacks", multiple=True, metavar="PATH", help="Only these layer stacks (module paths).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write layer-by-layer similarity heatmaps (PNG), one row per stack.")
@click.option("--no-similarity", is_flag=True, help="Skip the activation similarity run on the example inputs.")
def inspect(model, inputs, trust_pickle, allow_export_mismatch, seq_len, batch, print_after, dump_ir, timing, skip,
            stacks, json_out, plot, no_similarity):
    """Capture MODEL and report its layer stacks and the spans of interchangeable layers.

    For every stack (a text decoder's layers, a vision tower's layers ...) it prints the layer
    count, the maximal runs of interchangeable layers, parameters per layer and how alike the
    layers are (weight residual against the run mean; block influence on the example inputs).
    Layers that break a run are listed with the reason.
    """
    from loopify import inspection
    from loopify.pipeline import Pipeline, State, run_pipeline
    from loopify.passes.find_spans import FindSpans

    _check_outputs(json_out, plot)
    cap = _capture(model, inputs, trust_pickle, allow_export_mismatch, seq_len, batch)
    pipeline = Pipeline.of(FindSpans(stacks=tuple(stacks), similarity=not no_similarity))
    click.echo(f"pipeline: {pipeline}", err=True)
    result = run_pipeline(pipeline, State(cap, cap.unflatten()), skip=tuple(skip), print_after=tuple(print_after),
                          dump_ir=dump_ir, emit=click.echo)
    if timing:
        for r in result.records:
            click.echo(f"  {r.name:<16} {r.seconds * 1000:9.1f} ms", err=True)
    analysis = result.state.analyses.get("spans")
    if analysis is None:
        raise LoopifyError("find-spans was skipped: nothing to report")
    click.echo(inspection.format_table(analysis))
    _write(json_out, lambda p: inspection.write_json(p, cap, analysis))
    _write(plot, lambda p: inspection.plot(p, analysis))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output archive OUT.pt2 (the manifest OUT.json is written beside it).")
@click.option("--blocks", type=click.IntRange(min=1), help="Unique blocks K per run (default: half the run).")
@click.option("--loops", type=click.IntRange(min=1), help="Loops N per run (instead of --blocks).")
@click.option("--sharing", type=click.Choice(["cycle", "sequence", "middle-cycle", "middle-sequence"]), default="cycle",
              show_default=True, help="Which block each depth uses.")
@click.option("--init", "init", type=click.Choice(["stepwise", "average", "lower", "upper"]), default="average",
              show_default=True, help="How blocks are built from the original layers.")
@click.option("--rank", default="0", show_default=True, metavar="R|full",
              help="Per-depth LoRA rank, initialised from the SVD of the residual; 'full' reproduces the original.")
@click.option("--connector", type=click.Choice(["none", "identity", "recursive", "embedding"]), default=None,
              help="Connector between recursion steps (default: none; recursive in deepen mode).")
@click.option("--mode", type=click.Choice(["compress", "deepen"]), default="compress", show_default=True,
              help="compress: tie layers; deepen: loop the span with its own weights (RecursiveVLM).")
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True, help="Deepen mode: default loop count.")
@click.option("--stack", "stacks", multiple=True, metavar="PATH", help="Only these stacks (default: every stack with a run).")
@click.option("--norms", type=click.Choice(["shared", "per-depth"]), default="shared", show_default=True,
              help="Norm weights shared by the block or kept per depth.")
@click.option("--subsample", is_flag=True, help="When K does not divide a run, keep evenly spaced layers.")
@click.option("--image-token-id", type=int, default=-1, help="Image token id for the modality mask (default: from the config).")
@click.option("--router", type=click.Choice(["none", "expert", "token"]), default="none", show_default=True,
              help="Mixture-of-Recursions router on every loop (neutral until trained; Hugging Face sources).")
@click.option("--capacity", metavar="C0,C1,...", default=None,
              help="Expert router: fraction of the tokens kept at each recursion step (default (N-r)/N).")
@click.option("--schedule", metavar="R0,R1,...", default=None,
              help="Multi-resolution loops (SpiralFormer): pooling factor of each recursion step, coarse to fine "
                   "(e.g. 4,2,1; gates start at zero; Hugging Face sources).")
@click.option("--pipeline", "pipeline_spec", metavar="SPEC", help="Full pipeline spec (overrides the plan options).")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A `loopify plan` JSON: convert with the pipeline spec of its chosen point (or --point N).")
@click.option("--point", type=int, default=None, help="With --plan: the point to take (default: the chosen one).")
@click.option("--dry-run", is_flag=True, help="Plan, convert and verify; write nothing.")
@capture_options
@pipeline_options
def convert(model, out, blocks, loops, sharing, init, rank, connector, mode, repeat, stacks, norms, subsample,
            image_token_id, router, capacity, schedule, pipeline_spec, plan_file, point, dry_run, inputs,
            trust_pickle, allow_export_mismatch, seq_len, batch, print_after, dump_ir, timing, skip):
    """Fold MODEL's spans of interchangeable layers into recursive loops and write OUT.pt2.

    With no options: every run is halved (K = L/2 blocks x 2 loops), cycle sharing, average
    init. Before writing, original and converted run on the example inputs (max abs error,
    cosine, KL for logits); a lossless plan (--rank full, or --mode deepen --repeat 1) that does
    not match within 1e-5 relative writes nothing.
    """
    from loopify import convert as conv

    if point is not None and plan_file is None:
        raise LoopifyError("--point needs --plan PLAN.json")
    if plan_file is not None:
        from loopify.plan import point_spec

        if pipeline_spec:
            raise LoopifyError("give --plan or --pipeline, not both")
        pipeline_spec, chosen = point_spec(plan_file, model, point)
        click.echo(f"plan {plan_file}: point {point if point is not None else 'chosen'} (params "
                   f"{chosen['params_ratio']:.1%}, run it at --loops {chosen['loops']})", err=True)
    config = conv.ConvertConfig(blocks=blocks or 0, loops=loops or 0, sharing=sharing, init=init,
                                rank=_rank_option(rank), connector=connector or "none", mode=mode, repeat=repeat,
                                stacks=tuple(stacks), norms=norms, subsample=subsample,
                                image_token_id=image_token_id, router=router,
                                capacity=_capacity_option(capacity), schedule=_schedule_option(schedule),
                                pipeline=pipeline_spec)
    pipeline = config.to_pipeline()
    click.echo(f"plan: {pipeline}", err=True)
    from tqdm import tqdm

    bar = tqdm(total=len(pipeline), desc="passes", unit="pass", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty())

    def step(spec):
        bar.set_postfix_str(spec.split("{")[0])
        bar.update(1)

    def converted(result):
        bar.close()
        if timing:
            for p in result.manifest["passes"]:
                click.echo(f"  {p['name']:<18} {p['seconds'] * 1000:9.1f} ms", err=True)
        click.echo(conv.format_summary(result.manifest))
        if not dry_run and result.manifest["verify"]["ok"]:
            click.echo("exporting the converted model ...", err=True)

    if out is not None and not dry_run and out.suffix == ".pt2":
        from loopify.converted import Bundle, check_bundle_output

        check_bundle_output(Bundle.of(out))
    click.echo(f"capturing {model} ...", err=True)
    try:
        result = conv.convert(model, config, out, dry_run=dry_run,
                              capture_options=dict(inputs=inputs, trust_pickle=trust_pickle,
                                                   allow_export_mismatch=allow_export_mismatch, seq_len=seq_len,
                                                   batch=batch),
                              on_captured=_echo_captured, on_converted=converted, skip=tuple(skip),
                              print_after=tuple(print_after), dump_ir=dump_ir, emit=click.echo, progress=step)
    finally:
        bar.close()
    if dry_run:
        click.echo("dry run: nothing written", err=True)
        return
    m = result.manifest
    click.echo(f"wrote {out} (program {m['bytes']['program_file']:,} bytes; weights "
               f"{m['bytes']['converted_file']:,} bytes) and {Path(out).with_suffix('.json')}")


def _numbers(option: str, text: str | None, kind, example: str) -> tuple:
    """A comma- (or colon-) separated list option as numbers of ``kind``; None or empty: ()."""
    if not text:
        return ()
    try:
        return tuple(kind(c) for c in text.replace(":", ",").split(",") if c.strip())
    except ValueError:
        what = "fractions" if kind is float else "integer pooling factors"
        raise LoopifyError(f"{option} {text!r}: give {what} separated by commas, e.g. {example}") from None


def _capacity_option(text: str | None) -> tuple[float, ...]:
    return _numbers("--capacity", text, float, "1,0.5")


def _schedule_option(text: str | None) -> tuple[int, ...]:
    return _numbers("--schedule", text, int, "4,2,1")


def _check_outputs(*paths) -> None:
    """Output files given by options are checked before the work starts (see loopify.io.check_output)."""
    from loopify.io import check_output

    for p in paths:
        if p is not None:
            check_output(p)


def _rank_option(rank: str):
    if rank == "full":
        return "full"
    try:
        value = int(rank)
    except ValueError:
        raise LoopifyError(f"--rank must be an integer >= 0 or 'full', not {rank!r}") from None
    if value < 0:
        raise LoopifyError("--rank must be >= 0")
    return value


def _loops_option(value):
    if value is None:
        return None
    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give an integer or comma-separated integers (one per loop)") from None
    if any(c < 0 for c in counts):
        raise click.BadParameter("loop counts must be >= 0")
    return counts[0] if len(counts) == 1 else counts


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Artifact directory (written atomically).")
@click.option("--target", type=click.Choice(["x86", "arm64", "cuda"]), default="x86", show_default=True)
@click.option("--arch", default=None, help="CUDA architecture (sm_80, sm_90 ...; default sm_90).")
@click.option("--mcpu", default=None, help="CPU model for x86/arm64 (cortex-a76, neoverse-n1 ...).")
@click.option("--tune", is_flag=True, help="MetaSchedule tuning before building.")
@click.option("--trials", type=click.IntRange(min=1), default=64, show_default=True, help="Tuning trials in total.")
@click.option("--tuning-db", type=click.Path(file_okay=False, path_type=Path),
              help="Tuning database directory, reused by later compiles and copied into the artifact.")
@click.option("--rpc", metavar="HOST:PORT:KEY", help="TVM RPC tracker for tuning on a remote device.")
@click.option("--schedule", type=click.Choice(["loopify", "dlight", "none"]), default="loopify", show_default=True,
              help="CPU schedule rules (none: TVM's default pipeline, for comparison).")
@click.option("--no-validate", is_flag=True, help="Skip running the host artifact against PyTorch.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Compile for generation: prefill and decode entry points for prompts up to this many tokens "
                   "(prompt and generated together).")
@click.option("--kv-policy", type=click.Choice(["per-depth", "share-first", "last"]), default="per-depth",
              show_default=True, help="With --max-context: the KV cache slots of loops.")
@click.option("--lora-form", type=click.Choice(["auto", "merged", "factored"]), default="auto", show_default=True,
              help="Per-depth LoRA: each depth's merged matrix precomputed, or factored x@W.T + s*(x@A.T)@B.T; "
                   "auto: per matrix, factored while the factors add at most 5% to its matmul.")
@click.option("--route-bucket", type=float, default=0.25, show_default=True,
              help="With --max-context, routed loops: a routed step's prefill runs its blocks on its kept tokens "
                   "gathered into the smallest bucket of j * ceil(T * this) rows that holds them (buckets below T; "
                   "0: every token, masked).")
@click.option("--weights", type=click.Choice(["float32", "int8", "int4", "int4asym"]), default="float32", show_default=True,
              help="Linear weights stored as int8 (per output channel), int4 (groups of 32, one scale; two per byte) "
                   "or int4asym (groups of 32, a scale and a minimum: llama.cpp Q4_1), dequantised inside the matmul "
                   "kernels; shared loop weights once for all depths.")
@click.option("--quantize-embeddings", is_flag=True,
              help="With --weights: also the token embeddings and a head tied to them (default: float).")
@click.option("--embedding-weights", type=click.Choice(["int8", "int4", "int4asym"]), default=None,
              help="With --weights: the embeddings and a tied head in this scheme instead (a mixed scheme, "
                   "e.g. --weights int4asym --embedding-weights int8); implies --quantize-embeddings.")
@click.option("--lora-weights", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="With --weights: the per-depth LoRA (merged matrices and factors) as int8 per output row.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Weights, activations and KV cache in float16 (float32 accumulation in the matmuls): for CUDA "
                   "and arm64 CPUs with half arithmetic. A converted model or a generation artifact.")
@capture_options
def compile_cmd(model, out, target, arch, mcpu, tune, trials, tuning_db, rpc, schedule, no_validate, max_context,
                kv_policy, lora_form, route_bucket, weights, quantize_embeddings, embedding_weights, lora_weights, dtype,
                inputs, trust_pickle, allow_export_mismatch, seq_len, batch):
    """Compile MODEL (any model `convert` takes, or its OUT.pt2) with TVM into an artifact directory:
    lib.so, params.safetensors (shared weights once), manifest.json. A converted model compiles into
    a prologue, a loop body per loop and an epilogue; the loop count is a run-time argument."""
    from loopify.compile import compile_model

    gen = f" generation: max_context={max_context} kv_policy={kv_policy}" if max_context else ""
    emb = f" embeddings={embedding_weights}" if embedding_weights else (" +embeddings" if quantize_embeddings else "")
    quant = (f" weights={weights}{emb}" + (f" lora={lora_weights}" if lora_weights != "float32" else "")
             if weights != "float32" else "")
    click.echo(f"compile {model} -> {out}: target={target} arch={arch or '-'} mcpu={mcpu or '-'} schedule={schedule} "
               f"tune={tune} trials={trials if tune else '-'} tuning_db={tuning_db or '-'} rpc={rpc or '-'}{gen}{quant}"
               f"{' dtype=' + dtype if dtype != 'float32' else ''}",
               err=True)
    res = compile_model(model, out, target=target, arch=arch, mcpu=mcpu, tune=tune, trials=trials,
                        tuning_db=str(tuning_db) if tuning_db else None, rpc=rpc, schedule=schedule,
                        validate=not no_validate, max_context=max_context, kv_policy=kv_policy, lora_form=lora_form,
                        weights=weights, quantize_embeddings=quantize_embeddings,
                        embedding_weights=embedding_weights, dtype=dtype, lora_weights=lora_weights,
                        route_bucket=route_bucket, capture_options=dict(inputs=inputs, trust_pickle=trust_pickle,
                                             allow_export_mismatch=allow_export_mismatch, seq_len=seq_len, batch=batch))
    m = res.manifest
    loops = m.get("loops", [])
    click.echo(f"wrote {res.path}: target {m.get('target')}, loops {[(l.get('min'), l.get('max'), l.get('default')) for l in loops] or 'none'}")
    for name, digest in sorted(m.get("files", {}).items()):
        size = (res.path / name).stat().st_size if (res.path / name).exists() else 0
        click.echo(f"  {name:<28} {size:>12,} bytes  sha256 {digest[:16]}")
    if res.checks:
        for c in res.checks:
            what = c.get("what") or f"output {c['output']}"
            click.echo(f"  validate loops={c['loops']} {what}: max abs {c['max_abs_err']:.3g} "
                       f"rel {c['rel_err']:.3g} {'ok' if c['ok'] else 'NOT OK'}")
    elif not no_validate:
        click.echo("  (not validated: the artifact does not run on this machine)")
    q = m.get("quantization")
    if q:
        b = q["bytes"]
        click.echo(f"  weights {q['weights']}: {len(q['tensors'])} matrices quantised ({b['quantized']:,} bytes for "
                   f"{b['quantized_float32']:,} in float32), {len(q['float'])} kept in float; params {b['params']:,} bytes"
                   + ("; validated against the PyTorch model with the same dequantised weights" if res.checks else ""))


@cli.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--loops", "loops_s", default=None, metavar="K[,K...]", help="Loop count (one per loop, or one for all).")
@click.option("--inputs", "inputs", type=click.Path(dir_okay=False, path_type=Path),
              help="torch.save'd tuple or dict of tensors (default for .pt2: the model's example inputs).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the outputs with torch.save (a tuple of tensors).")
@click.option("--save-inputs", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the flat inputs used (a tuple of tensors) for running an artifact with the same inputs.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (TVM and PyTorch).")
def run_cmd(model, loops_s, inputs, out_file, save_inputs, threads):
    """Run an artifact directory (TVM) or a .pt2/model (PyTorch) with the loop count given."""
    from loopify import execute

    _check_outputs(out_file, save_inputs)
    loops = _loops_option(loops_s)
    outs, used = execute.run(model, loops=loops, inputs=inputs, threads=threads)
    for i, o in enumerate(outs):
        click.echo(f"output {i}: {tuple(o.shape)} {str(o.dtype).replace('torch.', '')} "
                   f"mean {o.float().mean().item():.6g} max|.| {o.float().abs().max().item():.6g}")
    _write(out_file, lambda p: execute.save_tensors(p, tuple(outs)))
    _write(save_inputs, lambda p: execute.save_tensors(p, tuple(used)))


@cli.command("bench")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("converted", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("artifacts", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--backends", default="eager,compile,tvm", show_default=True, help="Comma-separated: eager, compile, tvm.")
@click.option("--loops", "loops_s", default=None, metavar="K,K...", help="Loop counts of the converted model (default: 1..max).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU threads, fixed for every backend.")
@click.option("--seq", type=click.IntRange(min=2), default=None,
              help="Text length for both models (Hugging Face sources; default: the length the model was converted at).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Batch size for both models (Hugging Face sources; default: the batch the model was converted at, 1).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Interleaved timing rounds.")
@click.option("--per-round", type=click.IntRange(min=1), default=3, show_default=True, help="Timed calls per round.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Uncounted calls first.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write throughput / Pareto plots (PNG).")
@click.option("--generate", "gen", is_flag=True,
              help="Benchmark generation instead: time to first token and decode tokens/s per prompt length "
                   "(backends hf, eager, tvm; ARTIFACTS are generation artifacts).")
@click.option("--prompt-lengths", default="32,128,512", show_default=True, help="--generate: prompt lengths.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="--generate: tokens decoded after each prompt.")
@click.option("--kv-policies", default="per-depth", show_default=True,
              help="--generate: KV policies of the converted model (eager); 'all' for the three.")
@click.option("--kv-table", is_flag=True, help="--generate: also the KV policy table (bytes per token, agreement).")
@click.option("--gguf", "ggufs", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--generate: a GGUF of the original for llama.cpp rows (repeatable; needs llama-cpp-python, "
                   "the bench extra).")
@click.option("--gguf-f32", is_flag=True, help="--generate: also a float32 GGUF written from each --gguf's weights "
                                               "(llama.cpp at loopify's precision).")
@click.option("--lora-form", type=click.Choice(["auto", "merged", "factored"]), default="auto", show_default=True,
              help="Per-depth LoRA of the converted model in PyTorch (as `compile --lora-form`).")
@click.option("--prepack", is_flag=True, help="--generate: loopify's eager rows run linear layers on oneDNN-packed "
                                              "weights (as `generate --prepack`).")
def bench_cmd(original, converted, artifacts, backends, loops_s, threads, seq, batch, rounds, per_round, warmup, json_out,
              plot, gen, prompt_lengths, new_tokens, kv_policies, kv_table, ggufs, gguf_f32, lora_form, prepack):
    """Benchmark CONVERTED (a `loopify convert` output) against ORIGINAL, side by side.

    ARTIFACTS: the TVM artifact directories of the original and the converted model (compiled
    on the fly for the host when not given). Each configuration runs in its own process; timing
    rounds are interleaved; ratios are converted / original for the same backend. With
    --generate: generation (see `loopify.bench_generate`).
    """

    from loopify import bench

    _check_outputs(json_out, plot)
    loops = _loops_option(loops_s)
    if ggufs and not gen:
        raise LoopifyError("--gguf is for --generate (llama.cpp rows)")
    if prepack and not gen:
        raise LoopifyError("--prepack is for --generate (loopify's eager decoder)")
    if gen:
        return _bench_generate(original, converted, artifacts, backends, loops, threads, rounds, warmup, json_out,
                               plot, prompt_lengths, new_tokens, kv_policies, kv_table, ggufs, gguf_f32, prepack)
    spec = bench.BenchSpec(str(original), str(converted), [str(a) for a in artifacts],
                           tuple(b.strip() for b in backends.split(",") if b.strip()),
                           tuple([loops] if isinstance(loops, int) else loops) if loops is not None else None,
                           threads, warmup, rounds, per_round, seq, batch, lora_form)
    click.echo(f"bench: backends={','.join(spec.backends)} loops={spec.loops or 'all'} threads={threads} "
               f"seq={seq or 'as converted'} batch={batch or 'as converted'} "
               f"warmup={warmup} rounds={rounds}x{per_round} (interleaved, one process per configuration)", err=True)
    bar, step = _progress("bench")
    try:
        report = bench.run(spec, progress=step)
    finally:
        bar.close()
    click.echo(bench.format_table(report))
    _write(json_out, lambda p: bench.write_json(report, p))
    _write(plot, lambda p: bench.plot(report, p))


def _write(path, write) -> None:
    """Write an optional output file (``write(path)``; nothing when not asked for) and say so."""
    if path:
        write(path)
        click.echo(f"wrote {path}", err=True)


def _progress(desc: str):
    """A progress bar on stderr (shown only on a terminal) and the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", leave=False, file=sys.stderr, disable=not sys.stderr.isatty())

    def step(msg):
        bar.set_postfix_str(msg)
        bar.update(1)
    return bar, step


def _bench_generate(original, converted, artifacts, backends, loops, threads, rounds, warmup, json_out, plot,
                    prompt_lengths, new_tokens, kv_policies, kv_table, ggufs=(), gguf_f32=False, prepack=False):

    from loopify import bench_generate as bg
    from loopify.nn.kv import POLICIES

    chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
    if backends == "eager,compile,tvm":  # the default of the forward benchmark
        chosen = ("hf", "eager", "tvm")
    bad = [b for b in chosen if b not in ("hf", "eager", "tvm")]
    if bad:
        raise LoopifyError(f"--generate backends are hf, eager, tvm; not {bad[0]!r}")
    policies = POLICIES if kv_policies == "all" else tuple(p.strip() for p in kv_policies.split(","))
    if any(p not in POLICIES for p in policies):
        raise LoopifyError(f"--kv-policies: each one of {', '.join(POLICIES)} (or 'all')")
    try:
        lengths = tuple(int(x) for x in prompt_lengths.split(","))
    except ValueError:
        raise LoopifyError(f"--prompt-lengths {prompt_lengths!r}: give comma-separated integers") from None
    spec = bg.GenBenchSpec(str(original), str(converted), [str(a) for a in artifacts], chosen,
                           tuple([loops] if isinstance(loops, int) else loops) if loops is not None else None,
                           policies, lengths, new_tokens, threads, rounds, warmup, prepack=prepack)
    if ggufs:
        if not bg.llama_cpp_available():
            raise LoopifyError("--gguf needs llama-cpp-python (pip install 'loopify[bench-llamacpp]': it builds "
                               "llama.cpp from source)")
        spec.ggufs = [str(g) for g in ggufs]
    tmp = None
    if gguf_f32 and ggufs:
        import tempfile

        from loopify.capture.gguf import write_float_copy

        tmp = tempfile.TemporaryDirectory(prefix="loopify-gguf-")
        for g in ggufs:
            click.echo(f"writing a float32 copy of {g.name}", err=True)
            spec.ggufs.append(str(write_float_copy(g, Path(tmp.name) / f"{g.stem}.f32.gguf")))
    click.echo(f"bench --generate: backends={','.join(chosen)} loops={spec.loops or 'all'} kv={','.join(policies)} "
               f"prompts={','.join(map(str, lengths))} new_tokens={new_tokens} threads={threads} rounds={rounds} "
               f"{'prepack ' if prepack else ''}"
               "(interleaved, one process per configuration)", err=True)
    bar, step = _progress("bench")
    try:
        report = bg.run(spec, progress=step)
        if kv_table:
            report["kv_policies"] = bg.kv_policy_table(converted)
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
    click.echo(bg.format_table(report))
    for r in report.get("kv_policies", []):
        click.echo(f"kv policy loops={r['loops']} {r['kv_policy']:<12} {r['kv_bytes_per_token']:>10,.0f} bytes/token  "
                   f"next-token agreement with per-depth {r['agreement_with_per_depth']:.3f}")
    from loopify.io import write_json

    _write(json_out, lambda p: write_json(p, report))
    _write(plot, lambda p: bg.plot(report, p))


@cli.command("train")
@click.argument("converted", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="The original model (default: the source recorded in CONVERTED's manifest).")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='Text file (one text per line) or JSON lines (.jsonl: a string or {"text": ..., "image": PATH}).')
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output OUT.pt2 (+ OUT.json).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Examples per step per process.")
@click.option("--batched/--one-at-a-time", default=True, show_default=True,
              help="Run a step's examples as one batch trimmed to its longest text (Hugging Face models, text only); "
                   "else one at a time at the captured length.")
@click.option("--seq-len", type=click.IntRange(min=0), default=0,
              help="Tokens per text example (0: the captured length; longer needs a batched run).")
@click.option("--loss", type=click.Choice(["mrl", "last"]), default="mrl", show_default=True,
              help="mrl: every depth supervised, a depth worse than the previous weighted by beta; last: final depth only.")
@click.option("--beta", type=float, default=2.0, show_default=True, help="MRL weight of a depth worse than the previous one (>= 1).")
@click.option("--train", "groups", default="base,lora,connector,router,spiral", show_default=True,
              help="Parameter groups to train (spiral: the gates of multi-resolution loops).")
@click.option("--lr-scale", "lr_scale", multiple=True, metavar="GROUP=X",
              help="A group's learning rate is X times --lr (repeatable; e.g. spiral=30 for the zero-initialised "
                   "gates of multi-resolution loops).")
@click.option("--router", type=click.Choice(["none", "expert", "token"]), default="none", show_default=True,
              help="Add a Mixture-of-Recursions router to every loop and train it (router losses beside distillation).")
@click.option("--capacity", metavar="C0,C1,...", default=None,
              help="Expert router: fraction of the tokens kept at each recursion step (default (N-r)/N).")
@click.option("--router-aux", type=float, default=0.1, show_default=True,
              help="Weight of the router's auxiliary loss (expert: BCE to the top-k choice; token: balancing).")
@click.option("--router-z", type=float, default=1e-3, show_default=True, help="Weight of the router z-loss.")
@click.option("--capacity-warmup", type=int, default=0, show_default=True,
              help="Expert router: steps over which the top-k capacity falls from 1 to --capacity (MoR's warm-up).")
@click.option("--balance", type=click.Choice(["loss", "bias"]), default="loss", show_default=True,
              help="Token router: the balancing loss, or MoR's loss-free balancing bias.")
@click.option("--bias-rate", type=float, default=1e-3, show_default=True, help="Loss-free bias update per step.")
@click.option("--shared-prefix/--no-shared-prefix", default=True, show_default=True,
              help="Run the deepest depth once and replay each loop's state after k steps for the smaller depths "
                   "(cycle and deepen loops; the same losses and gradients, fewer block calls).")
@click.option("--objective", type=click.Choice(["auto", "kl", "cosine", "mse", "token-cosine", "ce"]), default="auto",
              show_default=True,
              help="auto: KL on logits, cosine on pooled embeddings for encoders; token-cosine: every token's hidden "
                   "state; ce: next-token cross-entropy on the data (no teacher).")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="Held-out data (default: part of --data).")
@click.option("--holdout", type=float, default=0.1, show_default=True)
@click.option("--eval-every", type=int, default=0, show_default=True, help="0: before and after only.")
@click.option("--eval-size", type=int, default=0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Default: OUT.ckpt.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (same step, optimizer state, data position).")
@click.option("--tokenizer", default="auto", show_default=True, help="auto (the model's own), bytes, or a tokenizer directory.")
@click.option("--max-seconds", type=float, default=0.0, help="Stop training after this long and write the output (0: no limit).")
@click.option("--threads", type=int, default=0)
def train_cmd(converted, teacher, data, out, groups, capacity, lr_scale, **kw):
    """Uptrain CONVERTED (a `loopify convert` output) by distillation from the original, with
    RecursiveVLM's Monotonic Recursion Loss over every recursion depth. Writes OUT.pt2 + OUT.json
    like `convert`, with the training report. Runs under torchrun (DDP, gloo on CPU)."""
    from loopify import train as tr

    config = tr.TrainConfig(converted=str(converted), teacher=str(teacher) if teacher else None, data=str(data),
                            out=str(out), train=groups, capacity=_capacity_option(capacity),
                            lr_scale=_lr_scale_option(lr_scale),
                            **{k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})
    click.echo("train: " + " ".join(f"{k}={v}" for k, v in config.to_dict().items() if v not in (None, "", ())), err=True)
    res = tr.train(config, progress=tr.ConsoleProgress())
    if res.out is not None:  # rank 0 only under torchrun
        click.echo(tr.format_report(res.report))
        click.echo(f"wrote {res.out} and {res.manifest_path}")


@cli.command("generate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt (repeatable: a batch, left-padded).")
@click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="I,J,...",
              help="A prompt as token ids (repeatable), for models without a tokenizer.")
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An image for a vision-language model (made into pixel values by its processor settings).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--loops", "loops_s", default=None, metavar="K[,K...]", help="Loop count of a converted model (per request).")
@click.option("--kv-policy", type=click.Choice(["per-depth", "share-first", "last"]), default="per-depth",
              show_default=True, help="KV cache slots of loops: per executed depth (exact), or one per block.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", "stops", multiple=True, metavar="TEXT", help="Stop a row when its text contains TEXT (repeatable).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (TVM and PyTorch).")
@click.option("--prepack", is_flag=True,
              help="Eager models: run linear layers on oneDNN-packed weights (faster; a second copy of those weights "
                   "in memory; float results differ in the last bits). Artifacts ignore it.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write tokens, texts, timings as JSON.")
def generate_cmd(model, prompts, prompt_ids, image, chat, max_new_tokens, loops_s, kv_policy, temperature, top_p, seed,
                 stops, threads, prepack, json_out):
    """Generate from MODEL (a Hugging Face directory, a GGUF file, a converted .pt2 or an artifact
    directory): prefill each prompt, then decode token by token with a KV cache. Streams the text
    of a single prompt as it is decoded, then prints time to first token, decode tokens/s and the
    KV cache's bytes."""
    from loopify import generate as gen

    _check_outputs(json_out)
    loops = _loops_option(loops_s)
    if not prompts and not prompt_ids:
        raise LoopifyError("give --prompt TEXT or --prompt-ids I,J,...")
    g = gen.open_model(model, threads=threads, prepack=prepack)
    ids = [g.encode(p, chat) for p in prompts] + [_ids_option(p) for p in prompt_ids]
    extra = {}
    if image is not None:
        pairs = [g.with_image(p, image) for p in ids]
        ids = [p for p, _ in pairs]
        import torch

        extra = {"pixel_values": torch.cat([e["pixel_values"] for _, e in pairs])}
    s = gen.Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, eos=g.eos,
                     stop=tuple(stops))
    click.echo(f"generate: {g.kind} {model} loops={loops if loops is not None else 'default'} kv={kv_policy} "
               f"prompts={len(ids)} ({', '.join(str(len(p)) for p in ids)} tokens) max_new_tokens={max_new_tokens} "
               f"temperature={temperature} top_p={top_p} seed={seed}"
               f"{' prepack' if prepack and g.kind != 'artifact' else ''}", err=True)
    single = len(ids) == 1
    res = g.generate(ids, s, loops=loops, policy=kv_policy, extra=extra,
                     stream=(lambda row, text: click.echo(text, nl=False)) if single else None)
    if single:
        click.echo("")
    else:
        for i, t in enumerate(res.texts):
            click.echo(f"[{i}] {t}")
    n_tok = sum(res.prompt_tokens) + sum(len(t) for t in res.tokens)
    click.echo(f"time to first token {res.ttft_s * 1000:.1f} ms; decode {res.decode_tokens_per_s:.1f} tokens/s "
               f"({res.decoded} tokens); KV cache {res.kv_bytes:,} bytes ({res.kv_bytes / max(n_tok, 1):,.0f} per token)",
               err=True)
    if res.depth:
        from loopify.nn.routing import format_depths

        click.echo(format_depths(res.depth), err=True)
    if json_out:
        from loopify.io import write_json

        write_json(json_out, {"model": str(model), "kind": g.kind, "loops": loops, "kv_policy": kv_policy,
                              "sampling": s.__dict__, **res.to_dict()})


@cli.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", required=True, metavar="params=R|latency=R",
              help="Parameters or estimated latency (FLOPs) at most R times the original's.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Calibration text (one text per line or JSON lines; default: the train side of the real text "
                   "on this machine, see `python -m loopify.texts`).")
@click.option("--tokens", type=click.IntRange(min=16), default=512, show_default=True,
              help="Calibration tokens each candidate is measured on.")
@click.option("--metric", default=None, help="Fidelity to rank by: kl (default), top1_agreement, top5_overlap, "
                                             "perplexity (causal LMs); cosine (default), spearman (encoders).")
@click.option("--tokenizer", default="auto", show_default=True, help="auto (the model's own), bytes, or a tokenizer directory.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the plan as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the Pareto fronts (PNG).")
def plan_cmd(model, budget, data, tokens, metric, tokenizer, threads, json_out, plot):
    """Search MODEL's conversion plans under a budget without training: which layers to fold (the
    run may be cut where its first or last layers matter most), blocks, sharing, init, per-depth
    vectors and per-matrix LoRA ranks from the SVD energy. Each candidate is converted in eager
    PyTorch and measured on the calibration tokens; prints the Pareto front (fidelity against
    parameters and against FLOPs) and the best point within the budget, which `loopify convert
    MODEL --plan PLAN.json` converts."""
    import torch

    from loopify import plan as pl

    _check_outputs(json_out, plot)
    b = pl.Budget.parse(budget)
    if threads:
        torch.set_num_threads(threads)
    click.echo(f"plan: model={model} budget={b} data={data or 'real text on this machine (train side)'} "
               f"tokens={tokens} metric={metric or 'default'}", err=True)
    rep = pl.plan(model, b, data=data, tokens=tokens, metric=metric, tokenizer_choice=tokenizer,
                  progress=lambda msg: click.echo(msg, err=True))
    click.echo(pl.format_table(rep))
    _write(json_out, lambda p: pl.write(rep, p))
    _write(plot, lambda p: pl.plot(rep, p))


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='Text file (one text per line) or JSON lines (.jsonl: a string or {"text": ...}); '
                   "`python -m loopify.texts DIR` writes a held-out file from text on this machine.")
@click.option("--loops", "loops", type=click.IntRange(min=1), multiple=True, metavar="K",
              help="Loop count to measure (repeatable; default: every count the model allows).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The original to compare with (default: the source recorded in MODEL's manifest).")
@click.option("--tokenizer", default="auto", show_default=True, help="auto (the model's own), bytes, or a tokenizer directory.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per window (causal LMs) or per sentence (encoders); default 128.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many windows (default 16) or sentences (default 64), evenly spaced over the file.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--weights", type=click.Choice(["int8", "int4", "int4asym"]), default=None,
              help="Measure MODEL (original or converted) with its linear weights quantised as `compile --weights` does.")
@click.option("--quantize-embeddings", is_flag=True, help="With --weights: the embeddings and a tied head too.")
@click.option("--embedding-weights", type=click.Choice(["int8", "int4", "int4asym"]), default=None,
              help="With --weights: the embeddings and a tied head in this scheme (as `compile --embedding-weights`).")
@click.option("--lora-weights", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="With --weights: the per-depth LoRA as int8 (as `compile --lora-weights`).")
def eval_cmd(model, data, loops, reference, tokenizer, seq_len, limit, threads, json_out, weights,
             quantize_embeddings, embedding_weights, lora_weights):
    """Fidelity of MODEL (an original, a converted .pt2 or a generation artifact) on the texts of
    --data, at every loop count, against the original: perplexity and next-token agreement (top-1,
    top-5 overlap, KL) for causal LMs and VLMs; sentence-embedding cosine and the Spearman
    correlation of pairwise similarities for encoders."""
    import torch

    from loopify.fidelity.report import evaluate, format_report
    from loopify.io import write_json

    if threads:
        torch.set_num_threads(threads)
    click.echo(f"eval: model={model} data={data} loops={list(loops) or 'all'} reference={reference or 'recorded'}",
               err=True)
    rep = evaluate(model, data, loops=list(loops) or None, reference=reference, tokenizer_choice=tokenizer,
                   seq_len=seq_len, limit=limit, progress=sys.stderr.isatty(), weights=weights,
                   quantize_embeddings=quantize_embeddings, embedding_weights=embedding_weights,
                   lora_weights=lora_weights)
    click.echo(format_report(rep))
    _write(json_out, lambda p: write_json(p, rep))


def _lr_scale_option(values) -> dict:
    out = {}
    for v in values:
        g, sep, x = v.partition("=")
        try:
            out[g.strip()] = float(x)
        except ValueError:
            raise LoopifyError(f"--lr-scale {v!r}: give GROUP=X, e.g. spiral=30") from None
        if not sep:
            raise LoopifyError(f"--lr-scale {v!r}: give GROUP=X, e.g. spiral=30")
    return out


def _ids_option(value: str) -> list[int]:
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise LoopifyError(f"--prompt-ids {value!r}: give comma-separated integers") from None


def main(argv=None):
    """Console entry point."""
    cli.main(args=argv, prog_name="loopify", obj={})


if __name__ == "__main__":  # pragma: no cover
    main()
