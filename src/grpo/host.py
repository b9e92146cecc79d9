"""How this process uses the machine it runs on: its CPU threads, on a CPU its C allocator's policy for large
blocks, and how much memory it holds (`memory_use`, each step's `memory/*` metrics).

glibc's malloc serves every block above its mmap threshold (128 KiB, rising with use to at most 32 MiB) with
a fresh `mmap` and unmaps it on free. A training step on a CPU allocates and frees the same large tensors
again and again (a chunk of logits [chunk, V] in float32, the output head's weight gradient [V, H], its
bfloat16 copy), so every one of them is page-faulted in anew, 4 KiB at a time, each page zeroed by the
kernel: on a virtual machine a fault costs microseconds, and with a 49k vocabulary those faults were most
of a bfloat16 step's output-head backward. `keep_freed_memory` raises the mmap threshold to 1 GiB and the
trim threshold to 2 GiB, so freed blocks stay in the process's heap and the next allocation of that size
reuses their pages, as a caching allocator (PyTorch's CUDA one, jemalloc, tcmalloc) would. The process keeps
what it freed instead of giving it back between steps, and the heap's fragmentation can add to its peak
(both measured in benchmarks/RESULTS_train.md).

It is left alone where the user chose an allocator policy (glibc's MALLOC_* variables or GLIBC_TUNABLES,
jemalloc / tcmalloc in LD_PRELOAD, or GRPO_KEEP_FREED_MEMORY=0 for glibc's own) and where the C library is
not glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = (2 << 30) - 1  # up to 2 GiB free at the heap's top stays mapped (mallopt takes an int)
_USER_POLICY = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def set_up(threads: int | None, device: torch.device | str) -> None:
    """This process's share of the machine for a run on `device`: `threads` CPU threads for torch (None: torch's
    default) and, on a CPU, the allocator policy of `keep_freed_memory`."""
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        keep_freed_memory()


def user_allocator_policy() -> str | None:
    """The allocator setting the user made in the environment, if any (then theirs stands): GRPO_KEEP_FREED_MEMORY=0
    keeps glibc's own behaviour."""
    if os.environ.get("GRPO_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return "GRPO_KEEP_FREED_MEMORY"
    for name in _USER_POLICY:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "LD_PRELOAD"
    return None


@functools.cache
def keep_freed_memory() -> bool:
    """Keep large freed blocks in the heap for reuse (see the module docstring). True where the policy is now
    in force; False where the user set their own or the C library is not glibc. Once per process."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_allocator_policy():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def memory_use(device: torch.device | str) -> dict[str, int]:
    """This process's memory, in bytes: `rss`, resident now, and `peak_rss`, the most it has held resident since it
    started (what an out-of-memory kill goes by); on a CUDA device also `cuda_peak`, the most its tensors held
    since the previous call (each call starts the next interval: a step's peak), and `cuda_reserved`, what
    PyTorch's caching allocator holds now. `rss` is left out where /proc is not there (not Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    use = {"peak_rss": peak if platform.system() == "Darwin" else peak * 1024}
    try:
        with open("/proc/self/statm") as f:
            use["rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident pages
        use["peak_rss"] = max(use["peak_rss"], use["rss"])  # the kernel updates its high-water mark lazily
    except (OSError, ValueError, IndexError):
        pass
    device = torch.device(device)
    if device.type == "cuda":
        use["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        use["cuda_reserved"] = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    return use
