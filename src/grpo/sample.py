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
                seeds: list[int] | None, episodes=None) -> Sampled:
    """G completions for each row (`data`: the run's DataConfig), group b under seeds[b] (None: greedy); with
    `episodes` (grpo.envs.episodes.Episodes), G multi-turn episodes instead.

    Length rewards (overlong_penalty) read an episode's model tokens against max_new_tokens x environment.max_turns.
    An episode's completion text is every turn after the prompt, the model's and the environment's, as the model
    read it (special tokens skipped), so a reward that checks the last number sees the final answer; reward
    functions also get `messages` (the whole conversation), `turn_rewards` (the environment's reward of each turn),
    `turn_ends` (the character offset where each model turn ends in the completion text, for step rewards) and
    `environment_error` (what the environment raised, under environment.on_error=none; else None)."""
    if episodes is None:
        prompt_ids = encode_rows(tokenizer, rows, data)
        rollout = engine.generate(prompt_ids, group_size, params, seeds=seeds)
    else:
        rollout = episodes.run(engine, tokenizer, rows, group_size, params, seeds)
        prompt_ids = rollout.prompt_ids
    g = rollout.group_size
    prompts = [text for text in tokenizer.batch_decode(prompt_ids) for _ in range(g)]
    completions = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    most = params.max_new_tokens * (episodes.limits.max_turns if episodes is not None else 1)  # the model's tokens
    columns = reward_columns(rows, g, data.prompt_column, rollout.lengths.tolist(), most)
    if rollout.episodes is not None:
        columns.update(episode_columns(rollout, tokenizer))
    return Sampled(rows, rollout, prompts, completions, columns)


def episode_columns(rollout: Rollout, tokenizer) -> dict[str, list]:
    """What reward functions get about each episode (see sample_rows)."""
    ends = []
    for row, ep in zip(rollout.completion_ids.tolist(), rollout.episodes):
        # a turn's reward lands just past the turn's text: on its last token or on the environment's next ones,
        # which no model token comes between (step_token_index puts an offset past the text on the last token)
        ends.append([len(tokenizer.decode(row[: t + 1], skip_special_tokens=True)) + 1 for t in ep.turn_ends])
    return {"messages": [ep.messages for ep in rollout.episodes],
            "turn_rewards": [list(ep.turn_rewards) for ep in rollout.episodes],
            "turn_ends": ends,
            "environment_error": [ep.error for ep in rollout.episodes]}


def score_sampled(sampled: Sampled, rewards) -> RewardResult:
    """The reward functions on every completion (grpo.rewards.score)."""
    return score(rewards, sampled.prompts, sampled.completions, sampled.columns)
