"""The teacher is captured at the length the converted model was: a source with a tokenizer
records only ``seq_len`` (no ``text_len``), and a ``--seq-len`` conversion used to get a teacher
of the default length, refused as "takes other inputs"."""

from __future__ import annotations

from loopify import convert as conv
from loopify import texts
from loopify import train as tr


def test_teacher_of_a_seq_len_conversion_has_its_length(tmp_path):
    from loopify.examples import zoo

    src = zoo.write_zoo(tmp_path / "zoo", ["minilm"])["minilm"]["hf"]
    pt2 = tmp_path / "m.pt2"
    conv.convert(src, conv.ConvertConfig(), pt2, capture_options={"seq_len": 20})
    manifest = conv.load_converted(pt2)[2]
    assert manifest["source"]["seq_len"] == 20 and "text_len" not in manifest["source"]
    data = tmp_path / "d.txt"
    data.write_text("\n".join(texts.sentences()[:6]) + "\n")
    r = tr.train(tr.TrainConfig(converted=str(pt2), data=str(data), out=str(tmp_path / "t.pt2"), steps=1, batch=1,
                                checkpoint_every=0))
    assert r.report["objective"] == "cosine" and r.report["after"]["depths"]["2"]["cosine"] > 0
