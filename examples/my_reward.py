"""A custom reward in its own file: no grpo import needed, just a function.

Use it from the config or the command line by path and name:

    rewards: [{name: examples/my_reward.py:close_number}]

Contract (grpo.rewards.base): dataset columns arrive as keyword arguments by name (`answer`
here); a function with a `completion` parameter scores one completion per call (grpo runs
them in parallel threads); return a float, or None when the reward does not apply.
"""

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def close_number(completion: str, answer: str) -> float | None:
    """Partial credit for arithmetic: 1.0 for the exact answer as the reply's first number,
    falling to 0.0 as it gets further away (relative error of 100% or more). None when the row
    has no numeric answer; 0.0 when the reply has no number."""
    try:
        target = float(answer)
    except (TypeError, ValueError):
        return None
    found = NUMBER.search(completion)
    if not found:
        return 0.0
    error = abs(float(found.group()) - target) / max(1.0, abs(target))
    return max(0.0, 1.0 - error)
