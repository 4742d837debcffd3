"""Inputs and faults of a careless or hostile user (issue 16): each is refused in one line with
exit status 2 (never a traceback, a native crash or "internal error"), before the work starts
where it can be, and nothing half-written or stale is left beside the target.

The model is the 5-block TinyStack of tests/models.py (vocabulary 50), exported once, compiled
once for x86 and converted once (graph form) per module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loopify.cli import cli

VOCAB = 50
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"dir", "pt2" (export archive), "art" (x86 artifact), "conv" (converted .pt2)}."""
    from tests.models import TinyStack, export

    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    with open(d / "tiny.pt2", "wb") as f:
        torch.export.save(export(TinyStack(vocab=VOCAB)), f)
    r = CliRunner().invoke(cli, ["compile", str(d / "tiny.pt2"), "-o", str(d / "tiny.x86"), "--no-validate"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["convert", str(d / "tiny.pt2"), "-o", str(d / "conv.pt2")])
    assert r.exit_code == 0, r.output
    return {"dir": d, "pt2": d / "tiny.pt2", "art": d / "tiny.x86", "conv": d / "conv.pt2"}


def _error(r, message: str, code: int = 2) -> str:
    """The run failed with ``code`` and exactly one error line, which contains ``message``."""
    assert r.exit_code == code, r.output
    errs = [l for l in r.output.splitlines() if l.startswith("loopify:")]
    assert len(errs) == 1 and message in errs[0], r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    return errs[0]


def _ids(tmp_path: Path, value: int) -> Path:
    p = tmp_path / f"ids{value}.pt"
    torch.save((torch.full((1, 12), value, dtype=torch.long),), p)
    return p


def _sh(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopify.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, **kw)


# -- 1. token ids outside the vocabulary ----------------------------------------------------------

def test_the_artifact_records_the_vocabulary_as_the_range_of_its_token_input(tiny):
    m = json.loads((tiny["art"] / "manifest.json").read_text())
    assert m["inputs"][0]["range"] == [0, VOCAB]


@pytest.mark.parametrize("value", [10**9, VOCAB, -1])
def test_out_of_vocabulary_ids_are_refused_by_the_artifact(tiny, tmp_path, value):
    # Before: outputs came back for these ids (the clip-mode gather clamps them, silently wrong;
    # the build, in TVM's fast mode, segfaulted at 10^9).
    r = CliRunner().invoke(cli, ["run", str(tiny["art"]), "--inputs", str(_ids(tmp_path, value))])
    _error(r, f"holds {value}, outside [0, {VOCAB - 1}]")


def test_out_of_vocabulary_ids_are_refused_by_the_runtime_api(tiny):
    from loopify import runtime
    from loopify.bounds import IndexRangeError

    art = runtime.load(tiny["art"])
    with pytest.raises(IndexRangeError, match="outside"):
        art(torch.full((1, 12), 10**9, dtype=torch.long))
    art(torch.full((1, 12), VOCAB - 1, dtype=torch.long))  # the last row is fine


@pytest.mark.parametrize("model", ["pt2", "conv"])
def test_out_of_vocabulary_ids_are_one_line_in_pytorch(tiny, tmp_path, model):
    # Before: "internal error: IndexError: index out of range in self", exit 1.
    r = CliRunner().invoke(cli, ["run", str(tiny[model]), "--inputs", str(_ids(tmp_path, 10**9))])
    _error(r, "1000000000")


def test_the_compiled_gathers_are_bounds_safe(tiny):
    """Even without the runtime's check (an artifact called below the API), an id past the table
    reads its last row: gathers are imported in TVM's clip mode, not fast mode."""
    import numpy as np
    import tvm.runtime

    from loopify import runtime

    art = runtime.load(tiny["art"])
    far = tvm.runtime.tensor(np.full((1, 12), 10**9, dtype="int64"), art.device)
    last = tvm.runtime.tensor(np.full((1, 12), VOCAB - 1, dtype="int64"), art.device)
    (a,), (b,) = art._main(far, *art.params), art._main(last, *art.params)
    assert np.array_equal(a.numpy(), b.numpy())


# -- 4. unwritable outputs, found before the work ---------------------------------------------------

@pytest.mark.parametrize("command", [
    ["convert", "{pt2}", "-o", "{file}/x.pt2"],
    ["compile", "{pt2}", "-o", "{file}/a.x86"],
    ["run", "{pt2}", "--out", "{file}/o.pt"],
    ["inspect", "{pt2}", "--json", "{file}/s.json"],
])
def test_an_output_under_a_file_is_refused_before_the_work(tiny, tmp_path, command):
    f = tmp_path / "afile"
    f.write_text("x")
    args = [a.format(pt2=tiny["pt2"], file=f) for a in command]
    t = time.time()
    r = CliRunner().invoke(cli, args)
    _error(r, f"{f} is a file, not a directory")
    assert "capturing" not in r.output  # refused before the model is even read
    assert time.time() - t < 5


def test_an_output_in_an_unwritable_place_is_refused_before_the_work(tiny):
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    r = CliRunner().invoke(cli, ["convert", str(tiny["pt2"]), "-o", "/proc/x.pt2"])
    _error(r, "/proc/x.pt2: cannot write the output in /proc")


def test_a_directory_where_a_file_goes_is_refused(tiny, tmp_path):
    from loopify.errors import LoopifyError
    from loopify.io import check_output

    (tmp_path / "x.json").mkdir()
    (tmp_path / "a.x86").write_text("")
    with pytest.raises(LoopifyError, match="the output is a directory; give a file path"):
        check_output(tmp_path / "x.json")
    with pytest.raises(LoopifyError, match="the artifact is a file; give a directory path"):
        check_output(tmp_path / "a.x86", directory=True, what="artifact")
    # convert's companion files too: OUT.json being a directory stops it before the capture
    r = CliRunner().invoke(cli, ["convert", str(tiny["pt2"]), "-o", str(tmp_path / "x.pt2")])
    _error(r, "x.json: the output is a directory")


# -- 2. a full disk ------------------------------------------------------------------------------

def test_a_write_past_the_file_size_limit_is_one_line_and_leaves_nothing(tiny, tmp_path):
    """RLIMIT_FSIZE makes every write past 2000 bytes fail (EFBIG), as a full disk does (ENOSPC):
    the same path in loopify.io. Before: "internal error: OSError", or torch's zip writer
    aborting the process (exit 134)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    out = tmp_path / "out" / "o.pt"
    r = _sh("run", tiny["pt2"], "--out", out, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("loopify:")]
    assert len(err) == 1 and f"{out}: no space left on the device" in err[0], r.stderr
    assert list(out.parent.iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path):
    """A 600 KiB tmpfs (root only), filled to ~150 KiB free."""
    d = tmp_path / "full"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    (d / "fill").write_bytes(b"\0" * 450 * 1024)
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tiny, tiny_fs):
    # Before: "internal error: OSError [Errno 28]", then a c10::Error terminate (exit 134).
    r = _sh("convert", tiny["pt2"], "-o", tiny_fs / "x.pt2")
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("loopify:")]
    assert len(err) == 1 and "no space left on the device" in err[0] and "bytes are free" in err[0], r.stderr
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["fill"]


def test_outputs_in_directories_not_made_yet_are_written(tiny, tmp_path):
    # Before: the free-space check read a missing directory as 0 bytes free and refused the convert
    # as "no space left on the device" after all its work; the directories are made on the way.
    out = tmp_path / "new" / "deeper" / "c.pt2"
    r = CliRunner().invoke(cli, ["convert", str(tiny["pt2"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and out.with_suffix(".json").is_file()


# -- 6. temporaries of killed runs ---------------------------------------------------------------

def test_temporaries_of_a_killed_run_are_swept_by_the_next(tiny, tmp_path):
    """A kill -9 while writing leaves the hidden temporary (.NAME.PID.xxxx.tmp); the next write
    of the same target removes it (its process is gone) and leaves a live process's alone."""
    from loopify.io import atomic_path, temp_prefix

    target = tmp_path / "x.pt2"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = tmp_path / f".x.pt2.{child.pid}.abcd1234.tmp"
    dead.write_bytes(b"partial")
    (tmp_path / f".x.pt2.{child.pid}.ef567890.tmp").mkdir()
    live = tmp_path / f".x.pt2.{os.getppid()}.zz.tmp"  # a process that is alive (our parent)
    live.write_bytes(b"being written")
    other = tmp_path / f".y.pt2.{child.pid}.abcd.tmp"  # another target's: not ours to sweep
    other.write_bytes(b"")
    child.send_signal(signal.SIGKILL)
    child.wait()
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(temp_prefix(target))
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "x.pt2"])


