"""insert-connectors: neutral at insertion, the modality mask, training moves them, refusals, golden IR, idempotence."""

from __future__ import annotations

import pytest
import torch

from loopify.errors import PipelineError
from loopify.nn import recursions
from tests.passes.helpers import RTOL, check_golden, describe, out, rel, run


# -- insert-connectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["recursive", "identity", "embedding"])
def test_connectors_are_neutral_at_insertion(captured, kind):
    cap = captured("llava-clip")
    base = out(cap, run(cap, "fold-loops").state.module)
    got = out(cap, run(cap, f"fold-loops,insert-connectors{{kind={kind}}}").state.module)
    assert torch.equal(base, got)


def test_llava_modality_mask_marks_exactly_the_image_tokens(captured):
    cap = captured("llava-clip")
    res = run(cap, "fold-loops,insert-connectors")
    loops = recursions(res.state.module)
    text = loops["model.model.language_model.layers_loop"]
    vision = loops["model.model.vision_tower.encoder.layers_loop"]
    assert text.connector.modalities == 2 and vision.connector.modalities == 1
    seen = {}

    def grab(module, args):  # a pre-hook must return None, or it replaces the arguments
        seen["mask"] = args[-1]

    text.register_forward_pre_hook(grab)
    out(cap, res.state.module)
    ids = cap.kwargs["input_ids"]
    expected = ids == cap.info["image_token_id"]
    assert torch.equal(seen["mask"], expected)
    assert int(expected.sum()) == 16  # the zoo's LLaVA has 16 image tokens


def test_connector_changes_output_once_trained(captured):
    cap = captured("llama")
    res = run(cap, "fold-loops,insert-connectors")
    (rec,) = recursions(res.state.module).values()
    assert rec.connector.modalities == 1  # text-only model
    base = out(cap, res.state.module)
    with torch.no_grad():
        rec.connector.scale.fill_(0.5)
    assert not torch.equal(base, out(cap, res.state.module))


def test_connectors_refuse_sequence_sharing(captured):
    with pytest.raises(PipelineError, match="cycle sharing and deepen mode, not sequence"):
        run(captured("llama"), "fold-loops{sharing=sequence},insert-connectors")


# -- golden IR, idempotence, module form ----------------------------------------------------------


def test_golden_ir(tiny_capture):
    res = run(tiny_capture, "fold-loops{blocks=1},insert-connectors{kind=recursive,taps=2}")
    check_golden("insert-connectors", describe(res.state.module))


def test_a_second_run_changes_nothing(tiny_capture):
    from loopify.passes.insert_connectors import InsertConnectors

    res = run(tiny_capture, "fold-loops{blocks=1},insert-connectors")
    again = InsertConnectors().run(res.state)
    assert not again.modified and "already" in again.report["note"]
    assert describe(again.state.module) == describe(res.state.module)


def test_module_form_llava_connector_reads_the_image_positions(captured):
    """Module form (the eager model): the wrapper computes the mask from its input_ids and the
    loop reads it while it runs; neutral at insertion, and the image projection acts once the
    scale moves."""
    cap = captured("llava-clip", "hf")
    base = out(cap, run(cap, "fold-loops", form="module").state.module)
    res = run(cap, "fold-loops,insert-connectors", form="module")
    assert torch.equal(base, out(cap, res.state.module))
    loops = recursions(res.state.module)
    text = loops["model.model.language_model.layers.0"]
    assert text.connector.modalities == 2 and text.modality_token == cap.info["image_token_id"]
    with torch.no_grad():
        text.connector.scale.fill_(0.1)
        a = out(cap, res.state.module)
        text.connector.proj[1][0].weight.mul_(3.0)  # the image projection only
        b = out(cap, res.state.module)
    assert not torch.equal(a, b)
