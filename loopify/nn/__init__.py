"""The modules a converted model is made of, one file per paper concept.

* :mod:`~loopify.nn.sharing`: sharing maps, schedules, initialisations (Relaxed Recursive
  Transformers);
* :mod:`~loopify.nn.recursion`: the loop module (:class:`Recursion`) and loop counts;
* :mod:`~loopify.nn.lora`: per-depth LoRA relaxation, initialised from the SVD of the residual;
* :mod:`~loopify.nn.connectors`: connectors between recursion steps (RecursiveVLM);
* :mod:`~loopify.nn.kv`: KV caches for loops (one slot per executed depth, or shared);
* :mod:`~loopify.nn.routing`: Mixture-of-Recursions routers (each token its own depth).

Used alike by the passes, staging, training and generation.
"""

from loopify.nn.recursion import Recursion, RecursionSpec, current_depth, deploy_lora, recursions, set_loops
from loopify.nn.sharing import schedule, sharing_map

__all__ = ["Recursion", "RecursionSpec", "current_depth", "deploy_lora", "recursions", "set_loops", "schedule", "sharing_map"]
