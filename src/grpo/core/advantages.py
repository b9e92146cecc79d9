"""Advantages from rewards (docs/algorithm.md section 2). Pure tensor functions, no I/O.

Rows are grouped prompt-major: row n = b * G + g is sample g of prompt b.

Rewards and advantages are a few numbers per step, so they are computed in float64, and a group whose
rewards are all equal gets advantage exactly 0 (the same test `zero_std_groups` reports), whatever the
values: the mean of G equal floats need not equal them, and dividing that rounding error by a std of
the same size would give every member one large advantage.
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
    batch_std: torch.Tensor | None = None,  # [] for scale "batch": the global batch's (None: of `rewards`)
) -> torch.Tensor:  # [N] float64
    """A_i = (r_i - mean(group)) / (std + eps), the same for every token of completion i.

    scale="group" divides by the group's std (DeepSeekMath eq. 4.1.2), "batch" by the
    std of the whole batch, "none" not at all: A_i = r_i - mean, exactly (Dr. GRPO, Liu
    et al. 2025, arXiv 2503.20783). A NaN reward is left out of its group's mean and std
    and gets advantage 0 (docs/algorithm.md section 4); so does every member of a zero-std group.
    When `rewards` is one rank's part of the batch, "batch" needs `batch_std`: the
    `values_std` of every valid reward of every rank.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale!r}; valid: {sorted(SCALE_REWARDS)}")
    r = group_view(rewards, group_size).double()  # [B, G]
    valid = ~torch.isnan(r)
    mean, std = masked_group_mean_std(r, valid)
    signal = valid & ~_constant_groups(r, valid)[:, None]  # [B, G]: zero-std groups carry none
    centered = torch.where(signal, r - mean, torch.zeros_like(r))  # [B, G]
    denom = SCALE_REWARDS[scale](r[valid], std, batch_std)
    return (centered if denom is None else centered / (denom + eps)).reshape(-1)


def values_std(values: torch.Tensor) -> torch.Tensor:  # [M] -> [] float64
    """Sample std of every value of the batch (0 for fewer than two), of the sorted values: the same number
    whatever their order, so whichever rank holds which group (scale_rewards "batch")."""
    v = values.double().sort().values
    return v.std() if v.numel() > 1 else torch.zeros((), dtype=torch.float64)


def _batch_std(values: torch.Tensor, group_std: torch.Tensor, batch_std: torch.Tensor | None) -> torch.Tensor:
    return values_std(values) if batch_std is None else batch_std.double()


# scale_rewards -> the divisor of the centred rewards (None: no division), from the batch's valid values [M],
# the group std of each, and the whole global batch's std when the caller holds only a part of it
SCALE_REWARDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]] = {
    "group": lambda values, group_std, batch_std: group_std,
    "batch": _batch_std,
    "none": lambda values, group_std, batch_std: None,
}


def _constant_groups(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # [B, G] -> [B] bool
    """Groups whose valid values are all equal (or that have fewer than two)."""
    hi = torch.where(valid, r, torch.full_like(r, -float("inf"))).amax(dim=1)
    lo = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(dim=1)
    return (hi - lo <= 0) | (valid.sum(dim=1) < 2)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [N] -> [B] bool
    """Groups whose valid rewards are all equal: they carry no policy gradient (their advantages are 0)."""
    r = group_view(rewards, group_size)
    return _constant_groups(r, ~torch.isnan(r))


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
    batch_std: torch.Tensor | None = None,  # [] for scale "batch": every step's of the global batch (None: these)
) -> torch.Tensor:  # [N, T]
    """Process supervision (DeepSeekMath 4.1.3): A_{i,t} = sum of normalized step rewards of
    completion i whose step ends at or after token t.

    All step rewards of a group share one mean and std (sample std, as for outcomes); scale
    "batch" divides by the std of every step of the batch, "none" only centers (exactly). A group
    whose step rewards are all equal, a completion without steps, and tokens after a completion's
    last step get advantage 0. Computed in float64, returned in float64.
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
    hi = torch.full((num_groups,), -float("inf"), dtype=r.dtype).scatter_reduce_(0, group, r, "amax")
    lo = torch.full((num_groups,), float("inf"), dtype=r.dtype).scatter_reduce_(0, group, r, "amin")
    constant = (hi - lo <= 0) | (count < 2)  # [B]: no signal, advantage exactly 0
    centered = torch.where(constant[group], torch.zeros_like(r), r - mean[group])  # [S]
    sq = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, group, (r - mean[group]) ** 2)
    group_std = (sq / (count - 1).clamp(min=1)).sqrt()  # [B]; 0 for groups with < 2 steps
    denom = SCALE_REWARDS[scale](r, group_std[group], batch_std)  # [S], [] or None
    normalized = centered if denom is None else centered / (denom + eps)  # [S]
    dense = torch.zeros(num_rows * num_tokens, dtype=r.dtype)
    dense.index_add_(0, step_rows * num_tokens + step_index, normalized)  # steps ending on one token add up
    dense = dense.view(num_rows, num_tokens)  # [N, T]
    return dense.flip(1).cumsum(1).flip(1)  # sum over steps ending at or after t
