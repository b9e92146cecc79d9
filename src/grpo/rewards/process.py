"""Step-level (process) rewards and length rewards, and mapping step ends to tokens.

- `step_accuracy`: a process reward for the arithmetic task. Every line of the completion
  that holds an equation "expression = number" is a reasoning step; it is rewarded 1.0
  when every equation on the line holds, else 0.0 (DeepSeekMath 4.1.3 process supervision).
- `overlong_penalty`: DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13).

Step positions are character offsets into the completion text (see grpo.rewards.base);
`step_token_index` turns them into token indices with the tokenizer.
"""

from __future__ import annotations

import math
import re

from grpo.rewards.base import register_reward
from grpo.rewards.builtin import to_number

# "12 + 5 = 17", "3*4=12", "(2 + 3) * 4 = 20": an arithmetic expression, "=", a number.
_EQUATION = re.compile(r"(-?[\d(][\d\s+\-*/×().,]*?)\s*=\s*(-?\d[\d,]*(?:\.\d+)?)")


def equation_steps(text: str, correct: float = 1.0, wrong: float = 0.0) -> list[tuple[int, float]]:
    """(end of line, reward) for each line of `text` that holds at least one equation."""
    steps, start = [], 0
    for line in text.split("\n"):
        found = [(to_number(lhs), to_number(rhs)) for lhs, rhs in _EQUATION.findall(line)]
        if found:
            ok = all(a is not None and b is not None and math.isclose(a, b, abs_tol=1e-9) for a, b in found)
            end = start + len(line.rstrip())
            steps.append((end, correct if ok else wrong))
        start += len(line) + 1
    return steps


@register_reward("step_accuracy")
def step_accuracy(completions, correct: float = 1.0, wrong: float = 0.0, **_) -> list[list[tuple[int, float]]]:
    """Process reward: one step per line holding an equation "a + b = c", rewarded `correct` (1.0) when
    every equation on it holds, else `wrong` (0.0). A completion without equations has no steps."""
    return [equation_steps(text, correct, wrong) for text in completions]


def soft_overlong(length: int, max_length: int, cache_length: int) -> float:
    """DAPO eq. 13: 0 up to max_length - cache_length tokens, then linear down to -1 at max_length, -1 beyond."""
    free = max_length - cache_length
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache_length
    return -1.0


@register_reward("overlong_penalty")
def overlong_penalty(
    completions,
    completion_lengths: list[int] | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    cache_length: int = 16,
    **_,
) -> list[float | None]:
    """DAPO's soft overlong penalty (arXiv 2503.14476): 0 for completions up to max_length - cache_length
    tokens, falling linearly to -1 at max_length. max_length defaults to sampling.max_new_tokens. It reads
    the token lengths the trainer passes as `completion_lengths`; without them (e.g. in eval) it is None."""
    limit = max_length or max_new_tokens
    if completion_lengths is None or limit is None:
        return [None] * len(completions)
    if not 0 < cache_length <= limit:
        raise ValueError(f"overlong_penalty: cache_length ({cache_length}) must be in (0, max_length={limit}]")
    return [soft_overlong(int(n), limit, cache_length) for n in completion_lengths]


def step_token_index(token_ids: list[int], tokenizer, ends: list[int]) -> list[int]:
    """Index of the token holding character end - 1 of the decoded completion, for each step end.

    The completion text is `tokenizer.decode(token_ids, skip_special_tokens=True)`; the token of a
    character offset is the first k whose decoded prefix token_ids[:k + 1] reaches it (binary search:
    O(log T) decodes per step). Offsets past the text land on the last token.
    """
    if not token_ids:
        return [0 for _ in ends]
    cache: dict[int, int] = {}

    def prefix_len(k: int) -> int:  # characters decoded from the first k + 1 tokens
        if k not in cache:
            cache[k] = len(tokenizer.decode(token_ids[: k + 1], skip_special_tokens=True))
        return cache[k]

    out = []
    for end in ends:
        lo, hi = 0, len(token_ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix_len(mid) >= end:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out
