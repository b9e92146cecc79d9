"""Judging a solution against a row's test cases, from outside the solution's process.

The solution runs in one sandbox (programs/serve.py), alone with its own code: it never sees a test,
an expected value or a verdict. Whoever judges asks it, over a pipe (programs/channel.py), for the
values the test needs: its names, and calls of its functions with plain arguments; each answer is
plain data (programs/codec.py) or a reference to an object that stays in its process.

- Assert cases run in a second sandbox, the judge (programs/judge.py): the test's own code, setup
  included, with fresh builtins, the standard modules it names imported there, its setup's names
  over the solution's, and the solution's functions as proxies. So rebinding `math.isclose`,
  `sorted`, `abs` or any builtin in the solution changes nothing of the test, and the setup's values
  (`EXPECTED = {...}`) never enter the solution's process.
- Simple asserts (no setup; only literals, comparisons, not/and/or, and calls of the solution's
  functions on literals, e.g. `assert add(1, 2) == 3`) are judged by the trainer itself, the same
  way, without the second process.
- Input/output cases: the trainer sends each input, the solution's process answers with the
  program's output, and the trainer compares it with the expected one, which never enters it.

Verdicts travel only from the judge's own stdout (or are the trainer's): nothing the solution
writes can be one. Whatever its process writes that cannot be read fails the case that asked;
when the channel cannot be used any more (closed, a line over 1 MiB, no answer in time), every
later case fails too (a case the solution did not answer fails).
Not guaranteed: a program can still hard-code the answers to the tests it is shown; arguments and
results must be plain data (a test that passes a lambda to the solution fails); an argument the
solution mutates in place is not seen changed by the test.
"""

from __future__ import annotations

import ast
import builtins
import fcntl
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

from grpo.rewards.sandbox import jail
from grpo.rewards.sandbox.jail import Jail, Limits, SandboxResult, program_files
from grpo.rewards.sandbox.programs.channel import CLOSED, ChannelError, Lines, Solution
from grpo.rewards.sandbox.programs.codec import TooManyKeys

MAX_KEYS_HERE = 5000
"""Set and dict entries per answer the trainer decodes itself (n colliding keys cost n**2 / 2 probes:
5000, about 0.15 s); an answer with more sends the whole run to the judge process."""
_BUILTINS = frozenset(dir(builtins))


@dataclass
class CaseResult:
    passed: bool
    reason: str  # "passed", or why not


_AST_LOCK = threading.Lock()


def parse_python(source: str, mode: str = "exec") -> ast.AST:
    """ast.parse under one lock for the process. Reward functions run on several threads at once, and on
    CPython 3.11 two concurrent ast.parse calls can fail with "SystemError: AST constructor recursion depth
    mismatch" (the converter's depth counter is shared by the threads): seen with 8 concurrent code_tests."""
    with _AST_LOCK:
        return ast.parse(source, mode=mode)


def parse_tests(tests) -> tuple[str, list, str]:
    """A dataset's test cases -> (mode, cases, setup).

    - assert statements: a list of strings, or one string of code whose top-level `assert`
      statements are the cases (its other statements, e.g. imports, are the setup and run first):
      mode "asserts";
    - input/output pairs: a list of {"input": ..., "output": ...}, or {"inputs": [...], "outputs": [...]}
      (the APPS layout): mode "io", the solution is run as a program on each input.
    JSON text of any of these is read too (parquet files often store it so)."""
    if isinstance(tests, str) and tests.lstrip()[:1] in ("[", "{"):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            pass
    if isinstance(tests, dict) and {"inputs", "outputs"} <= set(tests):
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
        return "io", [[_text(t.get("input", "")), _text(t.get("output", ""))] for t in tests], ""
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        return "asserts", list(tests), ""
    if isinstance(tests, str):
        tree = parse_python(tests)  # a SyntaxError here is the dataset's, not the completion's
        cases = [ast.get_source_segment(tests, s) for s in tree.body if isinstance(s, ast.Assert)]
        setup = "\n".join(ast.get_source_segment(tests, s) for s in tree.body if not isinstance(s, ast.Assert))
        return "asserts", cases, setup
    raise ValueError(f"test cases must be assert statements or input/output pairs, got {type(tests).__name__}")


def _text(x) -> str:
    return x if isinstance(x, str) else "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def run_tests(code: str, tests, limits: Limits = Limits(), per_test_timeout: float = 3.0) -> tuple[list[CaseResult], SandboxResult]:
    """Run `code` against the test cases; one CaseResult per case, in order, judged outside the
    solution's process (module docstring), and how the solution's process ended."""
    mode, cases, setup = parse_tests(tests)
    if mode == "io":
        return _judge_here(code, "io", cases, limits, per_test_timeout)
    simple = [_simple(c) for c in cases] if not setup.strip() else []
    if all(s is not None for s in simple) and len(simple) == len(cases):
        try:
            return _judge_here(code, "asserts", simple, limits, per_test_timeout)
        except TooManyKeys:
            pass  # too large to judge here: judged there
    return _judge_there(code, cases, setup, limits, per_test_timeout)


