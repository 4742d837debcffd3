"""Fidelity that users read, for every model loopify takes, in one place.

* :mod:`~loopify.fidelity.metrics`: the numbers (perplexity, next-token top-1 agreement and top-5
  overlap, KL; sentence-embedding cosine and the Spearman correlation of pairwise similarities);
* :mod:`~loopify.fidelity.inputs`: text as model inputs (tokenizers, windows, static shapes);
* :mod:`~loopify.fidelity.models`: an original, a converted ``.pt2`` or a generation artifact,
  opened for measurement, and the original it was made from;
* :mod:`~loopify.fidelity.report`: ``loopify eval``, at every loop count.

``convert``'s verify, ``train``'s evaluation and ``bench`` use the same metric functions.
"""

from loopify.fidelity.inputs import batch_inputs, embed, tokenizer_for
from loopify.fidelity.metrics import (NextToken, agreement, mean_pooled, pairwise_similarities, sentence_cosines,
                                      sentence_fidelity, spearman, top_k_overlap)

__all__ = ["NextToken", "agreement", "batch_inputs", "embed", "evaluate", "mean_pooled", "pairwise_similarities",
           "sentence_cosines", "sentence_fidelity", "spearman", "tokenizer_for", "top_k_overlap"]


def evaluate(*args, **kwargs):
    """See :func:`loopify.fidelity.report.evaluate` (imported lazily: it loads models)."""
    from loopify.fidelity.report import evaluate as run

    return run(*args, **kwargs)
