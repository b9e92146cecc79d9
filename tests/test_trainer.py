"""The trainer's gradient on the tiny model: independent of the micro-batch split, and equal to the
GRPO gradient written out by hand."""

import pytest
import torch

from grpo.backend.cpu_fast import completion_logprobs
from grpo.logging.metrics import Phases
from grpo.optim import lr_lambda

import trainer_helpers
from trainer_helpers import gradients


def make_trainer(micro_batch_size: int, loss_type: str = "grpo", beta: float = 0.04, seed: int = 0):
    overrides = [f"algorithm.loss_type={loss_type}", f"algorithm.beta={beta}"]
    return trainer_helpers.make_trainer(*overrides, micro_batch_size=micro_batch_size, seed=seed)


def fixed_batch(trainer):
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.0, 2.0, -1.0, -1.0])  # every row has a signal
    return batch


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_gradient_does_not_depend_on_micro_batch_size(loss_type):
    whole = make_trainer(8, loss_type)
    batch = fixed_batch(whole)
    reference = gradients(whole, batch)
    assert reference.abs().max() > 0
    for mb in (1, 3):
        split = make_trainer(mb, loss_type)
        torch.testing.assert_close(gradients(split, batch), reference, rtol=0, atol=1e-6)


def test_gradient_matches_the_paper_objective_written_out():
    """GRPO (mu=1, loss_type grpo): grad of -(1/N) sum_i (1/|o_i|) sum_t [ratio*A_i - beta*k3], ratio = 1."""
    trainer = make_trainer(3, "grpo", beta=0.04)
    batch = fixed_batch(trainer)
    got = gradients(trainer, batch)

    trainer.model.zero_grad(set_to_none=True)
    lp, _ = completion_logprobs(trainer.model, batch.sequences)
    mask = batch.rollout.completion_mask.float()
    ratio = torch.exp(lp - lp.detach())
    r = batch.ref_logprobs - lp
    k3 = torch.exp(r) - r - 1
    per_token = ratio * batch.advantages[:, None] - 0.04 * k3
    objective = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    (-objective).backward()
    expected = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_tis_cap_weights_the_policy_term_by_the_capped_sampler_ratio():
    """algorithm.tis_cap: grad of -(1/N) sum_i (1/|o_i|) sum_t [min(pi_old / pi_sampler, cap) * ratio * A_i - beta * k3],
    with sampler log-probs moved off the policy's by hand (some tokens past the cap, some below 1)."""
    trainer = trainer_helpers.make_trainer("algorithm.tis_cap=2", "algorithm.beta=0.04", micro_batch_size=3)
    batch = fixed_batch(trainer)
    mask = batch.rollout.completion_mask
    shift = torch.tensor([-1.5, 0.7, 0.0, 0.3])[torch.arange(mask.shape[1]) % 4]  # [T] log(pi_old / pi_sampler)
    batch.rollout.sampling_logprobs = (batch.rollout.sampling_logprobs - shift).masked_fill(~mask, 0.0)
    got = gradients(trainer, batch)

    trainer.model.zero_grad(set_to_none=True)
    lp, _ = completion_logprobs(trainer.model, batch.sequences)
    w = torch.exp(lp.detach() - batch.rollout.sampling_logprobs).clamp(max=2.0)  # e^-1.5, 2 (capped), 1, e^0.3
    assert (w[mask] < 0.3).any() and (w[mask] == 2.0).any()
    r = batch.ref_logprobs - lp
    per_token = w * torch.exp(lp - lp.detach()) * batch.advantages[:, None] - 0.04 * (torch.exp(r) - r - 1)
    m = mask.float()
    (-((per_token * m).sum(1) / m.sum(1)).mean()).backward()
    expected = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    untouched = gradients(trainer_helpers.make_trainer("algorithm.beta=0.04", micro_batch_size=3), batch)
    assert (untouched - got).abs().max() > 1e-4  # the weights change the update


def test_mu_one_uses_no_old_logprob_pass_and_beta_zero_no_reference():
    trainer = make_trainer(8, beta=0.0)
    trainer.ref_model = None
    batch = trainer.make_batch(trainer.sampler.next(2), phases := Phases())
    assert batch.ref_logprobs is None and batch.old_logprobs is None
    assert "reference" not in phases.seconds and "old_logprobs" not in phases.seconds


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup=2, total=10, schedule="cosine")
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    assert lr_lambda(0, 10, "constant")(7) == 1.0