def test_compile_killed_then_rerun_leaves_one_artifact(tiny, tmp_path):
    out = tmp_path / "a.x86"
    p = subprocess.Popen([sys.executable, "-m", "loopify.cli", "compile", str(tiny["pt2"]), "-o", str(out),
                          "--no-validate"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # until the artifact is being written inside compile's temporary
    while time.time() < deadline and not any(n.name.startswith("..a.x86.") for n in tmp_path.iterdir()):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [n.name for n in tmp_path.iterdir()]
    assert not out.exists() and any(n.startswith("..a.x86.") for n in left), left
    r = _sh("compile", tiny["pt2"], "-o", out, "--no-validate")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [n.name for n in tmp_path.iterdir()] == ["a.x86"]
    from loopify import runtime

    runtime.load(out)


# -- 7 / 10. manifests that point elsewhere, pairs out of step ---------------------------------

def test_an_artifact_manifest_entry_outside_the_artifact_is_refused(tiny, tmp_path):
    from loopify.io import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny["art"], bad)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"secret")
    m = json.loads((bad / "manifest.json").read_text())
    for name in (str(outside), "../elsewhere.bin"):
        m["files"] = {**m["files"], name: sha256_file(outside)}
        (bad / "manifest.json").write_text(json.dumps(m))
        r = CliRunner().invoke(cli, ["run", str(bad), "--inputs", str(_ids(tmp_path, 1))])
        _error(r, f"file entry {name!r} is not a file inside the artifact")
        del m["files"][name]


