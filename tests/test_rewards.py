"""Reward functions on literal strings, and the scoring contract (None, weights, errors)."""

import math

import pytest
import torch

from grpo.rewards import RewardError, score
from grpo.rewards.builtin import answer_accuracy, extract_answer, format_reward, to_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>68</answer>", "68"),
        ("I think <answer> 12 </answer> and then <answer>13</answer>", "13"),
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("23 + 45 = 68", "68"),
        ("The answer is 1,234.", "1,234"),
        ("no digits here", None),
        ("-7", "-7"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, value",
    [("68", 68.0), ("1,234", 1234.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("12 + 5", 17.0), ("$5", 5.0),
     ("2^3", 8.0), ("abc", None), ("1/0", None), ("__import__('os')", None)],
)
def test_to_number(text, value):
    assert to_number(text) == value


def test_answer_accuracy_literal_strings():
    completions = ["68", "23 + 45 = 68", "<answer>68</answer> not 70", "The answer is 67.", "\\boxed{68.0}", "", "<answer>136/2</answer>"]
    got = answer_accuracy(completions, answer=["68"] * len(completions))
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_answer_accuracy_without_reference_is_none():
    assert answer_accuracy(["5"], answer=[None]) == [None]


def test_answer_accuracy_text_answers_compare_as_text():
    assert answer_accuracy(["<answer>Paris</answer>", "<answer>Rome</answer>"], answer=["Paris", "Paris"]) == [1.0, 0.0]


def test_format_reward_literal_strings():
    completions = [
        "<answer>5</answer>",
        "5",
        "<answer></answer>",
        "<answer>5</answer><answer>6</answer>",
        "<answer>5",
    ]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    two = format_reward(["<think>a</think><answer>5</answer>", "<answer>5</answer><think>a</think>", "<think>a</think>"], tags=["think", "answer"])
    assert two == [1.0, 0.5, 0.5]


def _const(values):
    return lambda prompts, completions, **kw: values


def test_score_weights_and_none():
    specs = [("a", _const([1.0, None, None]), 2.0, {}), ("b", _const([0.5, 1.0, None]), 1.0, {})]
    result = score(specs, ["p"] * 3, ["c"] * 3, {})
    # row 0: 2*1 + 0.5 ; row 1: only b applies ; row 2: nothing applies -> NaN (not zero)
    assert result.total[:2].tolist() == [2.5, 1.0]
    assert math.isnan(result.total[2])
    assert math.isnan(result.per_function["a"][1])


def test_score_passes_columns_by_name():
    seen = {}

    def fn(prompts, completions, answer, difficulty, **kw):
        seen.update(answer=answer, difficulty=difficulty, scale=kw["scale"])
        return [1.0] * len(completions)

    score([("fn", fn, 1.0, {"scale": 3})], ["p", "q"], ["x", "y"], {"answer": ["1", "2"], "difficulty": [1, 2]})
    assert seen == {"answer": ["1", "2"], "difficulty": [1, 2], "scale": 3}


def test_score_rejects_wrong_length_and_non_numbers():
    with pytest.raises(RewardError, match="list of 2 values"):
        score([("bad", _const([1.0]), 1.0, {})], ["p"] * 2, ["c"] * 2, {})
    with pytest.raises(RewardError, match="returned 'yes'.*completion 1"):
        score([("bad", _const([1.0, "yes"]), 1.0, {})], ["p"] * 2, ["c", "d"], {})


def test_score_names_a_raising_reward():
    def boom(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="reward 'boom' raised KeyError"):
        score([("boom", boom, 1.0, {})], ["p"], ["c"], {})


def test_score_accepts_bools_and_tensors():
    result = score([("t", _const([True, torch.tensor(0.5)]), 1.0, {})], ["p"] * 2, ["c"] * 2, {})
    assert result.total.tolist() == [1.0, 0.5]


def test_rewards_are_summed_in_float64():
    """Weighted sums such as 0.1 + 0.2 and values float32 cannot hold (5.001) stay float64 numbers."""
    from grpo.rewards import score

    texts = ["a", "b"]
    result = score([("one", lambda completions, **kw: [0.1, 0.1], 1.0, {}),
                    ("two", lambda completions, **kw: [5.0, 5.001], 2.0, {})], ["p", "p"], texts, {})
    assert result.total.dtype == torch.float64 and result.per_function["two"].dtype == torch.float64
    assert result.total.tolist() == [0.1 + 2 * 5.0, 0.1 + 2 * 5.001]
