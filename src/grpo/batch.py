"""The data a GRPO step carries from stage to stage (docs/design.md, "the flow of one training step").

    Scored     whole groups of sampled completions and their rewards       (steps 1-2)
    StepBatch  a Scored plus advantages, sequences, loss mask and the
               log-probs that stay fixed during the step                   (steps 3-4)

Rows are grouped prompt-major: row n = b * G + g is sample g of prompt b; G is the rollout's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo.core.logprobs import SequenceBatch
from grpo.rewards.base import RewardResult
from grpo.rollout.base import Rollout, concat_rollouts, select_groups


@dataclass
class Scored:
    """Whole groups of sampled completions and their rewards. N = B * G rows."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout
    prompts: list[str]  # N rendered prompt texts
    completions: list[str]  # N completion texts
    rewards: RewardResult

    @property
    def group_size(self) -> int:  # G
        return self.rollout.group_size

    def select(self, groups: list[int]) -> Scored:
        """These groups (prompt indices), in this order."""
        g = self.group_size
        idx = [b * g + k for b in groups for k in range(g)]
        r = self.rewards
        rewards = RewardResult(
            per_function={k: v[idx] for k, v in r.per_function.items()},
            total=r.total[idx],
            errors=dict(r.errors),
            steps={k: [v[i] for i in idx] for k, v in r.steps.items()},
            nonfinite=dict(r.nonfinite),
        )
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        rollout = select_groups(self.rollout, groups)
        return Scored([self.rows[b] for b in groups], rollout, pick(self.prompts), pick(self.completions), rewards)


def concat_scored(parts: list[Scored], pad_id: int) -> Scored:
    """The groups of all parts, in order (a reward's steps are None where a part had none)."""
    n = [p.rollout.num_completions for p in parts]
    names = {k: None for p in parts for k in p.rewards.steps}
    rewards = RewardResult(
        per_function={k: torch.cat([p.rewards.per_function[k] for p in parts]) for k in parts[0].rewards.per_function},
        total=torch.cat([p.rewards.total for p in parts]),
        errors={k: sum(p.rewards.errors.get(k, 0) for p in parts) for k in parts[0].rewards.errors},
        steps={k: [s for p, m in zip(parts, n) for s in p.rewards.steps.get(k, [None] * m)] for k in names},
        nonfinite={k: sum(p.rewards.nonfinite.get(k, 0) for p in parts)
                   for k in dict.fromkeys(k for p in parts for k in p.rewards.nonfinite)},
    )
    return Scored(
        [r for p in parts for r in p.rows],
        concat_rollouts([p.rollout for p in parts], pad_id),
        [x for p in parts for x in p.prompts],
        [x for p in parts for x in p.completions],
        rewards,
    )


@dataclass
class StepBatch:
    """Everything one step computes before the gradient steps. N = B * G rows."""

    scored: Scored
    advantages: torch.Tensor  # [N] (outcome) or [N, T] (process)
    sequences: SequenceBatch | None  # None in a gathered batch (gather_batch)
    loss_mask: torch.Tensor  # [N, T] bool: completion tokens that enter the loss (overlong_filter drops truncated rows)
    ref_logprobs: torch.Tensor | None = None  # [N, T]
    old_logprobs: torch.Tensor | None = None  # [N, T]
    sampling: dict[str, float] = field(default_factory=dict)  # dynamic sampling counts
    num_steps: int | None = None  # process supervision: step rewards in the batch

    @property
    def rollout(self) -> Rollout:
        return self.scored.rollout

    @property
    def group_size(self) -> int:  # G
        return self.scored.rollout.group_size

    @property
    def total_rewards(self) -> torch.Tensor:  # [N]
        return self.scored.rewards.total


def gather_batch(batch: StepBatch, world, pad_id: int) -> StepBatch:
    """The step's batch over all ranks, in rank order (what metrics and samples describe): the groups, their
    rewards, advantages and loss masks; the sequences and fixed log-probs stay each rank's own (None here).
    In one process: `batch` itself."""
    if not world.distributed:
        return batch
    parts = world.gather((batch.scored, batch.advantages, batch.loss_mask, batch.sampling, batch.num_steps))
    width = max(mask.shape[1] for _, _, mask, _, _ in parts)  # T: the longest completion of any rank

    def pad(x: torch.Tensor, value) -> torch.Tensor:  # [n, t] -> [n, T]
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value) if x.dim() == 2 else x

    sampling: dict[str, float] = {}
    for _, _, _, counts, _ in parts:  # dynamic sampling: rounds is the most any rank ran, the rest add up
        for k, v in counts.items():
            sampling[k] = max(sampling.get(k, 0), v) if k == "rounds" else sampling.get(k, 0) + v
    steps = [s for *_, s in parts]
    return StepBatch(
        scored=concat_scored([p[0] for p in parts], pad_id),
        advantages=torch.cat([pad(p[1], 0.0) for p in parts]),
        sequences=None,
        loss_mask=torch.cat([pad(p[2], False) for p in parts]),
        sampling=sampling,
        num_steps=None if steps[0] is None else sum(steps),
    )
