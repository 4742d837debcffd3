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


@pytest.fixture
def rpc_tracker():
    """A TVM RPC tracker with one CPU server registered under a key, on this machine: the same
    protocol an arm64 board or a GPU host speaks (``python -m tvm.exec.rpc_server --tracker``)."""
    import time

    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=19190, port_end=19290, silent=True)
    server = rpc.Server(host="127.0.0.1", port=19300, port_end=19400, key="loopify-test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until the server has registered its key
            summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            if "loopify-test" in summary.get("queue_info", {}):
                break
            time.sleep(0.5)
        yield f"127.0.0.1:{tracker.port}:loopify-test"
    finally:
        server.terminate()
        tracker.terminate()


def test_tuning_through_an_rpc_tracker(tmp_path, rpc_tracker):
    # --rpc: candidates and both schedules of each function are timed on the device the tracker
    # hands out (here a local server); a timing that failed would be recorded as None.
    import loopify.runtime as rt

    torch.manual_seed(0)
    m, x = MLP().eval(), torch.randn(16, 64)
    res = tune_remotely(torch.export.export(m, (x,), strict=False), "x86", tmp_path, rpc_tracker)
    assert rt.validate(res.path, lambda *i: m(*i), (x,))[0].ok


def tune_remotely(ep, target: str, tmp_path, rpc: str):
    """Compile with --rpc tuning and check that every function's both schedules were timed on the
    remote device (a timing that failed there is recorded as None), several uploads in one session."""
    from loopify.backends.tvm import compile_program

    res = compile_program(ep, target, tmp_path / "a", tune=True, trials=4, tuning_db=str(tmp_path / "db"), rpc=rpc)
    tuning = json.loads((res.path / "manifest.json").read_text())["tuning"]
    assert tuning["rpc"] == rpc and tuning["functions"]
    for f in tuning["functions"]:
        assert f["default_ms"] is not None and f["default_ms"] > 0, f
        assert f["tuned_ms"] is not None and f["tuned_ms"] > 0, f
    return res


def test_unreachable_tracker_is_one_line(tmp_path):
    from loopify.backends.tvm import compile_program

    ep = torch.export.export(MLP().eval(), (torch.randn(16, 64),), strict=False)
    with pytest.raises(CompileError, match="cannot reach the RPC tracker at 127.0.0.1:1") as err:
        compile_program(ep, "x86", tmp_path / "a", tune=True, trials=4, rpc="127.0.0.1:1:nokey")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a").exists()


def test_tracker_without_the_key_is_one_line(tmp_path, rpc_tracker):
    from loopify.backends.tvm import compile_program

    host, port, _ = rpc_tracker.split(":")
    ep = torch.export.export(MLP().eval(), (torch.randn(16, 64),), strict=False)
    with pytest.raises(CompileError, match="no device registered as 'rk3588' \\(keys: loopify-test\\)"):
        compile_program(ep, "x86", tmp_path / "a", tune=True, trials=4, rpc=f"{host}:{port}:rk3588")
