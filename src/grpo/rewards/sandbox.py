"""Run untrusted Python (a model's completion) in a separate, limited process, and judge it from outside.

Every run gets a fresh process, `python -I -S` (no site-packages, no PYTHON* variables, no user
site: the standard library only), an empty environment, and its own temporary working directory,
deleted afterwards. On top of that, each protection below is applied where the kernel allows it;
`capabilities()` says which ones this machine gives (the first call says once, on the
"grpo.sandbox" logger, which are missing and what is weaker then), and every SandboxResult lists
those applied:

- "timeout": wall-clock limit; then the run is killed from outside (see "pid_ns" and "cgroup").
- "rlimits": CPU seconds (RLIMIT_CPU), address space per process (RLIMIT_AS), file size, open
  files, no core files, and processes (RLIMIT_NPROC); no new privileges (setuid files do nothing).
- "uid" (when the trainer runs as root): the code runs as a uid of its own per slot (not root, not
  "nobody"), so it cannot signal or trace the trainer or the sandbox's own supervisors (root).
- "no_network": a new, empty network namespace (no interface but a down loopback).
- "private_fs": a new mount namespace where the working directory is a small tmpfs, and the
  trainer's directories (the checkout, HOME, /tmp, /run, /dev/shm, /sys, ...) are hidden under
  empty read-only tmpfs mounts; what the code writes disappears with it.
- "pid_ns": a new PID namespace with a fresh /proc (hidepid=2): the code sees its own processes
  only, never the trainer's or the host's (nor their command lines). Its root is a supervisor
  (root, out of the code's reach) that dies with the call, and the kernel kills every process of
  the namespace when it does: no process outlives the call, none can reach the next run.
- "ipc_ns": a new IPC namespace: SysV shared memory, semaphores and message queues are its own
  and are destroyed with it.
- "cgroup": a cgroup per run (v2, or the v1 memory and pids controllers) limits the memory
  (`Limits.memory_mb`: RAM, tmpfs, shared memory, all together) and the processes of the whole
  tree; after the run the trainer kills whatever is still in it and removes it.
- a bounded number of sandboxes run at once (`set_max_concurrency`, default min(4, CPUs)).

Without "pid_ns" and "cgroup" (the fallback), leftovers are killed as before: by a helper process
running as the sandbox's uid (`kill(-1)`), which a leftover of the same uid can trace or stop.

Judging (`run_tests`): the test cases never run in the solution's process. For an `assert` case the
solution's process only evaluates the parts of the expression that need the solution (e.g.
`add(1, 2)` of `assert add(1, 2) == 3`) and reports their values as plain data (None, bool, int,
float, complex, str, bytes, and lists, tuples, sets, dicts of them; anything else is a failure);
the trainer rebuilds them, and the rest of the assert (`_v0 == 3`) is computed by the trainer or,
when it is more than comparisons of literals, by a second sandboxed process without the solution.
For input/output cases the solution's process reports its output and the trainer compares it with
the expected one, which never enters the sandbox. A case the process did not report fails.
Weaker (said in `plan_case`): a case that is not a single `assert`, or whose solution calls sit in
a comprehension or lambda of the test, is evaluated whole in the solution's process, so a solution
that tampers with its interpreter can forge it. Not a defence against kernel exploits.
"""

from __future__ import annotations

import ast
import builtins
import errno
import json
import logging
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
_log = logging.getLogger("grpo.sandbox")


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0
    """Wall-clock seconds for the whole run."""
    cpu_seconds: int = 10
    """CPU seconds (RLIMIT_CPU; the process gets SIGXCPU, then SIGKILL a second later)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS) and, with "cgroup", the memory of the whole process tree."""
    max_processes: int = 16
    """Processes of the run: RLIMIT_NPROC with "uid", and the whole tree's pids.max with "cgroup"."""
    max_file_mb: int = 16
    """Largest file it may write (RLIMIT_FSIZE); with "private_fs" also its whole working directory."""
    max_open_files: int = 64
    max_output_kb: int = 64
    """Stdout / stderr kept (the rest is dropped); run_tests keeps up to 1 MiB of reported values."""


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


