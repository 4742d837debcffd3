"""The fidelity numbers themselves: perplexity as transformers computes it, top-k overlap,
Spearman's rho with ties, and the train / held-out split of the real texts by document."""

from __future__ import annotations

import math

import pytest
import torch

from loopify import texts
from loopify.fidelity.metrics import NextToken, pairwise_similarities, sentence_fidelity, spearman, top_k_overlap


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from loopify.examples import zoo

    return zoo.write_zoo(tmp_path_factory.mktemp("zoo"), ["llama"])["llama"]["hf"]


def test_perplexity_is_transformers_own_loss(llama_dir):
    """exp(mean NLL) over positions 0..T-2 predicting 1..T-1 is what ``labels=`` computes;
    loopify accumulates in float64, transformers' loss is float32: 1e-5 relative covers that."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.randint(3, 200, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    s = NextToken()
    s.add(out.logits[0], ids[0], out.logits[0])
    r = s.result()
    assert r["tokens"] == 36
    assert r["perplexity"] == pytest.approx(math.exp(float(out.loss)), rel=1e-5)
    # against itself: every prediction agrees, the distributions are equal
    assert r["top1_agreement"] == 1.0 and r["top5_overlap"] == 1.0 and abs(r["kl"]) < 1e-12
    # another model's logits (the same shifted by noise) agree less and diverge
    s2 = NextToken()
    s2.add(out.logits[0] + 3 * torch.randn(out.logits[0].shape, generator=torch.Generator().manual_seed(2)),
           ids[0], out.logits[0])
    assert s2.result()["top1_agreement"] < 1.0 and s2.result()["kl"] > 0.01


def test_top_k_overlap_counts_shared_tokens_not_order():
    ref = torch.tensor([[5.0, 4, 3, 2, 1, 0, 0]])
    same_set = torch.tensor([[1.0, 2, 3, 4, 5, 0, 0]])     # the same five, reversed
    two_new = torch.tensor([[5.0, 4, 3, 0, 0, 2, 1]])       # tokens 3, 4 swapped for 5, 6
    assert float(top_k_overlap(ref, same_set, 5)) == 1.0
    assert float(top_k_overlap(ref, two_new, 5)) == pytest.approx(3 / 5)


def test_spearman_with_ties_and_monotone_maps():
    a = torch.tensor([1.0, 2, 2, 3])
    b = torch.tensor([1.0, 2, 3, 4])
    # average ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5) (scipy gives the same)
    assert spearman(a, b) == pytest.approx(4.5 / math.sqrt(4.5 * 5), rel=1e-12)
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert spearman(x, x.exp()) == pytest.approx(1.0)       # ranks only: any increasing map is 1
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_sentence_fidelity_of_a_rotation_is_perfect_and_of_noise_is_not():
    """An orthogonal rotation of every embedding keeps all pairwise similarities (spearman 1)
    while moving each embedding away from the original (cosine < 1): the two numbers measure
    different things."""
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    rot = sentence_fidelity(emb, emb @ q)
    assert rot["spearman"] == pytest.approx(1.0) and rot["cosine"] < 0.9
    noisy = torch.nn.functional.normalize(emb + 0.5 * torch.randn(20, 16, generator=g), dim=-1)
    assert sentence_fidelity(emb, noisy)["spearman"] < 0.95
    assert pairwise_similarities(emb).numel() == 20 * 19 // 2


def test_texts_split_by_document_family():
    docs = texts.documents()
    train, held = texts.split_documents(docs)
    assert train and held and len(train) + len(held) <= len(docs)  # a held-out document of boilerplate only is dropped
    names = {n for n, _ in held}
    # whole documents and whole families on one side: no held-out paragraph is in the train file
    assert not names & {n for n, _ in train}
    assert not {texts.family(n) for n in names} & {texts.family(n) for n, _ in train}
    train_paras = {p for _, ps in train for p in ps}
    assert not any(p in train_paras for _, ps in held for p in ps)
    # the rule depends on the name alone (deterministic across machines and document sets)
    assert sorted(texts.split_documents(docs[::-1])[1]) == sorted(held)
    assert {texts.family(n) for n in ("license/GPL-2", "license/GPL-3", "license/LGPL-2.1")} == {
        "license/GPL", "license/LGPL"}


def test_write_corpus(tmp_path):
    s = texts.write_corpus(tmp_path)
    held = (tmp_path / "heldout.txt").read_text().splitlines()
    train = set((tmp_path / "train.txt").read_text().splitlines())
    assert len(held) == s["files"]["heldout.txt"]["lines"] and not train & set(held)


def test_sentence_corpus_is_split_by_document(tmp_path):
    """One sentence per line, held out by document (as the paragraphs): no held-out sentence is
    trained on, and every held-out sentence comes from a held-out document."""
    s = texts.write_corpus(tmp_path, sentences=True)
    held = (tmp_path / "heldout.txt").read_text().splitlines()
    train = (tmp_path / "train.txt").read_text().splitlines()
    assert s["unit"] == "sentence" and len(held) == s["files"]["heldout.txt"]["lines"] > 100
    assert not set(train) & set(held) and len(set(train)) == len(train)
    assert all(6 <= len(x.split()) <= 40 for x in held + train)
    held_text = " ".join(p for _, ps in texts.split_documents()[1] for p in ps)
    assert all(x in held_text for x in held[:50])


def test_troff_text_keeps_words_and_drops_macros():
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n.B \\-a\ndo not ignore\n'
    out = texts.troff_text(src)
    assert "comment" not in out and "TH" not in out
    assert "ls - list directory contents" in out and "-a" in out
