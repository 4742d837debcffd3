"""``loopify eval``: a model's fidelity on a text file of the user's, at every loop count, in the
metric that fits it (see :mod:`loopify.fidelity.metrics`), against the original it was made from."""

from __future__ import annotations

from pathlib import Path

import torch

from loopify.fidelity import inputs as text_inputs
from loopify.fidelity.metrics import NextToken, mean_pooled, sentence_fidelity
from loopify.fidelity.models import EvalError, Subject, open_subject, reference_path

DEFAULT_LIMIT = {"causal": 16, "encoder": 64}   # windows / sentences: seconds, not minutes, on 2 cores
DEFAULT_SEQ = 128


def tokenizer(subject: Subject, choice: str = "auto"):
    """``(text -> token ids, description)``: the model's own tokenizer, a tokenizer directory, or
    (on request only, for models that ship none) UTF-8 bytes mapped onto the vocabulary."""
    from loopify.capture.inputs import has_tokenizer, special_ids
    from loopify.train.data import ByteTokenizer, _find

    if choice == "bytes":
        vocab = _find(subject.config, "vocab_size")
        if not vocab:
            raise EvalError(f"{subject.path}: cannot tell the vocabulary size for byte tokenisation")
        bos, pad = _find(subject.config, "bos_token_id"), _find(subject.config, "pad_token_id")
        specials = special_ids(subject.config) | {i for i in (bos, pad) if i is not None}
        return ByteTokenizer(vocab, specials, bos, pad or 0).ids, "bytes"
    d = subject.assets if choice == "auto" else Path(choice)
    if d is None or not has_tokenizer(d):
        raise EvalError(f"{subject.path}: the model has no tokenizer of its own; pass --tokenizer DIR, or "
                        "--tokenizer bytes to map UTF-8 bytes onto its vocabulary" if choice == "auto" else
                        f"{d}: no tokenizer files in this directory")
    tok = text_inputs.tokenizer_for(d)
    return (lambda text: [int(i) for i in tok(text)["input_ids"]]), str(d)


def read_texts(path: str | Path) -> list[str]:
    """The texts of ``--data`` (one per line, or JSON lines with ``"text"``); images are refused."""
    from loopify.train.data import read_records

    recs = read_records(path)
    if any(r.image is not None for r in recs):
        raise EvalError(f"{path}: image records are not evaluated yet; give text records only")
    return [r.text for r in recs]


def evaluate(model: str | Path, data: str | Path, *, loops: list[int] | None = None, reference: str | Path | None = None,
             tokenizer_choice: str = "auto", seq_len: int | None = None, limit: int | None = None,
             progress: bool = False, weights: str | None = None, quantize_embeddings: bool = False,
             embedding_weights: str | None = None, lora_weights: str = "float32") -> dict:
    """Fidelity of ``model`` on ``data`` at each loop count (default: every count), against
    ``reference`` (default: the original the model records as its source; none for an original,
    whose own perplexity is then reported alone). ``weights``: measure the model with its
    weights fake-quantised (``int8`` / ``int4``, see :func:`open_subject`); an original is then
    compared with itself in float32. ``quantize_embeddings`` / ``embedding_weights``: the
    embeddings and a tied head too; ``lora_weights`` ``int8``: the per-depth LoRA too
    (``compile``'s options of the same names)."""
    subject = open_subject(model, weights=weights, quantize_embeddings=quantize_embeddings,
                           embedding_weights=embedding_weights, lora_weights=lora_weights)
    counts = subject.counts(loops)
    texts = read_texts(data)
    if seq_len is not None and subject.max_len is not None and seq_len > subject.max_len:
        raise EvalError(f"--seq-len {seq_len}: longer than the artifact's maximum context {subject.max_len}")
    seq = seq_len or min(DEFAULT_SEQ, subject.max_len or DEFAULT_SEQ)
    notes = []
    ref_path, why = (Path(reference), "") if reference is not None else reference_path(subject)
    if weights and reference is None and subject.kind == "original":
        ref_path, why = Path(model), ""  # the same model in float32
    if weights:
        emb = (f" --embedding-weights {embedding_weights}" if embedding_weights
               else " --quantize-embeddings" if quantize_embeddings else "")
        emb += " --lora-weights int8" if lora_weights == "int8" else ""
        notes.append(f"weights {weights}: fake-quantised in PyTorch, what a `compile --weights {weights}{emb}` artifact "
                     "computes (validated against it to 1e-4)")
    if why:
        notes.append(f"no agreement with the original: {why} (give --reference ORIGINAL)")
    ref = open_subject(ref_path) if ref_path is not None else None
    if ref is not None and ref.task != subject.task:
        raise EvalError(f"{ref_path}: the reference is a{'n' if ref.task == 'encoder' else ''} {ref.task} model, "
                        f"{subject.path} a{'n' if subject.task == 'encoder' else ''} {subject.task} one")
    encode, tok_desc = tokenizer(subject, tokenizer_choice)
    limit = limit or DEFAULT_LIMIT[subject.task]
    measure = _causal if subject.task == "causal" else _encoder
    # causal LMs read the file as one text (lines packed in order, newline-separated: a window
    # has the context of a document, not of one short line); encoders embed each line
    tokens = encode("\n".join(texts)) if subject.task == "causal" else [encode(t) for t in texts]
    body = measure(subject, ref, counts, tokens, seq, limit, data, progress)
    body["data"]["texts"] = len(texts)
    return {"model": str(subject.path), "kind": subject.kind, "task": subject.task,
            "reference": str(ref_path) if ref_path is not None else None, "tokenizer": tok_desc,
            "loops": subject.loops, **body, "notes": notes}


