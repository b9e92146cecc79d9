"""The jail: a fresh, limited, isolated process for untrusted Python, killed from outside.

Every run gets a fresh process, `python -I -S` (no site-packages, no PYTHON* variables, no user
site: the standard library only), an empty environment, and its own working folder. On top of that,
each protection below is applied where the kernel allows it; `capabilities()` says which ones this
machine gives (the first call says once, on the "grpo.sandbox" logger, which are missing and what is
weaker then), and every SandboxResult lists those applied:

- "timeout": wall-clock limit; then the run is killed from outside (see "pid_ns" and "cgroup").
- "rlimits": CPU seconds (RLIMIT_CPU), address space per process (RLIMIT_AS), file size, open
  files, no core files, and processes (RLIMIT_NPROC); no new privileges (setuid files do nothing).
- "uid" (when the trainer runs as root): the code runs as a uid of its own per slot and role (not
  root, not "nobody"), so it cannot signal or trace the trainer, the judge or its own supervisors.
- "no_network": a new, empty network namespace (no interface but a down loopback).
- "private_fs": a new mount namespace and a root of its own (view.py): the system's trees
  read-only, its working folder /sandbox (a small tmpfs), a few devices and a fresh /proc; nothing
  else of the host (the checkout, the data, the run folder, HOME, caches, /tmp, /etc, /sys), and no
  Python package folder; what the code writes disappears with it.
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
Not a defence against kernel exploits.
"""

from __future__ import annotations

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from grpo.rewards.sandbox import view

_MARK = "\x00grpo-sandbox "  # first line of stderr: the protections the boot script applied
_PROGRAMS = Path(__file__).parent / "programs"
_log = logging.getLogger("grpo.sandbox")


@lru_cache(maxsize=None)
def program_text(name: str) -> str:
    """The text of one of the programs that run inside the sandbox (programs/<name>)."""
    return (_PROGRAMS / name).read_text()


def program_files(main: str) -> dict[str, str]:
    """The package `programs` as files for a run's working folder, with `main` (serve or judge) and
    what it imports (not the other one, nor boot.py), and main.py that runs it."""
    names = ["__init__.py", "codec.py", "channel.py", f"{main}.py"]
    launch = f"import sys\nsys.dont_write_bytecode = True\nfrom programs.{main} import main\nmain()\n"
    return {"main.py": launch, **{f"programs/{n}": program_text(n) for n in names}}


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
    """Stdout / stderr kept (the rest is dropped). (run_tests: each answer of the solution up to 1 MiB.)"""


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


# --- the interpreter ------------------------------------------------------------------------------


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


# --- bounding concurrency: slots, each with its own uid -----------------------------------------

_slots: queue.Queue | None = None
_slots_lock = threading.Lock()


def set_max_concurrency(n: int) -> None:
    """How many sandboxes may run at once (each one process tree)."""
    global _slots
    with _slots_lock:
        _slots = queue.Queue()
        for i in range(max(1, min(n, 32))):
            _slots.put(i)


def _take_slot() -> int:
    if _slots is None:
        set_max_concurrency(min(4, os.cpu_count() or 1))
    return _slots.get()


@contextmanager
def concurrency_slot():
    """One of the set_max_concurrency slots, for a run (its program and its judge), given back after.

    The machine's capabilities are probed first, holding no slot: the probes take slots of their own,
    so a first run that held its slot while they waited for one would deadlock once every slot is held."""
    capabilities()
    slot = _take_slot()
    try:
        yield slot
    finally:
        _slots.put(slot)


def _uid(slot: int, role: int = 0) -> int:
    """A uid of its own per (trainer process, slot, role: 0 the program, 1 its judge), far above the
    ones people and services use."""
    return 1_000_000 + (os.getpid() % 100_000) * 64 + role * 32 + slot


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

    def __init__(self, limits: Limits, slot: str):
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
    with concurrency_slot() as slot:
        jail = Jail(files, main, limits, caps, slot, stdin=stdin, out_kb=out_kb)
        return jail.finish(jail.wait(limits.timeout))


