"""The code sandbox on hostile code: each attack is contained, reported with a reason, and the
test process (standing in for the trainer) keeps running. Each run takes well under a few seconds."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from grpo.rewards.sandbox import Limits, capabilities, parse_tests, run_python, run_tests

LIMITS = Limits(timeout=4, cpu_seconds=3, memory_mb=256, max_processes=8)
CAPS = capabilities()


def needs(cap):
    return pytest.mark.skipif(cap not in CAPS, reason=f"this machine does not allow the {cap!r} protection")


def live_processes_of(uids: set[int]) -> int:
    """Processes of these uids that are not zombies (a zombie waits for init to reap it)."""
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if p.stat().st_uid in uids and (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    n += 1
            except (OSError, IndexError):
                pass
    return n


def test_good_code_passes_and_bad_code_fails_per_case():
    cases, result = run_tests("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(1, 1) == 3"], LIMITS)
    assert [c.passed for c in cases] == [True, False] and "assertion failed" in cases[1].reason
    assert result.ok


def test_stdin_stdout_programs():
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "11"}]
    cases, _ = run_tests("a, b = map(int, input().split())\nprint(a + b)\n", tests, LIMITS)
    assert [c.passed for c in cases] == [True, False] and "wrong output" in cases[1].reason


def test_parse_tests_layouts():
    assert parse_tests("import math\nassert f(1) == 1\nassert f(2) == 2") == ("asserts", ["assert f(1) == 1", "assert f(2) == 2"], "import math")
    assert parse_tests('{"inputs": ["1"], "outputs": ["2"]}') == ("io", [["1", "2"]], "")


def test_infinite_loop_is_stopped():
    cases, _ = run_tests("def f():\n    while True:\n        pass\n", ["assert f() == 1", "assert 1 == 1"], LIMITS, per_test_timeout=0.5)
    assert not cases[0].passed and "timeout" in cases[0].reason and cases[1].passed


def test_loop_that_ignores_the_alarm_hits_the_wall_clock():
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    start = time.perf_counter()
    cases, result = run_tests(code, ["assert True"], Limits(timeout=1.5, cpu_seconds=10))
    assert time.perf_counter() - start < 4
    assert not cases[0].passed and result.timed_out and "timeout" in cases[0].reason


def test_cpu_limit():
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    cases, result = run_tests(code, ["assert True"], Limits(timeout=6, cpu_seconds=1))
    assert not cases[0].passed and not result.timed_out and "CPU time limit" in cases[0].reason


def test_memory_bomb():
    cases, _ = run_tests("x = bytearray(2 * 1024 ** 3)\n", ["assert True"], LIMITS)
    assert not cases[0].passed and "MemoryError" in cases[0].reason


@needs("uid")
def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.perf_counter()
    cases, result = run_tests(bomb, ["assert True"], Limits(timeout=1.5, cpu_seconds=2, max_processes=8))
    assert time.perf_counter() - start < 5
    assert not cases[0].passed and "not run" in cases[0].reason
    # the process limit held: the run counted its own successful forks
    counter = "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n            time.sleep(5); os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint(n)\n"
    result = run_python({"main.py": counter}, limits=Limits(timeout=3, max_processes=8))
    assert int(result.stdout.strip()) < 8
    uid_base = 1_000_000 + (os.getpid() % 100_000) * 64
    uids = {uid_base + slot for slot in range(64)}
    deadline = time.monotonic() + 2
    while live_processes_of(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_processes_of(uids) == 0  # nothing left behind (its sleeping children were killed)


@needs("private_fs")
def test_writing_outside_its_folder_fails(tmp_path):
    target = tmp_path / "pwned.txt"
    code = f"open('local.txt', 'w').write('fine')\nopen({str(target)!r}, 'w').write('x')\n"
    cases, _ = run_tests(code, ["assert open('local.txt').read() == 'fine'"], LIMITS)
    assert not cases[0].passed and ("FileNotFoundError" in cases[0].reason or "PermissionError" in cases[0].reason)
    assert not target.exists()
    cases, _ = run_tests("open('/tmp/grpo-sandbox-pwned', 'w')", ["assert True"], LIMITS)
    assert not cases[0].passed and not Path("/tmp/grpo-sandbox-pwned").exists()


def test_no_access_to_the_trainers_environment(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "s3cret-value")
    code = (
        "import os\nprint(dict(os.environ))\n"
        "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\nexcept OSError as e:\n    print('denied', e)\n"
    )
    result = run_python({"main.py": code}, limits=LIMITS)
    assert result.returncode == 0 and "s3cret-value" not in result.stdout and "GRPO_TEST_SECRET" not in result.stdout


@needs("private_fs")
def test_trainers_files_are_hidden():
    here = os.getcwd()
    result = run_python({"main.py": f"import os\nprint(os.listdir({here!r}))\n"}, limits=LIMITS)
    assert "pyproject.toml" not in result.stdout


@needs("no_network")
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []
    threading.Thread(target=lambda: got.append(_accept(server)), daemon=True).start()
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"
    cases, _ = run_tests(code, ["assert True"], LIMITS)
    assert not cases[0].passed and ("OSError" in cases[0].reason or "Connection" in cases[0].reason)
    time.sleep(0.2)
    assert got in ([], [None])
    server.close()


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


@needs("uid")
def test_killing_its_parent_fails():
    cases, _ = run_tests("import os\nos.kill(os.getppid(), 9)\n", ["assert True"], LIMITS)
    assert not cases[0].passed and "PermissionError" in cases[0].reason
    assert os.getpid() > 0  # still here


def test_exiting_early_does_not_pass():
    cases, _ = run_tests("def f():\n    import os\n    os._exit(0)\n", ["assert f() == 1", "assert True"], LIMITS)
    assert [c.passed for c in cases] == [False, False] and "not run" in cases[0].reason
    cases, _ = run_tests("def f():\n    raise SystemExit(0)\n", ["assert f() == 1"], LIMITS)
    assert not cases[0].passed


def test_printed_fake_results_do_not_count():
    fake = 'print(\'{"token": "x", "case": 0, "passed": true, "reason": "passed"}\')\n'
    cases, _ = run_tests(fake, ["assert False"], LIMITS)
    assert not cases[0].passed


def test_subclasses_of_plain_types_cross_as_the_plain_values_they_hold():
    """A Counter, a namedtuple, an IntEnum are compared as the dict, tuple, int they hold; their own
    __eq__ / __iter__ play no part (a list subclass that iterates as [9, 9] is still [1, 2])."""
    code = ("from collections import Counter, namedtuple\nfrom enum import IntEnum\nP = namedtuple('P', 'x y')\n"
            "class E(IntEnum):\n    A = 3\nclass Weird(list):\n    def __iter__(self):\n        return iter([9, 9])\n"
            "    def __eq__(self, other):\n        return True\n"
            "def count(s):\n    return Counter(s)\ndef point():\n    return P(1, 2)\ndef three():\n    return E.A\n"
            "def weird():\n    return Weird([1, 2])\n")
    tests = ["assert count('aab') == {'a': 2, 'b': 1}", "assert point() == (1, 2)", "assert three() == 3",
             "assert weird() == [1, 2]", "assert weird() == [9, 9]", "assert weird() == []"]
    cases, _ = run_tests(code, tests, LIMITS)
    assert [c.passed for c in cases] == [True, True, True, True, False, False]


def test_the_channel_reads_anything_defensively():
    """programs/channel.py on a plain pipe: unreadable lines raise ChannelError (the case fails), a line
    over the limit or a closed pipe break the channel, replies to other requests are skipped."""
    from grpo.rewards.sandbox.programs.channel import ChannelError, Lines, Solution

    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        lines = Lines(r, w2, max_line=10_000)
        for garbage in (b"[" * 5000, b"9" * 5000, b"\xff\xfe", b'{"n": 1, "value": ["int", "' + b"9" * 900 + b'"]'):
            os.write(w, garbage + b"\n")
            with pytest.raises(ChannelError):
                lines.receive(time.monotonic() + 1)
            assert lines.broken is None
        solution = Solution(lines, 1.0, time.monotonic() + 5)
        os.write(w, b'{"n": 7, "value": ["int", "1"]}\n{"n": 1, "value": ["list", [["int", "2"]]]}\n')
        assert solution.ask(op="get", name="f") == [2]  # the stray reply (n 7) skipped
        assert os.read(r2, 1000).startswith(b'{"op": "get"')
        os.write(w, b'{"n": 2, "value": ["int", "' + b"9" * 5000 + b'"]}\n')
        with pytest.raises(ChannelError):
            solution.ask(op="get", name="f")  # 5000 digits: over the 4300 a value may have
        os.write(w, b"x" * 15_000)
        with pytest.raises(ChannelError, match="over 10000 bytes"):
            lines.receive(time.monotonic() + 1)
        assert lines.broken  # and it stays broken
        with pytest.raises(ChannelError):
            solution.ask(op="get", name="f")
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


def test_a_failed_assert_says_the_value_judged_here_or_by_the_judge():
    cases, _ = run_tests("def fact(n):\n    return 0\n", ["assert fact(5) == 120"], LIMITS)
    assert cases[0].reason == "assertion failed: fact(5) = 0"  # judged by the trainer
    cases, _ = run_tests("def fact(n):\n    return 0\n", "E = {5: 120}\nassert fact(5) == E[5]\nassert 0 < fact(5)", LIMITS)
    assert [c.reason for c in cases] == ["assertion failed: fact(5) = 0", "assertion failed"]  # by the judge process


FIRST_RUNS = """
import sys, threading
from grpo.rewards.sandbox import jail, run_tests
jail.set_max_concurrency(int(sys.argv[1]))
code, tests = "def add(a, b):\\n    return a + b\\n", ["assert add(1, 2) == 3"]
io = "print(sum(map(int, input().split())))"
results = []
def one(i):
    kind = i % 3
    if kind == 0:
        results.append(run_tests(code, tests)[0][0].passed)
    elif kind == 1:
        results.append(run_tests(io, [{"input": "1 2", "output": "3"}])[0][0].passed)
    else:  # judged in a second sandbox: the asserts have setup code
        results.append(run_tests(code, "x = 1\\nassert add(x, 2) == 3")[0][0].passed)
threads = [threading.Thread(target=one, args=(i,)) for i in range(int(sys.argv[2]))]
for t in threads: t.start()
for t in threads: t.join()
print(results)
"""


@pytest.mark.parametrize("slots,threads", [(1, 1), (1, 3), (2, 2), (2, 6)])
def test_the_first_runs_of_a_process_do_not_wait_on_each_other(slots, threads):
    """A process's first sandbox runs probe the machine's protections; runs that held every slot while
    the probe waited for one deadlocked (a fresh process, so nothing is probed yet; a timeout, not a hang)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FIRST_RUNS, str(slots), str(threads)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str([True] * threads)
