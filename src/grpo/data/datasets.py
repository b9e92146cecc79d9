"""Loaders for common math datasets saved as .jsonl / .parquet: each writes its answer its own way.

- GSM8K (Cobbe et al. 2021): `question`, and `answer` = worked solution ending in "#### 72".
- MATH (Hendrycks et al. 2021): `problem`, and `solution` with the final answer in \\boxed{...};
  files that already carry an `answer` column (e.g. MATH-500) use it as is.

Rows keep every column; they gain `prompt` (the instruction applied to the question), `answer`
(the final answer alone) and `solution` (the original worked solution).
"""

from __future__ import annotations

from grpo.data.files import DataError, read_rows
from grpo.data.answers import boxed


def gsm8k_answer(text: str) -> str | None:
    """"... so she has 72 clips.\\n#### 72" -> "72" (thousands separators dropped)."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def math_answer(solution: str) -> str | None:
    return boxed(solution)


def dataset_rows(path: str, kind: str, question_column: str | None, answer_column: str, instruction: str) -> list[dict]:
    """Rows of a GSM8K-style (kind="gsm8k") or MATH-style (kind="math") file."""
    question_column = question_column or {"gsm8k": "question", "math": "problem"}[kind]
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows, start=1):
        question = row.get(question_column)
        if not isinstance(question, str) or not question.strip():
            raise DataError(
                f"{path}: row {i} has no {question_column!r} text (columns: {', '.join(sorted(row))}); "
                f"set data.question_column"
            )
        if kind == "gsm8k":
            solution = row.get(answer_column)
            answer = gsm8k_answer(solution) if isinstance(solution, str) else None
            where = f"{answer_column!r} ending in '#### <answer>'"
        else:
            given = row.get(answer_column)
            solution = row.get("solution")
            answer = str(given).strip() if given not in (None, "") else (math_answer(solution) if isinstance(solution, str) else None)
            where = f"{answer_column!r} column or a 'solution' with \\boxed{{...}}"
        if answer is None:
            raise DataError(f"{path}: row {i}: no final answer found; a {kind} row needs an {where}")
        out.append({**row, "prompt": instruction.format(question=question), "question": question,
                    "answer": answer, "solution": solution})
    return out
