"""Prompt sources: the built-in tasks and prompt files, behind one `load_task`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from grpo.data.arithmetic import arithmetic_rows
from grpo.data.files import DataError, check_rows, read_rows


@dataclass
class Task:
    train: list[dict]
    eval: list[dict]
    name: str


def load_task(data, needed_columns: list[str]) -> Task:
    """Rows of the configured task. `data` is a DataConfig; rows keep every column."""
    if data.task == "arithmetic":
        train, eval_ = arithmetic_rows(
            data.digits, data.operators, data.num_train, data.num_eval, data.instruction, data.seed
        )
        return Task(train, eval_, f"arithmetic-{data.digits}d{''.join(data.operators)}")
    needed = [data.prompt_column] + [c for c in needed_columns if c != data.prompt_column]
    train = _file_rows(data.train_file, data, needed)
    eval_ = _file_rows(data.eval_file, data, needed) if data.eval_file else []
    return Task(train, eval_, "file")


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


__all__ = ["DataError", "PromptSampler", "Task", "chat_messages", "load_task"]