# --- the boot script: runs in the child as root (if we are), isolates, limits, then execs ---------
# Three processes: P (the trainer's child, in the host's PID namespace) joins the cgroup and
# unshares; its child is the new namespace's init (root; pid 1), which mounts and forks the worker;
# the worker drops to the sandbox uid and execs Python on the code. Each supervisor dies with its
# parent (PR_SET_PDEATHSIG), and the kernel kills the whole namespace when its init ends.

_BOOT = r"""
import ctypes, json, os, resource, signal, sys
c = json.loads(sys.stdin.buffer.read())
done = []
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
def mount(src, dst, kind, flags, data):
    if libc.mount(src.encode(), dst.encode(), kind.encode() if kind else None, flags, data.encode() if data else None):
        raise OSError(ctypes.get_errno(), "mount " + dst)
def fail(what, e):
    sys.stderr.write("sandbox: %s failed: %s\n" % (what, e))
    os._exit(125)
def die_with_parent(ppid=None):
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL
    if ppid is not None and os.getppid() != ppid:  # (a parent outside our PID namespace reads as 0)
        os._exit(125)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
die_with_parent(c["parent"])
for procs in c["cgroup"]:
    try:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        fail("cgroup", e)
if c["cgroup"]:
    done.append("cgroup")
here = os.getcwd()
for name, flag, want in [("no_network", 0x40000000, c["network"]), ("ipc_ns", 0x08000000, c["ipc_ns"]),
                         ("private_fs", 0x00020000, c["private_fs"]), ("pid_ns", 0x20000000, c["pid_ns"])]:
    if want and libc.unshare(flag) == 0:
        done.append(name)
rfd, wfd = os.pipe()  # the init's report of how the worker ended
if "pid_ns" in done and os.fork():  # P: wait for the init, then end as the worker did
    os.close(wfd)
    status = os.read(rfd, 64)
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        pass
    status = int(status) if status else 9  # no report: the init was killed
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 125)
if "pid_ns" in done:
    die_with_parent()
if "private_fs" in done:
    try:
        mount("none", "/", None, 16384 | (1 << 18), None)  # MS_REC | MS_PRIVATE: nothing leaks out
        if "pid_ns" in done:  # this namespace's processes only; the root-owned init invisible too
            mount("proc", "/proc", "proc", 2 | 4 | 8, "hidepid=2")
        opts = "size=%dm,nr_inodes=1024,mode=700" % c["disk_mb"] + (",uid=%d,gid=%d" % (c["uid"], c["uid"]) if c["uid"] else "")
        mount("tmpfs", here, "tmpfs", 2 | 4, opts)
        os.chdir(here)  # into the new mount; it stays the cwd when its path is hidden below
        for d in c["hide"]:
            mount("tmpfs", d, "tmpfs", 1 | 2 | 4 | 8, "size=4k,nr_inodes=8,mode=555")  # RDONLY NOSUID NODEV NOEXEC
    except OSError as e:
        fail("private_fs", e)
elif "pid_ns" in done:
    fail("pid_ns", "needs private_fs for its /proc")
for name, text in c["files"].items():
    with open(name, "w") as f:
        f.write(text)
    if c["uid"]:
        os.chown(name, c["uid"], c["uid"])
stdin = os.memfd_create("stdin")
os.write(stdin, c["stdin"].encode())
os.lseek(stdin, 0, 0)
worker = os.fork() if "pid_ns" in done else 0
if worker:  # the init: reap everything until the worker ends, report it, end (the kernel kills the rest)
    while True:
        pid, status = os.wait()
        if pid == worker:
            os.write(wfd, str(status).encode())
            os._exit(0)
os.dup2(stdin, 0)
R = resource
lim = [(R.RLIMIT_CPU, c["cpu"], c["cpu"] + 1), (R.RLIMIT_AS, c["mem"], c["mem"]), (R.RLIMIT_FSIZE, c["fsize"], c["fsize"]),
       (R.RLIMIT_NOFILE, c["nofile"], c["nofile"]), (R.RLIMIT_CORE, 0, 0), (R.RLIMIT_NPROC, c["nproc"], c["nproc"])]
for which, soft, hard in lim:
    resource.setrlimit(which, (soft, hard))
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid files cannot give root back
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

_SYSTEM_DIRS = {"/", "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev", "/var"}


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
    """Directories the sandboxed code must not see: the trainer's, the temporary and runtime ones, /sys."""
    cwd = Path.cwd().resolve()
    wanted = {"/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt", "/media", "/srv", "/opt", "/sys",
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
    """The fallback clean-up: SIGKILL every process of `uid` (kill(-1) from a process running as that uid).
    Reachable by a leftover of that uid (it can trace or stop it): used only without "pid_ns" and "cgroup"."""
    code = "import os, signal\ntry:\n os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n pass"
    for _ in range(2):
        subprocess.run([sandbox_python(), "-I", "-S", "-c", code], user=uid, group=uid, extra_groups=[], env={},
                       cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)


# --- cgroups: a memory and pids limit for a run's whole tree, emptied from outside ----------------


@lru_cache(maxsize=1)
def _cgroup_parents() -> tuple[str, tuple[Path, ...]] | None:
    """Where this process may create child cgroups: ("v2", (dir,)) with the memory and pids
    controllers, else ("v1", (memory dir, pids dir)), else None."""
    try:
        own = {}  # controller ("" for v2) -> this process's cgroup path
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                own[ctrl] = path
        mounts = {}  # "v2" / controller -> directory of our own cgroup there
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            root, point = left.split()[3:5]
            kind, _, opts = right.split()[:3]
            ctrls = [""] if kind == "cgroup2" else [o for o in opts.split(",") if o in ("memory", "pids")] if kind == "cgroup" else []
            for ctrl in ctrls:
                path = own.get(ctrl)
                if path is not None and path.startswith(root):
                    mounts.setdefault(ctrl or "v2", Path(point + "/" + path[len(root):].lstrip("/")))
    except (OSError, ValueError):
        return None
    v2 = mounts.get("v2")
    if v2 and {"memory", "pids"} <= set((v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else []):
        try:
            (v2 / "cgroup.subtree_control").write_text("+memory +pids")
            return "v2", (v2,)
        except OSError:
            pass
    if "memory" in mounts and "pids" in mounts and all(os.access(mounts[c], os.W_OK) for c in ("memory", "pids")):
        return "v1", (mounts["memory"], mounts["pids"])
    return None


class _Cgroup:
    """One run's cgroup(s), created by the trainer; the sandbox's first process joins them."""

    def __init__(self, limits: Limits, slot: int):
        kind, parents = _cgroup_parents()
        name = f"grpo-sandbox-{os.getpid()}-{slot}-{secrets.token_hex(4)}"
        self.dirs = [p / name for p in parents]
        self.v2 = kind == "v2"
        mem, pids = limits.memory_mb << 20, limits.max_processes + 2  # + the two supervisors
        for d in self.dirs:
            d.mkdir()
        settings = ([("memory.max", mem), ("memory.swap.max", 0), ("pids.max", pids)] if self.v2 else
                    [("memory.limit_in_bytes", mem), ("memory.memsw.limit_in_bytes", mem), ("pids.max", pids)])
        for fname, value in settings:
            for d in self.dirs:
                if (d / fname).exists():
                    (d / fname).write_text(str(value))

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        out = set()
        for f in self.procs_files:
            try:
                out |= {int(x) for x in Path(f).read_text().split()}
            except OSError:
                pass
        return out

    def kill_and_remove(self, wait: float = 5.0) -> None:
        """SIGKILL whatever is left, from the trainer (the sandbox cannot reach it), wait until empty, remove."""
        deadline = time.monotonic() + wait
        while (left := self.pids()) and time.monotonic() < deadline:
            if self.v2 and (self.dirs[0] / "cgroup.kill").exists():
                (self.dirs[0] / "cgroup.kill").write_text("1")
            else:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.002)
        for d in self.dirs:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError as e:  # EBUSY while the last exits are being accounted
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)


