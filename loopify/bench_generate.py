"""``loopify bench --generate``: generation, converted against original, side by side.

For every configuration (transformers' own ``generate`` on the original, loopify's eager decoder
on the original and on the converted model at each loop count and KV policy, the TVM generation
artifacts given) and every prompt length: time to first token (prefill + one token) and decode
tokens/s over ``new_tokens`` tokens after that prompt (the context the decode runs at), peak
memory and KV cache bytes. As in :mod:`loopify.bench`, each configuration runs in its own worker
process, rounds are interleaved, threads are fixed.

The machine's memory read bandwidth is probed (a numpy sum over a 512 MB array, with the thread
count of the run); each decode row is also given as a fraction of its bandwidth bound: the
weight bytes one decoded token reads (:func:`weight_bytes_per_token`) divided by the bandwidth is
the least time a token can take.

The KV policy table (eager, on real text, teacher-forced): KV bytes per token of each policy and
the next-token agreement of ``share-first`` and ``last`` with ``per-depth`` at every loop count.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from loopify.bench import _peak_mb, _release_freed, _reset_peak, _rss_mb, machine, worker_session
from loopify.errors import LoopifyError


@dataclass(frozen=True)
class GenConfig:
    model: str            # original | converted
    backend: str          # hf | eager | tvm | llama.cpp
    loops: int | None = None
    policy: str = "per-depth"
    gguf: str | None = None   # llama.cpp: the GGUF file


@dataclass
class GenBenchSpec:
    original: str
    converted: str
    artifacts: list[str] = field(default_factory=list)     # generation artifacts: [original, converted]
    backends: tuple[str, ...] = ("hf", "eager", "tvm")
    loops: tuple[int, ...] | None = None
    policies: tuple[str, ...] = ("per-depth",)
    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    new_tokens: int = 32
    threads: int = 1
    rounds: int = 3
    warmup: int = 1
    ggufs: list[str] = field(default_factory=list)        # llama.cpp rows: GGUF files of the original
    prepack: bool = False    # loopify's eager rows on oneDNN-packed linear weights (loopify.nn.prepack)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def bandwidth_gbs(threads: int = 1, mb: int = 512, repeat: int = 3) -> float:
    """Memory read bandwidth in GB/s: the best of ``repeat`` numpy sums over ``mb`` MB, split over
    ``threads`` threads (numpy releases the GIL in the sum)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def weight_bytes_per_token(module, loops=None, stored: dict | None = None) -> int:
    """Bytes of weights one decoded token reads: every weight outside loops once (an embedding
    table only when a linear layer reads it too: tied heads), a loop's block weights once per
    recursion that runs (a multi-resolution step of factor r: once per r tokens, on average),
    and each running depth's own LoRA factors and vectors. ``stored``:
    ``{id(parameter): bytes}`` for weights stored otherwise (quantised codes and scales)."""
    stored = stored or {}

    def nbytes(p):
        return stored.get(id(p), p.numel() * p.element_size())

    from torch import nn

    from loopify.nn import recursions, set_loops

    set_loops(module, loops)
    try:
        loop_params, total = set(), 0
        for rec in recursions(module).values():
            runs = {}
            sched = rec.depth_schedule()
            # a multi-resolution step of factor r runs once per r decoded tokens (when a group ends)
            steps = rec.steps()
            per = [1 / r for _, r in rec.spiral.spec.factors(len(steps))] if rec.spiral is not None else None
            for i, step in enumerate(steps):
                for d in step:
                    b = rec.block_for_depth(d)
                    runs[b] = runs.get(b, 0) + (per[i] if per else 1)
            for b, block in enumerate(rec.blocks):
                for p in block.parameters():
                    loop_params.add(id(p))
                    total += int(nbytes(p) * runs.get(b, 0))
            for d in (rec.lora_A, rec.lora_B, rec.depth_params):
                for p in d.values():
                    loop_params.add(id(p))
                    total += p.numel() * p.element_size() * len(sched) // max(rec.spec.layers, 1)
        linear = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
        tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)} - linear
        seen = set()
        for p in module.parameters():
            if id(p) in loop_params or id(p) in tables or id(p) in seen:
                continue
            seen.add(id(p))
            total += nbytes(p)
        return total
    finally:
        set_loops(module, None)


