"""The built-in countdown task (as in TinyZero): reach a target with the given numbers and + - * /,
each number at most once. Every problem is solvable: the target is built from the numbers."""

from __future__ import annotations

import random
from fractions import Fraction

from grpo.data.files import DataError

_OPS = ("+", "-", "*", "/")


def _random_solution(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction] | None:
    """Combine all numbers pairwise in random order with random operators; (expression, value)."""
    pool = [(str(n), Fraction(n)) for n in numbers]
    while len(pool) > 1:
        rng.shuffle(pool)
        (ea, a), (eb, b) = pool.pop(), pool.pop()
        op = rng.choice(_OPS)
        if op == "-" and a < b:
            (ea, a), (eb, b) = (eb, b), (ea, a)  # keep intermediate values positive
        if op == "/" and (b == 0 or (a / b).denominator != 1):
            op = "*"
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
        pool.append((f"({ea} {op} {eb})", value))
    expr, value = pool[0]
    return (expr[1:-1] if expr.startswith("(") else expr), value


def countdown_rows(
    count: int, num_train: int, num_eval: int, instruction: str, seed: int, max_number: int = 99, max_target: int = 999
) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with columns prompt, numbers, target, answer (the target, as text) and
    solution (one expression that reaches it). Eval problems never appear in train."""
    rng = random.Random(seed)
    wanted, seen, rows = num_train + num_eval, set(), []
    attempts = 0
    while len(rows) < wanted:
        attempts += 1
        if attempts > 50 * wanted + 1000:
            raise DataError(f"countdown: could not draw {wanted} distinct problems with {count} numbers")
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        expr, value = _random_solution(rng, numbers)
        if value.denominator != 1 or not 1 <= value <= max_target:
            continue
        key = (tuple(sorted(numbers)), int(value))
        if key in seen:
            continue
        seen.add(key)
        target = int(value)
        question = f"numbers {numbers}, target {target}"
        rows.append({
            "prompt": instruction.format(question=question, numbers=numbers, target=target),
            "numbers": numbers, "target": target, "answer": str(target), "solution": expr,
        })
    return rows[num_eval:], rows[:num_eval]
