"""arm64 artifacts that have run: one converted zoo model compiled for arm64 on this host and run
under qemu-user by an emulated aarch64 Python with loopify's runtime (numpy and TVM only), at
every loop count, against the converted PyTorch model's outputs computed on this host.

Needs the emulated runtime that ``tools/arm/setup.sh`` (or ``make test-arm``) sets up in
``.arm/`` (or ``$ARM_DIR``); skipped with that reason when it is not there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

REPO = Path(__file__).resolve().parents[2]
ARM_DIR = Path(os.environ.get("ARM_DIR", REPO / ".arm"))
#: What the emulated side may import beyond the standard library: loopify, numpy, TVM (tvm and
#: tvm_ffi) and the pure-Python packages TVM's own imports pull in.
BOARD_PACKAGES = {"loopify", "numpy", "tvm", "tvm_ffi", "ml_dtypes", "typing_extensions", "psutil",
                  "cloudpickle", "safetensors"}


def emulated_runtime() -> Path:
    """tools/arm/python, or skip the test saying how to set it up."""
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("no qemu-aarch64: run tools/arm/setup.sh (or make test-arm) to set up the emulated runtime")
    if not (ARM_DIR / "root/usr/bin/python3.11").is_file() or not (ARM_DIR / "site/tvm").is_dir():
        pytest.skip(f"no emulated aarch64 Python in {ARM_DIR}: run tools/arm/setup.sh (or make test-arm)")
    return REPO / "tools/arm/python"


@pytest.mark.slow
def test_minilm_arm64_artifact_runs_emulated_at_every_loop_count(tmp_path):
    python = emulated_runtime()
    env = {**os.environ, "ARM_DIR": str(ARM_DIR)}
    subprocess.run([sys.executable, str(REPO / "tools/arm/prepare.py"), str(tmp_path), "--cases", "minilm"],
                   check=True, env=env, timeout=1800)
    case = tmp_path / "minilm"
    spec = json.loads((case / "case.json").read_text())
    counts = [c["loops"] for c in spec["checks"]]
    assert counts == [[1], [2]]  # MiniLM's 6 layers halved: one loop of 3 blocks, default 2
    # the loop count changes the computation (else running at every count would prove nothing)
    ref = [np.load(case / c["expected"][0]) for c in spec["checks"]]
    assert np.abs(ref[0] - ref[1]).max() > 1e-2

    report_file = tmp_path / "report.json"
    run = subprocess.run([str(python), str(REPO / "tools/arm/check.py"), str(tmp_path), "--json", str(report_file)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_file.read_text())
    assert report["machine"] == "aarch64"
    # the board needs no torch: only loopify, numpy, TVM and what TVM imports
    assert set(report["packages"]) <= BOARD_PACKAGES, report["packages"]
    rows = report["cases"]["minilm"]
    assert sorted({tuple(r["loops"]) for r in rows}) == [(1,), (2,)]
    # ARTIFACT_RTOL (1e-4 of the largest reference value): the host compile's own tolerance
    # (TVM reorders float32 reductions, ~1e-6 per layer); measured 2.7e-7..7.8e-7 here
    assert all(r["ok"] and r["rel_err"] < 1e-4 for r in rows), rows


@pytest.fixture
def emulated_rpc_server():
    """A TVM RPC tracker on this host and an RPC server running inside the emulator (the emulated
    aarch64 Python's ``tvm.exec.rpc_server``), registered under a key: the setup of a real board,
    where the server runs on the board."""
    import time

    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    python = emulated_runtime()
    tracker = Tracker(host="127.0.0.1", port=19490, port_end=19590, silent=True)
    server = subprocess.Popen([str(python), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", "19600",
                               "--port-end", "19700", "--tracker", f"127.0.0.1:{tracker.port}", "--key", "arm64-qemu"],
                              env={**os.environ, "ARM_DIR": str(ARM_DIR)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600  # the emulated `import tvm` alone takes ~40 s
        while "arm64-qemu" not in rpc.connect_tracker("127.0.0.1", tracker.port).summary().get("queue_info", {}):
            assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.poll() else "timeout"
            time.sleep(2)
        yield f"127.0.0.1:{tracker.port}:arm64-qemu"
    finally:
        server.terminate()
        server.wait(timeout=30)
        tracker.terminate()


@pytest.mark.slow
def test_arm64_tuning_through_an_rpc_server_in_the_emulator(tmp_path, emulated_rpc_server):
    # --rpc with --target arm64: candidates are cross-built here and timed on the emulated aarch64
    # server (a board in real use); a timing that failed there would be recorded as None.
    import torch

    from tests.tvm.test_tvm_tuning import MLP, tune_remotely

    torch.manual_seed(0)
    tune_remotely(torch.export.export(MLP().eval(), (torch.randn(16, 64),), strict=False), "arm64", tmp_path,
                  emulated_rpc_server)
    assert (tmp_path / "db" / "database_tuning_record.json").stat().st_size > 0
