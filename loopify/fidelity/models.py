"""Any model loopify takes, opened for measurement: an original (Hugging Face directory or GGUF
file), a converted ``.pt2`` (module form, rebuilt with :func:`loopify.convert.load_converted`)
or a generation artifact (its TVM ``prefill`` entry point returns the logits of every prompt
position). Each becomes a :class:`Subject` that maps token ids to logits (causal LMs and VLMs)
or to hidden states (encoders) at a chosen loop count, and knows what it was made from."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loopify.errors import LoopifyError


class EvalError(LoopifyError):
    """A model or data set that cannot be evaluated."""


@dataclass
class Subject:
    """A model to measure. ``run(inputs, loops)`` -> logits [1, T, V] (``task == "causal"``) or
    the last hidden state [1, T, D] (``"encoder"``)."""

    path: Path
    kind: str                      # original | converted | artifact
    task: str                      # causal | encoder
    run: Callable
    assets: Path | None            # config and tokenizer files
    config: dict
    takes: set[str]                # keyword inputs the model accepts
    loops: list[dict] = field(default_factory=list)   # per loop: min, max, default
    source: dict | None = None     # what it was made from (a converted model's or artifact's record)
    max_len: int | None = None     # an artifact's maximum context
    module: object = None          # the PyTorch model (originals and converted models)

    def depth(self) -> torch.Tensor | None:
        """Routed models: the recursion steps each token took in the last output (else None)."""
        return getattr(self.run, "depth", None)

    def output(self, ids: torch.Tensor, loops: int | None = None, extra: dict | None = None) -> torch.Tensor:
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **(extra or {})}
        with torch.no_grad():
            return self.run({k: v for k, v in inputs.items() if k in self.takes}, loops)

    def counts(self, requested: list[int] | None) -> list[int | None]:
        """The loop counts to measure: ``requested`` (each checked against every loop's range),
        else every count from the loops' common minimum to maximum; ``[None]`` for a model
        without loops."""
        if not self.loops:
            if requested:
                raise EvalError(f"{self.path}: not a converted model; it has no loops to set (drop --loops)")
            return [None]
        lo = max(int(l.get("min", 1)) for l in self.loops)
        maxes = [int(l["max"]) for l in self.loops if l.get("max") is not None]
        hi = min(maxes) if maxes else None     # deepen-mode loops run any count
        for k in requested or []:
            if k < lo or (hi is not None and k > hi):
                raise EvalError(f"--loops {k}: outside the model's range [{lo}, {hi if hi is not None else 'any'}]")
        if requested:
            return list(requested)
        top = hi if hi is not None else max(int(l["default"]) for l in self.loops)
        return list(range(lo, top + 1))


def open_subject(path: str | Path, weights: str | None = None, *, quantize_embeddings: bool = False,
                 embedding_weights: str | None = None, lora_weights: str = "float32") -> Subject:
    """A :class:`Subject` for an original, a converted ``.pt2`` or a generation artifact.

    ``weights``: ``int8`` / ``int4``: an original or converted model with its weights
    fake-quantised (:func:`loopify.nn.quant.quantize_module_`): exactly what a ``compile
    --weights`` artifact computes (validated against it to 1e-4); ``quantize_embeddings`` /
    ``embedding_weights``: the embeddings and a tied head too, as ``compile`` does;
    ``lora_weights`` ``int8``: the per-depth LoRA too, in the forms ``compile`` gives it
    (:func:`loopify.nn.deploy_lora`, ``auto``: a causal LM's as its generation artifact's)."""
    path = Path(path)
    from loopify.nn.quant import needs_weights

    lora = lora_weights == "int8"
    flag = needs_weights(quantize_embeddings, embedding_weights, lora_weights)
    if flag and not weights:
        raise EvalError(f"{flag} needs --weights int8, int4 or int4asym")
    if not path.exists():
        raise EvalError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "manifest.json").is_file():
        if weights:
            raise EvalError(f"{path}: --weights is for PyTorch models; an artifact's weights are fixed when it is compiled")
        return _artifact(path)
    from loopify.converted import is_converted

    subject = _converted(path) if is_converted(path) else _original(path)
    if weights:
        from loopify.nn import quant

        try:
            if lora and subject.task == "causal":  # as its generation artifact deploys it
                from loopify.generate.export import deploy

                deploy(subject.module, "auto")
            elif lora:
                from loopify.nn import deploy_lora

                deploy_lora(subject.module, "auto")
            plan = quant.plan_module(subject.module, quant.QuantConfig(
                weights, embeddings=quantize_embeddings, embedding_weights=embedding_weights,
                lora="int8" if lora else None))
        except ValueError as e:
            raise EvalError(str(e)) from None
        if not plan.registry:
            raise EvalError(f"{path}: --weights {weights}: no nn.Linear weight to quantise")
    return subject


def _task(output_names: list[str]) -> str:
    return "causal" if "logits" in output_names else "encoder"


def _eager_run(wrapper, output_names: list[str]):
    """(inputs, loops) -> the model's first output of interest (logits, else the first output)."""
    from loopify.nn import set_loops

    index = output_names.index("logits") if "logits" in output_names else 0

    from loopify.nn.routing import routers

    routed = list(routers(wrapper).values())

    def run(inputs: dict, loops):
        set_loops(wrapper, loops)
        out = wrapper(**inputs)[index]
        # routed models: the steps each token took (summed over routed loops), for eval's depth
        run.depth = sum(r.last_depth for r in routed).flatten() if routed else None
        return out

    return run


def _takes(wrapper) -> set[str]:
    return set(inspect.signature(wrapper.model.forward).parameters)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _converted(path: Path) -> Subject:
    from loopify.convert import load_converted

    module, inputs, manifest = load_converted(path)
    arch = manifest.get("architecture", {})
    if arch.get("kind") != "hf":
        raise EvalError(f"{path}: eval needs a converted Hugging Face model (this one came from an export archive: "
                        "a fixed-shape graph that takes no text of another length)")
    names = list(arch.get("output_names") or ["logits"])
    assets = Path(inputs.info["assets_dir"])
    return Subject(path, "converted", _task(names), _eager_run(module, names), assets, _json(assets / "config.json"),
                   _takes(module), list(manifest["loops"]), dict(manifest.get("source") or {}), module=module)


def _original(path: Path) -> Subject:
    from loopify.capture.loader import load_source

    model = load_source(path, "eval needs a Hugging Face directory, a GGUF file, a converted .pt2 or a generation "
                              "artifact (an export archive is a fixed-shape graph that takes no text)", EvalError)
    names = list(model.output_names)
    assets = Path(model.info.get("assets_dir") or path)
    return Subject(path, "original", _task(names), _eager_run(model.module, names), assets,
                   _json(assets / "config.json"), _takes(model.module), module=model.module)


def _artifact(path: Path) -> Subject:
    import numpy as np

    from loopify import runtime
    from loopify.generate.compiled import TVMDecoder

    art = runtime.load(path)
    if not isinstance(art, runtime.GenerationArtifact):
        raise EvalError(f"{path}: eval takes generation artifacts (compile with --max-context N); a forward "
                        "artifact has fixed input shapes")

    def run(inputs: dict, loops):
        ids = inputs["input_ids"].numpy()
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(ids.shape[1], dtype="int64")[None]}
        return TVMDecoder(art, art.gen["kv_policy"], loops).prefill(batch, last=False)

    assets = path / "assets"
    return Subject(path, "artifact", "causal", run, assets if assets.is_dir() else None,
                   _json(assets / "config.json"), {"input_ids", "attention_mask"}, list(art.loops),
                   dict(art.manifest.get("source") or {}), max_len=int(art.gen["max_context"]))


def reference_path(subject: Subject) -> tuple[Path | None, str]:
    """The original a converted model or artifact was made from, when it is still there (and,
    where the record has its sha256, unchanged), with a note saying why not otherwise. An
    artifact of a converted model leads to that converted model's own source."""
    from loopify.converted import is_converted, read_manifest
    from loopify.io import sha256_path

    src = subject.source
    if not src or not src.get("path"):
        return None, "" if subject.kind == "original" else f"{subject.path}: records no source model"
    p = Path(src["path"])
    if src.get("kind") == "converted":
        if not is_converted(p):
            return None, f"the converted model {p} this artifact was compiled from is gone"
        src = read_manifest(p).get("source") or {}
        p = Path(src.get("path", ""))
    if not p.exists():
        return None, f"the original model {p} is gone"
    if src.get("sha256") and sha256_path(p) != src["sha256"]:
        return None, f"the original model {p} changed since the conversion (sha256 differs)"
    return p, ""
