"""capture.load: every format, safe loading, refusal of bad input with one line."""

from __future__ import annotations

import pytest
import torch

from loopify import capture
from loopify.errors import CaptureError, ExportMismatchError
from tests.models import Drifts, TinyStack, example_ids, export


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyStack().eval()


@pytest.fixture(scope="module")
def archive(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "model.pt"
    with open(path, "wb") as f:
        torch.export.save(export(model), f)
    return path


def test_export_archive_loads_with_its_example_inputs(model, archive):
    cap = capture.load(archive)
    assert cap.format == "export-archive"
    (ids,) = cap.args
    assert torch.equal(ids, example_ids())
    # The archive reproduces the eager model exactly: same float32 kernels, same order.
    torch.testing.assert_close(cap.run()[0], model(ids)[0], rtol=0, atol=1e-6)


def test_inputs_file_overrides_example_inputs(archive, tmp_path):
    new = example_ids(seed=5)
    torch.save((new,), tmp_path / "in.pt")
    cap = capture.load(archive, inputs=tmp_path / "in.pt")
    assert torch.equal(cap.args[0], new)


def test_pickled_module_is_refused_without_trust(model, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(model, path)
    with pytest.raises(CaptureError, match="runs arbitrary code"):
        capture.load(path)


def test_trusted_pickle_needs_inputs_and_is_checked_against_eager(model, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save(model, path)
    with pytest.raises(CaptureError, match="--inputs"):
        capture.load(path, trust_pickle=True)
    torch.save((example_ids(),), tmp_path / "in.pt")
    cap = capture.load(path, trust_pickle=True, inputs=tmp_path / "in.pt")
    assert cap.format == "pickle"
    assert cap.export_check is not None and cap.export_check.ok
    assert cap.export_check.max_abs_err < 1e-5


def test_export_mismatch_is_an_error_unless_allowed(tmp_path):
    path = tmp_path / "drifts.pt"
    torch.save(Drifts(), path)
    torch.save((torch.randn(2, 4),), tmp_path / "in.pt")
    with pytest.raises(ExportMismatchError, match="differs from the eager model"):
        capture.load(path, trust_pickle=True, inputs=tmp_path / "in.pt")
    cap = capture.load(path, trust_pickle=True, inputs=tmp_path / "in.pt", allow_export_mismatch=True)
    assert not cap.export_check.ok


# One case per kind of bad input; each must give one line that names the file.
def _bad_files(tmp_path, archive, model):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    (tmp_path / "trunc.pt").write_bytes(archive.read_bytes()[:2000])
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.ones(1, 2)), tmp_path / "script.pt")
    (tmp_path / "nodir").mkdir()
    return {
        "missing.pt": "no such file",
        "empty.pt": "empty",
        "junk.pt": "unrecognised file format",
        "trunc.pt": "truncated or corrupt",
        "state.pt": "state dict, not a model",
        "script.pt": "TorchScript",
        "nodir": "no config.json",
    }


def test_bad_files_are_refused_with_one_line(tmp_path, archive, model):
    for name, reason in _bad_files(tmp_path, archive, model).items():
        with pytest.raises(CaptureError) as e:
            capture.load(tmp_path / name)
        msg = str(e.value)
        assert reason in msg, (name, msg)
        assert name in msg and "\n" not in msg


def test_inputs_file_with_code_is_refused(archive, tmp_path):
    # Any object beyond tensors needs code to unpickle (here a module class).
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "evil.pt")
    with pytest.raises(CaptureError, match="refusing to unpickle"):
        capture.load(archive, inputs=tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "ints.pt")
    with pytest.raises(CaptureError, match="must hold a tensor"):
        capture.load(archive, inputs=tmp_path / "ints.pt")
