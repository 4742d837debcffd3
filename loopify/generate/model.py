"""A model to generate from, whatever it is: an original (Hugging Face directory or GGUF file), a
converted ``.pt2``, or a compiled artifact directory; its tokenizer, end tokens, maximum context,
and how prompts (with images for vision-language models) become inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loopify.generate.engine import GenerateError, Result, Sampling, run


@dataclass
class Generator:
    """What :func:`open_model` returns; :meth:`generate` serves requests."""

    path: Path
    kind: str                       # original | converted | artifact
    make_decoder: object            # (policy) -> decoder
    tokenizer: object | None
    config: dict                    # the text model's config (dict)
    assets: Path | None             # where config / tokenizer / processor files are
    loops: list[dict] = field(default_factory=list)   # per loop: min, max, default
    policies: tuple[str, ...] = ("per-depth", "share-first", "last")
    image_token_id: int | None = None
    image_tokens: int | None = None
    pixel_shape: tuple | None = None
    model_type: str = ""
    max_context: int | None = None
    #: multi-resolution loops (SpiralFormer): why a request of several prompts or with an image is
    #: refused (None: no schedule)
    spiral: str | None = None

    # -- prompts --------------------------------------------------------------------------------

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise GenerateError(f"{self.path}: the model has no tokenizer; give token ids (--prompt-ids 1,2,3)")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise GenerateError(f"{self.path}: the tokenizer has no chat template; drop --chat")
            enc = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else \
            " ".join(map(str, ids))

    @property
    def eos(self) -> tuple[int, ...]:
        ids = set()
        for src in (self.config, _json(self.assets, "generation_config.json")):
            v = src.get("eos_token_id")
            ids |= set(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
        tid = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(tid, int):
            ids.add(tid)
        return tuple(sorted(ids))

    @property
    def pad(self) -> int:
        for src in (self.config, _json(self.assets, "generation_config.json")):
            if isinstance(src.get("pad_token_id"), int):
                return int(src["pad_token_id"])
        return self.eos[0] if self.eos else 0

    def with_image(self, ids: list[int], image: str | Path | None) -> tuple[list[int], dict]:
        """The prompt with the image's tokens put in, and the pixel values (a text-only model
        refuses an image; a vision-language model without one gets none)."""
        if image is None:
            return ids, {}
        if self.image_token_id is None:
            raise GenerateError(f"{self.path}: a text-only model takes no --image")
        from loopify.capture.inputs import ImageReader

        like = torch.zeros(self.pixel_shape)
        px, _note = ImageReader(self.assets).pixels(Path(image), like)
        img = [int(self.image_token_id)] * int(self.image_tokens)
        from loopify.capture.inputs import image_first

        body = ids
        if image_first(self.model_type):
            return img + body, {"pixel_values": px}
        k = 1 if body and body[0] == self.config.get("bos_token_id") else 0
        return body[:k] + img + body[k:], {"pixel_values": px}

    # -- requests -------------------------------------------------------------------------------

    def check(self, loops, policy: str) -> None:
        if policy not in self.policies:
            raise GenerateError(f"{self.path}: KV policy {policy!r} is not available here (this model offers "
                                f"{', '.join(self.policies)})")
        if loops is None:
            return
        counts = [loops] * len(self.loops) if isinstance(loops, int) else list(loops)
        if not self.loops:
            raise GenerateError(f"{self.path}: not a converted model; it has no loops to set")
        if len(counts) != len(self.loops):
            raise GenerateError(f"{len(counts)} loop counts given for {len(self.loops)} loops")
        for k, l in zip(counts, self.loops):
            lo, hi = l.get("min", 1), l.get("max")
            if k < lo or (hi is not None and k > hi):
                raise GenerateError(f"loop count {k} is outside the model's range [{lo}, {hi if hi is not None else 'any'}]")

    def check_ids(self, prompts: list[list[int]]) -> None:
        """Token ids outside the vocabulary are refused before anything runs (an eager model
        would raise an IndexError, a compiled one read outside its embedding table)."""
        vocab = self.config.get("vocab_size")
        ids = [i for p in prompts for i in p]
        if not isinstance(vocab, int) or not ids:
            return
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise GenerateError(f"{self.path}: token id {bad} is outside the vocabulary [0, {vocab - 1}]")

    def generate(self, prompts: list[list[int]], sampling: Sampling, *, loops=None, policy: str = "per-depth",
                 extra: dict | None = None, stream=None) -> Result:
        self.check(loops, policy)
        self.check_ids(prompts)
        if self.spiral is not None and (len(prompts) > 1 or (extra or {}).get("pixel_values") is not None):
            raise GenerateError(f"{self.path}: {self.spiral}")
        decoder = self.make_decoder(policy, loops)
        return run(decoder, prompts, sampling, pad=self.pad, extra=extra, detok=self.decode_text, stream=stream,
                   max_context=self.max_context)


def _json(d: Path | None, name: str) -> dict:
    if d is None or not (Path(d) / name).is_file():
        return {}
    try:
        return json.loads((Path(d) / name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def open_model(path: str | Path, *, threads: int | None = None, prepack: bool = False) -> Generator:
    """A :class:`Generator` for ``path`` (original, converted ``.pt2`` or artifact directory).
    ``prepack``: an eager model runs its linear layers on oneDNN-packed weights
    (:mod:`loopify.nn.prepack`); an artifact has its own kernels and ignores it."""
    path = Path(path)
    if threads:
        torch.set_num_threads(threads)
    if path.is_dir() and (path / "manifest.json").is_file():
        from loopify.generate.compiled import open_artifact

        return open_artifact(path, threads=threads)
    from loopify.converted import is_converted

    if is_converted(path):
        return _open_converted(path, prepack)
    return _open_original(path, prepack)


def _set_loops_decoder(wrapper, policy, loops, prepack: bool = False):
    from loopify.generate.eager import EagerDecoder
    from loopify.nn import set_loops

    set_loops(wrapper, loops)
    return EagerDecoder(wrapper, policy, prepack=prepack)


def _vision(wrapper, info: dict) -> dict:
    return {"image_token_id": info.get("image_token_id"), "image_tokens": info.get("num_image_tokens"),
            "pixel_shape": tuple(info["pixel_shape"]) if info.get("pixel_shape") else None,
            "model_type": str(info.get("model_type", ""))}


def _open_converted(path: Path, prepack: bool = False) -> Generator:
    from loopify.convert import load_converted

    module, inputs, manifest = load_converted(path)
    from loopify.nn import recursions

    spiral = {p: r for p, r in recursions(module).items() if r.spiral is not None}
    spiral_note, policies = None, ("per-depth", "share-first", "last")
    if spiral:  # decoded one prompt at a time, text only, one slot per depth (loopify.nn.spiral.run_cached)
        spiral_note = ("a multi-resolution loop decodes one text prompt at a time (a batch of prompts, or image "
                       "positions, is not supported with a resolution schedule yet)")
        policies = ("per-depth",)
    if manifest.get("architecture", {}).get("kind") != "hf":
        raise GenerateError(f"{path}: generation needs a converted Hugging Face model (this one came from an export "
                            "archive: a fixed-shape graph without a KV cache)")
    assets = Path(inputs.info["assets_dir"])
    cfg = _json(assets, "config.json")
    info = {**manifest["source"], "pixel_shape": _pixel_shape(inputs.kwargs)}
    return Generator(path, "converted", lambda policy, loops: _set_loops_decoder(module, policy, loops, prepack),
                     _tokenizer(assets), _text_config(cfg), assets, manifest["loops"], policies=policies,
                     **_vision(module, info), max_context=_text_config(cfg).get("max_position_embeddings"),
                     spiral=spiral_note)


def _open_original(path: Path, prepack: bool = False) -> Generator:
    from loopify.capture.loader import load_source

    model = load_source(path, "generation needs a Hugging Face directory, a GGUF file, a converted .pt2 or an "
                              "artifact (an export archive is a fixed-shape graph without a KV cache)", GenerateError)
    assets = Path(model.info.get("assets_dir") or path)
    cfg = _json(assets, "config.json")
    info = {**model.info, "image_token_id": model.image_token_id, "model_type": model.model_type,
            "pixel_shape": _pixel_shape(model.inputs)}
    return Generator(path, "original", lambda policy, loops: _set_loops_decoder(model.module, policy, None, prepack),
                     _tokenizer(assets), _text_config(cfg), assets, [], **_vision(model.module, info),
                     max_context=_text_config(cfg).get("max_position_embeddings"))


def _pixel_shape(kwargs: dict):
    px = kwargs.get("pixel_values")
    return None if px is None else [1, *px.shape[1:]]


def _tokenizer(d: Path):
    from loopify.capture.inputs import has_tokenizer, load_tokenizer

    if not has_tokenizer(d):
        return None
    tok = load_tokenizer(d)
    return tok
