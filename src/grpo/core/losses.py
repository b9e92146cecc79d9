"""The GRPO objective (SPEC.md section 3): per-token terms, then their aggregation.

The per-token loss is kept apart from how it is reduced to one number, as in
verl's core_algos. Aggregations are written so that a micro-batch's share uses
normalizers of the whole global batch: summing the shares of any split gives
the same loss and gradient (except "bnpo", which is defined per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

LossType = Literal["grpo", "dapo", "token", "dr_grpo", "bnpo"]


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:  # [N, T] -> [N, T]
    """KL(pi_theta || pi_ref) per token, Schulman's k3 estimator: r - log r - 1 with r = pi_ref / pi_theta.

    Unbiased and >= 0 (DeepSeekMath eq. 4).
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


@dataclass
class SurrogateOut:
    objective: torch.Tensor  # [N, T] min(ratio * A, clip(ratio) * A), to maximize
    ratio: torch.Tensor  # [N, T]
    clipped_low: torch.Tensor  # [N, T] bool: ratio < 1 - eps_low with A < 0 (the clip is active)
    clipped_high: torch.Tensor  # [N, T] bool: ratio > 1 + eps_high with A > 0


def clipped_surrogate(
    logprobs: torch.Tensor,  # [N, T] pi_theta, with grad
    old_logprobs: torch.Tensor,  # [N, T] pi_old, no grad
    advantages: torch.Tensor,  # [N] or [N, T]
    eps_low: float,
    eps_high: float,
) -> SurrogateOut:
    """PPO's clipped surrogate with asymmetric bounds (clip-higher: DAPO, Yu et al. 2025, arXiv 2503.14476)."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, T]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    return SurrogateOut(
        objective=objective,
        ratio=ratio,
        clipped_low=(ratio < 1.0 - eps_low) & (adv < 0),
        clipped_high=(ratio > 1.0 + eps_high) & (adv > 0),
    )


def per_token_loss(
    surrogate: torch.Tensor,  # [N, T]
    kl: torch.Tensor | None,  # [N, T] or None when beta == 0
    beta: float,
) -> torch.Tensor:  # [N, T]
    """The negative of the per-token objective: -(surrogate - beta * kl)."""
    objective = surrogate if kl is None or beta == 0 else surrogate - beta * kl
    return -objective


@dataclass(frozen=True)
class BatchTotals:
    """Sizes of the whole global batch (all micro-batches, all processes) that normalizers use."""

    num_completions: int  # N
    num_tokens: int  # sum of the completion mask
    max_completion_length: int  # the configured limit, for dr_grpo


def _grpo(loss, mask, totals):  # mean over completions of each completion's token mean
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [n]
    return per_seq.sum() / totals.num_completions


def _token(loss, mask, totals):  # all tokens of the global batch weigh the same
    return (loss * mask).sum() / max(totals.num_tokens, 1)


def _dr_grpo(loss, mask, totals):  # a constant normalizer: no length bias at all
    return (loss * mask).sum() / (totals.num_completions * totals.max_completion_length)


def _bnpo(loss, mask, totals):  # tokens of this micro-batch only
    return (loss * mask).sum() / mask.sum().clamp(min=1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, BatchTotals], torch.Tensor]] = {
    "grpo": _grpo,  # DeepSeekMath eq. 3; long wrong answers are penalized less per token
    "dapo": _token,  # DAPO token-level loss (arXiv 2503.14476)
    "token": _token,
    "dr_grpo": _dr_grpo,  # Dr. GRPO (arXiv 2503.20783)
    "bnpo": _bnpo,  # normalized by the micro-batch's tokens (depends on the split by definition)
}


def aggregate(
    loss: torch.Tensor,  # [n, T] per-token loss of one micro-batch
    mask: torch.Tensor,  # [n, T] completion mask
    loss_type: LossType,
    totals: BatchTotals,
) -> torch.Tensor:  # scalar: this micro-batch's share of the global loss
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[loss_type](loss, mask.to(loss.dtype), totals)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True positions of mask (0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)
