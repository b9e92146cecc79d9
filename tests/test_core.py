"""The GRPO math on hand-computed tensors (docs/algorithm.md sections 2 and 3)."""

import math

import pytest
import torch

from grpo.core.advantages import outcome_advantages, zero_std_groups
from grpo.core.losses import BatchTotals, aggregate, clipped_surrogate, kl_k3, per_token_loss

EPS = 1e-4


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = outcome_advantages(rewards, group_size=4, scale="group", eps=EPS)
    std = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    a = 0.5 / (std + EPS)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_all_equal_group_gives_zero_advantage_not_nan():
    adv = outcome_advantages(torch.tensor([3.0, 3.0, 3.0]), group_size=3)
    assert torch.equal(adv, torch.zeros(3, dtype=torch.float64))
    assert zero_std_groups(torch.tensor([3.0, 3.0, 1.0, 2.0]), 2).tolist() == [True, False]


def test_scale_none_is_dr_grpo_centering_only_exactly():
    adv = outcome_advantages(torch.tensor([1.0, 0.0, 4.0, 2.0]), group_size=2, scale="none", eps=EPS)
    assert adv.tolist() == [0.5, -0.5, 1.0, -1.0]  # r - mean, no division by (1 + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1000.1, 0.1 + 0.2, 1e-7, -3.3])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_advantage_in_every_dtype(dtype, value, scale):
    """The mean of G equal floats need not be exactly that float: the rounding left over must not be divided
    by a std of the same size (it gave every member of a 1000.1 x 8 group -0.37)."""
    rewards = torch.cat([torch.full((8,), value, dtype=dtype), torch.tensor([0.0, 1.0] * 4, dtype=dtype)])
    adv = outcome_advantages(rewards, group_size=8, scale=scale)
    assert adv.dtype == torch.float64
    assert zero_std_groups(rewards, 8).tolist() == [True, False]
    assert torch.equal(adv[:8], torch.zeros(8, dtype=torch.float64))
    assert adv[8:].abs().min() > 0


def test_near_ties_get_symmetric_advantages():
    """[5.0, 5.001]: each member is as far from the mean; in float32 they came out -0.6192 / +0.6198."""
    adv = outcome_advantages(torch.tensor([5.0, 5.001], dtype=torch.float64), group_size=2)
    assert float(adv[0] + adv[1]) == pytest.approx(0.0, abs=1e-9)  # float32 rewards: 6e-4 apart
    d = 0.001
    assert float(adv[1]) == pytest.approx((d / 2) / (d / math.sqrt(2) + EPS), rel=1e-9)


def test_scale_batch_uses_batch_std():
    rewards = torch.tensor([1.0, 0.0, 4.0, 2.0])
    adv = outcome_advantages(rewards, group_size=2, scale="batch", eps=EPS)
    std = rewards.std()  # sample std of the whole batch
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64) / (float(std) + EPS)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_nan_rewards_are_left_out_of_mean_and_std():
    # group [1, nan, 0]: mean 0.5 and std over the two valid rewards; the NaN row gets 0
    adv = outcome_advantages(torch.tensor([1.0, float("nan"), 0.0]), group_size=3, eps=EPS)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(adv, torch.tensor([a, 0.0, -a], dtype=torch.float64), rtol=0, atol=1e-6)


def test_batch_must_be_whole_groups():
    with pytest.raises(ValueError, match="G=3"):
        outcome_advantages(torch.zeros(4), group_size=3)


def test_unknown_scale_lists_valid_names():
    with pytest.raises(ValueError, match="valid: \\['batch', 'group', 'none'\\]"):
        outcome_advantages(torch.zeros(4), group_size=2, scale="std")


def test_kl_k3_hand_computed():
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    # r = ref/pi: 0.5 -> 0.5 - log 0.5 - 1 ; 1 -> 0
    expected = torch.tensor([[0.5 - math.log(0.5) - 1.0, 0.0]])
    torch.testing.assert_close(kl_k3(lp, ref), expected, rtol=0, atol=1e-6)
    assert (kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28)
    # A>0: min(1.5, 1.28) = 1.28 ; A<0: min(-0.5, -0.8) = -0.8 ; inside the range: ratio * A
    torch.testing.assert_close(out.objective, torch.tensor([[1.28, -0.8, 1.1, -0.9]]), rtol=0, atol=1e-6)
    assert out.clipped_high.tolist() == [[True, False, False, False]]
    assert out.clipped_low.tolist() == [[False, True, False, False]]


def test_ratio_is_one_when_old_is_detached_current():
    lp = torch.randn(3, 5, requires_grad=True)
    out = clipped_surrogate(lp, lp.detach(), torch.randn(3), 0.2, 0.2)
    assert torch.equal(out.ratio.detach(), torch.ones(3, 5))


def test_per_token_loss_adds_beta_kl():
    sur, kl = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]])
    torch.testing.assert_close(per_token_loss(sur, kl, beta=0.1), torch.tensor([[-0.95, -1.9]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(per_token_loss(sur, None, beta=0.1), -sur, rtol=0, atol=0)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (2.0 + 4.0) / 2),  # mean of per-completion means
        ("dapo", 10.0 / 4),  # all tokens weigh the same
        ("token", 10.0 / 4),
        ("dr_grpo", 10.0 / (2 * 5)),  # N * max_completion_length
        ("bnpo", 10.0 / 4),  # tokens of the process's batch (one process: dapo)
    ],
)
def test_aggregations_hand_computed(loss_type, expected):
    totals = BatchTotals(num_completions=2, num_tokens=4, max_completion_length=5)
    got = aggregate(LOSS, MASK, loss_type, totals)
    assert abs(float(got) - expected) < 1e-6


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "token", "dr_grpo", "bnpo"])
def test_aggregation_does_not_depend_on_micro_batch_split(loss_type):
    torch.manual_seed(0)
    loss = torch.randn(6, 7)
    mask = torch.rand(6, 7) > 0.3
    mask[:, 0] = True
    totals = BatchTotals.of(mask, 7)
    whole = aggregate(loss, mask, loss_type, totals)
    for size in (1, 2, 4):
        parts = sum(aggregate(loss[i : i + size], mask[i : i + size], loss_type, totals) for i in range(0, 6, size))
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*dr_grpo"):
        aggregate(LOSS, MASK, "ppo", BatchTotals(2, 4, 5))


def test_rows_left_out_of_the_loss_still_count_in_n():
    """A truncated row masked by the overlong filter has no loss token, but it is one of the N completions:
    grpo divides by N (all rows), dr_grpo by N x max_new_tokens, a constant (docs/algorithm.md section 3)."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 2: filtered out
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    totals = BatchTotals.of(mask, 5)
    assert (totals.num_completions, totals.num_tokens, totals.process_tokens) == (3, 4, 4)
    assert float(aggregate(loss, mask, "grpo", totals)) == pytest.approx((2.0 + 4.0) / 3, abs=1e-7)
    assert float(aggregate(loss, mask, "dr_grpo", totals)) == pytest.approx(10.0 / (3 * 5), abs=1e-7)
    assert float(aggregate(loss, mask, "dapo", totals)) == pytest.approx(10.0 / 4, abs=1e-7)


def test_bnpo_normalizes_by_its_process_s_tokens_not_the_global_batch_s():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    totals = BatchTotals(num_completions=4, num_tokens=9, max_completion_length=3, process_tokens=4)
    assert float(aggregate(LOSS, mask, "bnpo", totals)) == pytest.approx(10.0 / 4, abs=1e-7)
    assert float(aggregate(LOSS, mask, "dapo", totals)) == pytest.approx(10.0 / 9, abs=1e-7)
