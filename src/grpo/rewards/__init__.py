"""Reward functions: the contract and registry (base) and the built-ins."""

from grpo.rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from grpo.rewards import process as _process  # noqa: F401  (step_accuracy, overlong_penalty)
from grpo.rewards.base import REWARDS, RewardError, RewardResult, get_reward, register_reward, required_columns, score

__all__ = ["REWARDS", "RewardError", "RewardResult", "get_reward", "register_reward", "required_columns", "score"]
