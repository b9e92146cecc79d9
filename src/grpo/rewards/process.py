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

import torch

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
    max_new_tokens: list[int] | None = None,
    max_length: int | None = None,
    cache_length: int = 16,
    **_,
) -> list[float | None]:
    """DAPO's soft overlong penalty (arXiv 2503.14476): 0 for completions up to max_length - cache_length
    tokens, falling linearly to -1 at max_length. max_length defaults to sampling.max_new_tokens. It reads
    the token lengths the trainer passes as the columns `completion_lengths` and `max_new_tokens` (one
    value per completion); without them (e.g. in eval) it does not apply (None)."""
    if completion_lengths is None or (max_length is None and max_new_tokens is None):
        return [None] * len(completions)
    out: list[float | None] = []
    for i, n in enumerate(completion_lengths):
        limit = max_length or int(max_new_tokens[i])
        if not 0 < cache_length <= limit:
            raise ValueError(f"overlong_penalty: cache_length ({cache_length}) must be in (0, max_length={limit}]")
        out.append(soft_overlong(int(n), limit, cache_length))
    return out


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


def step_table(
    steps: dict[str, list],  # reward name -> N step lists or None (RewardResult.steps)
    scalars: dict[str, torch.Tensor],  # reward name -> [N] scalar values, NaN for None (RewardResult.per_function)
    weights: dict[str, float],  # reward name -> weight
    completion_ids: torch.Tensor,  # [N, T]
    lengths: torch.Tensor,  # [N] tokens of each completion
    tokenizer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # values [S], rows [S], token index [S]
    """Every weighted step reward of the batch, for core.advantages.process_advantages.

    A step reward lands on the token of its end offset; a scalar reward is one step at the
    completion's last token; a completion a reward scored None (or with no steps) adds nothing.
    """
    values, rows, index = [], [], []
    for name, weight in weights.items():
        step_lists = steps.get(name)
        for i in range(completion_ids.shape[0]):
            n = int(lengths[i])
            if step_lists is not None and step_lists[i] is not None:
                ids = completion_ids[i, :n].tolist()
                tokens = step_token_index(ids, tokenizer, [end for end, _ in step_lists[i]])
                for (_, r), t in zip(step_lists[i], tokens):
                    values.append(weight * r), rows.append(i), index.append(t)
            elif not math.isnan(float(scalars[name][i])):
                values.append(weight * float(scalars[name][i])), rows.append(i), index.append(max(n - 1, 0))
    return (
        torch.tensor(values, dtype=torch.float64),
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(index, dtype=torch.long),
    )
