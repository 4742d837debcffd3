"""Pass infrastructure: passes, pipeline specs, and the runner.

A pass is a frozen dataclass whose fields are its options and whose ``name`` is kebab-case; its
``run`` takes a :class:`State` and returns a :class:`PassResult` (new state, whether anything
changed, a JSON-able report). Passes never print and never change the state they are given.

A pipeline is data with a string form::

    find-spans,fold-loops{blocks=3,init=average},relax{rank=16}

that parses and prints back identically. Unknown passes or options are errors that list what is
valid.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from loopify.errors import PipelineError

log = logging.getLogger(__name__)

#: node.meta keys written by passes on every node they create.
META_PASS = "loopify_pass"
META_FROM = "loopify_from"


@dataclass
class State:
    """What flows through a pipeline.

    Attributes:
        captured: the captured original (program and example inputs); never modified.
        module: the current module (the unflattened hierarchy at the start).
        analyses: results of analysis passes by name (``"spans"`` from find-spans, ...).
        history: names of the passes that have run.
    """

    captured: Any
    module: torch.nn.Module
    analyses: dict[str, Any] = field(default_factory=dict)
    history: tuple[str, ...] = ()

    def replace(self, **changes) -> "State":
        return dataclasses.replace(self, **changes)


@dataclass
class PassResult:
    state: State
    modified: bool
    report: dict


@dataclass(frozen=True)
class Pass:
    """Base class of all passes. Subclasses are frozen dataclasses with a kebab-case ``name``.

    ``requires`` names what must hold before the pass runs: analyses by name (``"spans"``, made
    by find-spans) or ``"loops"`` (the module holds at least one loop, made by fold-loops).
    A pass never runs another pass to satisfy them: the runner refuses it, saying which pass
    provides what is missing.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, state: State) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: What provides each precondition, for the refusal message.
PROVIDERS = {"spans": "find-spans", "loops": "fold-loops"}


def require(p: Pass, state: State) -> bool:
    """Check ``p``'s preconditions: raise ValueError naming the pass to run first when one does not
    hold; return False when that pass did run but made nothing (fold-loops found no span: there is
    nothing for ``p`` to do, which the caller reports as a no-op), else True."""
    from loopify.nn.recursion import recursions

    for need in p.requires:
        ok = bool(recursions(state.module)) if need == "loops" else need in state.analyses
        if ok:
            continue
        if PROVIDERS.get(need) in state.history:
            return False
        what = "a loop" if need == "loops" else f"the '{need}' analysis"
        raise ValueError(f"{p.name} needs {what}: run {PROVIDERS.get(need, need)} before it")
    return True


def mark_node(node: torch.fx.Node, pass_name: str, origin: Any = None) -> torch.fx.Node:
    """Record on a node which pass created it and what it came from."""
    node.meta[META_PASS] = pass_name
    if origin is not None:
        node.meta[META_FROM] = origin
    return node


# ----------------------------------------------------------------------------------------------
# Registry


def registry() -> dict[str, type[Pass]]:
    """All passes by name (imported lazily from ``loopify.passes``)."""
    from loopify.passes import REGISTRY, load_pass

    return {name: load_pass(name) for name in REGISTRY}


def pass_class(name: str) -> type[Pass]:
    from loopify.passes import REGISTRY, load_pass

    if name not in REGISTRY:
        raise PipelineError(f"unknown pass '{name}'; valid passes: {', '.join(sorted(REGISTRY))}")
    return load_pass(name)


# ----------------------------------------------------------------------------------------------
# Spec parsing and printing

_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(\{([^{}]*)\})?\s*(,|$)")


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return ":".join(_format_value(x) for x in v)
    return str(v)


def _coerce(pass_name: str, f: dataclasses.Field, hint: Any, raw: str) -> Any:
    """Convert an option's text to the field's declared type."""

    def one(tp: Any, text: str) -> Any:
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            for choice in typing.get_args(tp):
                if str(choice) == text:
                    return choice
            raise ValueError(f"one of {', '.join(map(str, typing.get_args(tp)))}")
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", object)):
            errors = []
            for alt in typing.get_args(tp):
                if alt is type(None):
                    if text in ("none", "None"):
                        return None
                    continue
                try:
                    return one(alt, text)
                except ValueError as e:
                    errors.append(str(e))
            raise ValueError(" or ".join(errors))
        if origin in (tuple, list):
            (inner, *_rest) = typing.get_args(tp) or (str,)
            return tuple(one(inner, t) for t in text.split(":") if t != "")
        if tp is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError("true or false")
        if tp is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError("an integer") from None
        if tp is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError("a number") from None
        if tp is str:
            return text
        raise ValueError(f"a {tp}")

    try:
        return one(hint, raw)
    except ValueError as e:
        raise PipelineError(f"{pass_name}: option {f.name}={raw!r} is invalid; expected {e}") from None


@dataclass(frozen=True)
class PipelineItem:
    instance: Pass
    given: tuple[str, ...]  # option names as written in the spec, in that order

    def __str__(self) -> str:
        if not self.given:
            return self.instance.name
        opts = ",".join(f"{k}={_format_value(getattr(self.instance, k))}" for k in self.given)
        return f"{self.instance.name}{{{opts}}}"


