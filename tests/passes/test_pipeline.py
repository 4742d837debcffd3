"""Pipeline specs parse and print back identically; bad specs are refused with what is valid;
the runner dumps IR, names failing passes, and never mutates its input."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from loopify import pipeline as pl
from loopify.errors import PipelineError


@pytest.mark.parametrize("spec", [
    "find-spans",
    "find-spans{min_length=3}",
    "find-spans{similarity=false,min_length=2}",
    "find-spans{stacks=model.layers:model.vision.layers}",
])
def test_spec_round_trips(spec):
    p = pl.parse(spec)
    assert str(p) == spec
    assert str(pl.parse(str(p))) == spec


def test_spec_values_are_typed():
    p = pl.parse("find-spans{min_length=3,similarity=false,stacks=a.b:c}")
    (fs,) = list(p)
    assert fs.min_length == 3 and fs.similarity is False and fs.stacks == ("a.b", "c")


@pytest.mark.parametrize("spec,message", [
    ("no-such-pass", "unknown pass 'no-such-pass'; valid passes: find-spans"),  # lists the valid ones
    ("find-spans{colour=red}", "unknown option 'colour'; valid options: min_length"),  # lists options
    ("find-spans{min_length=two}", "expected an integer"),  # typed values
    ("find-spans{min_length=1}", "min_length must be >= 2"),  # the pass validates itself
    ("find-spans{similarity=maybe}", "expected true or false"),
    ("find-spans{min_length}", "needs the form key=value"),
    ("find-spans{min_length=2,min_length=3}", "given twice"),
    ("find-spans,", "ends with a comma"),
    ("find-spans;x", "bad pipeline spec"),
    ("", "empty pipeline spec"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pl.parse(spec)


@dataclasses.dataclass(frozen=True)
class _Boom(pl.Pass):
    name: ClassVar[str] = "boom"

    def run(self, state):
        raise RuntimeError("kaput")


@dataclasses.dataclass(frozen=True)
class _Noop(pl.Pass):
    name: ClassVar[str] = "noop"

    def run(self, state):
        return pl.PassResult(state, False, {"seen": True})


def test_runner_names_failing_pass_and_those_before(tiny_capture):
    state = pl.State(tiny_capture, tiny_capture.unflatten())
    with pytest.raises(PipelineError, match=r"pass 'boom' failed \(passes run before it: noop\): kaput"):
        pl.run_pipeline(pl.Pipeline.of(_Noop(), _Boom()), state)


def test_runner_dumps_numbered_ir_and_skips(tiny_capture, tmp_path):
    state = pl.State(tiny_capture, tiny_capture.unflatten())
    printed = []
    res = pl.run_pipeline(pl.Pipeline.of(_Noop(), _Boom()), state, skip=("boom",), dump_ir=tmp_path,
                          print_after=("noop",), emit=printed.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_input.txt", "001_noop.txt"]
    assert "graph()" in (tmp_path / "001_noop.txt").read_text()
    assert len(printed) == 1 and printed[0].startswith("// IR after noop")
    assert [r.name for r in res.records] == ["noop"] and res.state.history == ("noop",)
    assert state.history == ()  # the input state is untouched
    with pytest.raises(PipelineError, match="--skip nope: not in the pipeline"):
        pl.run_pipeline(pl.Pipeline.of(_Noop()), state, skip=("nope",))