# --- the solution's process ----------------------------------------------------------------------


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are not 0, 1 or 2 (they are passed on by number)."""
    r, w = os.pipe()
    out = []
    for fd in (r, w):
        if fd < 3:
            fd, old = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), fd
            os.close(old)
        out.append(fd)
    return out[0], out[1]


def _start_solution(code: str, mode: str, limits: Limits, slot: int, seconds: float) -> tuple[Jail, int, int]:
    """The solution's server in its sandbox; the caller's ends of its channel (read, write)."""
    to_r, to_w = _pipe()
    from_r, from_w = _pipe()
    job = {"mode": mode, "seconds": seconds, "fds": [to_r, from_w]}
    files = {"solution.py": code, "job.json": json.dumps(job), **program_files("serve")}
    try:
        return Jail(files, "main.py", limits, jail.capabilities(), slot, fds=(to_r, from_w)), from_r, to_w
    except BaseException:
        os.close(from_r)
        os.close(to_w)
        raise
    finally:
        os.close(to_r)
        os.close(from_w)


def _end_solution(sandbox: Jail, deadline: float, closed: bool) -> tuple[SandboxResult, bool]:
    """Its result, and whether it had ended by itself: `closed`, it closed its channel (it is
    ending: wait for it), or it had ended already. Our ends are closed by now: that ends a server."""
    ended = closed or sandbox.proc.poll() is not None
    still = sandbox.wait(min(2.0 if closed else 0.5, max(0.0, deadline - time.monotonic())))
    return sandbox.finish(timed_out=still and time.monotonic() >= deadline), ended


def _closed(broken: str | None) -> bool:
    return broken is not None and broken.startswith(CLOSED)


def _lost(result: SandboxResult, ended: bool, broken: str | None, limits: Limits) -> CaseResult:
    """A case the solution did not answer: why, as its process ended or as the channel failed."""
    if ended or result.timed_out or not broken:
        return CaseResult(False, "not run: " + result.reason(limits))
    return CaseResult(False, "not run: " + broken)


# --- judged here: input/output cases and simple asserts -------------------------------------------


def _judge_here(code: str, mode: str, items: list, limits: Limits, seconds: float) -> tuple[list[CaseResult], SandboxResult]:
    with jail.concurrency_slot() as slot:
        sandbox, rfd, wfd = _start_solution(code, mode, limits, slot, seconds)
        deadline = time.monotonic() + limits.timeout
        lines = Lines(rfd, wfd)
        solution = Solution(lines, seconds + 1.0, deadline, max_keys=MAX_KEYS_HERE)
        out: list[CaseResult | None] = []
        try:
            load_error = solution.hello()
            names: dict = {}
            for item in items:
                if load_error is not None or lines.broken:
                    out.append(None)
                elif mode == "io":
                    out.append(_check_output(solution, *item))
                else:
                    out.append(_check_assert(item, solution, names))
        finally:
            os.close(rfd)
            os.close(wfd)
            result, ended = _end_solution(sandbox, deadline, _closed(lines.broken))
    if load_error is not None and not lines.broken:
        return [CaseResult(False, "the solution failed before the tests: " + load_error)] * len(items), result
    lost = _lost(result, ended, lines.broken, limits)
    return [r if r is not None else lost for r in out], result


def _check_output(solution: Solution, stdin_text: str, expected: str) -> CaseResult | None:
    try:
        got = solution.ask(op="run", stdin=stdin_text)
    except (ChannelError, TooManyKeys) as e:
        return None if solution.lines.broken else CaseResult(False, f"an unreadable answer: {e}")
    except Exception as e:
        return CaseResult(False, f"{type(e).__name__}: {e}"[:300])
    if type(got) is not str:
        return CaseResult(False, "no output reported")
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    if norm(got) == norm(expected):
        return CaseResult(True, "passed")
    return CaseResult(False, f"wrong output: {got[:200]!r}")


_LITERAL = (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.Load, ast.USub, ast.UAdd)
_SIMPLE = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Call, ast.Name, ast.keyword, ast.Not, ast.And, ast.Or, ast.cmpop) + _LITERAL


def _simple(case: str) -> ast.expr | None:
    """The test of an assert the trainer can judge itself: literals, comparisons, not/and/or, and
    calls of the solution's functions (not builtins) on such; else None (the judge process)."""
    try:
        tree = parse_python(case)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    funcs = {id(n.func) for n in ast.walk(test) if isinstance(n, ast.Call)}
    for n in ast.walk(test):
        if not isinstance(n, _SIMPLE):
            return None
        if isinstance(n, ast.Name) and (id(n) not in funcs or n.id in _BUILTINS):
            return None
        if isinstance(n, ast.Call) and (not isinstance(n.func, ast.Name) or any(isinstance(a, ast.Starred) for a in n.args)
                                        or any(k.arg is None for k in n.keywords)):
            return None
        if isinstance(n, ast.UnaryOp) and not isinstance(n.op, ast.Not) and not isinstance(n.operand, ast.Constant):
            return None
        if isinstance(n, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and any(isinstance(m, ast.Call) for m in ast.walk(n)):
            return None
    return test


def _check_assert(test: ast.expr, solution: Solution, names: dict) -> CaseResult | None:
    seen: list[tuple[str, object]] = []
    try:
        passed = bool(_evaluate(test, solution, names, seen))
    except ChannelError as e:
        return None if solution.lines.broken else CaseResult(False, f"an unreadable answer: {e}")
    except TooManyKeys:
        raise
    except Exception as e:  # the solution's error, or e.g. '<' between a str and an int
        return CaseResult(False, f"{type(e).__name__}: {e}"[:300])
    if passed:
        return CaseResult(True, "passed")
    got = ", ".join(f"{s} = {v!r}"[:200] for s, v in seen)
    return CaseResult(False, "assertion failed" + (f": {got}" if got else ""))


_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
            ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b}


