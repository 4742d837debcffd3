"""pytest-benchmark suite (``make bench``; not part of ``make test``): capture, each pass, convert
end to end, compile, and one forward per backend, on the benchmark Llama, MiniLM and LLaVA.

Compare figures within one run only: this machine's timings swing with other load. Ratios of
converted against original are what ``loopify bench`` reports; these benchmarks track the cost of
each step of the tool itself."""

from __future__ import annotations

import pytest
import torch

from loopify import capture
from loopify.convert import ConvertConfig, convert_captured
from loopify.examples import zoo
from loopify.pipeline import State, parse, run_pipeline

pytestmark = pytest.mark.bench
MODELS = ["bench-llama", "minilm", "llava-clip"]


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchzoo")
    return {n: zoo.write_hf(n, out) for n in MODELS}


@pytest.fixture(scope="session")
def caps(hf_dirs):
    return {n: capture.load(d, seq_len=zoo.ZOO[n].seq_len) for n, d in hf_dirs.items()}


def _once(benchmark, fn):
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("name", MODELS)
def test_capture(benchmark, hf_dirs, name):
    cap = _once(benchmark, lambda: capture.load(hf_dirs[name], seq_len=zoo.ZOO[name].seq_len))
    assert cap.export_check.ok


@pytest.mark.parametrize("spec", ["find-spans", "fold-loops", "fold-loops,relax{rank=16}",
                                  "fold-loops,insert-connectors"])
@pytest.mark.parametrize("name", MODELS)
def test_pass(benchmark, caps, name, spec):
    cap = caps[name]
    res = _once(benchmark, lambda: run_pipeline(parse(spec), State(cap, cap.unflatten())))
    assert res.records


@pytest.mark.parametrize("name", MODELS)
def test_convert(benchmark, caps, name):
    res = _once(benchmark, lambda: convert_captured(caps[name], ConvertConfig(rank=16)))
    assert res.manifest["params"]["converted"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_compile_x86(benchmark, caps, name, tmp_path):
    from loopify.backends.tvm import compile_program

    res = _once(benchmark, lambda: compile_program(caps[name].program, "x86", tmp_path / "art"))
    assert (tmp_path / "art" / "lib.so").exists() and res.manifest


@pytest.mark.parametrize("backend", ["eager", "compile", "tvm"])
@pytest.mark.parametrize("name", MODELS)
def test_forward(benchmark, caps, name, backend, tmp_path_factory):
    cap = caps[name]
    torch.set_num_threads(1)
    if backend == "tvm":
        from loopify import runtime
        from loopify.backends.tvm import compile_program

        d = tmp_path_factory.mktemp(f"fwd-{name}") / "art"
        compile_program(cap.program, "x86", d)
        art = runtime.load(d, num_threads=1)
        flat = cap.flat_inputs()
        fn = lambda: art(*flat)  # noqa: E731
    else:
        gm = cap.program.module()
        if backend == "compile":
            gm = torch.compile(gm, dynamic=False)

        def fn():
            with torch.no_grad():
                return gm(*cap.args, **cap.kwargs)
    fn()  # warm-up (compilation) outside the measurement
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
