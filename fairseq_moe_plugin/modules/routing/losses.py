"""The router's auxiliary losses and statistics (plain functions of the routing tensors), and
``RouterLosses``, which computes them lazily for ``GateOutput`` and ``MoERecord``.

Tokens are flattened: ``N`` non-padding tokens, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

from functools import cached_property

import torch


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``expert_index`` (any shape) name each expert: E long.

    ``torch.bincount`` would do, but on CUDA it reads the largest index back to size its output
    (a host sync per call); a scatter-add into E zeros does not."""
    flat = expert_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss.

    Fedus, Zoph & Shazeer (2021), "Switch Transformers", eq. 4-6:
    ``loss = E * sum_i f_i * P_i`` where ``f_i`` is the fraction of routing choices sent to expert
    ``i`` (counted over all k choices of every token, divided by k, before capacity drops) and
    ``P_i`` the mean router probability of expert ``i`` (the full softmax). Both are over the
    tokens given, which must be non-padding tokens. It equals 1.0 when routing is uniform.

    Args:
        probs: N x E softmax probabilities (fp32).
        expert_index: N x k chosen experts.
    Returns:
        a scalar; 0 when there are no tokens.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    k = expert_index.shape[1]
    counts = expert_counts(expert_index, num_experts)
    f = counts.to(probs.dtype) / (num_tokens * k)  # E
    p = probs.mean(dim=0)  # E
    return num_experts * torch.sum(f * p)


def global_load_balance_loss(probs: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
    """The Switch loss with the expert frequencies of the global batch.

    Qiu et al. (2025), "Demons in the Detail: On Implementing Load Balancing Loss for Training
    Specialized Mixture-of-Expert Models", sec. 3: ``LBL = E * sum_i f_i * P_i`` as in Switch
    Transformer eq. 4-6, but with ``f_i`` the share of expert ``i`` among the router's choices
    (before capacity) of the whole global batch (every micro-batch of the update on every
    data-parallel worker: ``global_counts``), synchronised before the product is taken; ``P_i``
    is still the mean router probability over the tokens given (this micro-batch), which is
    where the gradient flows. With ``global_counts`` the micro-batch's own counts it is
    ``load_balance_loss``.

    Args:
        probs: N x E softmax probabilities (fp32), non-padding tokens only.
        global_counts: E, the router's assignments to each expert over the global batch.
    Returns:
        a scalar; 0 when there are no tokens here or no assignments in the global batch.
    """
    num_tokens, num_experts = probs.shape
    total = global_counts.sum()
    if num_tokens == 0:
        return probs.sum() * 0.0
    f = global_counts.to(probs.dtype) / total.clamp_min(1).to(probs.dtype)  # E, sums to 1
    return num_experts * torch.sum(f * probs.mean(dim=0))


def mse_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the batch's mean routing probability and uniform:
    ``mean_i (P_i - 1/E)^2`` with ``P_i = mean_tokens probs[:, i]``.

    The balance loss of the GLBL design (expert MLPs added to a frozen pretrained model, with a
    global load balance over the batch). It is the squared coefficient of variation of expert
    importance of Shazeer et al. (2017), "Outrageously Large Neural Networks", eq. 6-7
    (``CV(Importance)^2`` with ``Importance_i = sum_tokens probs[:, i]``), divided by ``E^2``:
    ``CV^2 = Var(P) / mean(P)^2 = E^2 * mean_i (P_i - 1/E)^2``. It is 0 when the mean routing
    probability is uniform, and, unlike the Switch loss, it has a gradient under dense routing.

    Args:
        probs: N x E softmax probabilities (fp32), non-padding tokens only.
    Returns:
        a scalar; 0 when there are no tokens.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    return (probs.mean(dim=0) - 1.0 / num_experts).pow(2).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss, ST-MoE (Zoph et al., 2022, "ST-MoE: Designing Stable and Transferable
    Sparse Expert Models"), eq. 5: ``mean_tokens( logsumexp_j(logits_j) ^ 2 )``.

    Args:
        logits: N x E router logits (fp32), non-padding tokens only.
    Returns:
        a scalar; 0 when there are no tokens.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``-sum_j p_j log p_j`` of the router distribution (nats); N -> N."""
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1)


class RouterLosses:
    """The router statistics that only training and analysis read, computed on first access
    from the ``logits``, ``probs`` and ``expert_index`` of the class using it (``GateOutput``,
    ``MoERecord``), so that inference (a decoding step) pays for none of them."""

    logits: torch.Tensor  # N x E
    probs: torch.Tensor  # N x E
    expert_index: torch.Tensor  # N x k
    balance_type: str  # "switch" or "mse" (BALANCE_LOSSES)

    @cached_property
    def logits_finite(self) -> torch.Tensor:
        """Scalar bool: no logit is NaN or inf (checked by the criterion), counting the tokens
        whose non-finite logits the fallback expert replaced (eval mode: validation must still
        see a broken router)."""
        finite = torch.isfinite(self.logits.detach()).all()
        fallback = getattr(self, "fallback_tokens", None)
        if fallback is not None:
            finite = finite & (fallback == 0)
        return finite

    @cached_property
    def balance_loss(self) -> torch.Tensor:
        """Scalar, differentiable: Switch eq. 4-6 (``load_balance_loss``), or the MSE to uniform
        (``mse_balance_loss``) when ``balance_type`` is ``mse``."""
        if self.balance_type == "mse":
            return mse_balance_loss(self.probs)
        return load_balance_loss(self.probs, self.expert_index)

    @cached_property
    def z_loss(self) -> torch.Tensor:
        """Scalar, differentiable: ST-MoE eq. 5 (``router_z_loss``)."""
        return router_z_loss(self.logits)
