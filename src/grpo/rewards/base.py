"""The reward-function contract, the registry, and scoring a batch.

A reward function takes the prompts and completions of a batch (lists of the
same length N, prompt texts repeated G times) and the dataset's columns as
keyword arguments by name, and returns one float or None per completion. None
means "does not apply": it is left out of that completion's weighted sum and
of the metrics, not counted as zero (SPEC.md section 4).

Process rewards (SPEC.md section 2): instead of a float, a completion's value may
be a list of (end, reward) pairs, one per reasoning step, where `end` is a
character offset into the completion text: the step is `completion[:end]` and
its reward lands on the token holding character `end - 1`. Such a completion's
scalar value (its weighted-sum share, metrics, outcome advantages) is the mean
of its step rewards, or None when it has no steps. The trainer also passes
`completion_lengths` (token counts, EOS included) and `max_new_tokens`.

    @register_reward("my_reward")
    def my_reward(prompts, completions, answer, **kwargs) -> list[float | None]: ...
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

RewardFn = Callable[..., Sequence[float | None]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: {sorted(REWARDS)}")
    return REWARDS[name]


def required_columns(fn: RewardFn, fixed_args: dict | None = None) -> list[str]:
    """Dataset columns a reward needs: its parameters without a default, beyond prompts/completions."""
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
            continue
        if p.name not in ("prompts", "completions") and p.name not in (fixed_args or {}):
            names.append(p.name)
    return names


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not one number or None per completion."""


Steps = list[tuple[int, float]]  # (character end offset in the completion, reward) per step


@dataclass
class RewardResult:
    per_function: dict[str, torch.Tensor]  # name -> [N] float, NaN where the function returned None
    total: torch.Tensor  # [N] weighted sum of the non-None rewards; NaN where all were None
    # name -> N step lists (None where the function gave a scalar or None), for the functions
    # that returned step rewards for at least one completion
    steps: dict[str, list[Steps | None]] = field(default_factory=dict)


def _as_steps(v) -> Steps | None:
    """A list of (end, reward) pairs as ints and floats, or None when v is not one."""
    if not isinstance(v, (list, tuple)):
        return None
    try:
        return [(int(end), float(r)) for end, r in v]
    except (TypeError, ValueError):
        return None


def _check_values(name: str, values, n: int, prompts, completions) -> tuple[list[float], list[Steps | None]]:
    """Scalar value per completion (NaN for None, step mean for step lists) and the step lists."""
    if not isinstance(values, Sequence) or len(values) != n:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise RewardError(f"reward {name!r} must return a list of {n} values (one per completion), got {got}")
    out: list[float] = []
    steps: list[Steps | None] = []
    for i, v in enumerate(values):
        step_list = _as_steps(v)
        steps.append(step_list)
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (bool, int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            out.append(float(v))
        elif step_list is not None:
            out.append(sum(r for _, r in step_list) / len(step_list) if step_list else math.nan)
        else:
            raise RewardError(
                f"reward {name!r} returned {v!r} ({type(v).__name__}) for completion {i}; expected a number, None "
                f"or a list of (end offset, reward) steps\n  prompt: {prompts[i]!r}\n  completion: {completions[i]!r}"
            )
    return out, steps


def score(
    specs: list[tuple[str, RewardFn, float, dict]],  # (name, function, weight, fixed kwargs)
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
) -> RewardResult:
    """Run every reward function on the batch and combine them with their weights."""
    n = len(completions)
    per_function: dict[str, torch.Tensor] = {}
    steps: dict[str, list[Steps | None]] = {}
    total = torch.zeros(n, dtype=torch.float64)
    any_applies = torch.zeros(n, dtype=torch.bool)
    for name, fn, weight, fixed in specs:
        try:
            values = fn(prompts=prompts, completions=completions, **columns, **fixed)
        except Exception as e:
            raise RewardError(
                f"reward {name!r} raised {type(e).__name__}: {e}\n"
                f"  first prompt of the batch: {prompts[0]!r}\n  first completion: {completions[0]!r}"
            ) from e
        scalars, step_lists = _check_values(name, values, n, prompts, completions)
        r = torch.tensor(scalars, dtype=torch.float64)
        per_function[name] = r.float()
        if any(s is not None for s in step_lists):
            steps[name] = step_lists
        applies = ~torch.isnan(r)
        total = total + torch.where(applies, weight * r, torch.zeros_like(r))
        any_applies |= applies
    total = torch.where(any_applies, total, torch.full_like(total, math.nan))
    return RewardResult(per_function=per_function, total=total.float(), steps=steps)
