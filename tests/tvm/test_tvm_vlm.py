"""Multimodal zoo models through `loopify compile`: Idefics3 (boolean-mask image selection) and
converted models with every sharing map.

Tolerance: ARTIFACT_RTOL (1e-4 relative) as `loopify compile` validates, since TVM reorders
float32 reductions; measured errors are about 5e-7.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tvm")

from loopify.compile import compile_model  # noqa: E402
from loopify.convert import ConvertConfig, convert  # noqa: E402
from loopify.errors import LoopifyError  # noqa: E402


@pytest.fixture(scope="module")
def idefics3(written, tmp_path_factory):
    out = tmp_path_factory.mktemp("idefics3")
    hf = written["idefics3"]["hf"]
    conv = out / "idefics3.loop.pt2"
    convert(hf, ConvertConfig(), conv)
    return hf, conv, out


def test_idefics3_original_compiles_and_matches(idefics3):
    hf, _, out = idefics3
    res = compile_model(hf, out / "orig.x86")
    assert res.ok and res.checks
    # the real-image selection was sized from the example (one real image) and recorded
    m = json.loads((res.path / "manifest.json").read_text())
    assert [(a["kind"], a["count"]) for a in m["assumptions"]] == [("mask-count", 1)]
    assert "modeling_idefics3.py" in m["assumptions"][0]["source"]


def test_idefics3_padding_image_breaks_the_assumption_clearly(idefics3, captured):
    # An all-zero image is padding to Idefics3 (not "real"): the artifact was compiled for one
    # real image, so it must refuse in one line rather than return numbers.
    import loopify.runtime as rt

    hf, _, out = idefics3
    path = out / "orig.x86"
    if not path.exists():
        compile_model(hf, path, validate=False)
    cap = captured("idefics3", "hf")
    flat = [t.clone() for t in cap.flat_inputs()]
    art = rt.load(path)
    names = [i["name"] for i in art.manifest["inputs"]]
    flat[names.index("pixel_values")].zero_()
    with pytest.raises(LoopifyError, match="break what the artifact was compiled for") as err:
        art(*flat)
    assert "\n" not in str(err.value)


def test_idefics3_converted_compiles_and_matches_at_every_loop_count(idefics3):
    _, conv, out = idefics3
    res = compile_model(conv, out / "conv.x86")
    assert res.ok
    # two loops (vision and text), each checked at 1 and 2
    assert sorted({tuple(c["loops"]) for c in res.checks}) == [(1, 1), (2, 2)]


@pytest.mark.parametrize("sharing,blocks", [("sequence", 2), ("middle-cycle", 3), ("middle-sequence", 3)])
def test_every_sharing_map_compiles_with_one_count_per_loop(written, tmp_path, sharing, blocks):
    conv = tmp_path / "llama.pt2"
    convert(written["llama"]["hf"], ConvertConfig(sharing=sharing, blocks=blocks, rank=4), conv)
    res = compile_model(conv, tmp_path / "art")
    assert res.ok
    loops = res.manifest["loops"]
    assert len(loops) == 1 and loops[0]["max"] == 2
    assert len(loops[0]["stages"]) == {"sequence": 2, "middle-cycle": 1, "middle-sequence": 1}[sharing]
    assert sorted({tuple(c["loops"]) for c in res.checks}) == [(1,), (2,)]


def test_an_artifact_that_does_not_match_is_not_written(written, tmp_path, monkeypatch):
    # Validation runs before the artifact is moved into place: a mismatch leaves nothing at OUT
    # (and an existing artifact there untouched). A zero tolerance forces the mismatch.
    import loopify.compile as lc

    out = tmp_path / "art"
    out.mkdir()
    (out / "keep").write_text("previous")
    monkeypatch.setattr(lc, "ARTIFACT_RTOL", 0.0)
    with pytest.raises(LoopifyError, match="does not match PyTorch .* nothing written"):
        compile_model(written["llama"]["hf"], out)
    assert (out / "keep").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