# --- running ------------------------------------------------------------------------------------


def run_python(
    files: dict[str, str], main: str = "main.py", limits: Limits = Limits(), stdin: str = "", isolate: bool = True
) -> SandboxResult:
    """Write `files` into a fresh working directory and run `python -I -S main` there, limited.

    isolate=False skips the namespaces, cgroups and the uid change (rlimits and timeout still apply)."""
    return _run(files, main, limits, stdin, capabilities() if isolate else frozenset())


def _run(files: dict[str, str], main: str, limits: Limits, stdin: str, caps: frozenset[str], out_kb: int = 0) -> SandboxResult:
    slot = _take_slot()
    uid = _uid(slot) if "uid" in caps else 0
    python = sandbox_python()
    cgroup = None
    try:
        with tempfile.TemporaryDirectory(prefix="grpo-sandbox-") as tmp:
            work, out_path, err_path = Path(tmp) / "work", Path(tmp) / "stdout", Path(tmp) / "stderr"
            work.mkdir(mode=0o700)
            os.chmod(tmp, 0o711)  # its uid may pass through, not list
            if uid:
                os.chown(work, uid, uid)
            cgroup = _Cgroup(limits, slot) if "cgroup" in caps else None
            own_procs = 0 if uid else _count_processes(os.getuid())
            config = {
                "files": files, "main": main, "python": python, "uid": uid, "stdin": stdin, "parent": os.getpid(),
                "network": "no_network" in caps, "private_fs": "private_fs" in caps,
                "pid_ns": "pid_ns" in caps, "ipc_ns": "ipc_ns" in caps, "cgroup": cgroup.procs_files if cgroup else [],
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
                timed_out = _feed_and_wait(proc, config, limits.timeout)
                _kill_group(proc.pid)  # the supervisor P (with "pid_ns" its death takes the namespace along)
                if cgroup:
                    cgroup.kill_and_remove()
                elif uid and "pid_ns" not in caps:
                    _kill_uid(uid)
                proc.wait()
            seconds = time.perf_counter() - start
            stdout, stderr = _read(out_path, max(out_kb, limits.max_output_kb)), _read(err_path, limits.max_output_kb)
    finally:
        _slots.put(slot)
    applied: list[str] = ["timeout"]
    if stderr.startswith(_MARK):
        line, _, stderr = stderr.partition("\n")
        applied += json.loads(line[len(_MARK):])
    return SandboxResult(proc.returncode, stdout, stderr, timed_out, seconds, applied)


def _feed_and_wait(proc: subprocess.Popen, config: dict, timeout: float) -> bool:
    """Send the boot script its config and wait; True when the wall-clock limit ran out."""
    try:
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return True
    except BrokenPipeError:
        proc.wait(timeout=timeout)
    return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, kb: int) -> str:
    with path.open("rb") as f:
        return f.read(kb << 10).decode("utf-8", errors="replace")


