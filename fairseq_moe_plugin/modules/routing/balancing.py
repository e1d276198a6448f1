"""Training state the gate keeps beside its router: the auxiliary-loss-free selection bias
(``BiasBalancing``) and the EMA of the expert load shares (``UsageEMA``).

Each component owns its buffers: it creates them, updates them and says what a loaded value
means. The buffers are registered on the host module (the gate) under the names existing
checkpoints use (``balance_bias``, ``balance_load``, ``usage_ema``), so checkpoints load as they
did; the component reads them from the host at each call, so moving the host to a device or
dtype moves them too.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def bias_balancing_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free load balancing: Wang et al. 2024 ("Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts"), Algorithm 1, as DeepSeek-V3 (2024, sec. 2.1.2,
    eq. 16) uses it: after each update, ``b_i <- b_i + u * sign(e_i)`` with
    ``e_i = mean_j(c_j) - c_i``, ``c_i`` the tokens assigned to expert i over the update. An
    overloaded expert's bias goes down by u, an underloaded one's up by u; one at the mean
    stays. The bias enters the top-k selection only, never the combine weights.

    Args:
        bias: E, the current biases.
        load: E, the loads of the update (counts, summed over its batches and workers).
        rate: u.
    Returns:
        the new E biases (``bias`` unchanged where the update saw no token at all).
    """
    step = rate * torch.sign(load.mean() - load).to(bias.dtype)
    return torch.where(load.sum() > 0, bias + step, bias)


def _all_reduced(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over all workers when torch.distributed runs several."""
    tensor = tensor.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(tensor)
    return tensor


class BiasBalancing:
    """The selection bias of aux-loss-free balancing (``bias_balancing_step``) and the loads it
    is computed from.

    Buffers on the host: ``balance_bias`` (E, added to the logits for the top-k selection) and
    ``balance_load`` (E, the loads accumulated since the last step). The loads of an update are
    added with ``accumulate`` (the MoE criteria do it after each training forward, so that a
    recomputed forward cannot count a batch twice) and applied when fairseq starts the next
    update (``set_num_updates``), summed over all workers first.
    """

    def __init__(self, host: nn.Module, num_experts: int, rate: float):
        self.host, self.rate = host, rate
        host.register_buffer("balance_bias", torch.zeros(num_experts))
        host.register_buffer("balance_load", torch.zeros(num_experts))
        self.seen_update: int | None = None  # the update whose loads balance_load holds

    @property
    def bias(self) -> torch.Tensor:
        return self.host.balance_bias

    def set_num_updates(self, num_updates: int) -> None:
        """Apply the previous update's loads when the count moves on."""
        if num_updates != self.seen_update:
            if self.seen_update is not None or bool(self.host.balance_load.any()):
                self.step()
            self.seen_update = num_updates

    def loaded(self) -> None:
        """A loaded ``balance_load`` holds the loads of the update the checkpoint was saved
        after, whose bias step is still due: the next ``set_num_updates`` applies it."""
        self.seen_update = None

    @torch.no_grad()
    def accumulate(self, load: torch.Tensor) -> None:
        """Add one training batch's E expert loads (before capacity) to ``balance_load``."""
        self.host.balance_load.add_(load.to(self.host.balance_load.dtype))

    @torch.no_grad()
    def step(self) -> None:
        """One bias step from the loads accumulated since the last one (summed over all workers:
        every worker calls this at the same update), then start accumulating afresh. No host
        sync."""
        load = _all_reduced(self.host.balance_load)
        self.host.balance_bias.copy_(bias_balancing_step(self.host.balance_bias, load, self.rate))
        self.host.balance_load.zero_()


class UsageEMA:
    """An exponential moving average of each expert's load share, in the host's buffer
    ``usage_ema`` (E, starting uniform, saved in checkpoints)."""

    def __init__(self, host: nn.Module, num_experts: int, decay: float):
        self.host, self.decay = host, decay
        host.register_buffer("usage_ema", torch.full((num_experts,), 1.0 / num_experts))

    @torch.no_grad()
    def update(self, load: torch.Tensor) -> None:
        """``ema = decay * ema + (1 - decay) * load / sum(load)``; load: E expert loads (counts
        or probability mass) of one batch. A batch without tokens changes nothing."""
        ema = self.host.usage_ema
        load = load.to(ema.dtype)
        total = load.sum()
        share = load / total.clamp_min(1e-12)
        updated = ema * self.decay + share * (1.0 - self.decay)
        # No host read of the total (a sync per layer and batch on GPU): keep the EMA on device.
        ema.copy_(torch.where(total > 0, updated, ema))
