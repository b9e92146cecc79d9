"""The GRPO family's math (docs/algorithm.md sections 2-4) on hand-computed tensors, and each vectorized
function against a plain Python loop on random inputs."""

import math
import statistics
import typing

import pytest
import torch

from grpo.config import AlgorithmConfig
from grpo.core.advantages import SCALE_REWARDS, outcome_advantages, process_advantages, zero_std_groups
from grpo.core.losses import (
    AGGREGATIONS, IMPORTANCE_LEVELS, KL_ESTIMATORS, BatchTotals, aggregate, clipped_surrogate, kl_penalty, per_token_loss,
    truncated_importance_weights,
)

EPS = 1e-4


# -- process advantages -----------------------------------------------------------------------------


def test_process_advantages_hand_computed():
    # G = 2, T = 4. Group 0: row 0 has steps (t=1, r=1), (t=3, r=0); row 1 has (t=2, r=1).
    # Group 1: only row 3 has one step -> std 0 -> normalized 0.
    adv = process_advantages(
        torch.tensor([1.0, 0.0, 1.0, 5.0]), torch.tensor([0, 0, 1, 3]), torch.tensor([1, 3, 2, 0]),
        num_tokens=4, group_size=2, num_rows=4, scale="group", eps=EPS,
    )
    std = math.sqrt(1 / 3)  # sample std of [1, 0, 1]
    hi, lo = (1 - 2 / 3) / (std + EPS), (0 - 2 / 3) / (std + EPS)
    expected = torch.tensor([
        [hi + lo, hi + lo, lo, lo],  # tokens at or before t=1 see both steps, then only the last one
        [hi, hi, hi, 0.0],  # nothing after the last step
        [0.0, 0.0, 0.0, 0.0],  # no steps
        [0.0, 0.0, 0.0, 0.0],  # a lone step is centered to 0
    ], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-5)


def test_process_all_equal_step_rewards_give_zero_not_nan():
    adv = process_advantages(torch.ones(5), torch.tensor([0, 0, 1, 2, 3]), torch.tensor([0, 2, 1, 0, 2]), 3, 2, 4)
    assert torch.equal(adv, torch.zeros(4, 3, dtype=torch.float64))
    empty = process_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3, 2, 4)
    assert torch.equal(empty, torch.zeros(4, 3, dtype=torch.float64))


def test_process_one_token_completions():
    adv = process_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), torch.tensor([0, 0]), 1, 2, 2, eps=EPS)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(adv, torch.tensor([[a], [-a]], dtype=torch.float64), rtol=0, atol=1e-6)


def test_process_with_one_final_step_each_equals_outcome():
    """A scalar reward as one step at the last token gives the outcome advantage on every token."""
    torch.manual_seed(0)
    n, g, t = 8, 4, 6
    rewards = torch.randint(0, 3, (n,)).float()
    lengths = torch.randint(1, t + 1, (n,))
    for scale in ("group", "batch", "none"):
        adv = process_advantages(rewards, torch.arange(n), lengths - 1, t, g, n, scale, EPS)
        outcome = outcome_advantages(rewards, g, scale, EPS)
        mask = torch.arange(t)[None] < lengths[:, None]
        torch.testing.assert_close(adv, torch.where(mask, outcome[:, None], torch.zeros((), dtype=torch.float64)),
                                   rtol=0, atol=1e-6)