def _count_processes(uid: int) -> int:
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                n += p.stat().st_uid == uid
            except OSError:
                pass
    return n


_WEAKER = {
    "uid": "the code runs as the trainer's uid (root ignores the process limit; it can signal the trainer)",
    "no_network": "the code has the host's network",
    "private_fs": "the code sees (and may write) the host's files, the checkout included",
    "pid_ns": "the code sees the host's processes and command lines; leftovers are killed by a helper of the "
              "sandbox's uid, which a leftover can trace or stop, and a detached process can outlive the call",
    "ipc_ns": "SysV shared memory is the host's: segments survive the call and other runs can read them",
    "cgroup": "memory and processes are limited per process, not for the whole tree",
}
FALLBACK_CAPS = frozenset({"timeout", "rlimits", "uid", "no_network", "private_fs"})
"""The protections of the earlier sandbox (benchmarks compare with it: `_run(..., caps=...)`)."""


@lru_cache(maxsize=1)
def capabilities() -> frozenset[str]:
    """The protections this machine gives (probed once by running a trivial program with each);
    the first call logs, once, those the kernel refused and what is weaker without them."""
    caps = {"timeout", "rlimits"}
    extras = ["no_network", "private_fs", "pid_ns", "ipc_ns"] + (["cgroup"] if _cgroup_parents() else [])
    extras += ["uid"] if os.geteuid() == 0 and _world_runnable(sandbox_python()) else []
    for extra in extras:  # each one on top of those that worked
        result = _probe(frozenset(caps | {extra}))
        if result is not None and extra in result.protections and result.stdout.strip() == "ok":
            caps.add(extra)
    missing = [name for name in _WEAKER if name not in caps]
    if missing:
        _log.warning("code sandbox: this machine refuses %s; weaker: %s.", ", ".join(missing),
                     "; ".join(_WEAKER[m] for m in missing))
    return frozenset(caps)


def _probe(caps: frozenset[str]) -> SandboxResult | None:
    try:
        return _run({"main.py": "print('ok')"}, "main.py", Limits(timeout=20), "", caps)
    except (OSError, subprocess.SubprocessError):
        return None


# --- judging test cases from outside the solution's process ---------------------------------------

