"""Generation in PyTorch: the loop KV cache, exactness against transformers' own generate,
batches, sampling, stops, images.

Exactness: a lossless plan (rank full) with the per-depth KV policy must give the original's
greedy tokens exactly (token ids compared, no tolerance): the logits differ by float32
re-association (~1e-7 relative), far below the gaps between top tokens of these prompts.
"""

from __future__ import annotations

import pytest
import torch

from loopify import convert as conv
from loopify.generate import GenerateError, Sampling
from loopify.generate.cache import LoopCache
from loopify.generate.eager import EagerDecoder
from loopify.generate.engine import choose, left_pad, run
from loopify.nn import set_loops


@pytest.fixture(scope="module")
def lossless_llama(captured):
    cap = captured("llama", "hf")
    return cap, conv.convert_captured(cap, conv.ConvertConfig(blocks=2, rank="full")).module


def _hf_greedy(model, ids: list[int], n: int, **extra) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **extra)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("length", [3, 9, 40])
def test_lossless_conversion_decodes_the_originals_greedy_tokens(lossless_llama, length):
    cap, module = lossless_llama
    prompt = [int(i) for i in torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(length))]
    ref = _hf_greedy(cap.eager.model, prompt, 16)
    got = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=16)).tokens[0]
    assert got == ref
    # the original through loopify's own loop and cache gives the same tokens too
    assert run(EagerDecoder(cap.eager), [prompt], Sampling(max_new_tokens=16)).tokens[0] == ref


def test_kv_slots_per_policy(lossless_llama):
    """per-depth: one slot per executed depth (2 blocks x 2 loops = 4); shared policies: one per
    block (2); at one loop per-depth keeps 2."""
    _, module = lossless_llama
    prompt = [1, 5, 9, 13, 17]
    sizes = {}
    for policy, loops in (("per-depth", 2), ("share-first", 2), ("last", 2), ("per-depth", 1)):
        set_loops(module, loops)
        dec = EagerDecoder(module, policy)
        run(dec, [prompt], Sampling(max_new_tokens=3))
        sizes[(policy, loops)] = (dec.cache.slots, dec.kv_bytes())
    set_loops(module, None)
    assert [sizes[k][0] for k in sizes] == [4, 2, 2, 2]
    assert sizes[("per-depth", 2)][1] == 2 * sizes[("share-first", 2)][1] == 2 * sizes[("last", 2)][1]


def test_cache_policies_differ_and_are_refused_by_name():
    with pytest.raises(ValueError, match="KV policy must be one of"):
        LoopCache("everything")


def test_a_batch_of_different_lengths_equals_each_prompt_alone(lossless_llama):
    _, module = lossless_llama
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 77], [1, 200, 201, 202]]
    s = Sampling(max_new_tokens=8)
    together = run(EagerDecoder(module), prompts, s, pad=0).tokens
    alone = [run(EagerDecoder(module), [p], s).tokens[0] for p in prompts]
    assert together == alone


def test_left_padding_layout():
    b = left_pad([[5, 6, 7], [8]], pad=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sampling_is_reproducible_and_top_p_narrows(lossless_llama):
    _, module = lossless_llama
    prompt = [1, 5, 6, 7]
    a = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=10, temperature=1.5, seed=3)).tokens[0]
    b = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=10, temperature=1.5, seed=3)).tokens[0]
    c = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=10, temperature=1.5, seed=4)).tokens[0]
    assert a == b and a != c
    greedy = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=10)).tokens[0]
    nucleus = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=9)).tokens[0]
    assert nucleus == greedy  # the smallest nucleus is the top token alone


def test_choose_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(choose(logits, Sampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(i)))
             for i in range(200)}
    assert draws == {0, 1}


class _Fixed:
    """A decoder that always prefers a given token sequence (to test stops without a model)."""

    def __init__(self, seq, vocab=10):
        self.seq, self.vocab, self.i = seq, vocab, 0

    def _next(self, rows):
        tok = self.seq[min(self.i, len(self.seq) - 1)]
        self.i += 1
        out = torch.zeros(rows, self.vocab)
        out[:, tok] = 1.0
        return out

    def prefill(self, batch):
        return self._next(batch["input_ids"].shape[0])

    def decode(self, ids, mask, pos):
        return self._next(ids.shape[0])

    def kv_bytes(self):
        return 0


def test_stops_at_eos_and_at_stop_strings_and_at_the_context():
    words = {1: "a", 2: "b", 3: "<end>", 4: "c"}
    detok = lambda ids: " ".join(words[i] for i in ids)
    r = run(_Fixed([1, 2, 3, 4]), [[1]], Sampling(max_new_tokens=10, eos=(3,)), detok=detok)
    assert r.tokens == [[1, 2]] and r.finish == ["eos"]
    r = run(_Fixed([1, 2, 4, 4]), [[1]], Sampling(max_new_tokens=10, stop=("b c",)), detok=detok)
    assert r.finish == ["stop"] and r.texts == ["a "]
    r = run(_Fixed([1, 1, 1, 1]), [[1, 1, 1]], Sampling(max_new_tokens=10), max_context=5)
    assert len(r.tokens[0]) == 2 and r.finish == ["length"]
    with pytest.raises(GenerateError, match="past the maximum context of 3"):
        run(_Fixed([1]), [[1, 1, 1]], Sampling(), max_context=3)


def test_nanogpt_decodes_with_its_cache_as_without(captured):
    """A registered (non-transformers) model: cached decoding equals re-running the whole
    sequence, for the original and its lossless conversion."""
    cap = captured("nanogpt", "hf")
    module = conv.convert_captured(cap, conv.ConvertConfig(rank="full")).module
    prompt = [3, 9, 27, 81]
    for m in (cap.eager, module):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                x = torch.tensor([ids])
                ids.append(int(m(input_ids=x, attention_mask=torch.ones_like(x))[0][0, -1].argmax()))
        assert run(EagerDecoder(m), [prompt], Sampling(max_new_tokens=8)).tokens[0] == ids[len(prompt):]


def test_vlm_generates_from_an_image_like_transformers(captured, tmp_path):
    """LLaVA (CLIP + Llama) converted losslessly: an image plus a prompt gives the original's
    greedy tokens (transformers' generate with the same pixel values and image tokens)."""
    from PIL import Image

    from loopify.capture.inputs import ImageReader

    cap = captured("llava-clip", "hf")
    module = conv.convert_captured(cap, conv.ConvertConfig(rank="full")).module
    png = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 40, 90)).save(png)
    px, note = ImageReader(None).pixels(png, cap.kwargs["pixel_values"][:1])
    assert note and "scaled to [-1, 1]" in note
    n_img = cap.info["num_image_tokens"]
    prompt = [1, 7, 8] + [cap.info["image_token_id"]] * n_img + [20, 21, 22]
    ref = _hf_greedy(cap.eager.model, prompt, 8, pixel_values=px)
    got = run(EagerDecoder(module), [prompt], Sampling(max_new_tokens=8), extra={"pixel_values": px}).tokens[0]
    assert got == ref
