"""Step-level (process) rewards, the DAPO overlong penalty, and step ends mapped to tokens."""

import math

import pytest
import torch

from grpo.rewards import score
from grpo.rewards.process import equation_steps, overlong_penalty, soft_overlong, step_accuracy, step_table, step_token_index
from grpo.testing import tiny_tokenizer


def test_step_accuracy_one_step_per_equation_line():
    text = "Let me add.\n3 + 5 = 8\n20 + 40 = 70\nSo 68."
    steps = step_accuracy([text, "68", "1 + 1 = 2 and 2 * 3 = 6\n2 + 2 = 5, 1 + 1 = 2"])
    assert steps[0] == [(len("Let me add.\n3 + 5 = 8"), 1.0), (len("Let me add.\n3 + 5 = 8\n20 + 40 = 70"), 0.0)]
    assert steps[1] == []  # no equations, no steps
    assert [r for _, r in steps[2]] == [1.0, 0.0]  # a line is right only if every equation on it is
    assert equation_steps("(2 + 3) * 4 = 20", correct=1.0, wrong=-1.0) == [(16, 1.0)]
    assert equation_steps("12 * 3 = 35  ", correct=1.0, wrong=-1.0) == [(11, -1.0)]  # trailing spaces not in the step


def test_score_keeps_steps_and_uses_their_mean_as_the_scalar():
    per_completion = lambda completion, **kw: [(1, 1.0), (2, 0.0), (3, 0.0)] if completion == "abc" else None  # noqa: E731
    result = score(
        [("s", step_accuracy, 2.0, {}), ("p", per_completion, 1.0, {})], ["q"] * 3, ["1 + 1 = 2\n2 + 2 = 5", "none", "abc"], {}
    )
    assert result.per_function["s"][0].item() == 0.5 and math.isnan(result.per_function["s"][1])  # no steps: None
    assert result.per_function["p"][2].item() == pytest.approx(1 / 3)
    assert result.steps["s"] == [[(9, 1.0), (19, 0.0)], [], []]
    assert result.steps["p"] == [None, None, [(1, 1.0), (2, 0.0), (3, 0.0)]]
    assert result.total[0].item() == 1.0 and math.isnan(result.total[1])


@pytest.mark.parametrize(
    "length, expected", [(10, 0.0), (12, 0.0), (13, -0.25), (15, -0.75), (16, -1.0), (17, -1.0)],
)
def test_soft_overlong_hand_computed(length, expected):
    # max 16, cache 4: free up to 12 tokens, then (12 - L) / 4, -1 beyond the limit (DAPO eq. 13)
    assert soft_overlong(length, 16, 4) == expected


def test_overlong_penalty_reads_completion_lengths():
    assert overlong_penalty(["a", "b"], completion_lengths=[12, 15], max_new_tokens=[16, 16], cache_length=4) == [0.0, -0.75]
    assert overlong_penalty(["a"], completion_lengths=[15], max_length=20, cache_length=4) == [0.0]
    assert overlong_penalty(["a", "b"]) == [None, None]  # eval: no lengths, does not apply
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(["a"], completion_lengths=[3], max_length=4, cache_length=8)


class PieceTokenizer:
    """Multi-character tokens, decoded by concatenation (like a BPE vocabulary)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_step_token_index_maps_character_ends_to_the_token_holding_them():
    tok = PieceTokenizer(["So", " 3+5", "=8", "\n", "1+1=", "2", "!"])
    ids = list(range(7))  # text "So 3+5=8\n1+1=2!"
    text = tok.decode(ids)
    ends = [e for e, _ in equation_steps(text)]
    assert [text[:e] for e in ends] == ["So 3+5=8", "So 3+5=8\n1+1=2!"]  # a step runs to the end of its line
    assert step_token_index(ids, tok, ends) == [2, 6]  # "=8" is token 2, "!" is token 6
    assert step_token_index(ids, tok, [14]) == [5]  # character 13 ("2") is in token 5
    assert step_token_index(ids, tok, [1, 2, 3, 100]) == [0, 0, 1, 6]  # past the end: the last token
    char = tiny_tokenizer()
    ids = char("1+1=2\nok")["input_ids"]
    assert step_token_index(ids, char, [5, 8]) == [4, 7]  # one token per character


def test_step_table_weights_steps_and_puts_scalars_on_the_last_token():
    tok = PieceTokenizer(["1+1=2", "\n", "x", "<eos>"])
    ids = torch.tensor([[0, 1, 2, 3], [2, 3, 3, 3]])  # lengths 4 and 2
    lengths = torch.tensor([4, 2])
    steps = {"s": [[(5, 1.0), (7, 0.0)], None]}
    scalars = {"s": torch.tensor([0.5, float("nan")]), "acc": torch.tensor([1.0, 0.0])}
    values, rows, index = step_table(steps, scalars, {"s": 2.0, "acc": 0.5}, ids, lengths, tok)
    assert values.tolist() == [2.0, 0.0, 0.5, 0.0]
    assert rows.tolist() == [0, 0, 0, 1] and index.tolist() == [0, 2, 3, 1]
