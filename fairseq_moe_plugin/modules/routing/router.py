"""The router proper: token -> fp32 logits and probabilities, before any routing method chooses.

``Router`` is a linear d_model -> E computed in fp32 whatever the autocast dtype (as HF Mixtral
and Switch do), with the two input/output transforms the gate options ask for: multiplicative
jitter in training (Switch Transformer, Fedus et al. 2021, sec. 2.4) and a softmax temperature.
In eval mode a token whose logits are not finite goes to a fallback expert
(``fallback_nonfinite``), so that one bad token cannot poison its batch.

Tokens are flattened: ``N`` non-padding tokens, ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# The logit the other experts get for a token that falls back: exp(-1e4) is 0 in fp32, so the
# fallback expert's probability is exactly 1 and every other expert's exactly 0.
FALLBACK_OTHER_LOGIT = -1.0e4


def fallback_nonfinite(
    logits: torch.Tensor, fallback_expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the logits of every token that has a NaN or inf logit by a one-hot choice of
    ``fallback_expert`` (0 there, ``FALLBACK_OTHER_LOGIT`` elsewhere).

    Args:
        logits: N x E router logits (fp32).
    Returns:
        the N x E logits, finite everywhere, and a 0-dim long tensor: how many tokens fell back.
        No host sync: the replacement is a ``where`` over all tokens.
    """
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)  # N x 1
    onehot = torch.full_like(logits[:1], FALLBACK_OTHER_LOGIT)  # 1 x E
    onehot[0, fallback_expert] = 0.0
    return torch.where(bad, onehot, logits), bad.sum()


def router_logits(
    x: torch.Tensor,
    wg: nn.Linear,
    jitter_eps: float = 0.0,
    temperature: float = 1.0,
    fallback_expert: int = -1,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fp32 router: ``softmax(wg(jitter(x)) / temperature)``.

    Args:
        x: N x C tokens (any dtype).
        wg: the d_model -> E linear (its weights are read in fp32).
        fallback_expert: in eval mode, the expert a token with non-finite logits goes to (-1:
            none); training never falls back: there a broken router must surface.
    Returns:
        logits N x E (divided by the temperature: the z-loss reads these), probs N x E, and the
        0-dim count of tokens that fell back (None when no fallback applies).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        if training and jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - jitter_eps, 1.0 + jitter_eps)
        bias = None if wg.bias is None else wg.bias.float()
        logits = F.linear(x, wg.weight.float(), bias)  # N x E
        if temperature != 1.0:
            logits = logits / temperature
        fallback_tokens = None
        if not training and fallback_expert >= 0:
            logits, fallback_tokens = fallback_nonfinite(logits, fallback_expert)
        return logits, torch.softmax(logits, dim=-1), fallback_tokens
