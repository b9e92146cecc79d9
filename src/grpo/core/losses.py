"""The GRPO objective (docs/algorithm.md section 3): per-token terms, then their aggregation.

The per-token loss is kept apart from how it is reduced to one number, as in
verl's core_algos. Aggregations are written so that a micro-batch's share uses
normalizers of the whole batch (`BatchTotals`): summing the shares of any
micro-batch split gives the same loss and gradient, for every loss type. Rows
with no loss token (truncated rows under the overlong filter) still count in N:
leaving them out must not change the other rows' weight (docs/algorithm.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

LossType = Literal["grpo", "dapo", "token", "dr_grpo", "bnpo"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:  # [N, T] -> [N, T]
    """k1 = log(pi_theta / pi_ref): unbiased for KL(pi_theta || pi_ref) on samples of pi_theta, can be < 0."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:  # [N, T] -> [N, T]
    """k2 = (log(pi_theta / pi_ref))^2 / 2: biased, >= 0, low variance (Schulman 2020, "Approximating KL")."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:  # [N, T] -> [N, T]
    """KL(pi_theta || pi_ref) per token, Schulman's k3 estimator: r - log r - 1 with r = pi_ref / pi_theta.

    Unbiased and >= 0 (DeepSeekMath eq. 4).
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,  # DeepSeekMath's choice
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token KL estimate [N, T] by the named estimator."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


# -- importance ratio ------------------------------------------------------------------------------


def token_log_ratio(logprobs, old_logprobs, mask):  # [N, T] -> [N, T]
    """PPO / GRPO: log pi_theta(o_t) - log pi_old(o_t), one ratio per token."""
    return logprobs - old_logprobs


def sequence_log_ratio(logprobs, old_logprobs, mask):  # [N, T] -> [N, T]
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): log s_i = mean over the completion's tokens of
    (log pi_theta - log pi_old), the same for every token of o_i. A fully masked row gets 0 (s_i = 1)."""
    m = mask.to(logprobs.dtype)
    mean = ((logprobs - old_logprobs) * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)
    return mean.expand_as(logprobs)  # [N, T]


ImportanceLevel = Literal["token", "sequence"]
IMPORTANCE_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


@dataclass
class SurrogateOut:
    objective: torch.Tensor  # [N, T] min(ratio * A, clip(ratio) * A), to maximize
    ratio: torch.Tensor  # [N, T]
    clipped_low: torch.Tensor  # [N, T] bool: ratio < 1 - eps_low with A < 0 (the clip is active)
    clipped_high: torch.Tensor  # [N, T] bool: ratio > 1 + eps_high with A > 0
    clipped_dual: torch.Tensor  # [N, T] bool: A < 0 and ratio * A < delta * A (the dual clip is active)


def clipped_surrogate(
    logprobs: torch.Tensor,  # [N, T] pi_theta, with grad
    old_logprobs: torch.Tensor,  # [N, T] pi_old, no grad
    advantages: torch.Tensor,  # [N] or [N, T]
    eps_low: float,
    eps_high: float,
    mask: torch.Tensor | None = None,  # [N, T] completion mask; needed by level "sequence"
    level: ImportanceLevel = "token",
    delta: float | None = None,
) -> SurrogateOut:
    """PPO's clipped surrogate with asymmetric bounds (clip-higher: DAPO, Yu et al. 2025, arXiv 2503.14476).

    level "sequence" uses GSPO's sequence ratio s_i for every token of o_i, so the clip acts per
    sequence. delta > 1 adds dual-clip (Ye et al. 2020, arXiv 1912.09729): for A < 0 the objective is
    at least delta * A, so a huge ratio cannot make the loss unbounded.
    """
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {sorted(IMPORTANCE_LEVELS)}")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, T]
    mask = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask
    ratio = torch.exp(IMPORTANCE_LEVELS[level](logprobs, old_logprobs, mask))  # [N, T]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    dual = torch.zeros_like(objective, dtype=torch.bool)
    if delta is not None:
        floor = delta * adv
        dual = (adv < 0) & (objective < floor)
        objective = torch.where(adv < 0, torch.maximum(objective, floor), objective)
    return SurrogateOut(
        objective=objective,
        ratio=ratio,
        clipped_low=(ratio < 1.0 - eps_low) & (adv < 0),
        clipped_high=(ratio > 1.0 + eps_high) & (adv > 0),
        clipped_dual=dual,
    )


def truncated_importance_weights(
    old_logprobs: torch.Tensor,  # [N, T] pi_old (the trainer's log-probs of the policy that sampled), no grad
    sampling_logprobs: torch.Tensor,  # [N, T] the sampler's own log-probs of the same tokens (0 at padding)
    cap: float,
) -> torch.Tensor:  # [N, T] weights in (0, cap], no grad
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; TRL's `vllm_importance_sampling_correction`): min(pi_old / pi_sampler, cap) per
    token. The sampler (vLLM, a bfloat16 copy) computes its log-probs with other kernels than the trainer, so
    the batch is slightly off-policy; this weight on the policy term corrects for it, the cap bounds the
    variance. Padding (0 and 0) gets weight 1."""
    return torch.exp(old_logprobs.detach() - sampling_logprobs.detach()).clamp(max=cap)