# Plain data across the process boundary: a tagged JSON form, written inside the sandbox and read
# by the trainer (and by the judge). `type(x) is ...`, never isinstance: no subclass, no custom
# __eq__, no object of the solution's crosses. One text, executed here and in the sandbox.
_CODEC = r'''
def encode(x, depth=0):
    if depth > 100:
        raise ValueError("a value nested over 100 deep")
    t = type(x)
    if x is None or t is bool or t is str:
        return [t.__name__, x]
    if t is int or t is float:
        return [t.__name__, repr(x)]
    if t is complex:
        return ["complex", repr(x.real), repr(x.imag)]
    if t is bytes:
        return ["bytes", x.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [t.__name__, [encode(v, depth + 1) for v in x]]
    if t is dict:
        return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
    raise TypeError("a value of type %s is not plain data (None, bool, int, float, complex, str, bytes, list, tuple, set, dict)" % t.__name__)

def decode(e, depth=0):
    if depth > 100:
        raise ValueError("a value nested over 100 deep")
    tag, rest = e[0], e[1:]
    if tag == "NoneType":
        return None
    if tag in ("bool", "str") and type(rest[0]) is {"bool": bool, "str": str}[tag]:
        return rest[0]
    if tag in ("int", "float"):
        return {"int": int, "float": float}[tag](str(rest[0]))
    if tag == "complex":
        return complex(float(str(rest[0])), float(str(rest[1])))
    if tag == "bytes":
        return bytes.fromhex(str(rest[0]))
    if tag in ("list", "tuple", "set", "frozenset"):
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](decode(v, depth + 1) for v in rest[0])
    if tag == "dict":
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in rest[0]}
    raise ValueError("not an encoded value")
'''
exec(_CODEC)  # defines encode and decode here

# Runs in the solution's process: the solution, then per case the expressions asked for, reporting
# each value (or its output) on the original stdout; the solution's own fd 1 goes to /dev/null.
# It holds no expected value; whatever it reports is a claim that the trainer checks.
_HARNESS = _CODEC + r'''
import contextlib, io, json, os, signal, sys

def main():
    spec = json.load(open("job.json"))
    os.remove("job.json")
    per_test = spec["per_test_timeout"]
    out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    code = open("solution.py").read()

    class Timeout(BaseException):
        pass

    def alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)

    def send(**report):
        out.write(json.dumps(report) + "\n")
        out.flush()

    def run(source, ns, stdin_text="", program=False, expr=False):
        sys.stdin, buf = io.StringIO(stdin_text), io.StringIO()
        signal.setitimer(signal.ITIMER_REAL, per_test)
        try:
            with contextlib.redirect_stdout(buf):
                if expr:
                    return eval(compile(source, "<test>", "eval"), ns)
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

    if spec["mode"] == "values":
        ns = {"__name__": "__main__"}
        try:
            run(code + "\n" + spec["setup"], ns)
        except BaseException as e:
            send(loaded=False, reason=why(e))
            return
        for i, (exprs, whole) in enumerate(spec["cases"]):
            try:
                if whole is not None:
                    run(whole, ns)
                send(case=i, values=[encode(run(e, ns, expr=True)) for e in exprs])
            except BaseException as e:
                send(case=i, error=why(e))
    else:
        for i, stdin_text in enumerate(spec["inputs"]):
            try:
                send(case=i, output=run(code, {"__name__": "__main__"}, stdin_text, program=True))
            except BaseException as e:
                send(case=i, error=why(e))

main()
'''

# Runs in a second sandboxed process, without the solution: the rest of each assert on the values.
_JUDGE = _CODEC + r'''
import json, os

def main():
    spec = json.load(open("job.json"))
    ns = {"__name__": "__main__"}
    exec(spec["setup"], ns)
    for i, check, values in spec["cases"]:
        try:
            env = dict(ns, **{"_v%d" % k: decode(v) for k, v in enumerate(values)})
            print(json.dumps({"case": i, "passed": bool(eval(check, env))}))
        except BaseException as e:
            print(json.dumps({"case": i, "error": "%s: %s" % (type(e).__name__, e)}))

main()
'''


@dataclass
class CaseResult:
    passed: bool
    reason: str  # "passed", or why not


