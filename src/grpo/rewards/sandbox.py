"""Run untrusted Python (a model's completion) in a separate, limited process.

Every run gets a fresh process, `python -I -S` (no site-packages, no PYTHON* variables, no user
site: the standard library only), an empty environment, and its own temporary working directory,
deleted afterwards. On top of that, each protection below is applied where the OS allows it;
`capabilities()` says which ones this machine gives, and every SandboxResult lists those applied:

- "timeout": wall-clock limit; then the process group is killed (and, with "uid", every process
  of the run's uid, so children that left the group die too).
- "rlimits": CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size, open files, no core
  files, and processes (RLIMIT_NPROC).
- "uid" (when the trainer runs as root): the code runs as a uid of its own (not root, not
  "nobody" shared with others). Root ignores RLIMIT_NPROC, so this is what makes the process
  limit hold against fork bombs; it also cannot signal the trainer, read its private files
  or write anywhere it owns.
- "no_network": a new, empty network namespace (no interface but a down loopback).
- "private_fs": a new mount namespace where the working directory is a small tmpfs, and the
  trainer's directories (its cwd, HOME, /tmp, /run, ...) are hidden under empty read-only
  tmpfs mounts; what the code writes disappears with it.
- a bounded number of sandboxes run at once (`set_max_concurrency`, default min(4, CPUs)).

Not a defence against kernel exploits, and a solution can still game the test harness from
inside its own process (e.g. by introspection); reward hacking needs its own checks.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_MARK = "\x00grpo-sandbox "  # first line of stderr: the protections the boot script applied


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0
    """Wall-clock seconds for the whole run."""
    cpu_seconds: int = 10
    """CPU seconds (RLIMIT_CPU; the process gets SIGXCPU, then SIGKILL a second later)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS)."""
    max_processes: int = 16
    """Processes of the run's uid (RLIMIT_NPROC); enforced only with the "uid" protection."""
    max_file_mb: int = 16
    """Largest file it may write (RLIMIT_FSIZE); with "private_fs" also its whole working directory."""
    max_open_files: int = 64
    max_output_kb: int = 64
    """Stdout / stderr kept (the rest is dropped)."""


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    protections: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def reason(self, limits: Limits) -> str:
        """Why the process ended, in words."""
        if self.timed_out:
            return f"timeout: still running after {limits.timeout:g} s (wall clock)"
        rc = self.returncode
        if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and self.seconds >= limits.cpu_seconds):
            return f"CPU time limit ({limits.cpu_seconds} s) exceeded"
        if rc is not None and rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        last = self.stderr.strip().splitlines()[-1] if self.stderr.strip() else ""
        if "MemoryError" in self.stderr:
            return f"memory limit ({limits.memory_mb} MB) exceeded: {last}"
        return f"exit code {rc}" + (f": {last}" if last else "")


# --- the boot script: runs in the child as root (if we are), applies the limits, then execs -------

