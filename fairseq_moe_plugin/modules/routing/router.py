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


def fallback_row(num_experts: int, fallback_expert: int, device=None) -> torch.Tensor:
    """1 x E fp32: the logits a token falls back to (0 for ``fallback_expert``,
    ``FALLBACK_OTHER_LOGIT`` elsewhere)."""
    row = torch.full((1, num_experts), FALLBACK_OTHER_LOGIT, device=device)
    row[0, fallback_expert] = 0.0
    return row


def fallback_nonfinite(
    logits: torch.Tensor, fallback_expert: int, row: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the logits of every token that has a NaN or inf logit by a one-hot choice of
    ``fallback_expert`` (0 there, ``FALLBACK_OTHER_LOGIT`` elsewhere).

    Args:
        logits: N x E router logits (fp32).
        row: ``fallback_row``'s 1 x E row when the caller keeps one (the gate does, so that a
            decoding step does not build it again); None builds it.
    Returns:
        the N x E logits, finite everywhere, and N x 1 bool: False for the tokens that fell back
        (``GateOutput.fallback_tokens`` counts them, when read). No host sync: the replacement
        is a ``where`` over all tokens.
    """
    if row is None:
        row = fallback_row(logits.shape[1], fallback_expert, logits.device)
    finite = torch.isfinite(logits).all(dim=-1, keepdim=True)  # N x 1
    return torch.where(finite, logits, row), finite


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, without dispatching a cast when it is already (one op less per call)."""
    return t if t.dtype == torch.float32 else t.float()


def router_logits(
    x: torch.Tensor,
    wg: nn.Linear,
    jitter_eps: float = 0.0,
    temperature: float = 1.0,
    fallback_expert: int = -1,
    training: bool = False,
    fallback_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fp32 router: ``softmax(wg(jitter(x)) / temperature)``.

    Args:
        x: N x C tokens (any dtype).
        wg: the d_model -> E linear (its weights are read in fp32).
        fallback_expert: in eval mode, the expert a token with non-finite logits goes to (-1:
            none); training never falls back: there a broken router must surface.
        fallback_logits: its ``fallback_row``, when the caller keeps one.
    Returns:
        logits N x E (divided by the temperature: the z-loss reads these), probs N x E, and the
        N x 1 mask of tokens that did not fall back (None when no fallback applies).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = _fp32(x)
        if training and jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - jitter_eps, 1.0 + jitter_eps)
        bias = None if wg.bias is None else _fp32(wg.bias)
        logits = F.linear(x, _fp32(wg.weight), bias)  # N x E
        if temperature != 1.0:
            logits = logits / temperature
        finite_rows = None
        if not training and fallback_expert >= 0:
            row = None if fallback_logits is None else _fp32(fallback_logits)
            logits, finite_rows = fallback_nonfinite(logits, fallback_expert, row)
        return logits, torch.softmax(logits, dim=-1), finite_rows
