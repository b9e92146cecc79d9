"""The first two stages of a step, shared by training, evaluation and `grpo probe`: sample G completions (or, with
an environment, G multi-turn episodes) for each row, then score them with the reward functions.

    sampled = sample_rows(engine, tokenizer, rows, data, G, params, seeds)      # the rollout and its texts
    rewards = score_sampled(sampled, reward_specs)                              # grpo.rewards.score
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo.batch import Scored
from grpo.data import encode_rows
from grpo.rewards import RewardResult, reward_columns, score
from grpo.rollout.base import Rollout, SamplingParams


@dataclass
class Sampled:
    """G completions (or episodes) for each of B rows, as text for the reward functions. N = B * G."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout
    prompts: list[str]  # N rendered prompt texts
    completions: list[str]  # N completion texts (special tokens skipped)
    columns: dict[str, list]  # what reward functions get besides prompts and completions, N values each

    def scored(self, rewards: RewardResult) -> Scored:
        return Scored(self.rows, self.rollout, self.prompts, self.completions, rewards)


def sample_rows(engine, tokenizer, rows: list[dict], data, group_size: int, params: SamplingParams,
                seeds: list[int] | None) -> Sampled:
    """G completions for each row (`data`: the run's DataConfig), group b under seeds[b] (None: greedy)."""
    prompt_ids = encode_rows(tokenizer, rows, data)
    rollout = engine.generate(prompt_ids, group_size, params, seeds=seeds)
    g = rollout.group_size
    prompts = [text for text in tokenizer.batch_decode(prompt_ids) for _ in range(g)]
    completions = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    columns = reward_columns(rows, g, data.prompt_column, rollout.lengths.tolist(), params.max_new_tokens)
    return Sampled(rows, rollout, prompts, completions, columns)


def score_sampled(sampled: Sampled, rewards) -> RewardResult:
    """The reward functions on every completion (grpo.rewards.score)."""
    return score(rewards, sampled.prompts, sampled.completions, sampled.columns)
