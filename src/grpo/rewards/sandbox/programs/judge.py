"""The judge's process: the test's own code, run without the solution.

Its namespace starts from this fresh interpreter's builtins, the standard modules the test uses as
`module.attr` (imported here, never the solution's), and the solution's names the test uses (its
functions and classes as Remote proxies, its plain values as copies); then the test's setup runs
(its names win over the solution's), then each case. A solution's function is called across the
channel with plain arguments and answers with a plain value (or another Remote): the test's
builtins, modules, setup and comparisons stay out of the solution's reach. Verdicts go to the
trainer on this process's own stdout, which the solution's process cannot reach.
"""

import ast
import importlib
import json
import os
import signal
import time

from .channel import ChannelError, Lines, Solution


class Timeout(BaseException):
    pass


def _alarm(*_):
    raise Timeout()


def _why(e, seconds):
    if isinstance(e, Timeout):
        return "timeout: over %g s" % seconds
    if isinstance(e, AssertionError):
        return "assertion failed" + (": %s" % e if str(e) else "")
    return "%s: %s" % (type(e).__name__, e)


def explained(case):
    """The case's code; a single `assert left <op> right` without a message gets one: the left
    side's value ("assertion failed: add(1, 2) = 0"), evaluated once, in the same order."""
    try:
        tree = ast.parse(case)
    except SyntaxError:
        return case
    test = tree.body[0].test if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert) else None
    if (not isinstance(test, ast.Compare) or len(test.ops) != 1 or tree.body[0].msg is not None
            or not any(isinstance(n, ast.Name) for n in ast.walk(test.left))):  # (a literal says nothing)
        return case
    shown = ast.unparse(test.left)
    tree.body.insert(0, ast.Assign([ast.Name("_left_", ast.Store())], test.left))
    test.left = ast.Name("_left_", ast.Load())
    tree.body[1].msg = ast.parse("%r + ' = ' + repr(_left_)[:200]" % shown, mode="eval").body
    return ast.fix_missing_locations(tree)


def judge(job, solution, verdict):
    """Run the setup and the cases; call verdict(i, passed, reason, lost) once per case."""
    seconds, cases = job["seconds"], job["cases"]
    load_error = solution.hello()
    if load_error is not None:
        for i in range(len(cases)):
            verdict(i, False, "the solution failed before the tests: " + load_error, solution.lines.broken is not None)
        return
    ns = {"__name__": "__main__"}
    signal.signal(signal.SIGALRM, _alarm)

    def timed(fn, *args):
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def run(source):  # text, or a module's tree
        timed(exec, compile(source, "<test>", "exec"), ns)

    for name in job["modules"]:
        try:
            ns[name] = importlib.import_module(name)
        except ImportError:
            pass
    for name in job["names"]:
        try:
            ns[name] = timed(solution.get, name)
        except ChannelError:
            break
        except BaseException:
            pass  # the solution does not define it (or its answer took too long: then it is not defined)
    setup_error = None
    try:
        run(job["setup"])
    except BaseException as e:
        setup_error = "the test's setup failed: " + _why(e, seconds)
    for i, case in enumerate(cases):
        if solution.lines.broken:  # the solution is gone (or silent): no later case is judged
            verdict(i, False, "not run: " + solution.lines.broken, True)
            continue
        if setup_error:
            verdict(i, False, setup_error, False)
            continue
        try:
            run(explained(case))
            verdict(i, True, "passed", False)
        except BaseException as e:
            verdict(i, False, _why(e, seconds), isinstance(e, ChannelError))


def main():
    job = json.load(open("job.json"))
    out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the test's prints go nowhere

    def verdict(i, passed, reason, lost):
        out.write(json.dumps({"case": i, "passed": passed, "reason": reason[:500], "lost": lost}) + "\n")
        out.flush()

    solution = Solution(Lines(*job["fds"]), job["seconds"] + 1.0, time.monotonic() + job["deadline"])
    judge(job, solution, verdict)
