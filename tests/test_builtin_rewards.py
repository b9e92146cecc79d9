"""Built-in rewards and tasks on literal strings: math equivalence, countdown, length, format, code."""

import json
from pathlib import Path

import pytest

from grpo.config import load_config
from grpo.data import DataError, load_task
from grpo.data.countdown import countdown_rows
from grpo.data.datasets import gsm8k_answer, math_answer
from grpo.rewards.builtin import (
    code_tests, countdown, countdown_value, extract_code, length_reward, math_accuracy, think_format,
)

SAMPLES = Path(__file__).parents[1] / "src" / "grpo" / "data" / "samples"


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The answer is $0.5$", "\\frac{1}{2}", 1.0),
        ("<answer>1/2</answer>", "\\frac12", 1.0),
        ("so we get \\boxed{1,000}", "1000", 1.0),
        ("\\boxed{5\\sqrt{2}}", "\\sqrt{50}", 1.0),
        ("<answer>\\frac{5}{6}</answer>", "\\frac{10}{12}", 1.0),
        ("\\boxed{9\\pi}", "9\\pi", 1.0),
        ("\\boxed{0.6}", "0.5", 0.0),
        ("no answer here", "0.5", 0.0),
    ],
)
def test_math_accuracy_equivalent_forms(completion, answer, expected):
    assert math_accuracy([completion], answer=[answer]) == [expected]


def test_math_accuracy_without_reference_is_none():
    assert math_accuracy(["\\boxed{1}"], answer=[None]) == [None]


def test_countdown_rules():
    nums, tgt = [[3, 5, 7, 25]] * 8, [100] * 8
    completions = [
        "<answer>(7 - 3) * 25</answer>",  # right
        "(7 - 3) * 25 = 100",  # last line, with "= target"
        "<answer>4 * 25</answer>",  # 4 is not given
        "<answer>25 * 5 - 25</answer>",  # 25 used twice
        "<answer>(7 - 3) * 25 + 0</answer>",  # 0 is not given
        "<answer>__import__('os').system('x')</answer>",  # not arithmetic: never eval'd
        "<answer>25 / (5 - 5)</answer>",  # 5 twice, and a division by zero
        "<answer>(3 + 7) * 5 * 25 / 12.5</answer>",  # 12.5 not an integer given
    ]
    assert countdown(completions, nums, tgt) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert countdown_value("7/2*2", [7, 2, 2]) == 7  # exact fractions


def test_countdown_task_is_solvable_seeded_and_disjoint():
    train, eval_ = countdown_rows(4, 40, 10, "{question}", seed=1)
    assert (train, eval_) == countdown_rows(4, 40, 10, "{question}", seed=1)
    assert len(train) == 40 and len(eval_) == 10
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in eval_}
    solutions = [f"<answer>{r['solution']}</answer>" for r in train + eval_]
    assert countdown(solutions, [r["numbers"] for r in train + eval_], [r["target"] for r in train + eval_]) == [1.0] * 50


def test_think_format_and_length():
    assert think_format(["<think>x</think>\n<answer>4</answer>", "<answer>4</answer>", "<think></think><answer>4</answer>",
                         "<think>x</think><answer>4</answer> and more"]) == [1.0, 0.0, 0.0, 0.0]
    assert length_reward(["a" * 100, "a" * 150, "a" * 200, "a" * 50], target=100) == [1.0, 0.5, 0.0, 0.5]
    assert length_reward(["a" * 110], target=100, tolerance=10) == [1.0]


def test_extract_code():
    text = "Here:\n```python\nx = 1\n```\nand better:\n```python\ndef f():\n    return 2\n```\nDone."
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"
    assert extract_code("```python\ndef f():\n    return 3") == "def f():\n    return 3"  # cut off by max tokens


