"""Generation with a KV cache at any prompt length, from an original model, a converted model or
a compiled artifact, with the loop count chosen per request.

* :mod:`~loopify.generate.engine`: the decoding loop (greedy and sampling, stops, batches of
  left-padded prompts, timings);
* :mod:`~loopify.generate.cache`: the eager loop KV cache (policies in :mod:`loopify.nn.kv`);
* :mod:`~loopify.generate.eager`: decoding in PyTorch;
* :mod:`~loopify.generate.compiled`: decoding with a TVM artifact's prefill and decode functions;
* :mod:`~loopify.generate.model`: opening any of them, prompts and images.
"""

from loopify.generate.engine import GenerateError, Result, Sampling
from loopify.generate.model import Generator, open_model

__all__ = ["GenerateError", "Generator", "Result", "Sampling", "open_model"]
