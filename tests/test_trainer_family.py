"""The GRPO family in the trainer, on the tiny model: micro-batch invariance of every variant, the
REINFORCE-with-group-baseline gradient, mu > 1, dynamic sampling, reference reset, overlong filter,
process supervision."""

import statistics

import pytest
import torch

from grpo.rewards import REWARDS
from grpo.logging.metrics import Phases, step_metrics

import trainer_helpers
from trainer_helpers import gradients


def letters(completions, **kwargs):
    """Differs within groups of the random tiny model: the number of ASCII letters."""
    return [float(sum(c.isalpha() for c in text)) for text in completions]


def odd_only(completions, question, **kwargs):
    """All-equal (0) for questions starting with an even digit, so those groups are dropped."""
    return [float(len(c) % 3) if int(q[0]) % 2 else 0.0 for c, q in zip(completions, question)]


def seen_lengths(completions, completion_lengths, max_new_tokens, **kwargs):
    seen_lengths.calls.append((list(completion_lengths), list(max_new_tokens)))
    return [0.0] * len(completions)


seen_lengths.calls = []
REWARDS.setdefault("test_letters", letters)
REWARDS.setdefault("test_odd_only", odd_only)
REWARDS.setdefault("test_seen_lengths", seen_lengths)


def make_trainer(*overrides, micro_batch_size=8, seed=0):
    return trainer_helpers.make_trainer("rewards=[{name: test_letters}]", *overrides, micro_batch_size=micro_batch_size, seed=seed)