def process_loop(values, rows, index, t, g, n, scale, eps):
    """docs/algorithm.md section 2 written as loops."""
    values, rows, index = values.tolist(), rows.tolist(), index.tolist()
    out = [[0.0] * t for _ in range(n)]
    everything = values
    for b in range(n // g):
        mine = [k for k in range(len(values)) if rows[k] // g == b]
        rs = [values[k] for k in mine]
        if not rs:
            continue
        mean = sum(rs) / len(rs)
        group_std = statistics.stdev(rs) if len(rs) > 1 else 0.0
        std = {"group": group_std, "batch": statistics.stdev(everything) if len(everything) > 1 else 0.0}.get(scale)
        for k in mine:
            if max(rs) == min(rs):
                continue  # an all-equal group carries no signal: exactly 0
            for tok in range(index[k] + 1):  # every token at or before the step's end
                out[rows[k]][tok] += (values[k] - mean) if std is None else (values[k] - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_advantages_equal_the_loop(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    n, g, t, s = 12, 4, 7, 20
    values = torch.randn(s, generator=gen)
    rows = torch.randint(0, n, (s,), generator=gen)
    index = torch.randint(0, t, (s,), generator=gen)  # repeated (row, index) pairs add up
    got = process_advantages(values, rows, index, t, g, n, scale, EPS)
    torch.testing.assert_close(got, process_loop(values, rows, index, t, g, n, scale, EPS), rtol=0, atol=1e-5)


def outcome_loop(rewards, g, scale, eps):
    r = rewards.tolist()
    valid_all = [x for x in r if x == x]
    out = []
    for b in range(len(r) // g):
        grp = r[b * g : (b + 1) * g]
        valid = [x for x in grp if x == x]
        mean = sum(valid) / max(len(valid), 1)
        std = {"group": statistics.stdev(valid) if len(valid) > 1 else 0.0, "batch": statistics.stdev(valid_all)}.get(scale)
        equal = len(valid) < 2 or max(valid) == min(valid)  # no signal: exactly 0
        out += [0.0 if x != x or equal else (x - mean) if std is None else (x - mean) / (std + eps) for x in grp]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_outcome_advantages_equal_the_loop(scale):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 4, (24,), generator=gen).float()
    rewards[torch.rand(24, generator=gen) < 0.2] = float("nan")
    rewards[:4] = 2.0  # one all-equal group
    got = outcome_advantages(rewards, 4, scale, EPS)
    torch.testing.assert_close(got, outcome_loop(rewards, 4, scale, EPS), rtol=0, atol=1e-5)
    zero = zero_std_groups(rewards, 4).tolist()
    for b in range(6):
        valid = [x for x in rewards[b * 4 : b * 4 + 4].tolist() if x == x]
        assert zero[b] == (len(valid) < 2 or max(valid) == min(valid))


# -- importance ratio, clipping, dual clip -------------------------------------------------------------


def test_sequence_ratio_hand_computed_and_clipped_per_sequence():
    old = torch.zeros(2, 3)
    lp = torch.tensor([[0.3, -0.1, 0.7], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    out = clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.2, mask=mask, level="sequence")
    s0, s1 = math.exp((0.3 - 0.1) / 2), math.exp(0.5)  # mean over each completion's own tokens
    torch.testing.assert_close(out.ratio, torch.tensor([[s0] * 3, [s1] * 3]), rtol=0, atol=1e-6)
    # s0 = 1.105 is inside the range: s0 * A ; s1 = 1.65 with A < 0: min(-1.65, -1.2) = -1.65 (no clip)
    torch.testing.assert_close(out.objective, torch.tensor([[s0] * 3, [-s1] * 3]), rtol=0, atol=1e-6)
    out = clipped_surrogate(lp, old, -adv, 0.2, 0.2, mask, "sequence")
    torch.testing.assert_close(out.objective[0], torch.full((3,), -s0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.objective[1], torch.full((3,), 1.2), rtol=0, atol=1e-6)  # clipped at 1 + eps
    assert out.clipped_high[1].all() and not out.clipped_high[0].any()


def test_sequence_ratio_of_a_fully_masked_row_is_one():
    lp = torch.randn(2, 4)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out = clipped_surrogate(lp, torch.zeros(2, 4), torch.ones(2), 0.2, 0.2, mask, "sequence")
    assert torch.equal(out.ratio[1], torch.ones(4)) and torch.isfinite(out.objective).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_is_exactly_one_when_old_is_detached_current(level):
    lp = torch.randn(3, 5, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    out = clipped_surrogate(lp, lp.detach(), torch.randn(3), 0.2, 0.2, mask, level)
    assert torch.equal(out.ratio.detach(), torch.ones(3, 5))


def test_dual_clip_hand_computed():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[5.0, 2.0, 5.0, 0.5]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]])
    out = clipped_surrogate(lp, old, adv, 0.2, 0.2, delta=3.0)
    # A<0, ratio 5: min(-5, -1.2) = -5, floored at 3 * -1 = -3 ; ratio 2: -2 > -3 stays ; A>0: min(5, 1.2)
    torch.testing.assert_close(out.objective, torch.tensor([[-3.0, -2.0, 1.2, -0.8]]), rtol=0, atol=1e-6)
    assert out.clipped_dual.tolist() == [[True, False, False, False]]
    no_dual = clipped_surrogate(lp, old, adv, 0.2, 0.2)
    assert float(no_dual.objective[0, 0]) == pytest.approx(-5.0, abs=1e-6) and not no_dual.clipped_dual.any()


def surrogate_loop(lp, old, adv, mask, eps_low, eps_high, level, delta):
    n, t = lp.shape
    out = torch.zeros(n, t)
    for i in range(n):
        tokens = [j for j in range(t) if mask[i, j]]
        seq = math.exp(sum(float(lp[i, j] - old[i, j]) for j in tokens) / len(tokens)) if tokens else 1.0
        for j in range(t):
            ratio = math.exp(float(lp[i, j] - old[i, j])) if level == "token" else seq
            a = float(adv[i])
            obj = min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
            if delta is not None and a < 0:
                obj = max(obj, delta * a)
            out[i, j] = obj
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [None, 2.0])
def test_clipped_surrogate_equals_the_loop(level, delta):
    gen = torch.Generator().manual_seed(5)
    lp, old = torch.randn(6, 5, generator=gen) * 0.5, torch.randn(6, 5, generator=gen) * 0.5
    adv, mask = torch.randn(6, generator=gen), torch.rand(6, 5, generator=gen) > 0.3
    mask[0] = False  # a fully masked row
    got = clipped_surrogate(lp, old, adv, 0.2, 0.28, mask, level, delta).objective
    torch.testing.assert_close(got, surrogate_loop(lp, old, adv, mask, 0.2, 0.28, level, delta), rtol=0, atol=1e-5)


def test_sequence_ratio_gradient_is_the_mean_token_gradient():
    """GSPO with pi_old = pi_theta: grad s_i = mean_t grad log pi (the ratio is 1)."""
    lp = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = clipped_surrogate(lp, lp.detach(), torch.ones(2), 0.2, 0.2, mask, "sequence")
    out.objective[:, 0].sum().backward()  # one token per row carries the sequence's objective
    torch.testing.assert_close(lp.grad, torch.tensor([[1 / 3] * 3, [0.5, 0.5, 0.0]]), rtol=0, atol=1e-7)


# -- KL, entropy, per-token loss -----------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    log2 = math.log(2)
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[log2, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.5 * log2**2, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([[0.5 + log2 - 1, 0.0]]), rtol=0, atol=1e-6)


def test_kl_estimators_equal_the_loop():
    gen = torch.Generator().manual_seed(7)
    lp, ref = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    formulas = {"k1": lambda x, y: x - y, "k2": lambda x, y: 0.5 * (x - y) ** 2, "k3": lambda x, y: math.exp(y - x) - (y - x) - 1}
    for name, f in formulas.items():
        expected = torch.tensor([[f(float(lp[i, j]), float(ref[i, j])) for j in range(5)] for i in range(4)])
        torch.testing.assert_close(kl_penalty(lp, ref, name), expected, rtol=0, atol=1e-5)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['k1', 'k2', 'k3'\]"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match=r"valid: \['sequence', 'token'\]"):
        clipped_surrogate(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), 0.2, 0.2, level="group")


def test_entropy_bonus_in_per_token_loss():
    sur, kl, ent = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, 0.0]])
    got = per_token_loss(sur, kl, beta=0.1, entropy=ent, entropy_coef=0.01)
    torch.testing.assert_close(got, torch.tensor([[-(1.0 - 0.05 + 0.02), -(2.0 - 0.1)]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(per_token_loss(sur, kl, 0.1, ent, 0.0), per_token_loss(sur, kl, 0.1), rtol=0, atol=0)


def test_config_names_are_exactly_the_registries():
    """One registry per concept: the config's Literal names and the dispatch tables agree."""
    fields = AlgorithmConfig.model_fields
    names = lambda f: set(typing.get_args(fields[f].annotation))  # noqa: E731
    assert names("kl_estimator") == set(KL_ESTIMATORS)
    assert names("importance_sampling_level") == set(IMPORTANCE_LEVELS)
    assert names("loss_type") == set(AGGREGATIONS)
    assert names("scale_rewards") == set(SCALE_REWARDS)


# -- aggregation ---------------------------------------------------------------------------------------


def aggregate_loop(loss, mask, loss_type, totals):
    n, t = loss.shape
    rows = [[float(loss[i, j]) for j in range(t) if mask[i, j]] for i in range(n)]
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in rows if r) / totals.num_completions
    total = sum(sum(r) for r in rows)
    if loss_type in ("dapo", "token"):
        return total / totals.num_tokens
    if loss_type == "dr_grpo":
        return total / (totals.num_completions * totals.max_completion_length)
    return total / totals.process_tokens  # bnpo: the tokens of this process's whole batch


@pytest.mark.parametrize("loss_type", sorted(AGGREGATIONS))
def test_aggregations_equal_the_loop(loss_type):
    gen = torch.Generator().manual_seed(11)
    loss, mask = torch.randn(5, 6, generator=gen), torch.rand(5, 6, generator=gen) > 0.4
    mask[2] = False  # a fully masked row (e.g. a truncated completion under overlong_filter)
    mask[0, 0] = True
    totals = BatchTotals.of(mask, 6)  # N = 5: the fully masked row counts
    assert float(aggregate(loss, mask, loss_type, totals)) == pytest.approx(aggregate_loop(loss, mask, loss_type, totals), abs=1e-6)


def test_fully_masked_batch_gives_zero_loss_not_nan():
    loss = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for loss_type in AGGREGATIONS:
        out = aggregate(loss, mask, loss_type, BatchTotals(0, 0, 3))
        assert float(out.detach()) == 0.0


def test_truncated_importance_weights_by_hand():
    """TIS (Yao et al. 2025): min(pi_old / pi_sampler, cap) per token, no gradient, on the policy term only."""
    old = torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, 1.0]]).log().requires_grad_()  # [N, T]
    sampler = torch.tensor([[0.25, 0.5, 0.3], [0.3, 0.2, 1.0]]).log()  # ratios 2, 0.4, 3 / 1, 3, 1
    w = truncated_importance_weights(old, sampler, cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.4, 2.5], [1.0, 2.5, 1.0]]), rtol=0, atol=1e-6)
    assert not w.requires_grad
    sur, kl = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), torch.full((2, 3), 0.1)
    got = per_token_loss(sur, kl, beta=0.5, policy_weights=w)
    want = torch.tensor([[-(2.0 - 0.05), -(-0.8 - 0.05), -(1.25 - 0.05)], [0.05, -(7.5 - 0.05), -(-1.0 - 0.05)]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(per_token_loss(sur, kl, 0.5, policy_weights=torch.ones(2, 3)), per_token_loss(sur, kl, 0.5),
                               rtol=0, atol=0)