_BOOT = r"""
import ctypes, json, os, resource, sys
c = json.loads(sys.stdin.buffer.read())
done = []
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def mount(src, dst, kind, flags, data):
    if libc.mount(src.encode(), dst.encode(), kind.encode() if kind else None, flags, data.encode() if data else None):
        raise OSError(ctypes.get_errno(), "mount " + dst)
here = os.getcwd()
if c["network"] and libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
    done.append("no_network")
if c["private_fs"] and libc.unshare(0x00020000) == 0:  # CLONE_NEWNS
    try:
        mount("none", "/", None, 16384 | (1 << 18), None)  # MS_REC | MS_PRIVATE: nothing leaks out
        opts = "size=%dm,nr_inodes=1024,mode=700" % c["disk_mb"] + (",uid=%d,gid=%d" % (c["uid"], c["uid"]) if c["uid"] else "")
        mount("tmpfs", here, "tmpfs", 2 | 4, opts)
        os.chdir(here)  # into the new mount; it stays the cwd when its path is hidden below
        for d in c["hide"]:
            mount("tmpfs", d, "tmpfs", 1 | 2 | 4 | 8, "size=4k,nr_inodes=8,mode=555")  # RDONLY NOSUID NODEV NOEXEC
        done.append("private_fs")
    except OSError as e:
        sys.stderr.write("sandbox: private_fs failed: %s\n" % e)
        os._exit(125)
for name, text in c["files"].items():
    with open(name, "w") as f:
        f.write(text)
    if c["uid"]:
        os.chown(name, c["uid"], c["uid"])
fd = os.open(c["stdin"], os.O_RDONLY) if c["stdin"] else os.open(os.devnull, os.O_RDONLY)
os.dup2(fd, 0)
R = resource
lim = [(R.RLIMIT_CPU, c["cpu"], c["cpu"] + 1), (R.RLIMIT_AS, c["mem"], c["mem"]), (R.RLIMIT_FSIZE, c["fsize"], c["fsize"]),
       (R.RLIMIT_NOFILE, c["nofile"], c["nofile"]), (R.RLIMIT_CORE, 0, 0), (R.RLIMIT_NPROC, c["nproc"], c["nproc"])]
for which, soft, hard in lim:
    resource.setrlimit(which, (soft, hard))
done.append("rlimits")
if c["uid"]:
    os.setgroups([])
    os.setgid(c["uid"])
    os.setuid(c["uid"])
    done.append("uid")
sys.stderr.write("\0grpo-sandbox " + json.dumps(done) + "\n")
sys.stderr.flush()
# run the file by a path relative to the working directory (absolute paths may be hidden)
run = "import sys; sys.argv = [%r]; exec(compile(open(%r, 'rb').read(), %r, 'exec'))" % ((c["main"],) * 3)
os.execv(c["python"], [c["python"], "-I", "-S", "-c", run])
"""

_SYSTEM_DIRS = {"/", "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/var"}


def _world_runnable(path: str) -> bool:
    """Can a uid with no rights of its own execute this file (every parent searchable by others)?"""
    p = Path(path)
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


@lru_cache(maxsize=1)
def sandbox_python() -> str:
    """The interpreter for sandboxed code: this one when an unprivileged uid may run it, else a system one."""
    candidates = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""), "/usr/bin/python3", shutil.which("python3") or ""]
    if os.geteuid() != 0:
        return candidates[0]
    for c in candidates:
        if c and _world_runnable(os.path.realpath(c)):
            return os.path.realpath(c)
    return candidates[0]


def _hidden_dirs(python: str) -> list[str]:
    """Directories the sandboxed code must not see: the trainer's, the temporary and runtime ones."""
    cwd = Path.cwd().resolve()
    wanted = {"/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt", "/media", "/srv", "/opt",
              str(Path.home()), str(cwd), "/" + cwd.parts[1] if len(cwd.parts) > 1 else "/", sys.prefix}
    keep = Path(python).resolve()
    out = []
    for d in sorted(wanted):
        p = Path(d)
        if d in _SYSTEM_DIRS or not p.is_dir() or p.is_symlink() or keep.is_relative_to(p.resolve()):
            continue
        out.append(str(p.resolve()))
    # parents before children; a child of a hidden parent is hidden already
    return [d for d in out if not any(d != o and Path(d).is_relative_to(o) for o in out)]


# --- bounding concurrency: slots, each with its own uid -----------------------------------------

_slots: queue.Queue | None = None
_slots_lock = threading.Lock()


def set_max_concurrency(n: int) -> None:
    """How many sandboxes may run at once (each one process tree)."""
    global _slots
    with _slots_lock:
        _slots = queue.Queue()
        for i in range(max(1, min(n, 64))):
            _slots.put(i)


def _take_slot() -> int:
    if _slots is None:
        set_max_concurrency(min(4, os.cpu_count() or 1))
    return _slots.get()


