"""Prompt sources: the built-in tasks and prompt files, behind one `load_task`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from grpo.data.arithmetic import arithmetic_rows
from grpo.data.countdown import countdown_rows
from grpo.data.datasets import dataset_rows
from grpo.data.files import DataError, check_rows, read_rows
from grpo.data.guess_number import guess_number_rows

INSTRUCTIONS = {
    "arithmetic": "What is {question}? Reply with only the number.",
    "countdown": (
        "Using the numbers {numbers}, write an arithmetic expression that equals {target}. You may use "
        "+ - * / and parentheses, and each number at most once. Put the expression inside "
        "<answer></answer>, for example <answer>(1 + 2) * 3</answer>."
    ),
    "gsm8k": "{question}\nThink step by step, then write the final number inside <answer></answer>.",
    "math": "{question}\nThink step by step, then put the final answer inside \\boxed{{}}.",
    "file": "{question}",
    "guess_number": "",  # the rules come with each row (grpo.envs.guess_number)
}
"""The default prompt text of each task (data.instruction overrides it)."""

ACCURACY_REWARDS = {
    "arithmetic": "answer_accuracy",
    "countdown": "countdown",
    "file": "answer_accuracy",
    "guess_number": "environment",
    "gsm8k": "answer_accuracy",
    "math": "math_accuracy",
}


def accuracy_reward(task: str) -> str:
    """The built-in reward that decides whether an answer is right, for eval accuracy and pass@k."""
    return ACCURACY_REWARDS[task]


@dataclass
class Task:
    train: list[dict]
    eval: list[dict]
    name: str


def load_task(data, needed_columns: list[str]) -> Task:
    """Rows of the configured task. `data` is a DataConfig; rows keep every column."""
    instruction = data.instruction or INSTRUCTIONS[data.task]
    if data.task == "arithmetic":
        train, eval_ = arithmetic_rows(data.digits, data.operators, data.num_train, data.num_eval, instruction, data.seed)
        _check_columns(train, data.task, needed_columns)
        return Task(train, eval_, f"arithmetic-{data.digits}d{''.join(data.operators)}")
    if data.task == "countdown":
        train, eval_ = countdown_rows(data.countdown_numbers, data.num_train, data.num_eval, instruction, data.seed)
        _check_columns(train, data.task, needed_columns)
        return Task(train, eval_, f"countdown-{data.countdown_numbers}")
    if data.task == "guess_number":
        return Task(guess_number_rows(data.num_train, data.seed), guess_number_rows(data.num_eval, data.seed + 1),
                    "guess_number")
    if data.task in ("gsm8k", "math"):
        load = lambda path: dataset_rows(path, data.task, data.question_column, data.answer_column, instruction)  # noqa: E731
        train = load(data.train_file)
        eval_ = load(data.eval_file) if data.eval_file else []
        for path, rows in ((data.train_file, train), (data.eval_file, eval_)):
            if rows:
                check_rows(rows, path, ["prompt"] + [c for c in needed_columns if c != "prompt"])
        return Task(train, eval_, data.task)
    needed = [data.prompt_column] + [c for c in needed_columns if c != data.prompt_column]
    train = _file_rows(data.train_file, data, needed)
    eval_ = _file_rows(data.eval_file, data, needed) if data.eval_file else []
    return Task(train, eval_, "file")


def _check_columns(rows: list[dict], task: str, needed: list[str]) -> None:
    """A built-in task's rows have every column the rewards take."""
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise DataError(
            f"data.task={task} has no {missing[0]!r} column (its rows have: {', '.join(sorted(rows[0]))}), and a "
            f"configured reward needs it: choose rewards for this task, or a prompt file with that column "
            f"(data.task=file data.train_file=...)"
        )


def _file_rows(path: str, data, needed: list[str]) -> list[dict]:
    rows = read_rows(path)
    if data.answer_column != "answer":  # reward functions take the reference as `answer`
        for row in rows:
            if data.answer_column in row:
                row["answer"] = row[data.answer_column]
        needed = [data.answer_column if c == "answer" else c for c in needed]
    check_rows(rows, path, needed)
    for i, row in enumerate(rows, start=1):
        if not _is_prompt(row[data.prompt_column]):
            raise DataError(
                f"{path}: row {i}, column {data.prompt_column!r}: a prompt is a string or a list of "
                f"{{role, content}} messages"
            )
    return rows


def _is_prompt(p) -> bool:
    if isinstance(p, str):
        return bool(p.strip())
    return isinstance(p, list) and bool(p) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in p)


def chat_messages(prompt, system_prompt: str | None) -> list[dict]:
    if isinstance(prompt, list):
        return prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def encode_rows(tokenizer, rows: list[dict], data) -> list[list[int]]:
    """Token ids of each row's prompt, rendered by the tokenizer's chat template and ready for the answer
    (`data`: the run's DataConfig: prompt column and system prompt)."""
    from grpo.models import encode_prompt

    return [encode_prompt(tokenizer, chat_messages(r[data.prompt_column], data.system_prompt)) for r in rows]


class PromptSampler:
    """Draws prompts in a seeded order, reshuffled each epoch; its position is two integers."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffled(self.epoch)


__all__ = ["ACCURACY_REWARDS", "INSTRUCTIONS", "DataError", "PromptSampler", "Task", "accuracy_reward", "chat_messages", "load_task"]