def test_a_manifest_beside_another_archive_is_refused(tiny, tmp_path):
    """A kill between the archive's and the manifest's rename leaves a new manifest beside an old
    archive (or the reverse): the archive's sha256 is in the manifest, so it is refused."""
    for f in ("conv.pt2", "conv.json", "conv.safetensors"):
        shutil.copy2(tiny["dir"] / f, tmp_path / f)
    shutil.copytree(tiny["dir"] / "conv.assets", tmp_path / "conv.assets")
    shutil.copy2(tiny["pt2"], tmp_path / "conv.pt2")  # another program under the same name
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "conv.pt2")])
    _error(r, "conv.pt2 does not match the sha256 in conv.json")


def test_a_converted_archive_without_its_json_runs_as_a_plain_archive(tiny, tmp_path):
    """Without its manifest a converted .pt2 is an ordinary torch.export archive (any torch user
    can run it); an edited manifest is refused."""
    shutil.copy2(tiny["conv"], tmp_path / "c.pt2")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "c.pt2")])
    assert r.exit_code == 0, r.output
    for f in ("conv.json", "conv.safetensors"):
        shutil.copy2(tiny["dir"] / f, tmp_path / f)
    shutil.copytree(tiny["dir"] / "conv.assets", tmp_path / "conv.assets")
    shutil.copy2(tiny["conv"], tmp_path / "conv.pt2")
    m = json.loads((tmp_path / "conv.json").read_text())
    m["files"]["conv.safetensors"] = "0" * 64
    (tmp_path / "conv.json").write_text(json.dumps(m))
    _error(CliRunner().invoke(cli, ["run", str(tmp_path / "conv.pt2")]), "conv.safetensors does not match the sha256")
    (tmp_path / "conv.json").write_text("{not json")
    _error(CliRunner().invoke(cli, ["run", str(tmp_path / "conv.pt2")]), "not valid JSON")