def _data_info(data, **kw) -> dict:
    from loopify.io import sha256_file

    return {"path": str(data), "sha256": sha256_file(data), **kw}


def _bar(items, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


def _extra(subject: Subject, ids: torch.Tensor, value: int) -> dict:
    # token types: 1 marks the causal suffix of prefix-LMs (PaliGemma), 0 the first segment (BERT)
    return {"token_type_ids": torch.full_like(ids, value)} if "token_type_ids" in subject.takes else {}


def _check_same_shape(ref_out: torch.Tensor, out: torch.Tensor, subject: Subject) -> None:
    if ref_out.shape != out.shape:
        raise EvalError(f"{subject.path}: its outputs {tuple(out.shape)} differ in shape from the reference's "
                        f"{tuple(ref_out.shape)} (another vocabulary or width?)")


def _causal(subject, ref, counts, tokens, seq, limit, data, progress) -> dict:
    wins = text_inputs.windows(tokens, seq, limit)
    if not wins:
        raise EvalError(f"{data}: no text of 2 tokens or more to score")
    stats = {k: NextToken() for k in counts}
    depths: dict = {k: [] for k in counts}
    ref_stats = NextToken()
    for w in _bar(wins, progress, "windows"):
        ids = torch.tensor([w], dtype=torch.long)
        r = ref.output(ids, None, _extra(ref, ids, 1))[0].float() if ref is not None else None
        if r is not None:
            ref_stats.add(r, ids[0])
        for k in counts:
            out = subject.output(ids, k, _extra(subject, ids, 1))[0].float()
            if r is not None:
                _check_same_shape(r, out, subject)
            stats[k].add(out, ids[0], r)
            if subject.depth() is not None:
                depths[k].append(subject.depth())
    return {"data": _data_info(data, tokens=len(tokens), windows=len(wins), window_tokens=seq,
                               scored_tokens=ref_stats.n or stats[counts[0]].n),
            "original": ref_stats.result() if ref is not None else None,
            "results": [{"loops": k, **stats[k].result(), **_depth(depths[k], k)} for k in counts]}


def _depth(depths: list, k) -> dict:
    """Routed models: average recursion depth per token and its distribution at this count."""
    if not depths:
        return {}
    from loopify.nn.routing import depth_stats

    return {"depth": depth_stats(torch.cat(depths), int(k) if k is not None else int(max(int(d.max()) for d in depths)))}


def _embed(subject: Subject, ids_list: list[list[int]], k) -> torch.Tensor:
    rows = []
    for ids in ids_list:
        x = torch.tensor([ids], dtype=torch.long)
        hidden = subject.output(x, k, _extra(subject, x, 0)).float()
        rows.append(mean_pooled(hidden, torch.ones_like(x)))
    return torch.cat(rows)


def _encoder(subject, ref, counts, token_lists, seq, limit, data, progress) -> dict:
    sents = text_inputs.evenly([ids[:seq] for ids in token_lists if ids], limit)
    if len(sents) < 3:
        raise EvalError(f"{data}: {len(sents)} text(s); the similarity ranking needs at least 3")
    ref_emb = _embed(ref, sents, None) if ref is not None else None
    results = []
    for k in _bar(counts, progress, "loop counts"):
        emb = _embed(subject, sents, k)
        row = {"loops": k, "sentences": len(sents)}
        if ref_emb is not None:
            _check_same_shape(ref_emb, emb, subject)
            row.update(sentence_fidelity(ref_emb, emb))
        results.append(row)
    return {"data": _data_info(data, sentences=len(sents), max_tokens=seq),
            "original": None, "results": results}


def format_report(rep: dict) -> str:
    """The report as a table for the terminal."""
    causal = rep["task"] == "causal"
    cols = (["loops", "perplexity", "accuracy", "top1 agree", "top5 overlap", "KL"] if causal
            else ["loops", "cosine", "cosine min", "spearman"])
    keys = (["perplexity", "accuracy", "top1_agreement", "top5_overlap", "kl"] if causal
            else ["cosine", "cosine_min", "spearman"])
    routed = any("depth" in r for r in rep["results"])
    if routed:  # routed models: the average recursion depth per token at each count
        cols = cols + ["avg depth"]
    rows = []
    if rep.get("original"):
        rows.append(["original"] + [_fmt(rep["original"].get(k)) for k in keys] + ([""] if routed else []))
    rows += [[str(r["loops"]) if r["loops"] is not None else "-"] + [_fmt(r.get(k)) for k in keys]
             + ([_fmt(r["depth"]["average"]) if "depth" in r else ""] if routed else []) for r in rep["results"]]
    widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [cols] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    d = rep["data"]
    what = (f"{d['windows']} windows of up to {d['window_tokens']} tokens ({d['scored_tokens']} scored)" if causal
            else f"{d['sentences']} sentences")
    head = [f"{rep['model']} ({rep['kind']}, {rep['task']}) on {d['path']}: {what}",
            f"reference: {rep['reference'] or 'none'}"]
    return "\n".join(head + lines + [f"note: {n}" for n in rep["notes"]])


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
