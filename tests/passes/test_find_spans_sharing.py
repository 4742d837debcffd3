"""find-spans on what torch.export names per program rather than per layer (issue 15): tensor
constants a layer's forward creates (compared by value, not by their numbered names), and
layers that already share one module (recognised as a loop as it is)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from loopify import capture
from loopify.cli import cli
from loopify.passes.find_spans import find_spans
from tests.models import Block, example_ids


class ScaledBlock(Block):
    """A block whose forward creates a tensor constant (as Falcon's attention and DeBERTa's
    relative positions do): torch.export lifts one per call, ``lifted_tensor_<k>`` program-wide."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x, mask):
        return super().forward(x, mask) * torch.tensor([self.scale])


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module], calls: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(blocks)
        self.calls = calls  # run blocks[0] this many times (ALBERT-style sharing) instead

    def forward(self, ids):
        t = ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        x = self.emb(ids)
        for b in ([self.blocks[0]] * self.calls if self.calls else self.blocks):
            x = b(x, mask)
        return x


def _cap(model, tmp_path):
    path = tmp_path / "m.pt2"
    with open(path, "wb") as f:
        torch.export.save(torch.export.export(model.eval(), (example_ids(),), strict=False), f)
    return capture.load(path)


def test_equal_lifted_constants_do_not_break_a_run(tmp_path):
    torch.manual_seed(0)
    c = _cap(Stack([ScaledBlock(0.5) for _ in range(4)]), tmp_path)
    assert len(c.program.constants) >= 4  # one lifted constant per layer, each its own name
    a = find_spans(c)
    assert [(s.start, s.length) for s in a.spans] == [(0, 4)] and a.refused == []


def test_different_lifted_constants_still_break_the_run(tmp_path):
    # Negative: layer 2's constant has another value, so its graph is not the same.
    torch.manual_seed(0)
    c = _cap(Stack([ScaledBlock(s) for s in (0.5, 0.5, 0.25, 0.25)]), tmp_path)
    a = find_spans(c)
    assert [(s.start, s.length) for s in a.spans] == [(0, 2), (2, 2)]
    assert [r["layer"] for r in a.refused] == [2] and "constant" in a.refused[0]["reason"]


def test_one_module_called_in_a_chain_is_already_a_loop(tmp_path):
    torch.manual_seed(0)
    c = _cap(Stack([Block()], calls=3), tmp_path)
    a = find_spans(c)
    assert [(x.module, x.calls) for x in a.shared] == [("blocks.0", 3)]
    assert a.spans == []
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "m.pt2"), "-o", str(tmp_path / "o.pt2")])
    assert r.exit_code == 2 and "already shares its layers (blocks.0 runs 3 times" in r.output, r.output
    assert not (tmp_path / "o.pt2").exists()


def test_distinct_layers_are_not_a_shared_loop(tiny_capture):
    # Negative: five modules called once each share nothing.
    assert find_spans(tiny_capture).shared == []


@pytest.mark.parametrize("arch", ["AlbertModel"])
def test_albert_shared_group_is_recognised(arch, tmp_path):
    from tests.tiny import write_tiny

    d = write_tiny(arch, tmp_path, layers=3)
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert r.exit_code == 0, r.output
    assert "already a loop: model.encoder.albert_layer_groups.0 runs 3 times with the same weights" in r.output
