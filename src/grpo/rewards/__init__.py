"""Reward functions: the contract and registry (base), the built-ins, and the code sandbox."""

from grpo.rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from grpo.rewards import process as _process  # noqa: F401  (step_accuracy, overlong_penalty: process and length rewards)
from grpo.rewards.base import (
    REWARDS,
    Reward,
    RewardError,
    RewardLoadError,
    RewardResult,
    build_rewards,
    check_args,
    default_label,
    get_reward,
    is_per_completion,
    register_reward,
    required_columns,
    reward_columns,
    score,
)

__all__ = [
    "REWARDS", "Reward", "RewardError", "RewardLoadError", "RewardResult", "build_rewards", "check_args",
    "default_label", "get_reward", "is_per_completion", "register_reward", "required_columns", "reward_columns", "score",
]