def _quantised_bytes(module, artifact) -> dict:
    """``{id(parameter): bytes of its codes and scales}`` for a quantised artifact's weights (the
    same selection as its compile, :func:`loopify.nn.quant.quantize_module_`, by parameter
    identity); {} for a float artifact."""
    import json
    from pathlib import Path

    from loopify.nn import quant

    q = json.loads((Path(artifact.path) / "manifest.json").read_text()).get("quantization")
    if not q:
        return {}
    cfg = quant.QuantConfig(q["weights"], embeddings=q.get("embeddings", False), scale_dtype=q.get("scale_dtype", "float32"),
                            embedding_weights=q.get("embedding_weights"))
    out = {}
    for p, _names, role in quant._selected(module, cfg).values():
        scheme = cfg.scheme_of(role)
        if quant.quantizable(tuple(p.shape), scheme) is None:
            out[id(p)] = quant.stored_bytes(tuple(p.shape), scheme, cfg.scale_dtype)
    return out


def prompts(n_tokens: int, tokenizer, vocab: int) -> list[int]:
    """A prompt of exactly ``n_tokens``: real English text (the licence texts on this machine)
    through the tokenizer, else fixed random ids."""
    if tokenizer is not None:
        from loopify import texts

        ids: list[int] = []
        for s in texts.sentences():
            ids += tokenizer(s)["input_ids"]
            if len(ids) >= n_tokens:
                return ids[:n_tokens]
    import torch

    return torch.randint(3, max(vocab - 1, 4), (n_tokens,), generator=torch.Generator().manual_seed(n_tokens)).tolist()


# ----------------------------------------------------------------------------------------------
# Worker


def _open(cfg: GenConfig, spec: GenBenchSpec):
    """(run(prompt) -> (ttft_s, decode_tokens_per_s, kv_bytes), weight bytes per token, tokenizer, vocab)."""
    import torch

    torch.set_num_threads(spec.threads)
    from loopify.generate import Sampling, open_model

    if cfg.backend == "llama.cpp":
        src = open_model(spec.original)
        return _llama_cpp_runner(cfg.gguf, spec), _gguf_weight_bytes(cfg.gguf), src.tokenizer, \
            int(src.config.get("vocab_size") or 32000)
    if cfg.backend == "tvm":
        idx = 0 if cfg.model == "original" else 1
        if len(spec.artifacts) <= idx:
            raise LoopifyError("tvm backend: give the generation artifacts (original, converted)")
        g = open_model(spec.artifacts[idx], threads=spec.threads)
        src = open_model(spec.converted if cfg.model == "converted" else spec.original)
    else:  # (transformers' own generate runs the unpacked layers)
        g = src = open_model(spec.converted if cfg.model == "converted" else spec.original,
                             prepack=spec.prepack and cfg.backend == "eager")
    module = src.make_decoder("per-depth", None).wrapper
    wbytes = weight_bytes_per_token(module, cfg.loops, _quantised_bytes(module, g) if cfg.backend == "tvm" else None)
    vocab = int(src.config.get("vocab_size") or 32000)
    if cfg.backend == "hf":
        return _hf_runner(module, spec), wbytes, g.tokenizer, vocab
    s = Sampling(max_new_tokens=spec.new_tokens + 1, eos=())

    def run(prompt):
        r = g.generate([prompt], s, loops=cfg.loops, policy=cfg.policy)
        run.depth = r.depth  # routed models: depth per token
        return r.ttft_s, r.decode_tokens_per_s, r.kv_bytes
    return run, wbytes, g.tokenizer, vocab


