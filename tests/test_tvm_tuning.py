"""MetaSchedule tuning options: rpc spec parsing (fast) and a short tuning run whose database is
reused by a later compile (slow: minutes on two cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tvm")

from loopify.backends.tvm.errors import CompileError  # noqa: E402
from loopify.backends.tvm.tuning import parse_rpc  # noqa: E402


def test_parse_rpc():
    assert parse_rpc("127.0.0.1:9190:rk3588") == ("127.0.0.1", 9190, "rk3588")
    for bad in ("127.0.0.1:9190", "host:port:key", ":9190:k"):
        with pytest.raises(CompileError, match="host:port:key"):
            parse_rpc(bad)


def test_importing_the_backend_does_not_import_tvm():
    code = ("import sys, loopify, loopify.capture, loopify.backends.tvm, loopify.artifact; "
            "print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        return (self.down(torch.relu(self.up(x))),)


@pytest.mark.slow
def test_tuning_database_is_kept_and_reused(tmp_path):
    import loopify.runtime as rt
    from loopify.backends.tvm import compile_program

    torch.manual_seed(0)
    m, x = MLP().eval(), torch.randn(16, 64)
    ep = torch.export.export(m, (x,), strict=False)
    db = tmp_path / "db"
    res = compile_program(ep, "x86", tmp_path / "a", tune=True, trials=8, tuning_db=str(db))
    assert (db / "database_tuning_record.json").stat().st_size > 0
    assert (res.path / "tuning" / "database_tuning_record.json").is_file()
    tuning = json.loads((res.path / "manifest.json").read_text())["tuning"]
    assert tuning["tuned"] and tuning["functions"]
    assert all(f["chosen"] in ("tuned", "default") for f in tuning["functions"])
    # trials=0: nothing is measured anew, the records are applied where they win
    res2 = compile_program(ep, "x86", tmp_path / "b", tune=True, trials=0, tuning_db=str(db))
    assert rt.validate(res2.path, lambda *i: m(*i), (x,))[0].ok