def test_code_tests_reward_is_the_fraction_passed():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return 3\n```"
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    assert code_tests(good, tests) == 1.0 and code_tests(half, tests) == 0.5
    assert code_tests(good, None) is None


def test_gsm8k_and_math_answers():
    assert gsm8k_answer("so 2 + 3 = 5\n#### 1,500") == "1500"
    assert gsm8k_answer("no marker") is None
    assert math_answer("thus $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.") == "\\frac{\\sqrt{3}}{2}"


@pytest.mark.parametrize("task, reward", [("gsm8k", "answer_accuracy"), ("math", "math_accuracy")])
def test_dataset_files_load_with_their_answers(task, reward):
    path = SAMPLES / f"{task}_sample.jsonl"
    cfg = load_config(None, [f"data.task={task}", f"data.train_file={path}", f"data.eval_file={path}", f"rewards=[{{name: {reward}}}]"])
    t = load_task(cfg.data, ["answer"])
    assert len(t.train) == 10 and len(t.eval) == 10
    first = t.train[0]
    assert first["answer"] == ("26" if task == "gsm8k" else "\\frac{5}{6}") and first["question"] in first["prompt"]
    if task == "gsm8k":
        assert [r["answer"] for r in t.train][7] == "20000"


def test_dataset_file_without_answers_is_named(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "no marker"}) + "\n")
    cfg = load_config(None, ["data.task=gsm8k", f"data.train_file={path}"])
    with pytest.raises(DataError, match="g.jsonl: row 1: no final answer found"):
        load_task(cfg.data, ["answer"])


def test_code_sample_runs_with_code_tests():
    rows = [json.loads(line) for line in (SAMPLES / "code_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    answers = {"add": "def add(a, b):\n    return a + b", "io": "a, b = map(int, input().split())\nprint(a + b)"}
    assert code_tests(f"```python\n{answers['add']}\n```", rows[0]["tests"]) == 1.0
    assert code_tests(f"```python\n{answers['io']}\n```", rows[8]["tests"]) == 1.0


# --- the answer-format rewards (configs/answer_format.yaml) -----------------------------------------------------

TAGGED = [
    ("<answer>7</answer>", "7", 1.0, 1.0),
    ("3 + 4 = 7\n<answer> 7. </answer>", "7", 1.0, 1.0),  # text around, spaces and a full stop inside
    ("<answer>8</answer>", "7", 0.0, 1.0),  # the format, the wrong number
    ("<answer>3 + 4</answer>", "7", 0.0, 1 / 3),  # an expression is not the number: only "<answer>3"
    ("<answer>7", "7", 0.0, 1 / 3),  # opened with a number, never closed
    ("Put it inside <answer></answer>: 7", "7", 0.0, 0.0),  # empty tags (an echoed instruction) earn nothing
    ("inside <answer></answer> like this: <answer>7</answer>", "7", 0.0, 2 / 3),  # a pair, but the tags twice
    ("<answer>7</answer><answer>7</answer>", "7", 0.0, 2 / 3),  # twice: not exactly one
    ("7", "7", 0.0, 0.0),
    ("<answer>-3</answer>", "-3", 1.0, 1.0),
    ("<answer>1,234</answer>", "1234", 1.0, 1.0),
]


@pytest.mark.parametrize("text, ref, strict, pieces", TAGGED)
def test_tagged_answer_and_tag_pieces(text, ref, strict, pieces):
    from grpo.rewards.builtin import tag_pieces, tagged_answer

    assert tagged_answer([text], [ref]) == [strict]
    assert tag_pieces([text]) == pytest.approx([pieces], rel=0, abs=1e-12)


def test_tagged_answer_without_a_reference_does_not_apply_and_other_tags_work():
    from grpo.rewards.builtin import tag_pieces, tagged_answer

    assert tagged_answer(["<answer>7</answer>", "<answer>7</answer>"], [None, "seven"]) == [None, None]
    assert tagged_answer(["<result>7</result>"], ["7"], tag="result") == [1.0]
    assert tag_pieces(["<result>7</result>"], tag="result") == [1.0] and tag_pieces(["<answer>7</answer>"], tag="result") == [0.0]


def test_answer_format_recipe_orders_the_behaviours():
    """configs/answer_format.yaml's weighted total: tagged and right > tagged, wrong > some tags > no tags, right
    or wrong alike (answer_accuracy is reported with weight 0, so a group without tags has no gradient)."""
    from grpo.config import load_config
    from grpo.rewards import build_rewards, score

    cfg = load_config(Path(__file__).parents[1] / "configs" / "answer_format.yaml")
    texts = ["<answer>7</answer>", "<answer>8</answer>", "<answer>7", "3 + 4 = 7", "no idea"]
    result = score(build_rewards(cfg.rewards), ["What is 3 + 4?"] * 5, texts, {"answer": ["7"] * 5})
    assert result.total.tolist() == pytest.approx([1.5, 0.5, 0.5 / 3, 0.0, 0.0], rel=0, abs=1e-12)
    assert result.per_function["answer_accuracy"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]  # still measured