def _evaluate(node: ast.expr, solution: Solution, names: dict, seen: list):
    """A simple assert's test (see _simple), here: the calls asked of the solution, the rest on the
    plain values it answers (exact types: no object of the solution compares here)."""
    if isinstance(node, ast.Call):
        if node.func.id not in names:
            names[node.func.id] = solution.get(node.func.id)
        args = [_evaluate(a, solution, names, seen) for a in node.args]
        kwargs = {k.arg: _evaluate(k.value, solution, names, seen) for k in node.keywords}
        value = names[node.func.id](*args, **kwargs)
        seen.append((ast.unparse(node), value))
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, solution, names, seen)
    if isinstance(node, ast.BoolOp):
        result = None
        for v in node.values:
            result = _evaluate(v, solution, names, seen)
            if bool(result) == isinstance(node.op, ast.Or):
                return result
        return result
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, solution, names, seen)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, solution, names, seen)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    return ast.literal_eval(node)


# --- judged there: the test's own code in the judge process ---------------------------------------


def _names(setup: str, cases: list[str]) -> tuple[list[str], list[str]]:
    """The names the test uses that the solution may provide, and the standard modules it uses as
    `module.attr` (imported in the judge, whatever the solution binds to that name)."""
    loads, bases = set(), set()
    for source in [setup, *cases]:
        try:
            tree = parse_python(source)
        except SyntaxError:
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                loads.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                bases.add(n.value.id)
    modules = {b for b in bases if b in sys.stdlib_module_names}
    return sorted(n for n in loads - _BUILTINS - modules if not n.startswith("__")), sorted(modules)


def _judge_there(code: str, cases: list[str], setup: str, limits: Limits, seconds: float) -> tuple[list[CaseResult], SandboxResult]:
    names, modules = _names(setup, cases)
    with jail.concurrency_slot() as slot:
        sandbox, rfd, wfd = _start_solution(code, "asserts", limits, slot, seconds)
        deadline = time.monotonic() + limits.timeout
        judged, verdicts = None, {}
        try:
            job = {"setup": setup, "cases": cases, "names": names, "modules": modules, "seconds": seconds,
                   "deadline": limits.timeout, "fds": [rfd, wfd]}
            files = {"job.json": json.dumps(job), **program_files("judge")}
            try:
                judge = Jail(files, "main.py", limits, jail.capabilities(), slot, out_kb=1024, fds=(rfd, wfd), role=1)
            finally:
                os.close(rfd)
                os.close(wfd)
            judged = judge.finish(judge.wait(limits.timeout + 0.5))
            verdicts = _verdicts(judged.stdout, len(cases))
        finally:
            closed = any(v["lost"] and CLOSED in v["reason"] for v in verdicts.values())
            result, ended = _end_solution(sandbox, deadline, closed)
    lost = _lost(result, ended, "the judge did not report: " + judged.reason(limits), limits)
    out = []
    for i in range(len(cases)):
        v = verdicts.get(i)
        if v is None or (v["lost"] and not v["passed"]):
            out.append(lost if v is None or ended or result.timed_out else CaseResult(False, v["reason"]))
        else:
            out.append(CaseResult(v["passed"], v["reason"]))
    return out, result


def _verdicts(stdout: str, n: int) -> dict[int, dict]:
    """The judge's verdicts, the first per case; read defensively all the same."""
    out: dict[int, dict] = {}
    for line in stdout.splitlines():
        try:
            v = json.loads(line)
        except Exception:
            continue
        if (type(v) is dict and type(v.get("case")) is int and 0 <= v["case"] < n and type(v.get("passed")) is bool
                and type(v.get("reason")) is str and v["case"] not in out):
            out[v["case"]] = {"passed": v["passed"], "reason": v["reason"], "lost": v.get("lost") is True}
    return out