VARIANTS = [
    ["algorithm.importance_sampling_level=sequence", "algorithm.mu=2"],
    ["algorithm.delta=3", "algorithm.mu=2", "algorithm.loss_type=dapo"],
    ["algorithm.kl_estimator=k1"],
    ["algorithm.kl_estimator=k2", "algorithm.loss_type=dr_grpo"],
    ["algorithm.entropy_coef=0.01", "algorithm.beta=0"],
    ["algorithm.advantage=process", "rewards=[{name: test_letters}, {name: step_accuracy}]"],
    ["algorithm.overlong_filter=true", "algorithm.loss_type=grpo"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(x.split("=")[0].split(".")[-1] for x in o))
def test_every_variant_is_independent_of_the_micro_batch_split(overrides):
    whole = make_trainer(*overrides, micro_batch_size=8)
    batch = whole.make_batch(whole.sampler.next(2), Phases())
    if batch.old_logprobs is not None:  # an off-policy pi_old, so the ratio and its clips matter
        batch.old_logprobs = batch.old_logprobs + 0.3 * torch.randn(batch.old_logprobs.shape, generator=torch.Generator().manual_seed(1))
    if whole.cfg.algorithm.overlong_filter:  # the random model rarely ends: leave out every third row instead
        batch.loss_mask = batch.rollout.completion_mask.clone()
        batch.loss_mask[::3] = False
    reference = gradients(whole, batch)
    assert reference.abs().max() > 0
    for mb in (1, 3):
        split = make_trainer(*overrides, micro_batch_size=mb)
        torch.testing.assert_close(gradients(split, batch), reference, rtol=0, atol=2e-6)


def logprobs_one_by_one(model, batch):
    """log pi(o_{i,t}) for each completion, computed alone: no padding, no batching, no shared code."""
    out = []
    g = batch.rollout.group_size
    for i in range(batch.rollout.num_completions):
        prompt = batch.rollout.prompt_ids[i // g]
        n = int(batch.rollout.lengths[i])
        completion = batch.rollout.completion_ids[i, :n].tolist()
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [P + n, V]
        out.append(torch.stack([logp[len(prompt) - 1 + t, completion[t]] for t in range(n)]))
    return out


def test_grpo_gradient_with_mu_1_and_beta_0_is_reinforce_with_a_group_baseline():
    """grad of -(1/N) sum_i A_i * (1/|o_i|) sum_t log pi(o_it), A_i = (r_i - mean_group) / (std_group + eps)."""
    trainer = make_trainer("algorithm.beta=0", micro_batch_size=3)
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    got = gradients(trainer, batch)

    rewards = letters(batch.scored.completions)
    g, eps = 4, trainer.cfg.algorithm.advantage_eps
    advantages = []
    for b in range(2):
        group = rewards[b * g : (b + 1) * g]
        advantages += [(r - statistics.mean(group)) / (statistics.stdev(group) + eps) for r in group]
    assert any(a != 0 for a in advantages)
    trainer.model.zero_grad(set_to_none=True)
    logps = logprobs_one_by_one(trainer.model, batch)
    objective = sum(a * lp.mean() for a, lp in zip(advantages, logps)) / len(logps)
    (-objective).backward()
    expected = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_mu_2_uses_the_sampling_policy_as_pi_old():
    trainer = make_trainer("algorithm.mu=2", "algorithm.beta=0")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    old = batch.old_logprobs.clone()
    first = trainer.accumulate_gradients(batch)
    assert first["ratio"] == 1.0 and first["clip_low"] == 0.0 and first["clip_high"] == 0.0  # before any update
    trainer.clip_and_step()
    trainer.optimizer.zero_grad(set_to_none=True)
    second = trainer.accumulate_gradients(batch)
    assert second["ratio"] != 1.0  # pi_theta moved, pi_old did not
    assert torch.equal(batch.old_logprobs, old)


def test_optimize_takes_mu_optimizer_steps():
    trainer = make_trainer("algorithm.mu=3", "algorithm.beta=0")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    trainer.optimize(batch)
    assert trainer.scheduler.last_epoch == 3


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    trainer = make_trainer("rewards=[{name: test_odd_only}]", "algorithm.dynamic_sampling=true",
                           "algorithm.max_sampling_rounds=6", "algorithm.beta=0", "trainer.batch_size=12")
    batch = trainer.make_batch(trainer.sampler.next(3), phases := Phases())
    s = batch.sampling
    assert s["groups_kept"] + s["groups_filled"] == 3 and 1 <= s["rounds"] <= 6 and s["groups_drawn"] >= 3
    assert batch.rollout.num_completions == 12 and len(batch.scored.rows) == 3 and len(batch.scored.completions) == 12
    assert all(int(r["question"][0]) % 2 == 1 for r in batch.scored.rows[: s["groups_kept"]])
    # everything lines up after concatenating rounds: the rewards are those of the batch's own completions
    assert batch.total_rewards.tolist() == odd_only(batch.scored.completions, [r["question"] for r in batch.scored.rows for _ in range(4)])
    assert batch.sequences.input_ids.shape[0] == 12 and "generate" in phases.seconds
    phases.seconds.update(step=1.0, train=1.0)
    opt = dict.fromkeys(["loss", "kl", "clip_low", "clip_high", "clip_dual", "entropy", "ratio", "grad_norm"], 0.0)
    metrics = step_metrics(1, batch, opt, phases, lr=0.0, skipped=False)
    assert metrics["dynamic_sampling/rounds"] == s["rounds"] and metrics["dynamic_sampling/groups_kept"] == s["groups_kept"]


def test_dynamic_sampling_gives_up_after_max_rounds_and_fills_the_batch():
    trainer = make_trainer("rewards=[{name: format}]", "algorithm.dynamic_sampling=true",
                           "algorithm.max_sampling_rounds=2", "algorithm.beta=0")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())  # the random model never writes <answer>
    assert batch.sampling == {"rounds": 2, "groups_drawn": 4, "groups_kept": 0, "groups_filled": 2}
    assert batch.rollout.num_completions == 8 and torch.equal(batch.advantages, torch.zeros(8))


def test_reference_reset_copies_the_policy_every_n_steps():
    trainer = make_trainer("algorithm.ref_reset_steps=2", "trainer.lr=1e-2")
    differs = lambda: any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), trainer.ref_model.parameters()))  # noqa: E731
    m1, _ = trainer.step()
    assert m1["ref_reset"] == 0.0 and differs()
    m2, _ = trainer.step()
    assert m2["ref_reset"] == 1.0 and not differs()


def test_overlong_filter_masks_truncated_completions_from_the_loss():
    trainer = make_trainer("algorithm.overlong_filter=true", "sampling.max_new_tokens=4")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    truncated = batch.rollout.truncated
    assert truncated.any()
    assert not batch.loss_mask[truncated].any()
    assert torch.equal(batch.loss_mask[~truncated], batch.rollout.completion_mask[~truncated])


def test_rewards_receive_completion_lengths():
    seen_lengths.calls.clear()
    trainer = make_trainer("rewards=[{name: test_seen_lengths}]")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    lengths, limits = seen_lengths.calls[-1]
    assert lengths == batch.rollout.lengths.tolist() and limits == [10] * 8


def test_process_advantages_through_the_trainer():
    trainer = make_trainer("algorithm.advantage=process")
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    outcome, _ = make_trainer().advantages(batch.scored)  # the same completions, outcome supervision
    mask = batch.rollout.completion_mask
    assert batch.advantages.shape == mask.shape
    # a scalar reward alone is one step at the last token: the outcome advantage on every real token
    torch.testing.assert_close(batch.advantages, torch.where(mask, outcome[:, None], torch.zeros(())), rtol=0, atol=1e-6)
    assert batch.num_steps == 8