def updated_parameters(trainer, batch):
    trainer.optimize(batch)
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_update_does_not_depend_on_micro_batches_of_rows_or_tokens(loss_type):
    """One optimizer step: micro-batches of 1, 2 and 4 completions, or a token budget (counting the tokens of the
    packed pass, each micro-batch cut to its width), give the same new weights as the whole batch at once."""
    whole = make_trainer(8, loss_type)
    batch = fixed_batch(whole)
    expected = updated_parameters(whole, batch)
    start = torch.cat([p.detach().flatten() for p in make_trainer(8, loss_type).model.parameters()])
    assert (expected - start).abs().max() > 1e-7
    lengths = batch.sequences.attention_mask.sum(dim=1)
    for mb, budget in [(1, None), (2, None), (4, None), (8, int(lengths.max()) * 3), (8, int(lengths.max()) * 2)]:
        split = make_trainer(mb, loss_type)
        split.cfg.trainer.micro_batch_tokens = budget
        padded = len(split.micro_batches(batch.sequences))
        assert padded == {1: 8, 2: 4, 4: 2, 8: 3 if budget == int(lengths.max()) * 3 else 4}[mb]
        if budget is not None:  # the rows run packed: the budget counts each prompt once and no padding
            assert split.packed(split.policy, batch.sequences, training=True)
            assert 1 < len(split.micro_batches(batch.sequences, packed=True)) < padded
        torch.testing.assert_close(updated_parameters(split, batch), expected, rtol=0, atol=1e-6)


def test_mu_above_one_takes_pi_old_from_the_rollout_when_it_is_the_policy_s():
    trainer = trainer_helpers.make_trainer("algorithm.mu=2")
    batch = trainer.make_batch(trainer.sampler.next(2), phases := Phases())
    assert "old_logprobs" not in phases.seconds  # no forward pass
    assert batch.old_logprobs is batch.rollout.sampling_logprobs
    fresh = trainer.fixed_logprobs(trainer.model, batch.sequences)  # what a forward pass gives
    torch.testing.assert_close(batch.old_logprobs, fresh, rtol=0, atol=1e-5)

    # top-k picks the tokens; the log-probs reported are still the policy's whole tempered distribution's
    truncated = trainer_helpers.make_trainer("algorithm.mu=2", "sampling.top_k=5")
    batch = truncated.make_batch(truncated.sampler.next(2), phases := Phases())
    assert "old_logprobs" not in phases.seconds and batch.old_logprobs is batch.rollout.sampling_logprobs
    fresh = truncated.fixed_logprobs(truncated.model, batch.sequences)
    torch.testing.assert_close(batch.old_logprobs, fresh, rtol=0, atol=1e-5)


def test_step_reports_how_far_the_sampler_s_logprobs_are_from_the_trainer_s():
    trainer = trainer_helpers.make_trainer()
    metrics, _ = trainer.step()
    assert 0 <= metrics["rollout/logprob_diff"] < 1e-4


def test_a_cast_sampling_copy_is_not_pi_old():
    """A bfloat16 sampling copy (sampling.dtype) gives other log-probs: with mu > 1 pi_old is recomputed."""
    from grpo.rollout import LogprobKind, make_engine

    trainer = trainer_helpers.make_trainer("algorithm.mu=2", "sampling.engine=fast", "sampling.dtype=bfloat16")
    trainer.engine = make_engine(trainer.cfg.sampling, trainer.model, trainer.tokenizer)
    assert trainer.engine.logprob_kind(trainer.params) is LogprobKind.OTHER
    batch = trainer.make_batch(trainer.sampler.next(2), phases := Phases())
    assert "old_logprobs" in phases.seconds and batch.old_logprobs is not batch.rollout.sampling_logprobs


def test_a_step_updates_the_weights_and_frees_the_gradients():
    """The gradients are not held through the next step's sampling (they would add a weights-sized
    block to its memory)."""
    trainer = trainer_helpers.make_trainer()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())


class CopyingEngine:
    """An engine that samples from its own copy of the policy (as vLLM or a cast copy do): it sees an update
    only through sync_weights."""

    def __init__(self, model, tokenizer):
        import copy

        from grpo.rollout import HFGenerateEngine

        self.copy = copy.deepcopy(model)
        self.inner = HFGenerateEngine(self.copy, tokenizer)
        self.syncs = 0

    def generate(self, prompt_ids, group_size, params, generator=None, seeds=None):
        return self.inner.generate(prompt_ids, group_size, params, generator, seeds)

    def sync_weights(self, model):
        self.syncs += 1
        self.copy.load_state_dict(model.state_dict())

    def logprob_kind(self, params):
        from grpo.rollout import LogprobKind

        return LogprobKind.OTHER

    def describe(self):
        return "a copy"


@pytest.mark.parametrize("mu", [1, 2])
def test_the_trainer_syncs_an_engine_that_holds_a_copy_after_every_update(mu):
    trainer = trainer_helpers.make_trainer(f"algorithm.mu={mu}", "trainer.lr=1e-2")
    engine = trainer.engine = CopyingEngine(trainer.model, trainer.tokenizer)
    for step in range(1, 3):
        trainer.step()
        assert engine.syncs == step * mu  # once per optimizer update
        assert all(torch.equal(p, q) for p, q in zip(engine.copy.parameters(), trainer.model.parameters()))
    start = trainer_helpers.make_trainer().model  # the same seed: the weights before any update
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), trainer.model.parameters()))
