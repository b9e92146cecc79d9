"""Training on multi-turn episodes: only the model's tokens are in the loss and its normalizers, checked against a
plain loop over the episodes that computes each loss type from its definition."""

from __future__ import annotations

import pytest
import torch

from grpo.envs.episodes import EpisodeLimits, Episodes
from grpo.logging.metrics import Phases
from test_episodes import Chatty
from trainer_helpers import gradients, make_trainer

TURNS = 3


def episode_trainer(*overrides):
    trainer = make_trainer(*overrides)
    trainer.episodes = Episodes(lambda: Chatty(turns=TURNS), EpisodeLimits(TURNS, None), "chatty")
    return trainer


def reference_loss(trainer, batch) -> torch.Tensor:
    """The loss from its definition, one episode at a time: the policy's log-prob of each of the episode's tokens from
    one forward over prompt + completion, the model's tokens only (mu = 1: ratio exp(lp - lp.detach()))."""
    r, cfg = batch.rollout, trainer.cfg
    per_row, counts = [], []
    for n in range(r.num_completions):
        span = int(r.completion_mask[n].sum())
        prompt, ids = r.prompt_ids[n // r.group_size], r.completion_ids[n, :span].tolist()
        logits = trainer.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float()
        logp = (logits / cfg.sampling.temperature).log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        mine = r.action_mask[n, :span]
        ratio = torch.exp(logp - logp.detach())[mine]
        per_row.append(-(batch.advantages[n] * ratio).sum())
        counts.append(int(mine.sum()))
    n = len(per_row)
    loss_type = cfg.algorithm.loss_type
    if loss_type == "grpo":
        return sum(x / c for x, c in zip(per_row, counts)) / n
    if loss_type in ("dapo", "bnpo"):
        return sum(per_row) / sum(counts)
    if loss_type == "dr_grpo":
        return sum(per_row) / (n * cfg.sampling.max_new_tokens * TURNS)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_loss_and_gradient_count_only_the_model_tokens(loss_type):
    trainer = episode_trainer(f"algorithm.loss_type={loss_type}", "algorithm.beta=0", "trainer.micro_batch_size=3")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    r = batch.rollout
    assert r.action_mask is not None and (r.spans > r.lengths).any()  # environment tokens are in there
    assert torch.equal(batch.loss_mask, r.action_mask)
    got = gradients(trainer, batch)
    trainer.model.zero_grad(set_to_none=True)
    reference_loss(trainer, batch).backward()
    want = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), float((got - want).abs().max())


def test_a_step_on_episodes_reports_the_episode_metrics_and_samples():
    trainer = episode_trainer("algorithm.beta=0.04")
    metrics, batch = trainer.step()
    assert metrics["env/turns_mean"] > 1 and 0 < metrics["env/tool_calls_mean"] <= metrics["env/turns_mean"]
    lengths = batch.rollout.action_mask.sum(1).float()
    assert metrics["completion/length_mean"] == pytest.approx(float(lengths.mean()))
    assert metrics["tokens/completion"] == float(lengths.sum())
    from grpo.logging.metrics import sample_records

    record = sample_records(1, batch, 2)[0]
    assert record["episode"]["messages"][0]["role"] == "user"
    assert len(record["episode"]["turn_rewards"]) >= 1
