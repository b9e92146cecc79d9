"""The built-in arithmetic task: seeded problems "a op b" with a held-out split that never overlaps."""

from __future__ import annotations

import random

from grpo.data.files import DataError

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def problem_space(digits: int, operators: list[str]) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    span = 10**digits - lo
    return span * span * len(operators)


def arithmetic_rows(
    digits: int, operators: list[str], num_train: int, num_eval: int, instruction: str, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with columns prompt, question, answer. Eval problems never appear in train.

    When the problem space is smaller than num_train + num_eval (one-digit sums: 100),
    eval keeps its num_eval problems and train gets all the others.
    """
    space = problem_space(digits, operators)
    if num_eval >= space:
        raise DataError(
            f"data.num_eval ({num_eval}) must be smaller than the {space} distinct {digits}-digit problems"
        )
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    rng = random.Random(seed)
    wanted = min(space, num_train + num_eval)
    seen: set[tuple[int, str, int]] = set()
    problems: list[tuple[int, str, int]] = []
    if wanted > space // 2:  # dense: enumerate and shuffle
        problems = [(a, op, b) for op in operators for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
        rng.shuffle(problems)
        problems = problems[:wanted]
    else:  # sparse: rejection-sample distinct problems
        while len(problems) < wanted:
            p = (rng.randint(lo, hi), rng.choice(operators), rng.randint(lo, hi))
            if p not in seen:
                seen.add(p)
                problems.append(p)

    def row(p):
        a, op, b = p
        question = f"{a} {op} {b}"
        return {"prompt": instruction.format(question=question), "question": question, "answer": str(OPERATIONS[op](a, b))}

    eval_rows = [row(p) for p in problems[:num_eval]]
    train_rows = [row(p) for p in problems[num_eval:]]
    return train_rows, eval_rows