def per_token_loss(
    surrogate: torch.Tensor,  # [N, T]
    kl: torch.Tensor | None,  # [N, T] or None when beta == 0
    beta: float,
    entropy: torch.Tensor | None = None,  # [N, T] with grad, or None when entropy_coef == 0
    entropy_coef: float = 0.0,
    policy_weights: torch.Tensor | None = None,  # [N, T] no grad, e.g. truncated_importance_weights; None: 1
) -> torch.Tensor:  # [N, T]
    """The negative of the per-token objective: -(w * surrogate - beta * kl + entropy_coef * entropy), where w
    weights the policy term only (truncated importance sampling; the KL and entropy terms are not weighted)."""
    policy = surrogate if policy_weights is None else surrogate * policy_weights
    objective = policy if kl is None or beta == 0 else policy - beta * kl
    if entropy is not None and entropy_coef != 0:
        objective = objective + entropy_coef * entropy
    return -objective


@dataclass(frozen=True)
class BatchTotals:
    """Sizes of the whole global batch (all micro-batches, all processes) that normalizers use."""

    num_completions: int  # N: every completion of the global batch, with or without a loss token
    num_tokens: int  # loss tokens of the global batch
    max_completion_length: int  # the configured limit, for dr_grpo
    process_tokens: int | None = None  # loss tokens of this process's batch, for bnpo (None: num_tokens)
    num_processes: int = 1  # W, for bnpo: its global loss is the mean over processes of each one's own

    @classmethod
    def of(cls, loss_mask: torch.Tensor, max_completion_length: int) -> "BatchTotals":
        """The totals of one process's whole batch, [N, T] loss mask (a single process: the global batch)."""
        tokens = int(loss_mask.sum())
        return cls(loss_mask.shape[0], tokens, max_completion_length, tokens)


def _grpo(loss, mask, totals):  # mean over completions of each completion's token mean
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [n]
    return per_seq.sum() / max(totals.num_completions, 1)


def _token(loss, mask, totals):  # all tokens of the global batch weigh the same
    return (loss * mask).sum() / max(totals.num_tokens, 1)


def _dr_grpo(loss, mask, totals):  # a constant normalizer: no length bias at all
    return (loss * mask).sum() / (max(totals.num_completions, 1) * totals.max_completion_length)


def _bnpo(loss, mask, totals):  # tokens of this process's batch (TRL's per-device batch), never a micro-batch's
    """The global loss is (1/W) * sum over processes p of (sum of p's loss tokens / p's loss tokens): each process's
    own token mean, averaged over the W processes, as TRL's per-device loss under DDP's gradient averaging. A share
    is a micro-batch's part of it."""
    tokens = totals.num_tokens if totals.process_tokens is None else totals.process_tokens
    return (loss * mask).sum() / (max(tokens, 1) * totals.num_processes)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, BatchTotals], torch.Tensor]] = {
    "grpo": _grpo,  # DeepSeekMath eq. 3; long wrong answers are penalized less per token
    "dapo": _token,  # DAPO token-level loss (arXiv 2503.14476)
    "token": _token,
    "dr_grpo": _dr_grpo,  # Dr. GRPO (arXiv 2503.20783)
    "bnpo": _bnpo,  # the mean over processes of each one's token mean (= dapo in one process)
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
