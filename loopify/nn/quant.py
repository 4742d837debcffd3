"""Quantised weights, loop-aware: int8 per output channel, int4 in groups of 32.

A weight ``W [N, K]`` (``nn.Linear``: N outputs, K inputs) is stored as

* ``int8``: ``q [N, K]`` int8 in [-127, 127] and ``scale [N]``, ``W ~ q * scale[:, None]``
  (symmetric, one scale per output channel: llama.cpp Q8_0's and torchao's int8 weight-only
  scheme per row);
* ``int4``: ``q [N, K / 2]`` uint8, two 4-bit codes per byte, and ``scale [N, K / 32]``:
  ``W ~ (code - 8) * scale`` per group of 32 inputs (MLC-LLM q4f16_1's groups, symmetric).
  In each group of 32, byte j holds element j in its low nibble and element j + 16 in its high
  nibble (llama.cpp's Q4_0 order), so a vector of 16 consecutive inputs reads 16 consecutive
  bytes with one shift, instead of a gather.

* ``int4asym``: the same codes and packing, and ``scale [N, K / 32, 2]`` holding a scale and a
  minimum per group: ``W ~ code * scale + min`` (llama.cpp Q4_1's scheme: a group whose values
  are not centred on zero uses all 16 codes; 6 bits per weight with float32 scales). A weight
  that is already Q4_1 (the dequantised SmolLM2 GGUF) is reproduced to float rounding.

Scales are float32 (float16 on CUDA, ``scale_dtype``). *Loop-aware*: a shared block's weight is
one parameter for every depth, so it is quantised once; per-depth LoRA factors are not
``nn.Linear`` weights and stay float; embeddings (and a head tied to them) only with
``embeddings=True``.

:func:`quantize_module_` replaces each selected weight *in place* by its dequantisation
(``fake quantisation``), so the module is afterwards exactly the model the quantised artifact
computes (the reference it is validated against), and returns the codes and scales to store,
keyed by the tensor's content (:func:`content_key`), which the compiler looks up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

SCHEMES = ("int8", "int4", "int4asym")
GROUP = 32  # int4 group size along the input dimension
INT4 = ("int4", "int4asym")
SCALE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantise weights (recorded in the manifest as :meth:`to_dict`).

    Attributes:
        weights: ``int8`` or ``int4``.
        embeddings: also the token embeddings and a head tied to them (default: they stay float).
        scale_dtype: ``float32``, or ``float16`` (CUDA).
        embedding_weights: the embeddings' own scheme (a *mixed* scheme, e.g. int4asym matrices
            and an int8 table); implies ``embeddings``. Default: the same as ``weights``.
        lora: ``int8``: the per-depth LoRA too (:func:`quantize_lora_`); None: it stays float.
    """

    weights: str
    embeddings: bool = False
    scale_dtype: str = "float32"
    embedding_weights: str | None = None
    lora: str | None = None

    def __post_init__(self):
        if self.weights not in SCHEMES:
            raise ValueError(f"--weights must be one of float32, {', '.join(SCHEMES)}, got {self.weights!r}")
        if self.embedding_weights is not None:
            if self.embedding_weights not in SCHEMES:
                raise ValueError(f"--embedding-weights must be one of {', '.join(SCHEMES)}, got {self.embedding_weights!r}")
            object.__setattr__(self, "embeddings", True)
        if self.lora not in (None, "int8"):
            raise ValueError(f"--lora-weights must be float32 or int8, got {self.lora!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"quantisation scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def group(self) -> int | None:
        return GROUP if self.weights in INT4 else None

    @property
    def embedding_scheme(self) -> str | None:
        """The scheme of the embeddings (and a head tied to them); None when they stay float."""
        return (self.embedding_weights or self.weights) if self.embeddings else None

    def scheme_of(self, role: str) -> str:
        """The scheme of a weight of ``role`` (``linear`` or ``embedding``)."""
        return self.embedding_scheme if role == "embedding" and self.embeddings else self.weights

    def to_dict(self) -> dict:
        used = {self.weights} | ({self.embedding_scheme} if self.embeddings else set())
        return {"weights": self.weights, "group_size": self.group, "scale_dtype": self.scale_dtype,
                "symmetric": self.weights != "int4asym", "embeddings": self.embeddings,
                "embedding_weights": self.embedding_scheme, "lora_weights": self.lora or "float32",
                "int4_packing": "low nibble = element j, high nibble = element j+16 of each group of 32"
                if used & set(INT4) else None,
                **({"int4_value": "code * scale + min (scale [N, K/32, 2] = (scale, min))"}
                   if "int4asym" in used else {})}


@dataclass
class Quantized:
    """One quantised weight: codes, scales and what they came from."""

    scheme: str
    q: torch.Tensor       # int8 [N, K] or uint8 [N, K/2]
    scale: torch.Tensor   # [N] or [N, K/32]
    shape: tuple
    names: list = field(default_factory=list)  # every module name of this tensor (ties)
    role: str = "linear"  # "linear", "embedding" or "lora-merged" (a depth's merged W + s B @ A)
    dtype: str = "float32"  # of the dequantised weight (the model's)


def content_key(t: torch.Tensor) -> tuple:
    """(dtype, shape, sha256 of the bytes): how a quantised weight is found again after export."""
    c = t.detach().contiguous()
    return (str(c.dtype), tuple(c.shape), hashlib.sha256(c.view(torch.uint8).numpy().tobytes()).hexdigest())


def quantizable(shape, scheme: str) -> str | None:
    """Why a weight of ``shape`` cannot take ``scheme`` (None when it can)."""
    if len(shape) != 2:
        return "not a matrix"
    if scheme in INT4 and shape[1] % GROUP:
        return f"input dim {shape[1]} is not a multiple of {GROUP}"
    return None


def quantize(w: torch.Tensor, scheme: str, scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of a ``[N, K]`` float weight (see the module docstring for the layout)."""
    w = w.detach().float()
    n, k = w.shape
    sdt = getattr(torch, scale_dtype)
    if scheme == "int8":
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(sdt)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale
    if scheme not in INT4:
        raise ValueError(f"unknown scheme {scheme!r}")
    if k % GROUP:
        raise ValueError(f"int4 needs the input dim to be a multiple of {GROUP}, got {k}")
    g = w.reshape(n, k // GROUP, GROUP)
    if scheme == "int4":
        amax = g.abs().amax(dim=2)
        # 7, not 8: the codes -8..7 are symmetric only up to 7, and the extreme must round to it
        scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax)).to(sdt)
        codes = (torch.round(g / scale.float()[..., None]).clamp(-8, 7) + 8).to(torch.uint8)  # [N, G, 32]
        return _pack(codes, n, k), scale
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    sm = torch.stack([scale, lo], dim=2).to(sdt)                       # [N, G, 2]: (scale, min)
    s_, m_ = sm[..., 0].float(), sm[..., 1].float()                    # round with the stored values
    codes = torch.round((g - m_[..., None]) / s_[..., None]).clamp(0, 15).to(torch.uint8)
    return _pack(codes, n, k), sm  # int4asym


def stored_bytes(shape, scheme: str, scale_dtype: str = "float32") -> int:
    """Bytes of the codes and scales of a ``[N, K]`` weight stored as ``scheme``."""
    n, k = shape
    sb = 2 if scale_dtype == "float16" else 4
    if scheme == "int8":
        return n * k + n * sb
    return n * k // 2 + n * (k // GROUP) * sb * (2 if scheme == "int4asym" else 1)


def _pack(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """4-bit codes ``[N, G, 32]`` -> bytes ``[N, K/2]``: element j of a group in the low nibble of
    byte j, element j+16 in its high nibble."""
    lo, hi = codes[..., :GROUP // 2], codes[..., GROUP // 2:]
    return (lo | (hi << 4)).reshape(n, k // 2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str, dtype=torch.float32) -> torch.Tensor:
    """The float weight ``q`` and ``scale`` stand for (what the compiled kernel computes)."""
    s = scale.float()
    if scheme == "int8":
        return (q.float() * s[:, None]).to(dtype)
    n = q.shape[0]
    b = q.reshape(n, -1, GROUP // 2)
    codes = torch.cat([b & 15, b >> 4], dim=2).float()  # [N, G, 32]
    if scheme == "int4asym":
        return (codes * s[..., 0:1] + s[..., 1:2]).reshape(n, -1).to(dtype)
    return ((codes - 8.0) * s[..., None]).reshape(n, -1).to(dtype)


def _fake_quantize_(t: torch.Tensor, scheme: str, scale_dtype: str, names: list, role: str) -> Quantized:
    """Quantise ``t`` in place to its dequantisation (what the artifact computes) and return
    its codes and scales, to be registered under the new values' :func:`content_key`."""
    q, s = quantize(t, scheme, scale_dtype)
    t.copy_(dequantize(q, s, scheme, t.dtype))
    return Quantized(scheme, q, s, tuple(t.shape), names, role, str(t.dtype).replace("torch.", ""))


def needs_weights(quantize_embeddings: bool, embedding_weights: str | None, lora_weights: str | None) -> str | None:
    """The option given without ``--weights`` that needs it (None when none is): the message of
    ``compile`` and ``eval`` alike."""
    if lora_weights not in (None, "float32"):
        return "--lora-weights"
    if embedding_weights:
        return "--embedding-weights"
    return "--quantize-embeddings" if quantize_embeddings else None


def _selected(module: nn.Module, config: QuantConfig) -> dict[int, tuple[nn.Parameter, list[str], str]]:
    """The weights to quantise, each once (by identity): id -> (parameter, names, role)."""
    out: dict[int, tuple] = {}
    emb_ids = set()
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) and m.weight.dim() == 2:
            emb_ids.add(id(m.weight))
    for name, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if pname != "weight" or p.dim() != 2 or not p.dtype.is_floating_point:
                continue
            is_linear = isinstance(m, nn.Linear)
            is_emb = id(p) in emb_ids
            if is_emb and not config.embeddings:
                continue  # a head tied to the embedding stays float with it
            if not (is_linear or is_emb):
                continue
            role = "embedding" if is_emb else "linear"
            ent = out.setdefault(id(p), (p, [], role))
            ent[1].append(full)
    return out


def quantize_module_(module: nn.Module, config: QuantConfig) -> tuple[dict, dict]:
    """Fake-quantise ``module``'s ``nn.Linear`` weights (and embeddings by option) in place.

    Returns ``(registry, skipped)``: ``{content_key of the new float weight: Quantized}`` and
    ``{name: reason}`` for weights left in float. A parameter shared by several modules or
    depths (a loop's block, a tied head) is quantised once.
    """
    registry, skipped = {}, {}
    with torch.no_grad():
        for p, names, role in _selected(module, config).values():
            scheme = config.scheme_of(role)
            why = quantizable(tuple(p.shape), scheme)
            if why:
                for n in names:
                    skipped[n] = why
                continue
            registry[content_key(p)] = _fake_quantize_(p, scheme, config.scale_dtype, names, role)
    return registry, skipped


def quantize_program_(program, config: QuantConfig) -> tuple[dict, dict]:
    """:func:`quantize_module_` for a ``torch.export`` program (graph form: no module types):
    the parameters every use of which is ``aten.linear``'s weight (or ``aten.embedding``'s table,
    by option)."""
    sig = program.graph_signature
    placeholder = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    registry, skipped = {}, {}
    linear, embedding = torch.ops.aten.linear.default, torch.ops.aten.embedding.default
    done = {}
    with torch.no_grad():
        for node_name, pname in sig.inputs_to_parameters.items():
            t = program.state_dict.get(pname)
            node = placeholder.get(node_name)
            if t is None or node is None or t.dim() != 2 or not t.dtype.is_floating_point:
                continue
            uses = [(u.target, [i for i, a in enumerate(u.args) if a is node]) for u in node.users]
            lin = all(tg is linear and pos == [1] for tg, pos in uses)
            emb = all(tg is embedding and pos == [0] for tg, pos in uses)
            mixed = all((tg is linear and pos == [1]) or (tg is embedding and pos == [0]) for tg, pos in uses)
            if not uses or not (lin or (config.embeddings and (emb or mixed))):
                continue
            key = id(t)
            if key in done:
                done[key].names.append(pname)
                continue
            role = "linear" if lin else "embedding"
            scheme = config.scheme_of(role)
            why = quantizable(tuple(t.shape), scheme)
            if why:
                skipped[pname] = why
                continue
            ent = _fake_quantize_(t, scheme, config.scale_dtype, [pname], role)
            registry[content_key(t)] = ent
            done[key] = ent
    return registry, skipped


@dataclass
class QuantPlan:
    """What the compiler needs: the config, the codes and scales by content key, and the weights
    left in float with the reason (see :func:`quantize_module_`)."""

    config: QuantConfig
    registry: dict
    skipped: dict
    factors: dict = field(default_factory=dict)  # int8 LoRA factors (:func:`quantize_lora_`), by name

    def manifest(self, report: dict, param_bytes: int) -> dict:
        """The manifest's ``quantization``: the scheme, per tensor (codes, scales, scheme,
        granularity, shape, bytes) and the weights kept in float with the reason."""
        tensors = {**report.get("tensors", {}), **self.factors}
        return {**self.config.to_dict(), "tensors": tensors,
                "float": {**self.skipped, **report.get("float", {})},
                "bytes": {"params": param_bytes,
                          "quantized": sum(t["bytes"] for t in tensors.values()),
                          "quantized_float32": sum(t["float32_bytes"] for t in tensors.values())}}


def plan_module(module: nn.Module, config: QuantConfig) -> QuantPlan:
    registry, skipped = quantize_module_(module, config)
    factors = quantize_lora_(module, config, registry) if config.lora else {}
    return QuantPlan(config, registry, skipped, factors)


def quantize_lora_(module: nn.Module, config: QuantConfig, registry: dict) -> dict:
    """int8 per-depth LoRA (``--lora-weights int8``), per output row, after the LoRA form of each
    matrix is fixed (:func:`loopify.nn.deploy_lora`):

    * a *merged* matrix (every depth's ``W + s * B @ A``, a parameter of the loop) is a weight
      like any other: fake-quantised in place and added to ``registry`` (role ``lora-merged``), so
      the compiler stores its codes and fuses the dequantisation into its matmul;
    * a *factored* matrix's stacked factors ``A [L, r, in]`` and ``B [L, out, r]`` become int8
      codes with a scale per depth and row, which the loop dequantises where it takes a depth's
      slice (:meth:`loopify.nn.Recursion.factor`): the artifact stores the codes, and its graph
      computes ``codes * scale`` before the rank-r products.

    Returns the manifest entries of the factors (the merged matrices' come from the compiler).
    Raises ValueError when the model has no per-depth LoRA."""
    from loopify.nn.recursion import recursions, unkey

    loops = {p: r for p, r in recursions(module).items() if r.lora_A}
    if not loops:
        raise ValueError("--lora-weights int8: the model has no per-depth LoRA (convert with --rank R)")
    factors = {}
    with torch.no_grad():
        for path, rec in loops.items():
            if not rec.lora_forms:
                raise ValueError(f"loop {path}: the LoRA form is not fixed (deploy_lora) before quantising it")
            for slot, p in rec.premerged.items():
                if content_key(p) in registry:
                    continue  # the very values of a weight quantised already: read as that one
                registry[content_key(p)] = _fake_quantize_(p, "int8", config.scale_dtype,
                                                           [f"{path}.premerged.{slot}"], "lora-merged")
            for k in rec.lora_A.keys():
                if rec.lora_forms.get(unkey(k)) != "factored":
                    continue
                for which, stacked in (("A", rec.lora_A[k]), ("B", rec.lora_B[k])):
                    rows = stacked.view(-1, stacked.shape[-1])  # every depth's rows: one scale each
                    e = _fake_quantize_(rows, "int8", config.scale_dtype, [], "lora-factor")
                    rec.set_factor_codes(k, which, e.q.reshape(stacked.shape), e.scale.reshape(stacked.shape[:-1]))
                    name = f"{path}.lora_{which}.{k}"
                    factors[name] = {"scheme": "int8", "group_size": None, "granularity": "output channel per depth",
                                     "shape": list(stacked.shape), "role": "lora-factor",
                                     "scale_dtype": config.scale_dtype, "modules": [name],
                                     "bytes": stored_bytes(rows.shape, "int8", config.scale_dtype),
                                     "float32_bytes": stacked.numel() * 4}
    return factors


def plan_program(program, config: QuantConfig) -> QuantPlan:
    registry, skipped = quantize_program_(program, config)
    return QuantPlan(config, registry, skipped)