def _hf_runner(wrapper, spec: GenBenchSpec):
    """transformers' generate with its own DynamicCache: TTFT from a one-token generate, the
    decode rate from the difference with an (N+1)-token generate."""
    import torch

    model = wrapper.model

    def gen(prompt, n):
        x = torch.tensor([prompt])
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True)
        return time.perf_counter() - t, out

    def run(prompt):
        t1, _ = gen(prompt, 1)
        tn, out = gen(prompt, spec.new_tokens + 1)
        return t1, spec.new_tokens / max(tn - t1, 1e-9), None
    return run


def _gguf_weight_bytes(path: str) -> int:
    """Bytes of the GGUF's tensors that a decoded token reads: all but the token embedding table
    (one row of it), unless the head reads the table too (tied: no ``output.weight``)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if tied or name != "token_embd.weight")


def _llama_cpp_runner(path: str, spec: GenBenchSpec):
    """llama.cpp (llama-cpp-python) on a GGUF, fed loopify's prompt token ids: TTFT is the
    prompt's evaluation plus the first sampled token, then one ``eval`` per decoded token;
    greedy (top-k 1)."""
    from llama_cpp import Llama

    ctx = max(spec.prompt_lengths) + spec.new_tokens + 8
    llm = Llama(model_path=path, n_ctx=ctx, n_threads=spec.threads, n_threads_batch=spec.threads,
                n_batch=min(512, ctx), verbose=False)

    def run(prompt):
        llm.reset()
        t0 = time.perf_counter()
        stream = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        next(stream)
        t1 = time.perf_counter()
        for _ in range(spec.new_tokens):
            next(stream)
        t2 = time.perf_counter()
        stream.close()
        return t1 - t0, spec.new_tokens / max(t2 - t1, 1e-9), None
    return run


def _worker(conn, cfg: GenConfig, spec: GenBenchSpec):
    with worker_session(conn):
        import torch  # noqa: F401

        base = _rss_mb()
        run, wbytes, tok, vocab = _open(cfg, spec)
        inputs = {n: prompts(n, tok, vocab) for n in spec.prompt_lengths}
        for _ in range(spec.warmup):
            run(inputs[spec.prompt_lengths[0]])
        _release_freed()
        _reset_peak()
        conn.send({"ready": True, "weight_bytes": wbytes})
        while True:
            msg = conn.recv()
            if msg == "stop":
                break
            ttft, rate, kvb = run(inputs[int(msg)])
            conn.send({"ttft_s": ttft, "decode_tps": rate, "kv_bytes": kvb,
                       "peak_mb": max(_peak_mb(), _rss_mb()) - base, "depth": getattr(run, "depth", None)})


def configs(spec: GenBenchSpec, max_loops: int) -> list[GenConfig]:
    loops = list(spec.loops) if spec.loops else list(range(1, max_loops + 1))
    out = [GenConfig("original", "llama.cpp", gguf=g) for g in spec.ggufs]
    for b in spec.backends:
        out.append(GenConfig("original", b))
        if b == "hf":
            continue
        for k in loops:
            for p in (spec.policies if b == "eager" else ("per-depth",)):
                out.append(GenConfig("converted", b, k, p))
    return out


def run(spec: GenBenchSpec, progress=None) -> dict:
    """Measure every configuration (see the module docstring); returns the report."""
    from loopify.convert import read_manifest

    man = read_manifest(spec.converted)
    max_loops = max((l["max"] or l["default"]) for l in man["loops"])
    if "tvm" in spec.backends and len(spec.artifacts) < 2:
        spec.backends = tuple(b for b in spec.backends if b != "tvm")
        notes = ["tvm: no generation artifacts given (compile both models with --max-context); tvm rows skipped"]
    else:
        notes = []
    workers, results = {}, {}
    ctx = mp.get_context("spawn")
    try:
        for cfg in configs(spec, max_loops):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, cfg, spec), daemon=True)
            p.start()
            hello = parent.recv()
            if "error" in hello:
                notes.append(f"{cfg.model}/{cfg.backend}/{cfg.loops}/{cfg.policy}: {hello['error']}")
                p.join(5)
                continue
            workers[cfg] = (p, parent, hello)
            if progress:
                progress(f"loaded {cfg.model} {cfg.backend} loops={cfg.loops} {cfg.policy}")
        for r in range(spec.rounds):
            order = list(workers) if r % 2 == 0 else list(reversed(list(workers)))
            for n in spec.prompt_lengths:
                for c in order:
                    workers[c][1].send(n)
                    msg = workers[c][1].recv()
                    if "error" in msg:
                        raise LoopifyError(f"{c.model}/{c.backend}: {msg['error']}")
                    results.setdefault((c, n), []).append(msg)
            if progress:
                progress(f"round {r + 1}/{spec.rounds}")
    finally:
        for p, conn, _ in workers.values():
            try:
                conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            p.join(5)
    bw = bandwidth_gbs(spec.threads)
    rows = [_row(c, n, msgs, workers[c][2]["weight_bytes"], bw) for (c, n), msgs in results.items()]
    return {"machine": {**machine(), "threads": spec.threads, "bandwidth_gbs": bw},
            "method": {"rounds": spec.rounds, "warmup": spec.warmup, "new_tokens": spec.new_tokens,
                       "prompt_lengths": list(spec.prompt_lengths), "interleaved": True, "process_per_config": True,
                       "eager_prepack": spec.prepack},
            "results": rows, "ratios": ratios(rows), "notes": notes}


def _row(c: GenConfig, n: int, msgs: list[dict], wbytes: int, bw: float) -> dict:
    ttft = statistics.median(m["ttft_s"] for m in msgs)
    tps = statistics.median(m["decode_tps"] for m in msgs)
    bound = bw * 1e9 / wbytes if wbytes else float("nan")
    kv = msgs[-1]["kv_bytes"]
    return {"model": c.model, "backend": c.backend, "loops": c.loops,
            "kv_policy": c.policy if c.backend != "llama.cpp" else Path(c.gguf).name,  # keys a row
            "weights": Path(c.gguf).name if c.gguf else "float32", "prompt_tokens": n,
            "ttft_ms": ttft * 1e3, "decode_tokens_per_s": tps, "peak_mb": max(m["peak_mb"] for m in msgs),
            "kv_bytes": kv, "weight_bytes_per_token": wbytes, "bandwidth_bound_tokens_per_s": bound,
            "bandwidth_fraction": tps / bound if bound == bound else None, "n": len(msgs),
            "depth": msgs[-1].get("depth")}


def ratios(rows: list[dict]) -> list[dict]:
    """Each row against transformers' generate on the original at the same prompt length."""
    ref = {r["prompt_tokens"]: r for r in rows if r["backend"] == "hf"}
    out = []
    for r in rows:
        o = ref.get(r["prompt_tokens"])
        if o is None or r is o:
            continue
        out.append({"model": r["model"], "backend": r["backend"], "loops": r["loops"], "kv_policy": r["kv_policy"],
                    "prompt_tokens": r["prompt_tokens"], "decode_vs_hf": r["decode_tokens_per_s"] / o["decode_tokens_per_s"],
                    "ttft_vs_hf": r["ttft_ms"] / o["ttft_ms"]})
    return out


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m.get('cpu')} ({m.get('cores')} cores), threads {m['threads']}, read bandwidth "
             f"{m['bandwidth_gbs']:.1f} GB/s"]
    head = ("model", "backend", "loops", "kv", "prompt", "TTFT ms", "decode tok/s", "x hf", "of bound", "peak MB", "KV bytes")
    rat = {(r["model"], r["backend"], r["loops"], r["kv_policy"], r["prompt_tokens"]): r for r in report["ratios"]}
    rows = [head]
    for r in report["results"]:
        q = rat.get((r["model"], r["backend"], r["loops"], r["kv_policy"], r["prompt_tokens"]))
        rows.append((r["model"], r["backend"], "-" if r["loops"] is None else str(r["loops"]), r["kv_policy"],
                     str(r["prompt_tokens"]), f"{r['ttft_ms']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
                     f"{q['decode_vs_hf']:.2f}" if q else "", f"{r['bandwidth_fraction']:.0%}" if r["bandwidth_fraction"] else "",
                     f"{r['peak_mb']:.0f}", f"{r['kv_bytes']:,}" if r["kv_bytes"] is not None else "-"))
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    for r in report["results"]:
        if r.get("depth"):
            from loopify.nn.routing import format_depths

            lines.append(f"{r['model']} {r['backend']} loops={r['loops']} prompt {r['prompt_tokens']}: "
                         + format_depths(r["depth"]))
    lines += [f"note: {n}" for n in report.get("notes", [])]
    lines.append("x hf: decode tokens/s against transformers' generate on the original; of bound: decode rate / "
                 "(bandwidth / weight bytes read per token)")
    return "\n".join(lines)


