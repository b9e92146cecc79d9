"""Built-in reward functions: answer checking (numbers, math, countdown), format, length, code tests.

Each is an ordinary function following the contract in grpo.rewards.base; read them as examples.
"""

from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction
import re

from grpo.data.answers import boxed  # noqa: F401  (also a name of this module: the answer checks use it)
from grpo.rewards.base import register_reward
from grpo.rewards.sandbox import parse_python

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


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: in <answer></answer>, else \\boxed{}, else its last number."""
    tagged = _tag_contents(text, "answer")
    if tagged:
        return tagged[-1].strip()
    boxed_ = boxed(text)
    if boxed_ is not None:
        return boxed_
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _eval_node(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and abs(left) > 1 and right * math.log2(abs(left)) > 4096:
            raise ValueError("result too large")  # (((9**64)**64)**64)**64 would run for minutes
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
        value = float(_eval_node(parse_python(s, mode="eval").body))  # OverflowError: an int past float's range
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) else None


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


def _plain_number(text: str) -> float | None:
    """The value of text that is just a number ("7", "-3", "1,234", "2.5", "7."), else None (not "3 + 4")."""
    s = text.strip().rstrip(".")
    return to_number(s) if _NUMBER.fullmatch(s) else None


@register_reward("tagged_answer")
def tagged_answer(completions, answer, tag: str = "answer", **_) -> list[float | None]:
    """Strict: 1.0 when the completion holds exactly one <tag>N</tag> and N is a plain number equal to the
    reference (text around the tags is allowed; "3 + 4" inside them is not a number); else 0.0. None when the row
    has no reference. Rarely above 0 for a model that was never taught the tags: pair it with tag_pieces and a
    lenient answer_accuracy for a signal to start from (configs/answer_format.yaml)."""
    out: list[float | None] = []
    for text, ref in zip(completions, answer):
        b = to_number(ref)
        if b is None:
            out.append(None)
            continue
        inside = _tag_contents(text, tag)
        once = len(inside) == 1 and text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1
        a = _plain_number(inside[0]) if once else None
        out.append(float(a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))))
    return out


@register_reward("tag_pieces")
def tag_pieces(completions, tag: str = "answer", **_) -> list[float]:
    """Partial credit for the format <tag>N</tag>, a third for each piece: <tag> followed by a number, that number
    closed by </tag>, and the tags written exactly once each. 1.0 exactly when tagged_answer's format holds
    (whatever the number). Shaping for a model that writes the tags in a few samples in a hundred: a sample with
    only "<tag>7" already differs from its group. Empty tags score nothing, so echoing an instruction that shows
    "<tag></tag>" earns no credit."""
    number = rf"\s*(?:{_NUMBER.pattern})"
    opened, closed = re.compile(rf"<{tag}>{number}"), re.compile(rf"<{tag}>{number}\.?\s*</{tag}>")
    out = []
    for text in completions:
        pair = bool(closed.search(text))
        once = pair and text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1
        out.append((bool(opened.search(text)) + pair + once) / 3)
    return out


@register_reward("think_format")
def think_format(completions, **_) -> list[float]:
    """DeepSeek-R1's format: 1.0 when the completion is exactly <think>...</think> then
    <answer>...</answer> (whitespace around them allowed, both non-empty), else 0.0."""
    pattern = re.compile(r"\s*<think>(?!.*<think>)(.+?)</think>\s*<answer>(?!.*<answer>)(.+?)</answer>\s*", re.DOTALL)
    return [float(bool((m := pattern.fullmatch(t)) and m.group(1).strip() and m.group(2).strip())) for t in completions]


@register_reward("length")
def length_reward(completions, target: int = 200, tolerance: int = 0, **_) -> list[float]:
    """Closeness of the completion's length in characters to `target`: 1.0 within `tolerance`,
    falling linearly to 0.0 at `tolerance + target` characters away (shorter or longer). For a
    token-based penalty of overlong completions see `overlong_penalty` (DAPO)."""
    if target <= 0:
        raise ValueError("length: target must be > 0 characters")
    return [max(0.0, 1.0 - max(0, abs(len(t) - target) - tolerance) / target) for t in completions]


# --- math answers: math-verify -------------------------------------------------------------------


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("math_accuracy needs math-verify: pip install math-verify") from None
    return math_verify


@register_reward("math_accuracy")
def math_accuracy(completions, answer, **_) -> list[float | None]:
    """1.0 when the completion's final answer is mathematically equal to the reference, checked with
    math-verify (Hugging Face): LaTeX, \\boxed{}, fractions, decimals, percentages, sets, intervals,
    equivalent forms (\\frac{1}{2} = 0.5 = 1/2). None when the row has no reference."""
    mv = _math_verify()
    import threading

    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    out: list[float | None] = []
    for text, ref in zip(completions, answer):
        if ref is None or not str(ref).strip():
            out.append(None)
            continue
        ref = str(ref)
        gold = mv.parse(ref if "$" in ref or "\\boxed" in ref else f"${ref}$", parsing_timeout=timeout)
        tagged = _tag_contents(text, "answer")
        given = mv.parse(f"${tagged[-1]}$" if tagged and "\\boxed" not in tagged[-1] else text, parsing_timeout=timeout)
        if not given and tagged:
            given = mv.parse(tagged[-1], parsing_timeout=timeout)
        out.append(float(bool(gold) and bool(given) and mv.verify(gold, given, timeout_seconds=timeout)))
    return out


# --- countdown -----------------------------------------------------------------------------------


def countdown_value(expression: str, numbers: list[int]) -> Fraction | None:
    """The exact value of an expression of + - * / and parentheses over integers, each of them one of
    `numbers` used at most once (as many times as it is given); None if the expression breaks a rule."""
    expression = expression.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    if len(expression) > 200:
        return None
    try:
        tree = parse_python(expression.strip(), mode="eval").body
    except SyntaxError:
        return None
    available = list(numbers)

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if node.value not in available:
                raise ValueError("number not given, or used too often")
            available.remove(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div):
                return a / b  # ZeroDivisionError is caught below
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.BinOp):
            return -ev(node.operand)
        raise ValueError("only integers, + - * / and parentheses")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


@register_reward("countdown")
def countdown(completions, numbers, target, **_) -> list[float]:
    """1.0 when the completion's expression (in <answer></answer>, else its last line; a trailing
    "= target" is allowed) uses only the given numbers, each at most once, with + - * / and
    parentheses, and equals the target exactly; else 0.0. Parsed with `ast`, never eval'd."""
    out = []
    for text, nums, tgt in zip(completions, numbers, target):
        tagged = _tag_contents(text, "answer")
        lines = [line for line in text.strip().splitlines() if line.strip()]
        expr = tagged[-1] if tagged else (lines[-1] if lines else "")
        if "=" in expr:
            left, _, right = expr.partition("=")
            expr = left if to_number(right) == float(tgt) else right if to_number(left) == float(tgt) else left
        value = countdown_value(expr, [int(n) for n in nums])
        out.append(float(value is not None and value == Fraction(int(tgt))))
    return out