@dataclass
class CasePlan:
    """How one assert case is judged: `subjects` are evaluated in the solution's process, `check`
    (the assert's test with the subjects replaced by _v0, _v1, ...) outside it. `whole` is the
    case's code when it cannot be split (not a single assert, or a solution call inside a
    comprehension or lambda of the test): it runs in the solution's process, which could forge it."""

    subjects: list[str]
    check: ast.expr
    whole: str | None = None


_AST_LOCK = threading.Lock()


def parse_python(source: str, mode: str = "exec") -> ast.AST:
    """ast.parse under one lock for the process. Reward functions run on several threads at once, and on
    CPython 3.11 two concurrent ast.parse calls can fail with "SystemError: AST constructor recursion depth
    mismatch" (the converter's depth counter is shared by the threads): seen with 8 concurrent code_tests."""
    with _AST_LOCK:
        return ast.parse(source, mode=mode)


def _defined_names(source: str) -> set[str]:
    """Names a module's top-level statements bind (defs, classes, imports, assignments)."""
    try:
        tree = parse_python(source)
    except SyntaxError:
        return set()
    out = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(stmt.name)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in stmt.names}
        else:
            out |= {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return out


def plan_case(case: str, solution: str, setup: str = "") -> CasePlan:
    """Split an assert into what needs the solution (evaluated inside) and the check (outside)."""
    try:
        tree = parse_python(case)
    except SyntaxError:
        tree = None
    if tree is None or len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return CasePlan([], ast.Constant(True), whole=case)
    test = tree.body[0].test
    parents = {child: node for node in ast.walk(test) for child in ast.iter_child_nodes(node)}
    local = {n.id for n in ast.walk(test) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    local |= {a.arg for n in ast.walk(test) if isinstance(n, ast.Lambda) for a in ast.walk(n.args) if isinstance(a, ast.arg)}
    free = {n.id for n in ast.walk(test) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    theirs = (free - local) & (_defined_names(solution) | (free - set(dir(builtins)) - _defined_names(setup)))
    subjects = []
    for name in (n for n in ast.walk(test) if isinstance(n, ast.Name) and n.id in theirs):
        node = name  # climb to the value the name produces: f -> f(1) -> f(1).x -> f(1).x[0] ...
        while (p := parents.get(node)) is not None and (
                (isinstance(p, ast.Call) and p.func is node) or (isinstance(p, (ast.Attribute, ast.Subscript)) and p.value is node)):
            node = p
        if any(isinstance(n, ast.Name) and n.id in local for n in ast.walk(node)):
            node = test  # it uses a variable of the test's own comprehension or lambda: all of it inside
        subjects.append(node)
    outer = [s for s in subjects if not any(o is not s and s in set(ast.walk(o)) for o in subjects)]
    outer = list({id(s): s for s in outer}.values())
    index = {id(s): k for k, s in enumerate(outer)}

    class Replace(ast.NodeTransformer):
        def visit(self, node):
            k = index.get(id(node))
            return ast.Name(f"_v{k}", ast.Load()) if k is not None else super().visit(node)

    check = Replace().visit(test)
    return CasePlan([ast.unparse(s) for s in outer], ast.fix_missing_locations(check))


class _NeedsJudge(Exception):
    pass


_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
            ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b}


def _evaluate(node: ast.expr, values: dict[str, object]):
    """The check on plain values, in the trainer: literals, comparisons, not/and/or; anything else
    (a call, arithmetic) raises _NeedsJudge and is computed in a sandboxed judge process."""
    if isinstance(node, ast.Name) and node.id in values:
        return values[node.id]
    if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp)) and not any(
            isinstance(n, ast.Name) for n in ast.walk(node)):
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise _NeedsJudge from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, values)
    if isinstance(node, ast.BoolOp):
        result = None
        for v in node.values:
            result = _evaluate(v, values)
            if bool(result) == isinstance(node.op, ast.Or):
                return result
        return result
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise _NeedsJudge


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
        tree = parse_python(tests)  # a SyntaxError here is the dataset's, not the completion's
        cases = [ast.get_source_segment(tests, s) for s in tree.body if isinstance(s, ast.Assert)]
        setup = "\n".join(ast.get_source_segment(tests, s) for s in tree.body if not isinstance(s, ast.Assert))
        return "asserts", cases, setup
    raise ValueError(f"test cases must be assert statements or input/output pairs, got {type(tests).__name__}")