def kv_policy_table(converted: str | Path, text_tokens: int = 96, prefix: int = 8) -> list[dict]:
    """Per loop count and policy: KV bytes per token, and next-token agreement with per-depth
    (teacher-forced on real text: each decoded step is fed the text's own next token)."""
    import torch

    from loopify.generate import open_model
    from loopify.generate.eager import EagerDecoder
    from loopify.nn import set_loops

    g = open_model(converted)
    module = g.make_decoder("per-depth", None).wrapper
    vocab = int(g.config.get("vocab_size") or 32000)
    ids = prompts(text_tokens, g.tokenizer, vocab)
    out = []
    max_loops = max(l["max"] or l["default"] for l in g.loops)
    for k in range(1, max_loops + 1):
        set_loops(module, k)
        preds = {}
        for policy in ("per-depth", "share-first", "last"):
            dec = EagerDecoder(module, policy)
            with torch.no_grad():
                x = torch.tensor([ids[:prefix]])
                p = [int(dec.prefill({"input_ids": x, "attention_mask": torch.ones_like(x),
                                      "position_ids": torch.arange(prefix)[None]}).argmax())]
                for t in range(prefix, len(ids) - 1):
                    logits = dec.decode(torch.tensor([[ids[t]]]), torch.ones(1, t + 1, dtype=torch.long),
                                        torch.tensor([[t]]))
                    p.append(int(logits.argmax()))
            preds[policy] = (p, dec.kv_bytes() / (len(ids) - 1))
        for policy, (p, per_tok) in preds.items():
            agree = sum(a == b for a, b in zip(p, preds["per-depth"][0])) / len(p)
            out.append({"loops": k, "kv_policy": policy, "kv_bytes_per_token": per_tok, "agreement_with_per_depth": agree})
    set_loops(module, None)
    return out


def plot(report: dict, path: Path) -> Path:
    """Decode tokens/s against prompt length per configuration, and time to first token."""
    from loopify.bench import label_axes, pyplot, save_figure

    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(r["model"], r["backend"], r["loops"] or 0, r["kv_policy"]) for r in report["results"]})
    for k in keys:
        rs = sorted((r for r in report["results"] if (r["model"], r["backend"], r["loops"] or 0, r["kv_policy"]) == k),
                    key=lambda r: r["prompt_tokens"])
        label = f"{k[0]} {k[1]}" + (f" k={k[2]}" if k[2] else "") + (f" {k[3]}" if k[3] != "per-depth" else "")
        a1.plot([r["prompt_tokens"] for r in rs], [r["decode_tokens_per_s"] for r in rs], marker="o", label=label)
        a2.plot([r["prompt_tokens"] for r in rs], [r["ttft_ms"] for r in rs], marker="o", label=label)
    label_axes(a1, "context (prompt tokens)", "decode tokens/s", "decode rate")
    label_axes(a2, "prompt tokens", "time to first token (ms)", "prefill")
    return save_figure(plt, fig, path)
