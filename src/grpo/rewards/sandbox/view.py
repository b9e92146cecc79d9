"""What the sandboxed program sees of the filesystem ("private_fs"): a root of its own that holds
the system's trees (read-only) and nothing else, so whatever the trainer reads that the program has
no business reading stays out wherever the run starts: the checkout, the installed package, the
data files, the run folder, HOME and its caches, /tmp, /etc, /mnt, /srv, /opt, other users' files.

Shown (read-only binds): /usr, /bin, /sbin, /lib* and, when the sandbox's interpreter lives outside
them (pyenv, conda, a uv-managed Python), its own prefix; /etc/ld.so.cache (to find shared
libraries). Hidden inside those (empty mounts): every site-packages and dist-packages folder (python
-S uses none), grpo's own package and checkout, the trainer's working folder and HOME and any folder
its environment names (HF_HOME, XDG_CACHE_HOME, PYTHONPATH, ...; not PATH or LD_*), when one of them
lies in a shown tree, unless it holds a file the interpreter needs. What lies under a shown tree by
another name (e.g. a data file kept in /usr/share that no variable names) stays readable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

SYSTEM_TREES = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
SYSTEM_FILES = ["/etc/ld.so.cache"]

# Asked of the sandbox's interpreter once: the paths it reads to start and import the standard
# library (its prefixes, sys.path, and every file it has mapped: the shared libraries).
_NEEDS = (
    "import sys, json, ctypes, select, signal, importlib\n"
    "maps = [l.split(None, 5)[5].strip() for l in open('/proc/self/maps') if len(l.split(None, 5)) == 6]\n"
    "print(json.dumps([sys.executable, sys.prefix, sys.exec_prefix, sys.base_prefix] + sys.path + "
    "[m for m in maps if m.startswith('/')]))"
)


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


@lru_cache(maxsize=4)
def interpreter_paths(python: str) -> tuple[str, ...]:
    """Real paths the interpreter needs (its prefixes, stdlib, shared libraries)."""
    out = subprocess.run([python, "-I", "-S", "-c", _NEEDS], env={}, capture_output=True, text=True, timeout=60, check=True)
    return tuple(sorted({os.path.realpath(p) for p in json.loads(out.stdout) if p and os.path.exists(p)}))


def _package_dirs() -> list[str]:
    """The folders of Python packages in the system trees and the interpreter's prefixes."""
    found = []
    for pattern in ["lib/python3*/site-packages", "lib/python3*/dist-packages", "lib/python3/dist-packages",
                    "local/lib/python3*/site-packages", "local/lib/python3*/dist-packages"]:
        for base in {"/usr", sys.prefix, sys.base_prefix, sys.exec_prefix, "/"}:
            found += [str(p) for p in Path(base).glob(pattern)]
    return found


def _trainer_dirs() -> list[str]:
    """The trainer's own folders: grpo's package and checkout, the working folder, HOME, and folders
    named by its environment (caches, data, virtual environments)."""
    import grpo

    package = Path(grpo.__file__).resolve().parent
    out = [package, Path.cwd(), Path.home()]
    for parent in package.parents:  # the checkout: the folder above with the project's files
        if (parent / "pyproject.toml").exists() or (parent / ".git").exists():
            out.append(parent)
            break
    for name, value in os.environ.items():
        if name in ("PATH", "LD_LIBRARY_PATH") or name.startswith("LD_"):
            continue
        out += [Path(v) for v in value.split(os.pathsep) if v.startswith("/")]
    return [str(p) for p in out]


def plan(python: str) -> tuple[list[str], list[str]]:
    """(binds, hide): the paths shown read-only in the sandbox's root, and the folders inside them
    covered by empty mounts. A folder that holds a path the interpreter needs is never hidden."""
    needs = interpreter_paths(python)
    binds = [t for t in SYSTEM_TREES + SYSTEM_FILES if os.path.lexists(t)]
    shown = [os.path.realpath(t) for t in binds if os.path.isdir(t)]
    for p in needs:  # the interpreter's own prefix, when it is not in a system tree
        if not any(_inside(p, t) for t in shown):
            prefix = next((q for q in {sys.base_prefix, sys.prefix, sys.exec_prefix} if _inside(p, os.path.realpath(q)) and
                           os.path.realpath(q) != "/"), None)
            extra = os.path.realpath(prefix) if prefix else (p if os.path.isdir(p) else os.path.dirname(p))
            binds.append(extra)
            shown.append(extra)
    hide = set()
    for d in _package_dirs() + _trainer_dirs():
        d = os.path.realpath(d)
        if (os.path.isdir(d) and any(_inside(d, t) and d != t for t in shown)
                and not any(_inside(n, d) for n in needs)):
            hide.add(d)
    hide_sorted = sorted(hide)
    hide_sorted = [d for d in hide_sorted if not any(o != d and _inside(d, o) for o in hide_sorted)]
    return binds, hide_sorted