def _text(x) -> str:
    return x if isinstance(x, str) else "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def _reports(stdout: str) -> tuple[dict[int, dict], str | None]:
    """The harness's reports, the first per case, and why the solution failed to load (if it did)."""
    reports, load_error = {}, None
    for line in stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("loaded") is False and load_error is None:
            load_error = str(r.get("reason"))
        elif isinstance(r, dict) and type(r.get("case")) is int:
            reports.setdefault(r["case"], r)
    return reports, load_error


def run_tests(code: str, tests, limits: Limits = Limits(), per_test_timeout: float = 3.0) -> tuple[list[CaseResult], SandboxResult]:
    """Run `code` against the test cases; one CaseResult per case, in order, judged outside the
    solution's process (module docstring). Cases the process never reported (it crashed, exited,
    was killed, or timed out) fail with the reason."""
    mode, cases, setup = parse_tests(tests)
    if mode == "asserts":
        plans = [plan_case(c, code, setup) for c in cases]
        job = {"mode": "values", "setup": setup, "cases": [[p.subjects, p.whole] for p in plans]}
    else:
        job = {"mode": "io", "inputs": [stdin_text for stdin_text, _ in cases]}
    job["per_test_timeout"] = per_test_timeout
    files = {"main.py": _HARNESS, "solution.py": code, "job.json": json.dumps(job)}
    result = _run(files, "main.py", limits, "", capabilities(), out_kb=1024)
    reports, load_error = _reports(result.stdout)
    missing = CaseResult(False, "not run: " + result.reason(limits))
    if load_error is not None:
        missing = CaseResult(False, "the solution failed before the tests: " + load_error)
    out: list[CaseResult | None] = []
    for i in range(len(cases)):
        r = reports.get(i)
        if r is None:
            out.append(missing)
        elif "error" in r:
            out.append(CaseResult(False, str(r["error"])))
        elif mode == "io":
            out.append(_compare_output(r.get("output"), cases[i][1]))
        else:
            out.append(None)  # judged below, all asserts at once
    if mode == "asserts":
        _judge_asserts(plans, reports, out, setup, limits)
    return out, result


def _compare_output(got, expected: str) -> CaseResult:
    if type(got) is not str:
        return CaseResult(False, "no output reported")
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    if norm(got) == norm(expected):
        return CaseResult(True, "passed")
    return CaseResult(False, f"wrong output: {got[:200]!r}")


def _judge_asserts(plans: list[CasePlan], reports: dict[int, dict], out: list, setup: str, limits: Limits) -> None:
    """Fill the None entries of `out`: each check on the reported values, here or in the judge."""
    for_judge = []
    for i, plan in enumerate(plans):
        if out[i] is not None:
            continue
        encoded = reports[i].get("values")
        try:
            if type(encoded) is not list or len(encoded) != len(plan.subjects):
                raise ValueError("the values reported do not match the case")
            values = {f"_v{k}": decode(v) for k, v in enumerate(encoded)}
        except (ValueError, TypeError, IndexError, KeyError, RecursionError) as e:
            out[i] = CaseResult(False, f"bad values reported: {type(e).__name__}: {e}"[:300])
            continue
        try:
            out[i] = _verdict(bool(_evaluate(plan.check, values)), plan, values)
        except _NeedsJudge:
            for_judge.append([i, ast.unparse(plan.check), encoded])
        except Exception as e:  # e.g. '<' between a str and an int
            out[i] = CaseResult(False, f"{type(e).__name__}: {e}"[:300])
    if for_judge:
        job = {"setup": setup, "cases": for_judge}
        result = _run({"main.py": _JUDGE, "job.json": json.dumps(job)}, "main.py", limits, "", capabilities(), out_kb=64)
        judged, _ = _reports(result.stdout)
        for i, _, encoded in for_judge:
            r = judged.get(i, {"error": "the judge did not report: " + result.reason(limits)})
            values = {f"_v{k}": decode(v) for k, v in enumerate(encoded)}
            out[i] = CaseResult(False, str(r["error"])) if "error" in r else _verdict(r.get("passed") is True, plans[i], values)


def _verdict(passed: bool, plan: CasePlan, values: dict) -> CaseResult:
    if passed:
        return CaseResult(True, "passed")
    got = ", ".join(f"{s} = {values[f'_v{k}']!r}"[:200] for k, s in enumerate(plan.subjects))
    return CaseResult(False, "assertion failed" + (f": {got}" if got else ""))
