"""What a routing method decides for N tokens: ``GateOutput``, and the ``RoutingMode`` that says
how to read it.

Every routing method (``topk.py``, ``dense.py``, ``expert_choice.py``, ...) returns a
``GateOutput``; the MoE layer dispatches on it and puts it, unchanged, in the layer's
``MoERecord`` (``record.py``), which adds only what the layer knows (its name, the token
positions, the computed counts). The statistics below are derived on first access, so a decoding
step, which reads none of them, pays for none.

Tokens are flattened: ``N`` non-padding tokens, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.utils import _pytree as pytree

from .losses import RouterLosses, expert_counts, routing_entropy


class RoutingMode(enum.Enum):
    """How ``expert_index``/``keep`` are laid out; a new routing method picks one of these.

    - ``TOKEN_CHOICE``: each token chose k experts (``expert_index`` N x k, best first);
      ``keep`` is False where capacity dropped a choice.
    - ``DENSE``: every token goes to all E experts (``expert_index`` N x E), nothing dropped;
      an expert's load is the probability mass it received.
    - ``EXPERT_CHOICE``: every expert chose its tokens (``expert_index`` N x E, every expert);
      ``keep`` marks the tokens each expert took; nothing is dropped, a token may be unchosen.

    The values are the names the routing logs store (``analysis/routing_log.py``).
    """

    TOKEN_CHOICE = "topk"
    DENSE = "dense"
    EXPERT_CHOICE = "expert_choice"


@dataclass
class GateOutput(RouterLosses):
    """One routing decision for N tokens (all fp32); the losses are ``RouterLosses``'."""

    logits: torch.Tensor  # N x E router logits (differentiable)
    probs: torch.Tensor  # N x E softmax over all experts (differentiable)
    expert_index: torch.Tensor  # N x k experts (k = E under DENSE and EXPERT_CHOICE)
    expert_weight: torch.Tensor  # N x k combine weights, 0 where dropped (differentiable)
    # N x k bool, False where the assignment is not computed; None when every assignment is
    # (capacity cannot bind, so no mask is made): ``keep`` reads it as a mask either way.
    kept: torch.Tensor | None
    capacity: int  # per-expert capacity used (N when nothing can be dropped)
    balance_type: str = "switch"  # which balance loss ``balance_loss`` computes
    mode: RoutingMode = RoutingMode.TOKEN_CHOICE
    # N x 1 bool: False for the tokens whose router logits were not finite and went to the
    # fallback expert (eval only, ``fallback_expert >= 0``); None when no fallback is applied.
    finite_rows: torch.Tensor | None = None

    @property
    def k(self) -> int:
        """Experts per token as laid out in ``expert_index`` (E under DENSE/EXPERT_CHOICE)."""
        return self.expert_index.shape[1]

    @property
    def dense(self) -> bool:
        return self.mode is RoutingMode.DENSE

    @property
    def expert_choice(self) -> bool:
        return self.mode is RoutingMode.EXPERT_CHOICE

    @property
    def all_kept(self) -> bool:
        """True when capacity cannot bind (dropless, or capacity >= N): ``keep`` is all True."""
        return self.capacity >= self.expert_index.shape[0]

    @cached_property
    def fallback_tokens(self) -> torch.Tensor | None:
        """0-dim long: how many tokens went to the fallback expert; None when no fallback is
        applied."""
        if self.finite_rows is None:
            return None
        return self.finite_rows.numel() - self.finite_rows.sum()

    @cached_property
    def keep(self) -> torch.Tensor:
        """N x k bool, False where the assignment is not computed (``kept``; all True, made on
        first access, when it is None)."""
        if self.kept is None:
            return torch.ones_like(self.expert_index, dtype=torch.bool)
        return self.kept

    @property
    def dropped_token_mask(self) -> torch.Tensor:
        """N bool: tokens none of whose assignments survived (their routed output is zero)."""
        return ~self.keep.any(dim=-1)

    @cached_property
    def expert_load(self) -> torch.Tensor:
        """E float: each expert's load, summable over batches: the router's assignments
        (``expert_counts_routed``); under DENSE, where every expert gets every token, the
        probability mass it received."""
        if self.mode is RoutingMode.DENSE:
            return self.probs.detach().sum(dim=0)
        return self.expert_counts_routed.float()

    @cached_property
    def expert_counts_routed(self) -> torch.Tensor:
        """E long: assignments the router chose (before capacity); under EXPERT_CHOICE, the
        tokens each expert took (C each)."""
        if self.mode is RoutingMode.EXPERT_CHOICE:
            return self.keep.sum(dim=0)
        return expert_counts(self.expert_index.detach(), self.probs.shape[1])

    @cached_property
    def dropped(self) -> torch.Tensor:
        """Scalar long: assignments dropped by capacity (none under EXPERT_CHOICE: experts
        choose, see ``unchosen_tokens``)."""
        if self.mode is RoutingMode.EXPERT_CHOICE:
            return self.expert_index.new_zeros((), dtype=torch.long)
        if self.kept is None:
            return self.expert_index.new_zeros((), dtype=torch.long)
        return (~self.kept).sum()

    @cached_property
    def dropped_tokens(self) -> torch.Tensor:
        """Scalar long: tokens none of whose assignments were computed (under EXPERT_CHOICE
        the tokens no expert took). Their routed output is zero."""
        return self.dropped_token_mask.sum()

    @property
    def unchosen_tokens(self) -> torch.Tensor:
        """Scalar long: tokens no expert took (EXPERT_CHOICE; they pass through the residual)."""
        return self.dropped_tokens

    @cached_property
    def computed_assignments(self) -> torch.Tensor:
        """Scalar long: (token, expert) pairs computed; divided by ``routed_tokens`` it is the
        mean number of experts per token."""
        if self.kept is None:
            return torch.tensor(self.expert_index.numel(), device=self.expert_index.device)
        return self.kept.sum()

    @cached_property
    def routed_tokens(self) -> torch.Tensor:
        """Scalar long: N."""
        return torch.tensor(self.expert_index.shape[0], device=self.expert_index.device)

    @cached_property
    def token_entropy(self) -> torch.Tensor:
        """N float: each token's routing entropy (nats)."""
        with torch.no_grad():
            return routing_entropy(self.probs.detach())

    @cached_property
    def entropy(self) -> torch.Tensor:
        """Scalar float: mean routing entropy over the N tokens (nats), 0 without tokens."""
        if self.expert_index.shape[0] == 0:
            return self.probs.new_zeros((), dtype=torch.float32)
        return self.token_entropy.mean().float()


pytree.register_dataclass(GateOutput)