# -- 11. concurrent runs of one artifact ---------------------------------------------------------

def test_two_runs_of_one_artifact_at_once_agree(tiny, tmp_path):
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    torch.save((ids,), tmp_path / "in.pt")
    procs = [subprocess.Popen([sys.executable, "-m", "loopify.cli", "run", str(tiny["art"]), "--inputs",
                               str(tmp_path / "in.pt"), "--out", str(tmp_path / f"o{i}.pt")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    (a,), (b,) = torch.load(tmp_path / "o0.pt"), torch.load(tmp_path / "o1.pt")
    assert torch.equal(a, b)


# -- 3. a config that disagrees with its weights -----------------------------------------------

@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A 4-layer random LlamaForCausalLM directory (vocabulary 256)."""
    from loopify.backends.tvm.testing import tiny_llama

    d = tmp_path_factory.mktemp("hf") / "llama"
    tiny_llama(layers=4).save_pretrained(d)
    return d


def _edited_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_config_with_more_layers_than_its_weights_is_refused_before_building(hf_llama, tmp_path):
    # Before: 10^6 layers were instantiated first (5.4 GB and rising after 9 minutes).
    bad = _edited_config(hf_llama, tmp_path / "big", num_hidden_layers=1_000_000)
    t = time.time()
    r = CliRunner().invoke(cli, ["inspect", str(bad)])
    _error(r, "config.json says num_hidden_layers=1000000, but model.safetensors does not hold them (its longest "
              "layer stack is model.layers with 4)")
    assert time.time() - t < 30


def test_a_config_wider_than_its_weights_is_refused_before_building(hf_llama, tmp_path):
    bad = _edited_config(hf_llama, tmp_path / "wide", intermediate_size=100_000)
    _error(CliRunner().invoke(cli, ["inspect", str(bad)]), "config.json describes a LlamaForCausalLM of 76,882,496 "
                                                           "parameters, model.safetensors holds 180,800")


def test_weights_larger_than_the_memory_are_refused(hf_llama, monkeypatch):
    from loopify.capture import hf

    monkeypatch.setattr(hf, "available_memory", lambda: 1 << 19)  # this machine with 0.5 MiB free
    with pytest.raises(hf.HFLoadError, match=r"needs about 0.7 MiB in float32, more than the 0.5 MiB of memory"):
        hf.load_hf_dir(hf_llama)


def test_generate_refuses_out_of_vocabulary_prompt_ids(hf_llama):
    _error(CliRunner().invoke(cli, ["generate", str(hf_llama), "--prompt-ids", "1,256"]),
           "token id 256 is outside the vocabulary [0, 255]")


def test_generate_prepack_gives_the_same_tokens_and_bench_refuses_it_without_generate(hf_llama, tmp_path):
    """--prepack (oneDNN-packed linear weights) changes only the last float bits: the greedy
    tokens of the tiny Llama are the same; `bench --prepack` is for --generate only."""
    import json

    from loopify.nn.prepack import available

    outs = []
    for extra in ([], ["--prepack"]) if available() else ([],):
        out = tmp_path / f"g{len(outs)}.json"
        r = CliRunner().invoke(cli, ["generate", str(hf_llama), "--prompt-ids", "1,5,9,13,17,21", "--max-new-tokens",
                                     "8", "--json", str(out), *extra])
        assert r.exit_code == 0, r.output
        outs.append(json.loads(out.read_text())["tokens"])
    assert all(o == outs[0] for o in outs) and len(outs[0][0]) == 8
    _error(CliRunner().invoke(cli, ["bench", str(hf_llama), str(tmp_path / "c.pt2"), "--prepack"]),
           "--prepack is for --generate")


# -- 5. target options ----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--mcpu", "notacpu"], "--mcpu 'notacpu' is not a CPU LLVM knows for x86"),
    (["--target", "arm64", "--mcpu", "neoverse-n2x"], "did you mean neoverse-n2"),
    (["--target", "cuda", "--arch", "sm_9x"], "CUDA arch must look like 'sm_90'"),
])
def test_bad_target_options_are_refused_before_the_work(tiny, tmp_path, args, message):
    # Before: --mcpu notacpu built (134 LLVM warnings), exit 0, the bogus name in the manifest.
    r = CliRunner().invoke(cli, ["compile", str(tiny["pt2"]), "-o", str(tmp_path / "a"), *args])
    _error(r, message)
    assert not (tmp_path / "a").exists()


def test_a_known_mcpu_is_accepted():
    from loopify.backends.tvm.targets import target_for

    assert target_for("arm64", mcpu="neoverse-n1")["mcpu"] == "neoverse-n1"
    assert target_for("x86", mcpu="znver3")["mcpu"] == "znver3"


# -- 8. a rank above the full rank ------------------------------------------------------------

def test_a_huge_rank_is_clamped_with_a_note_and_verified_as_lossless(tiny, tmp_path):
    r = CliRunner().invoke(cli, ["convert", str(tiny["pt2"]), "-o", str(tmp_path / "r.pt2"), "--rank", "100000"])
    assert r.exit_code == 0, r.output
    assert "note: rank 100000 is above the full rank of 4 matrices, clamped to it (effective rank 32; a lossless " \
           "plan)" in r.output
    m = json.loads((tmp_path / "r.json").read_text())
    assert m["plan"]["relax"]["loops"][0]["effective_rank"] == 32
    assert m["verify"]["lossless_plan"] and m["verify"]["ok"] and m["verify"]["rel_err"] <= 1e-5


# -- 9. messages that name the real problem ---------------------------------------------------

def test_too_many_blocks_names_the_layer_count(tmp_path):
    from tests.models import TinyStack, export

    with open(tmp_path / "six.pt2", "wb") as f:
        torch.export.save(export(TinyStack(n=6, vocab=VOCAB)), f)
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "six.pt2"), "-o", str(tmp_path / "x.pt2"), "--blocks", "7"])
    line = _error(r, "the run has only 6 layers, so choose blocks in {1, 2, 3, 6}")
    assert "subsample" not in line


@pytest.mark.parametrize("cut", [22, 30, 1000])
def test_an_archive_cut_near_its_end_is_called_truncated(tiny, tmp_path, cut):
    # Before: "truncated or corrupt torch.save file (RuntimeError)" (zipfile read an inner zip's end).
    data = tiny["pt2"].read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[:-cut])
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "cut.pt2")])
    _error(r, "cut.pt2: truncated or corrupt zip archive (its end record is missing")


# -- missing optional dependencies -------------------------------------------------------------

_HIDE = '''
import importlib.machinery, sys
hide = sys.argv[1]
class _Raise:
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {hide!r}", name=hide)
    def exec_module(self, module):
        pass
class Block:  # the package is "not installed": importing it fails, as without the extra
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, _Raise()) if name.split(".")[0] == hide else None
sys.meta_path.insert(0, Block())
from loopify.cli import main
main(sys.argv[2:])
'''


@pytest.mark.parametrize("hide,args,extra", [
    ("tvm", ["compile", "{pt2}", "-o", "{tmp}/a"], "loopify[tvm]"),
    ("tvm", ["run", "{art}", "--inputs", "{tmp}/in.pt"], "loopify[tvm]"),
    ("transformers", ["inspect", "{hf}"], "loopify[hf]"),
    ("matplotlib", ["inspect", "{pt2}", "--no-similarity", "--plot", "{tmp}/p.png"], "loopify[plot]"),
])
def test_a_missing_optional_dependency_names_its_extra(tiny, hf_llama, tmp_path, hide, args, extra):
    # Before: "internal error: ModuleNotFoundError: No module named 'tvm'", exit 1.
    torch.save((torch.zeros(1, 12, dtype=torch.long),), tmp_path / "in.pt")
    (tmp_path / "hide.py").write_text(_HIDE)
    args = [a.format(pt2=tiny["pt2"], art=tiny["art"], hf=hf_llama, tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, str(tmp_path / "hide.py"), hide, *args], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("loopify:")]
    assert len(err) == 1 and f"pip install '{extra}'" in err[0] and "internal error" not in err[0], r.stderr
