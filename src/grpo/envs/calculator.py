"""The `calculator` built-in: arithmetic the model cannot do alone, with a calculator tool.

Rows need a prompt (e.g. the arithmetic task's "What is 123 * 456? ...") and an `answer` column; the
final turn (the first without a tool call) scores 1.0 when its answer (<answer>, \\boxed{} or its last
number) equals the row's answer, else 0.0 (the `answer_accuracy` reward).
With the default SmolLM2 (a chat template without tools) a call reads `<calculator>123 * 456</calculator>`.
"""

from __future__ import annotations

import re

from grpo.envs.base import register_environment
from grpo.envs.tools import TAGS_INSTRUCTIONS, Format, ToolEnvironment
from grpo.rewards.builtin import _eval_node
from grpo.rewards.sandbox import parse_python


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / ** and parentheses.

    Args:
        expression: the expression to evaluate, e.g. 123 * 456
    """
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,234 -> 1234
    if len(text) > 200:
        raise ValueError("the expression is too long (at most 200 characters)")
    try:
        tree = parse_python(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return format_number(_eval_node(tree.body))  # the shared safe evaluator: numbers and + - * / ** only


def format_number(value: int | float) -> str:
    """A result as the model should read it: whole numbers without ".0", others to 12 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


@register_environment("calculator")
class CalculatorEnvironment(ToolEnvironment):
    """A ToolEnvironment with one tool, `calculator(expression)`; the final answer is checked against the
    row's `answer` (1.0 / 0.0; None when the row has none). Args as ToolEnvironment's."""

    def __init__(
        self,
        format: Format = "auto",
        timeout: float = 5.0,
        result_role: str = "tool",
        example: str = "123 * 456",
        instructions: str = TAGS_INSTRUCTIONS,
        answer_column: str = "answer",
    ):
        super().__init__([calculator], format, timeout, result_role, {"calculator": example}, instructions, answer_column)
