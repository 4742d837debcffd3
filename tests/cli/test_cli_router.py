"""convert --router / --capacity through the CLI, and the one-line refusals around routers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from loopify.cli import cli
from tests.cli.test_hostile import _error


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from loopify.examples import zoo

    return zoo.write_hf("llama", tmp_path_factory.mktemp("zoo"))


def test_convert_with_a_router_records_it(llama, tmp_path):
    out = tmp_path / "r.pt2"
    r = CliRunner().invoke(cli, ["convert", str(llama), "-o", str(out), "--rank", "full", "--router", "expert",
                                 "--capacity", "1,0.5"])
    assert r.exit_code == 0, r.output
    assert "router expert on model.model.layers.0: 2 steps, capacity 1:0.5" in r.output
    assert "OK (lossless plan within 1e-5 relative)" in r.output  # the neutral router keeps it lossless
    m = json.loads(out.with_suffix(".json").read_text())
    assert m["pipeline"].endswith("route{kind=expert,capacity=1.0:0.5}")
    assert m["config"]["capacity"] == [1.0, 0.5] and m["loops"][0]["router"] == "expert"
    # a routed model compiles for generation (tests/generate/test_routed_artifact.py); a forward
    # artifact (staged fixed-shape bodies that run every token) is refused in one line, before any work
    _error(CliRunner().invoke(cli, ["compile", str(out), "-o", str(tmp_path / "x86")]),
           "compile it for generation (--max-context N)")
    assert not (tmp_path / "x86").exists()
    _error(CliRunner().invoke(cli, ["compile", str(out), "-o", str(tmp_path / "g"), "--max-context", "32",
                                    "--route-bucket", "1.5"]), "--route-bucket must be in [0, 1)")
    assert not (tmp_path / "g").exists()


def test_router_option_refusals(llama, tmp_path):
    _error(CliRunner().invoke(cli, ["convert", str(llama), "-o", str(tmp_path / "a.pt2"), "--router", "expert",
                                    "--capacity", "1,half"]), "give fractions separated by commas")
    _error(CliRunner().invoke(cli, ["convert", str(llama), "-o", str(tmp_path / "a.pt2"), "--capacity", "1,0.5"]),
           "--capacity applies to --router expert")
    _error(CliRunner().invoke(cli, ["convert", str(llama), "-o", str(tmp_path / "a.pt2"), "--router", "expert",
                                    "--capacity", "1,0.5,0.25"]), "one value per recursion step")
    assert not (tmp_path / "a.pt2").exists()
