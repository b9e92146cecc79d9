"""The `python` built-in: a code-execution tool, run in grpo's sandbox (never in the trainer's process).

The tool `python(code)` runs the code as a program (`python -I -S`, the standard library only) in the
sandbox of grpo.rewards.sandbox (its own process, uid, namespaces, time, CPU and memory limits; see
jail.py) and returns what it printed, followed on failure by the reason (the error's last line, a
timeout, a limit), cut to `max_output` characters. A ```python fence around the code is removed.
A program that fails is a result the model reads (not a tool error, which is a call that could not
run: malformed, wrong arguments, or the tool itself past its timeout). The final turn is checked against the row's `answer` like the calculator's (None when the row has none).
"""

from __future__ import annotations

import math

from grpo.envs.base import register_environment
from grpo.envs.tools import TAGS_INSTRUCTIONS, Format, ToolEnvironment
from grpo.rewards.builtin import extract_code
from grpo.rewards.sandbox import Limits, run_python


def run_code(code: str, limits: Limits, max_output: int) -> str:
    """Run `code` in the sandbox: its stdout, then on failure the reason it ended, cut to max_output chars."""
    result = run_python({"main.py": extract_code(code)}, limits=limits)
    text = result.stdout
    if not result.ok:
        text += ("" if not text or text.endswith("\n") else "\n") + f"Error: {result.reason(limits)}"
    return truncate(text, max_output)


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    note = "\n... ({} more characters)"
    kept = limit - len(note.format(len(text)))
    return text[:limit] if kept < 1 else text[:kept] + note.format(len(text) - kept)


@register_environment("python")
class PythonEnvironment(ToolEnvironment):
    """A ToolEnvironment with one tool, `python(code)`, run in the sandbox.

    Args:
        timeout: wall-clock seconds per program (the sandbox's limit; the call itself may wait 10x + 30 s,
            in case it queues for a free sandbox).
        memory_mb: memory of the program's whole process tree.
        max_output: characters of output the model reads.
        format, result_role, instructions, answer_column: as ToolEnvironment's (the final answer is
            checked against the row's `answer`: 1.0 / 0.0, None when the row has none).
    """

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 256,
        max_output: int = 2000,
        format: Format = "auto",
        result_role: str = "tool",
        instructions: str = TAGS_INSTRUCTIONS,
        answer_column: str = "answer",
    ):
        if max_output < 1:
            raise ValueError(f"python environment: max_output must be >= 1, got {max_output}")
        # CPU seconds one past the wall clock: the wall clock ends a busy program, with the clearer message
        self.limits = Limits(timeout=timeout, cpu_seconds=math.ceil(timeout) + 1, memory_mb=memory_mb)
        self.max_output = max_output
        example = {"python": "print(2 ** 10)"}
        # The sandbox ends the program after `timeout`; the call's own limit only catches a call stuck waiting
        # for a free sandbox (at most sandbox.set_max_concurrency run at once) or in the sandbox itself.
        super().__init__([self.python], format, 10 * timeout + 30, result_role, example, instructions, answer_column)

    def python(self, code: str) -> str:
        """Run a Python program (standard library only) and return what it prints.

        Args:
            code: the program; print the values you need
        """
        return run_code(code, self.limits, self.max_output)
