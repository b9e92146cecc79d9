"""Built-in reward functions: answer checking and format."""

from __future__ import annotations

import ast
import math
import operator
import re

from grpo.rewards.base import register_reward

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _tag_contents(text: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: in <answer></answer>, else \\boxed{}, else its last number."""
    tagged = _tag_contents(text, "answer")
    if tagged:
        return tagged[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _eval_node(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_node(node.operand))
    raise ValueError("not an arithmetic expression")


def to_number(text: str | int | float | None) -> float | None:
    """A number or a plain arithmetic expression ("3/4", "12 + 5", "1,234", "$5") as a float, else None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().strip("$").replace(",", "").replace("\\frac{", "(").replace("}{", ")/(").rstrip(".")
    s = s.replace("}", ")").replace("\\cdot", "*").replace("\\times", "*").replace("×", "*").replace("^", "**")
    if not s or len(s) > 100:
        return None
    try:
        value = _eval_node(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return float(value) if math.isfinite(value) else None


@register_reward("answer_accuracy")
def answer_accuracy(completions, answer, tolerance: float = 1e-6, **_) -> list[float | None]:
    """1.0 when the completion's answer (<answer> tag, \\boxed{}, or last number) equals the reference
    numerically (or as text, when either is not a number); else 0.0. None when the row has no reference."""
    out: list[float | None] = []
    for text, ref in zip(completions, answer):
        if ref is None or (isinstance(ref, str) and not ref.strip()):
            out.append(None)
            continue
        given = extract_answer(text)
        a, b = to_number(given), to_number(ref)
        if a is not None and b is not None:
            out.append(float(abs(a - b) <= tolerance * max(1.0, abs(b))))
        else:
            out.append(float(given is not None and given.strip() == str(ref).strip()))
    return out


@register_reward("format")
def format_reward(completions, tags: list[str] = ("answer",), **_) -> list[float]:
    """Fraction of the expected tags that appear exactly once, well formed (<t>non-empty</t>) and
    in the given order; 1.0 when all do."""
    out = []
    for text in completions:
        ok, last_end = 0, 0
        for tag in tags:
            opens, closes = text.count(f"<{tag}>"), text.count(f"</{tag}>")
            match = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
            if opens == 1 and closes == 1 and match and match.group(1).strip() and match.start() >= last_end:
                ok += 1
                last_end = match.end()
        out.append(ok / len(tags))
    return out
