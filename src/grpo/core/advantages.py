"""Advantages from rewards (SPEC.md section 2). Pure tensor functions, no I/O.

Rows are grouped prompt-major: row n = b * G + g is sample g of prompt b.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [B, G], refusing a batch that is not made of whole groups."""
    if x.dim() != 1 or x.numel() % group_size != 0:
        raise ValueError(f"expected [B*G] values with G={group_size}, got shape {tuple(x.shape)}")
    return x.view(-1, group_size)


def masked_group_mean_std(
    rewards: torch.Tensor,  # [B, G]
    valid: torch.Tensor,  # [B, G] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample standard deviation (Bessel-corrected, as TRL) over the valid members of each group.

    Returns [B, 1] each. A group with fewer than two valid members has std 0.
    """
    count = valid.sum(dim=1, keepdim=True)  # [B, 1]
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = r.sum(dim=1, keepdim=True) / count.clamp(min=1)
    sq = torch.where(valid, (rewards - mean) ** 2, torch.zeros_like(rewards)).sum(dim=1, keepdim=True)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean, std


def outcome_advantages(
    rewards: torch.Tensor,  # [N] float; NaN marks a completion every reward function skipped (None)
    group_size: int,
    scale: ScaleRewards = "group",
    eps: float = 1e-4,
) -> torch.Tensor:  # [N]
    """A_i = (r_i - mean(group)) / (std + eps), the same for every token of completion i.

    scale="group" divides by the group's std (DeepSeekMath eq. 4.1.2), "batch" by the
    std of the whole batch, "none" not at all (Dr. GRPO, Liu et al. 2025, arXiv
    2503.20783). A NaN reward is left out of its group's mean and std and gets
    advantage 0 (SPEC.md section 4).
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale!r}; valid: {sorted(SCALE_REWARDS)}")
    r = group_view(rewards, group_size)  # [B, G]
    valid = ~torch.isnan(r)
    mean, std = masked_group_mean_std(r, valid)
    centered = torch.where(valid, r - mean, torch.zeros_like(r))  # [B, G]
    denom = SCALE_REWARDS[scale](r, valid, std)
    return (centered / (denom + eps)).reshape(-1)


def _batch_std(r: torch.Tensor, valid: torch.Tensor, group_std: torch.Tensor) -> torch.Tensor:
    flat = r[valid]
    return flat.std() if flat.numel() > 1 else torch.zeros((), dtype=r.dtype)


SCALE_REWARDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "group": lambda r, valid, group_std: group_std,
    "batch": _batch_std,
    "none": lambda r, valid, group_std: torch.ones_like(group_std),
}


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [N] -> [B] bool
    """Groups whose valid rewards are all equal: they carry no policy gradient."""
    r = group_view(rewards, group_size)
    valid = ~torch.isnan(r)
    hi = torch.where(valid, r, torch.full_like(r, -float("inf"))).amax(dim=1)
    lo = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(dim=1)
    return (hi - lo <= 0) | (valid.sum(dim=1) < 2)


AdvantageKind = Literal["outcome", "process"]


def process_advantages(
    step_rewards: torch.Tensor,  # [S] float: one reward per step, all completions of the batch
    step_rows: torch.Tensor,  # [S] long: completion (row n) of each step
    step_index: torch.Tensor,  # [S] long: token index in [0, T) where each step ends
    num_tokens: int,  # T
    group_size: int,  # G; rows n = b * G + g
    num_rows: int,  # N
    scale: ScaleRewards = "group",
    eps: float = 1e-4,
) -> torch.Tensor:  # [N, T]
    """Process supervision (DeepSeekMath 4.1.3): A_{i,t} = sum of normalized step rewards of
    completion i whose step ends at or after token t.

    All step rewards of a group share one mean and std (sample std, as for outcomes); scale
    "batch" divides by the std of every step of the batch, "none" only centers. A completion
    without steps, and tokens after a completion's last step, get advantage 0.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale!r}; valid: {sorted(SCALE_REWARDS)}")
    if num_rows % group_size != 0:
        raise ValueError(f"expected [B*G] rows with G={group_size}, got {num_rows}")
    num_groups = num_rows // group_size
    r = step_rewards.double()
    group = step_rows // group_size  # [S]
    count = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, group, torch.ones_like(r))  # [B]
    mean = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, group, r) / count.clamp(min=1)  # [B]
    centered = r - mean[group]  # [S]
    sq = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, group, centered**2)
    group_std = (sq / (count - 1).clamp(min=1)).sqrt()  # [B]; 0 for groups with < 2 steps
    denom = SCALE_REWARDS[scale](r, torch.ones_like(r, dtype=torch.bool), group_std[group])  # [S] or []
    normalized = centered / (denom + eps)  # [S]
    dense = torch.zeros(num_rows * num_tokens, dtype=r.dtype)
    dense.index_add_(0, step_rows * num_tokens + step_index, normalized)  # steps ending on one token add up
    dense = dense.view(num_rows, num_tokens)  # [N, T]
    return dense.flip(1).cumsum(1).flip(1).to(step_rewards.dtype)  # sum over steps ending at or after t