@dataclass(frozen=True)
class Pipeline:
    items: tuple[PipelineItem, ...]

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def __iter__(self):
        return iter(i.instance for i in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> list[str]:
        return [i.instance.name for i in self.items]

    @classmethod
    def of(cls, *passes: Pass) -> "Pipeline":
        """A pipeline of pass instances, printing every option that differs from its default."""
        items = []
        for p in passes:
            given = tuple(f.name for f in dataclasses.fields(p) if getattr(p, f.name) != _default(f))
            items.append(PipelineItem(p, given))
        return cls(tuple(items))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def build_pass(name: str, options: dict[str, str]) -> Pass:
    """Instantiate pass ``name`` from text options, validating names and values."""
    cls = pass_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in options if k not in fields]
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise PipelineError(f"{name}: unknown option '{unknown[0]}'; valid options: {valid}")
    values = {k: _coerce(name, fields[k], hints[k], v) for k, v in options.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{name}: {e}") from None


def parse(spec: str) -> Pipeline:
    """Parse a pipeline spec string.

    Raises:
        PipelineError: on bad syntax, unknown passes, unknown options or invalid values.
    """
    spec = spec.strip()
    if not spec:
        raise PipelineError("empty pipeline spec")
    items, pos = [], 0
    while pos < len(spec):
        m = _ITEM.match(spec, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"bad pipeline spec at position {pos}: {spec[pos:pos + 30]!r} "
                                "(expected pass{opt=value,...} separated by commas)")
        name, body = m.group(1), m.group(3)
        options: dict[str, str] = {}
        if body is not None and body.strip():
            for part in body.split(","):
                if "=" not in part:
                    raise PipelineError(f"{name}: option {part.strip()!r} needs the form key=value")
                k, v = (s.strip() for s in part.split("=", 1))
                if k in options:
                    raise PipelineError(f"{name}: option '{k}' given twice")
                options[k] = v
        items.append(PipelineItem(build_pass(name, options), tuple(options)))
        pos = m.end()
        if m.group(4) == "," and pos >= len(spec):
            raise PipelineError("pipeline spec ends with a comma")
    return Pipeline(tuple(items))


# ----------------------------------------------------------------------------------------------
# Runner


@dataclass
class PassRecord:
    name: str
    spec: str
    modified: bool
    seconds: float
    report: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    state: State
    records: list[PassRecord]

    def report(self) -> dict:
        return {"passes": [r.to_dict() for r in self.records]}


def module_ir(module: torch.nn.Module) -> str:
    """Readable IR of a module: the graph of every GraphModule in its hierarchy."""
    parts = []
    for name, sub in module.named_modules():
        graph = getattr(sub, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            parts.append(f"# --- {name or '<root>'} ({type(sub).__name__})\n{graph}")
    if not parts:
        parts.append(repr(module))
    return "\n".join(parts) + "\n"


def lint_module(module: torch.nn.Module) -> None:
    """``graph.lint()`` on every FX graph in the hierarchy."""
    for _name, sub in module.named_modules():
        graph = getattr(sub, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            graph.lint()


def run_pipeline(pipeline: Pipeline, state: State, *, skip: tuple[str, ...] = (),
                 print_after: tuple[str, ...] = (), dump_ir: str | Path | None = None,
                 emit: Callable[[str], None] | None = None,
                 progress: Callable[[str], None] | None = None) -> RunResult:
    """Run passes in order.

    Args:
        pipeline: the passes.
        state: the input state (not modified).
        skip: pass names to skip.
        print_after: pass names (or ``all``) after which the IR is handed to ``emit``.
        dump_ir: directory for numbered IR dumps (``001_find-spans.txt`` ...), the input first as
            ``000_input.txt``.
        emit: where printed IR goes (the CLI passes ``click.echo``); passes themselves never print.
        progress: called with each pass's spec before it runs (the CLI shows a progress bar).

    Raises:
        PipelineError: naming the failing pass and the passes that ran before it.
    """
    unknown_skip = [s for s in skip if s not in pipeline.names()]
    if unknown_skip:
        raise PipelineError(f"--skip {unknown_skip[0]}: not in the pipeline ({pipeline})")
    dump_dir = Path(dump_ir) if dump_ir is not None else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "000_input.txt").write_text(module_ir(state.module))
    records: list[PassRecord] = []
    for index, item in enumerate(pipeline.items, start=1):
        p = item.instance
        if p.name in skip:
            log.info("skipping %s", p.name)
            continue
        before = [r.name for r in records]
        if progress is not None:
            progress(str(item))
        t0 = time.perf_counter()
        try:
            result = p.run(state)
            lint_module(result.state.module)
        except Exception as e:
            ran = ", ".join(before) if before else "none"
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipelineError(f"pass '{item}' failed (passes run before it: {ran}): {detail}") from e
        seconds = time.perf_counter() - t0
        state = result.state.replace(history=state.history + (p.name,))
        records.append(PassRecord(p.name, str(item), result.modified, seconds, result.report))
        log.info("%s: modified=%s in %.2fs", p.name, result.modified, seconds)
        if emit is not None and (p.name in print_after or "all" in print_after):
            emit(f"// IR after {item}\n{module_ir(state.module)}")
        if dump_dir is not None:
            (dump_dir / f"{index:03d}_{p.name}.txt").write_text(
                f"// after {item} (modified={result.modified})\n{module_ir(state.module)}")
    return RunResult(state, records)
