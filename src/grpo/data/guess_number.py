"""Rows for the `guess_number` environment (grpo.envs.guess_number): data.task=guess_number."""

from __future__ import annotations

import random

RULES = (
    "I am thinking of a whole number from {low} to {high}. Guess it: reply with one number. After each "
    "guess I will tell you whether my number is higher or lower."
)
"""The rules the episode starts with (formatted with low and high)."""


def guess_number_rows(n: int, seed: int, low: int = 1, high: int = 16) -> list[dict]:
    """`n` rows for the guess_number environment: `prompt` (the rules) and `secret` (drawn from
    random.Random(seed), uniform in [low, high])."""
    rng = random.Random(seed)
    return [{"prompt": RULES.format(low=low, high=high), "secret": rng.randint(low, high)} for _ in range(n)]