class Jail:
    """One sandboxed process tree, started at once; `wait`, then `finish` (always) kills what is left
    and cleans up. `fds` (pipe ends of the caller) are passed to the program, whose job says which."""

    def __init__(self, files: dict[str, str], main: str, limits: Limits, caps: frozenset[str], slot: int,
                 stdin: str = "", out_kb: int = 0, fds: tuple[int, ...] = (), role: int = 0):
        self.limits, self.caps, self.out_kb = limits, caps, out_kb
        self.uid = _uid(slot, role) if "uid" in caps else 0
        self.cgroup: _Cgroup | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))
        try:
            self._start(files, main, stdin, slot, role, fds)
        except BaseException:
            self._clean_up()
            raise

    def _start(self, files, main, stdin, slot, role, fds) -> None:
        caps, limits, python = self.caps, self.limits, sandbox_python()
        work = self.tmp / "work"
        work.mkdir(mode=0o700)
        (self.tmp / "root").mkdir(mode=0o755)
        os.chmod(self.tmp, 0o711)  # its uid may pass through, not list
        if self.uid:
            os.chown(work, self.uid, self.uid)
        self.cgroup = _Cgroup(limits, f"{slot}-{role}") if "cgroup" in caps else None
        binds, hide = view.plan(python) if "private_fs" in caps else ([], [])
        own_procs = 0 if self.uid else _count_processes(os.getuid())
        config = {
            "files": files, "main": main, "python": python, "uid": self.uid, "stdin": stdin, "parent": os.getpid(),
            "network": "no_network" in caps, "private_fs": "private_fs" in caps,
            "pid_ns": "pid_ns" in caps, "ipc_ns": "ipc_ns" in caps, "cgroup": self.cgroup.procs_files if self.cgroup else [],
            "root": str(self.tmp / "root"), "binds": binds, "hide": hide, "fds": list(fds),
            "disk_mb": max(1, limits.max_file_mb), "cpu": limits.cpu_seconds, "mem": limits.memory_mb << 20,
            "fsize": limits.max_file_mb << 20, "nofile": limits.max_open_files,
            "nproc": limits.max_processes + own_procs,
        }
        self.start = time.perf_counter()
        with (self.tmp / "stdout").open("wb") as out, (self.tmp / "stderr").open("wb") as err:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", "-c", program_text("boot.py")], stdin=subprocess.PIPE, stdout=out, stderr=err,
                cwd=work, env={}, start_new_session=True, close_fds=True, pass_fds=fds,
            )
        try:
            self.proc.stdin.write(json.dumps(config).encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def wait(self, timeout: float) -> bool:
        """Wait for the program to end; True when it is still running after `timeout` seconds."""
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return True
        return False

    def finish(self, timed_out: bool = False) -> SandboxResult:
        """Kill whatever is left of the run, remove its cgroup and folder; how it ended."""
        try:
            _kill_group(self.proc.pid)  # the supervisor P (with "pid_ns" its death takes the namespace along)
            if self.cgroup:
                self.cgroup.kill_and_remove()
                self.cgroup = None
            elif self.uid and "pid_ns" not in self.caps:
                _kill_uid(self.uid)
            self.proc.wait()
            seconds = time.perf_counter() - self.start
            stdout = _read(self.tmp / "stdout", max(self.out_kb, self.limits.max_output_kb))
            stderr = _read(self.tmp / "stderr", self.limits.max_output_kb)
        finally:
            self._clean_up()
        applied: list[str] = ["timeout"]
        if stderr.startswith(_MARK):
            line, _, stderr = stderr.partition("\n")
            applied += json.loads(line[len(_MARK):])
        return SandboxResult(self.proc.returncode, stdout, stderr, timed_out, seconds, applied)

    def _clean_up(self) -> None:
        if self.cgroup:
            self.cgroup.kill_and_remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


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
    "uid": "the code runs as the trainer's uid (root ignores the process limit; it can signal the trainer, and "
           "its judge: without \"pid_ns\" it could trace the judge and forge verdicts)",
    "no_network": "the code has the host's network",
    "private_fs": "the code sees (and may write) the host's files: the checkout, the data, the run folder, caches",
    "pid_ns": "the code sees the host's processes and command lines; leftovers are killed by a helper of the "
              "sandbox's uid, which a leftover can trace or stop, and a detached process can outlive the call",
    "ipc_ns": "SysV shared memory is the host's: segments survive the call and other runs can read them",
    "cgroup": "memory and processes are limited per process, not for the whole tree",
}
FALLBACK_CAPS = frozenset({"timeout", "rlimits", "uid", "no_network", "private_fs"})
"""The protections of the earlier sandbox (benchmarks compare with it: `_run(..., caps=...)`)."""


_capabilities: frozenset[str] | None = None
_capabilities_lock = threading.Lock()


def capabilities() -> frozenset[str]:
    """The protections this machine gives (probed once, by the first caller, while any other waits, by
    running a trivial program with each); the first call logs those the kernel refused and what is
    weaker without them."""
    global _capabilities
    with _capabilities_lock:
        if _capabilities is None:
            _capabilities = _probe_capabilities()
    return _capabilities


def _probe_capabilities() -> frozenset[str]:
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
    slot = _take_slot()  # not concurrency_slot(): that waits for the probes
    try:
        jail = Jail({"main.py": "print('ok')"}, "main.py", Limits(timeout=20), caps, slot)
        return jail.finish(jail.wait(20))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    finally:
        _slots.put(slot)