def _uid(slot: int) -> int:
    """A uid of its own per (trainer process, slot), far above the ones people and services use."""
    return 1_000_000 + (os.getpid() % 100_000) * 64 + slot


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (kill(-1) from a process running as that uid)."""
    code = "import os, signal\ntry:\n os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n pass"
    for _ in range(2):
        subprocess.run([sandbox_python(), "-I", "-S", "-c", code], user=uid, group=uid, extra_groups=[], env={},
                       cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)


# --- running ------------------------------------------------------------------------------------


def run_python(
    files: dict[str, str], main: str = "main.py", limits: Limits = Limits(), stdin: str = "", isolate: bool = True
) -> SandboxResult:
    """Write `files` into a fresh working directory and run `python -I -S main` there, limited.

    isolate=False skips the namespaces and the uid change (rlimits and timeout still apply)."""
    return _run(files, main, limits, stdin, capabilities() if isolate else frozenset())


def _run(files: dict[str, str], main: str, limits: Limits, stdin: str, caps: frozenset[str]) -> SandboxResult:
    slot = _take_slot()
    uid = _uid(slot) if "uid" in caps else 0
    python = sandbox_python()
    try:
        with tempfile.TemporaryDirectory(prefix="grpo-sandbox-") as tmp:
            work, out_path, err_path = Path(tmp) / "work", Path(tmp) / "stdout", Path(tmp) / "stderr"
            work.mkdir(mode=0o700)
            os.chmod(tmp, 0o711)  # its uid may pass through, not list
            if uid:
                os.chown(work, uid, uid)
            stdin_path = ""
            if stdin:
                stdin_path = str(Path(tmp) / "stdin")
                Path(stdin_path).write_text(stdin)
                os.chmod(stdin_path, 0o444)
            own_procs = 0 if uid else _count_processes(os.getuid())
            config = {
                "files": files, "main": main, "python": python, "uid": uid, "stdin": stdin_path,
                "network": "no_network" in caps, "private_fs": "private_fs" in caps,
                "hide": _hidden_dirs(python) if "private_fs" in caps else [],
                "disk_mb": max(1, limits.max_file_mb), "cpu": limits.cpu_seconds, "mem": limits.memory_mb << 20,
                "fsize": limits.max_file_mb << 20, "nofile": limits.max_open_files,
                "nproc": limits.max_processes + own_procs,
            }
            start = time.perf_counter()
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = subprocess.Popen(
                    [python, "-I", "-S", "-c", _BOOT], stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env={},
                    start_new_session=True, close_fds=True,
                )
                timed_out = False
                try:
                    proc.stdin.write(json.dumps(config).encode())
                    proc.stdin.close()
                    proc.wait(timeout=limits.timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                except BrokenPipeError:
                    pass
                finally:
                    _kill_group(proc.pid)
                    if uid:
                        _kill_uid(uid)
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
            seconds = time.perf_counter() - start
            stdout, stderr = _read(out_path, limits), _read(err_path, limits)
    finally:
        _slots.put(slot)
    applied: list[str] = ["timeout"]
    if stderr.startswith(_MARK):
        line, _, stderr = stderr.partition("\n")
        applied += json.loads(line[len(_MARK):])
    return SandboxResult(proc.returncode, stdout, stderr, timed_out, seconds, applied)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, limits: Limits) -> str:
    with path.open("rb") as f:
        return f.read(limits.max_output_kb << 10).decode("utf-8", errors="replace")


def _count_processes(uid: int) -> int:
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                n += p.stat().st_uid == uid
            except OSError:
                pass
    return n


@lru_cache(maxsize=1)
def capabilities() -> frozenset[str]:
    """The protections this machine gives (probed once by running a trivial program with each)."""
    caps = {"timeout", "rlimits"}
    extras = ["no_network", "private_fs"] + (["uid"] if os.geteuid() == 0 and _world_runnable(sandbox_python()) else [])
    for extra in extras:  # each one on top of those that worked
        result = _probe(frozenset(caps | {extra}))
        if result is not None and extra in result.protections and result.stdout.strip() == "ok":
            caps.add(extra)
    return frozenset(caps)


def _probe(caps: frozenset[str]) -> SandboxResult | None:
    try:
        return _run({"main.py": "print('ok')"}, "main.py", Limits(timeout=20), "", caps)
    except (OSError, subprocess.SubprocessError):
        return None


# --- running test cases -------------------------------------------------------------------------


@dataclass
class CaseResult:
    passed: bool
    reason: str  # "passed", or why not


_HARNESS = r'''
import contextlib, io, json, os, signal, sys

def main():
    spec = json.load(open("tests.json"))
    os.remove("tests.json")
    token, per_test = spec.pop("token"), spec["per_test_timeout"]
    out = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # what the solution writes to fd 1 cannot look like a result
    code = open("solution.py").read()

    class Timeout(BaseException):
        pass

    def alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)

    def report(i, ok, reason):
        out.write(json.dumps({"token": token, "case": i, "passed": ok, "reason": reason}) + "\n")
        out.flush()

    def run(source, ns, stdin_text="", program=False):
        sys.stdin, buf = io.StringIO(stdin_text), io.StringIO()
        signal.setitimer(signal.ITIMER_REAL, per_test)
        try:
            with contextlib.redirect_stdout(buf):
                try:
                    exec(compile(source, "<solution>", "exec"), ns)
                except SystemExit as e:
                    if not program or e.code not in (None, 0):  # a program may end with exit(0)
                        raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return buf.getvalue()

    def why(e):
        if isinstance(e, Timeout):
            return "timeout: over %g s" % per_test
        if isinstance(e, AssertionError):
            return "assertion failed" + (": %s" % e if str(e) else "")
        return "%s: %s" % (type(e).__name__, e)

    if spec["mode"] == "asserts":
        ns = {"__name__": "__main__"}
        try:
            run(code + "\n" + spec["setup"], ns)
        except BaseException as e:
            for i in range(len(spec["cases"])):
                report(i, False, "the solution failed before the tests: " + why(e))
            return
        for i, case in enumerate(spec["cases"]):
            try:
                run(case, ns)
                report(i, True, "passed")
            except BaseException as e:
                report(i, False, why(e))
    else:
        for i, (stdin_text, expected) in enumerate(spec["cases"]):
            ns = {"__name__": "__main__"}
            try:
                got = run(code, ns, stdin_text, program=True)
            except BaseException as e:
                report(i, False, why(e))
                continue
            norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]
            if norm(got) == norm(expected):
                report(i, True, "passed")
            else:
                report(i, False, "wrong output: %r, expected %r" % (got[:200], expected[:200]))

main()
'''


def parse_tests(tests) -> tuple[str, list, str]:
    """A dataset's test cases -> (mode, cases, setup).

    - assert statements: a list of strings, or one string of code whose top-level `assert`
      statements are the cases (its other statements, e.g. imports, run first): mode "asserts";
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
        tree = ast.parse(tests)  # a SyntaxError here is the dataset's, not the completion's
        cases = [ast.get_source_segment(tests, s) for s in tree.body if isinstance(s, ast.Assert)]
        setup = "\n".join(ast.get_source_segment(tests, s) for s in tree.body if not isinstance(s, ast.Assert))
        return "asserts", cases, setup
    raise ValueError(f"test cases must be assert statements or input/output pairs, got {type(tests).__name__}")


def _text(x) -> str:
    return x if isinstance(x, str) else "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def run_tests(code: str, tests, limits: Limits = Limits(), per_test_timeout: float = 3.0) -> tuple[list[CaseResult], SandboxResult]:
    """Run `code` against the test cases in one sandbox; one CaseResult per case, in order.

    Cases the process never reported (it crashed, was killed, or timed out) fail with the reason."""
    mode, cases, setup = parse_tests(tests)
    token = secrets.token_hex(16)
    spec = {"mode": mode, "cases": cases, "setup": setup, "token": token, "per_test_timeout": per_test_timeout}
    files = {"main.py": _HARNESS, "solution.py": code, "tests.json": json.dumps(spec)}
    result = run_python(files, limits=limits)
    reported: dict[int, CaseResult] = {}
    for line in result.stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("token") == token and isinstance(r.get("case"), int):
            reported.setdefault(r["case"], CaseResult(bool(r["passed"]), str(r["reason"])))
    missing = CaseResult(False, "not run: " + result.reason(limits))
    return [reported.get(i, missing) for i in range(len(cases))], result
