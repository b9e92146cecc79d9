"""The `calculator` built-in: arithmetic the model cannot do alone, with a calculator tool.

Rows need a prompt (e.g. the arithmetic task's "What is 123 * 456? ...") and an `answer` column; the
final turn (the first without a tool call) scores 1.0 when its answer (<answer>, \\boxed{} or its last
number) equals the row's answer, else 0.0 (the `answer_accuracy` reward).
With the default SmolLM2 (a chat template without tools) a call reads `<calculator>123 * 456</calculator>`.
"""

from __future__ import annotations

import json
import re

from grpo.envs.base import register_environment
from grpo.envs.tools import TAGS_INSTRUCTIONS, Format, ToolCall, ToolEnvironment
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
    row's `answer` (1.0 / 0.0; None when the row has none). Args as ToolEnvironment's, and:

        demonstrate: put one worked example before the row's prompt, as chat turns: `demo_prompt` with the
            `example` expression, the call, its result (in `result_format`), the bare number. The untrained
            SmolLM2-135M calls the tool in ~0% of samples without it and in ~20% with it (configs/calculator.yaml).
        demo_prompt: the example's user message, "{expression}" replaced by `example`.
    """

    def __init__(
        self,
        format: Format = "auto",
        timeout: float = 5.0,
        result_role: str = "tool",
        example: str = "123 * 456",
        instructions: str = TAGS_INSTRUCTIONS,
        answer_column: str = "answer",
        system: str | None = None,
        result_format: str = "{result}",
        demonstrate: bool = False,
        demo_prompt: str = "Compute {expression}. Reply with only the number.",
    ):
        super().__init__([calculator], format, timeout, result_role, {"calculator": example}, instructions,
                         answer_column, system, result_format)
        self.demonstrate, self.demo_prompt, self.example = demonstrate, demo_prompt, example

    def bind(self, tokenizer) -> None:
        """Resolve the call format, then write the demonstration's call in it."""
        super().bind(tokenizer)
        if self.demonstrate:
            self.demonstration = self.demo_turns()

    def demo_turns(self) -> list[dict]:
        """The worked example as chat messages: the question, the call, its result, the answer."""
        result = calculator(self.example)
        if self._format() == "tags":
            call = f"<calculator>{self.example}</calculator>"
        else:
            call = "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": self.example}}) + \
                "</tool_call>"
        answer = self.result_message(ToolCall("calculator", {"expression": self.example}), result)
        return [{"role": "user", "content": self.demo_prompt.replace("{expression}", self.example)},
                {"role": "assistant", "content": call}, answer, {"role": "assistant", "content": result}]
