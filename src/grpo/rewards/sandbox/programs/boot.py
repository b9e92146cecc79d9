"""The jail's first program: runs in the child (as root, where the trainer is), joins the cgroup,
enters the namespaces, builds the private root, sets the limits, drops to the sandbox's uid and
execs Python on the program. Its config comes as JSON on stdin (jail.py, `_config`).

Three processes with "pid_ns": P (the trainer's child, in the host's PID namespace) joins the cgroup
and unshares; its child is the new namespace's init (root; pid 1), which mounts and forks the
worker; the worker drops to the sandbox uid and execs Python on the code. Each supervisor dies with
its parent (PR_SET_PDEATHSIG), and the kernel kills the whole namespace when its init ends.

The private root ("private_fs"): a new tmpfs holding read-only binds of the system's trees (/usr,
/lib*, /bin, /sbin, the interpreter's own prefix when it lives elsewhere), the few devices Python
uses, a fresh /proc and the program's working folder (/sandbox, a small tmpfs); inside the system
trees the Python package folders (site-packages, dist-packages, grpo's own source) are covered by
empty mounts. It becomes the root (pivot_root) and the old one is detached: whatever lives
elsewhere (the checkout, the data, the run folder, HOME, caches, /tmp, /etc, /sys) is not there.
"""

import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 8192, 16384, 1 << 18)
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
DEVICES = ["null", "zero", "full", "random", "urandom"]

c = json.loads(sys.stdin.buffer.read())
done = []
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def mount(src, dst, kind, flags, data):
    if libc.mount(src.encode() if src else None, dst.encode(), kind.encode() if kind else None, flags,
                  data.encode() if data else None):
        raise OSError(ctypes.get_errno(), "mount " + dst)


def fail(what, e):
    sys.stderr.write("sandbox: %s failed: %s\n" % (what, e))
    os._exit(125)


def die_with_parent(ppid=None):
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL
    if ppid is not None and os.getppid() != ppid:  # (a parent outside our PID namespace reads as 0)
        os._exit(125)


def close_channel():
    """The supervisors hold no end of the program's pipes: when it ends, its peer reads EOF."""
    for fd in c["fds"]:
        os.close(fd)


def bind(src, root, writable=False):
    dst = root + src
    if os.path.islink(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.readlink(src), dst)
        return
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "w").close()
    mount(src, dst, None, MS_BIND | MS_REC, None)
    if not writable:
        mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def new_root(c):
    """Build the private root in c["root"] and move into it; the program's folder is /sandbox."""
    root = c["root"]
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing leaks out
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for path in c["binds"]:
        bind(path, root)
    for path in c["hide"]:
        if os.path.isdir(root + path):
            mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=8,mode=555")
    os.makedirs(root + "/dev")
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=4k,nr_inodes=16,mode=755")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            open(root + "/dev/" + name, "w").close()
            mount("/dev/" + name, root + "/dev/" + name, None, MS_BIND, None)
    mount(None, root + "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "size=4k,nr_inodes=16,mode=755")
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    os.makedirs(root + "/sandbox")
    opts = "size=%dm,nr_inodes=1024,mode=700" % c["disk_mb"] + (",uid=%d,gid=%d" % (c["uid"], c["uid"]) if c["uid"] else "")
    mount("tmpfs", root + "/sandbox", "tmpfs", MS_NOSUID | MS_NODEV, opts)
    os.chdir(root)
    syscall = PIVOT_ROOT.get(os.uname().machine)
    if syscall is not None and libc.syscall(syscall, b".", b".") == 0:
        if libc.umount2(b".", 2):  # MNT_DETACH: the old root is gone from this namespace
            raise OSError(ctypes.get_errno(), "umount the old root")
    else:  # no pivot_root here: move the new root over / (the program runs unprivileged)
        mount(root, "/", None, MS_MOVE, None)
        os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    os.chdir("/sandbox")


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
for name, flag, want in [("no_network", 0x40000000, c["network"]), ("ipc_ns", 0x08000000, c["ipc_ns"]),
                         ("private_fs", 0x00020000, c["private_fs"]), ("pid_ns", 0x20000000, c["pid_ns"])]:
    if want and libc.unshare(flag) == 0:
        done.append(name)
rfd, wfd = os.pipe()  # the init's report of how the worker ended
if "pid_ns" in done and os.fork():  # P: wait for the init, then end as the worker did
    os.close(wfd)
    close_channel()
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
        new_root(c)
    except OSError as e:
        fail("private_fs", e)
elif "pid_ns" in done:
    fail("pid_ns", "needs private_fs for its /proc")
for name, text in c["files"].items():
    if os.path.dirname(name):
        os.makedirs(os.path.dirname(name), exist_ok=True)
    with open(name, "w") as f:
        f.write(text)
if c["uid"]:
    for folder, _, names in os.walk("."):
        for name in [folder] + [os.path.join(folder, n) for n in names]:
            os.chown(name, c["uid"], c["uid"])
stdin = os.memfd_create("stdin")
os.write(stdin, c["stdin"].encode())
os.lseek(stdin, 0, 0)
worker = os.fork() if "pid_ns" in done else 0
if worker:  # the init: reap everything until the worker ends, report it, end (the kernel kills the rest)
    close_channel()
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
# run the file by a path relative to the working directory; the folder itself is on sys.path
# (it holds the package `programs` for run_tests' programs), the site folders are not (-I -S)
run = "import sys; sys.argv = [%r]; sys.path.insert(0, ''); exec(compile(open(%r, 'rb').read(), %r, 'exec'))" % ((c["main"],) * 3)
os.execv(c["python"], [c["python"], "-I", "-S", "-c", run])
