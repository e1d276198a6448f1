"""Activation checkpointing (``--checkpoint-activations``, ``--offload-activations``) for layers
whose output nests tensors, as MoE layers return their routing record.

fairseq's ``checkpoint_wrapper`` runs the layer's first forward under ``no_grad`` and re-runs it
in backward. Its ``CheckpointFunction`` passes only the *top-level* tensors of a tuple output
through autograd; anything else (a record holding the balance and z losses) is handed over by
reference from the ``no_grad`` forward, so a loss read from it carries no gradient and the router
silently stops learning from it. ``checkpointed`` flattens the output with torch's pytree first
(``MoERecord`` is a registered node), so every tensor in it is a top-level output of fairseq's
function, and rebuilds the structure afterwards. The checkpointing itself (RNG state, offload to
CPU, the recompute in backward) is fairseq's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from fairseq.modules.checkpoint_activations import _checkpointed_forward
from torch.utils import _pytree as pytree


def checkpointed(forward: Callable, offload_to_cpu: bool, *args, **kwargs):
    """``forward(*args, **kwargs)`` under fairseq's activation checkpointing; the result has the
    structure ``forward`` returns, with gradients flowing into every tensor in it."""

    def flat_forward(*a, **kw):
        leaves, spec = pytree.tree_flatten(forward(*a, **kw))
        return (*leaves, spec)  # the spec is not a tensor: fairseq passes it by reference

    *leaves, spec = _checkpointed_forward(flat_forward, offload_to_cpu, *args, **kwargs)
    return pytree.tree_unflatten(leaves, spec)