# --- code: run the completion against the row's tests in the sandbox ------------------------------

_CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last ```python fenced block of a completion (an unclosed last one counts), else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    if blocks:
        return blocks[-1]
    start = max(text.rfind("```python"), text.rfind("```py\n"))
    if start >= 0:  # a block cut off by max_new_tokens
        return text[text.index("\n", start) + 1 :] if "\n" in text[start:] else ""
    return text


@register_reward("code_tests")
def code_tests(
    completion, tests, timeout: float = 10.0, per_test_timeout: float = 3.0, memory_mb: int = 512, **_
) -> float | None:
    """Fraction of the row's test cases that the completion's code passes, run in the sandbox
    (grpo.rewards.sandbox: own process, uid and PID/IPC/mount/network namespaces, a root that shows
    the system's trees only, time, CPU, and a memory and process limit for the whole tree; the cases
    are judged outside the solution's process: the test's own code in a judge process, or the
    trainer, asks the solution's process for the values it needs). `tests`: assert statements (a
    list, or code whose top-level asserts are the cases) or input/output pairs for a stdin/stdout
    program. None without tests; whatever the completion does, a number otherwise.
    Written per completion, so completions run in parallel (RewardSpec.concurrency threads; at most
    sandbox.set_max_concurrency runs at once)."""
    from grpo.rewards.sandbox import Limits, run_tests

    if tests is None or (isinstance(tests, (list, str, dict)) and not tests):
        return None
    limits = Limits(timeout=timeout, cpu_seconds=max(1, math.ceil(timeout)), memory_mb=memory_mb)
    cases, _ = run_tests(extract_code(completion), tests, limits, per_test_timeout)
    return sum(c.passed for c in cases) / len(cases) if cases else None


@register_reward("environment")
def environment_reward(completions, turn_rewards: list | None = None, turn_ends: list | None = None,
                       environment_error: list | None = None, per_turn: bool = False, **_) -> list:
    """The environment's own rewards (grpo.envs): an episode's return, the sum of its turn rewards (0.0 when no turn
    was rewarded, e.g. an episode cut before its final answer); None where the environment raised
    (environment.on_error=none) or the run has no environment. per_turn: one step per rewarded turn instead, at
    the end of the turn (for algorithm.advantage=process: a turn's reward reaches the tokens up to it)."""
    if turn_rewards is None:
        return [None] * len(completions)
    out: list = []
    errors = environment_error or [None] * len(completions)
    for rewards, ends, error in zip(turn_rewards, turn_ends or [None] * len(completions), errors):
        rewarded = [(end, r) for end, r in zip(ends or [0] * len(rewards), rewards) if r is not None]
        if error is not None:
            out.append(None)
        elif per_turn:
            out.append(rewarded)
        else:
            out.append(float(sum(r for _, r in rewarded)))
    return out
