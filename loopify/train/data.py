"""Training data: records from text or JSON lines, tokenised to the model's example inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loopify.capture.inputs import has_tokenizer, special_ids
from loopify.train.config import JSONL_SUFFIXES, TrainError


@dataclass
class Record:
    text: str
    image: Path | None = None


def read_records(path: str | Path) -> list[Record]:
    """Text file (one text per line, blank lines skipped) or JSON lines (by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: data file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: data file is not UTF-8 text (byte {e.start})") from None
    out: list[Record] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise TrainError(f"{path}:{i}: a record must be a string or an object with a non-empty \"text\"")
            img = obj.get("image")
            if img is not None:
                if not isinstance(img, str):
                    raise TrainError(f"{path}:{i}: \"image\" must be a path")
                img = Path(img) if Path(img).is_absolute() else path.parent / img
                if not img.is_file():
                    raise TrainError(f"{path}:{i}: image {img} not found")
            out.append(Record(obj["text"], img))
    else:
        out = [Record(line.strip()) for line in raw.splitlines() if line.strip()]
    if not out:
        raise TrainError(f"{path}: no texts in the data file")
    return out


def _config_json(source: Path) -> dict:
    try:
        if source.is_dir() and (source / "config.json").is_file():
            return json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    return {}


def _find(d: dict, key: str):
    if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
        return d[key]
    for v in d.values():
        if isinstance(v, dict):
            r = _find(v, key)
            if r is not None:
                return r
    return None


class ByteTokenizer:
    """UTF-8 bytes mapped onto the vocabulary minus its special ids (only on request: for tiny
    test models that ship no tokenizer). ``bos`` is prepended when given."""

    def __init__(self, vocab: int, specials: set[int], bos: int | None, pad: int):
        self.allowed = [i for i in range(vocab) if i not in specials]
        if len(self.allowed) < 2:
            raise TrainError(f"vocabulary of {vocab} ids has too few non-special ids for byte tokenisation")
        self.bos, self.pad = bos, pad

    def ids(self, text: str) -> list[int]:
        body = [self.allowed[b % len(self.allowed)] for b in text.encode("utf-8")]
        return ([self.bos] if self.bos is not None else []) + body


class Encoder:
    """Turns records into keyword inputs with the captured program's static shapes."""

    def __init__(self, captured, source: Path, tokenizer: str, seq_len: int = 0):
        self.template = {k: v for k, v in captured.kwargs.items()}
        if captured.args:
            raise TrainError(f"{captured.source}: the model takes positional inputs; text training data need a model "
                             "with keyword inputs (input_ids, attention_mask ...) such as a Hugging Face model")
        if "input_ids" not in self.template:
            raise TrainError(f"{captured.source}: the model takes no input_ids; training data are texts")
        self.seq = int(self.template["input_ids"].shape[-1])
        self.image_token_id = captured.info.get("image_token_id")
        ids = self.template["input_ids"][0]
        self.image_slots = (ids == self.image_token_id) if self.image_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        self.vlm = bool(self.image_slots.any()) and "pixel_values" in self.template
        if seq_len and seq_len != self.seq and not self.vlm:
            # every [1, S] input at the new length (a model that runs at any length: the caller checks;
            # a VLM keeps its image slots at the captured length)
            self.template = {k: (torch.zeros((1, seq_len), dtype=v.dtype) if tuple(v.shape) == (1, self.seq) else v)
                             for k, v in self.template.items()}
            self.seq = int(seq_len)
        self.notes: list[str] = []
        self.source = source
        cfg = _config_json(source)
        self.hf_tok = None
        self.bytes_tok = None
        if tokenizer == "bytes":
            self.bytes_tok = self._byte_tokenizer(captured, cfg)
            self.tokenizer_desc = "bytes"
            self.notes.append("texts tokenised as UTF-8 bytes mapped onto the vocabulary (tokenizer=bytes)")
        else:
            tok_dir = source if tokenizer == "auto" else Path(tokenizer)
            if tokenizer == "auto" and not has_tokenizer(tok_dir):
                raise TrainError(f"{source}: the model has no tokenizer of its own; pass a tokenizer directory, or "
                                 "--tokenizer bytes to map UTF-8 bytes onto its vocabulary")
            if not has_tokenizer(tok_dir):
                raise TrainError(f"{tok_dir}: no tokenizer files in this directory")
            from loopify.fidelity import tokenizer_for

            self.hf_tok = tokenizer_for(tok_dir)
            self.tokenizer_desc = str(tok_dir)
            vocab = self._vocab(captured, cfg)
            if vocab is not None and len(self.hf_tok) > vocab:
                raise TrainError(f"{tok_dir}: tokenizer has {len(self.hf_tok)} ids, the model's vocabulary only {vocab}")
        self.images = None
        self.image_note_done = False

    # -- tokenisers --------------------------------------------------------------------------

    @staticmethod
    def _vocab(captured, cfg) -> int | None:
        shapes = captured.info.get("output_shapes") or {}
        if "logits" in shapes:
            return int(shapes["logits"][-1])
        return _find(cfg, "vocab_size")

    def _byte_tokenizer(self, captured, cfg) -> ByteTokenizer:
        vocab = self._vocab(captured, cfg)
        if not vocab:
            raise TrainError(f"{captured.source}: cannot tell the vocabulary size for byte tokenisation")
        specials = special_ids(cfg)
        if self.image_token_id is not None:
            specials.add(int(self.image_token_id))
        bos = _find(cfg, "bos_token_id")
        first = int(self.template["input_ids"][0, 0])
        bos = bos if bos is not None and bos == first else None
        pad = _find(cfg, "pad_token_id")
        pad = pad if pad is not None and 0 <= pad < vocab else 0
        specials |= {i for i in (bos, pad) if i is not None}
        return ByteTokenizer(vocab, specials, bos, pad)

    def _text_ids(self, text: str, n: int) -> tuple[list[int], int]:
        """Token ids of ``text``, truncated to ``n``, and the pad id."""
        if self.hf_tok is not None:
            enc = self.hf_tok(text, truncation=True, max_length=n)
            pad = self.hf_tok.pad_token_id if self.hf_tok.pad_token_id is not None else 0
            return list(enc["input_ids"])[:n], int(pad)
        return self.bytes_tok.ids(text)[:n], self.bytes_tok.pad

    # -- examples -------------------------------------------------------------------------------

    def encode(self, rec: Record) -> dict[str, torch.Tensor]:
        t = self.template
        if not self.vlm:
            if rec.image is not None:
                raise TrainError(f"{rec.image}: the model takes no images")
            if self.hf_tok is not None:  # as loopify.fidelity.batch_inputs does
                enc = self.hf_tok(rec.text, padding="max_length", truncation=True, max_length=self.seq, return_tensors="pt")
                return {k: enc[k].to(t[k].dtype) if k in enc else torch.zeros_like(t[k]) for k in t}
            ids, pad = self._text_ids(rec.text, self.seq)
            out = {k: v.clone() for k, v in t.items()}
            out["input_ids"] = _padded(ids, self.seq, pad, t["input_ids"].dtype)
            if "attention_mask" in t:
                out["attention_mask"] = _mask(len(ids), self.seq, t["attention_mask"].dtype)
            if "token_type_ids" in t:
                out["token_type_ids"] = torch.zeros_like(t["token_type_ids"])
            return out
        # vision-language: the text fills the positions that are not image tokens
        slots = (~self.image_slots).nonzero().flatten()
        ids, pad = self._text_ids(rec.text, len(slots))
        out = {k: v.clone() for k, v in t.items()}
        new_ids = t["input_ids"].clone()
        new_ids[0, slots] = pad
        new_ids[0, slots[:len(ids)]] = torch.tensor(ids, dtype=new_ids.dtype)
        out["input_ids"] = new_ids
        if "attention_mask" in t:
            m = torch.ones_like(t["attention_mask"])
            m[0, slots[len(ids):]] = 0
            out["attention_mask"] = m
        if rec.image is not None:
            out["pixel_values"] = self._pixels(rec.image, t["pixel_values"])
        return out

    def _pixels(self, path: Path, like: torch.Tensor) -> torch.Tensor:
        from loopify.capture.inputs import ImageReader, InputsError

        if self.images is None:
            self.images = ImageReader(self.source)
        try:
            px, note = self.images.pixels(path, like)
        except InputsError as e:
            raise TrainError(str(e)) from None
        if note and not self.image_note_done:
            self.notes.append(note)
            self.image_note_done = True
        return px


def stack_examples(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of text examples: their inputs stacked, and the columns that are padding in every
    row (outside the first and last position any attention mask keeps) cut off, so that a batch
    of short texts runs at its longest text's length. Right- or left-padded alike."""
    out = {k: torch.cat([e[k] for e in examples], 0) for k in examples[0]}
    m = out.get("attention_mask")
    if m is None or m.dim() != 2:
        return out
    keep = m.to(torch.bool).any(0).nonzero().flatten()
    if not len(keep):
        return out
    lo, hi, s = int(keep[0]), int(keep[-1]) + 1, m.shape[1]
    return {k: v[:, lo:hi] if v.dim() == 2 and v.shape[1] == s else v for k, v in out.items()}


def _padded(ids: list[int], n: int, pad: int, dtype) -> torch.Tensor:
    x = torch.full((1, n), pad, dtype=dtype)
    if ids:
        x[0, :len(ids)] = torch.tensor(ids, dtype=dtype)
    return x


def _mask(n_valid: int, n: int, dtype) -> torch.Tensor:
    m = torch.zeros((1, n), dtype=dtype)
    m[0, :n_valid] = 1
    return m


def split_holdout(records: list, holdout: float) -> tuple[list, list]:
    """Every ``round(1/holdout)``-th record is held out (the first one included)."""
    if holdout <= 0:
        return list(records), []
    k = max(2, round(1 / holdout))
    return [r for i, r in enumerate(records) if i % k], [r for i, r in enumerate(records) if i % k == 0]


def data_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training examples in one epoch (a function of seed and epoch only)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def example_indices(pos: int, count: int, n: int, seed: int) -> list[int]:
    """The training examples at global data positions ``pos .. pos+count-1``."""
    out, cache = [], {}
    for p in range(pos, pos + count):
        e = p // n
        if e not in cache:
            cache[e] = data_order(n, seed, e)
        out.append(int(cache[e][p % n]))
    return out


# ----------------------------------------------------------------------------------------------
