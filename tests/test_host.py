"""grpo.host: a CPU run keeps large freed blocks for reuse instead of faulting their pages in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

from grpo import host

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt"
)

# the large tensors of an output head's step, allocated and freed six times: a chunk of logits [256, V] (48 MiB),
# its softmax, a tensor of the head weight's size [V, H] (108 MiB) and the weight's bfloat16 copy; the page faults
# of each round
_REUSE = """
import json, resource, sys, torch
from grpo import host
kept = host.keep_freed_memory() if sys.argv[1] == "policy" else None
torch.set_num_threads(1)
w = torch.randn(49152, 576)
faults = []
for i in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    z = torch.full((256, 49152), 0.5)
    p = torch.softmax(z, -1)
    g = w * 2
    b = w.to(torch.bfloat16)
    del z, p, g, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults, "pages": (2 * 256 * 49152 + 49152 * 576) * 4 // resource.getpagesize()}))
"""


def _reuse(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in host._USER_POLICY and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "GRPO_KEEP_FREED_MEMORY")}
    out = subprocess.run([sys.executable, "-c", _REUSE, mode], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_freed_large_block_is_reused_without_faulting_its_pages_in_again():
    default, kept = _reuse("default"), _reuse("policy")
    assert min(default["faults"][1:]) > default["pages"] // 2, default  # glibc's default: fresh mmaps, faulted in anew
    assert kept["kept"] is True
    # from the second round on most freed pages are reused: 12-29% of the default's faults over 20 tries (a block
    # freed with no free neighbour cannot serve torch's 64-byte-aligned request of its own size, so glibc's heap
    # still faults one or two blocks in a round, depending on where the heap starts)
    assert sum(kept["faults"][1:]) < sum(default["faults"][1:]) / 2, (kept, default)


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
                                 {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}, {"GRPO_KEEP_FREED_MEMORY": "0"}])
def test_the_users_own_allocator_policy_stands(env):
    out = _reuse("policy", **env)
    assert out["kept"] is False
    assert min(out["faults"][1:]) > out["pages"] // 2, out  # nothing changed


def test_set_up_sets_the_policy_on_a_cpu_only(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append(1))
    threads = torch.get_num_threads()
    try:
        host.set_up(1, "cuda")
        assert calls == [] and torch.get_num_threads() == 1
        host.set_up(None, "cpu")
        assert calls == [1] and torch.get_num_threads() == 1  # None: threads left as they are
    finally:
        torch.set_num_threads(threads)


# memory_use in a fresh process with glibc's own allocator: a 256 MiB block written, held, then freed (unmapped)
_MEMORY = """
import json, torch
from grpo import host
before = host.memory_use("cpu")
block = torch.ones(64 * 2**20)  # 256 MiB, every page written
held = host.memory_use("cpu")
del block
after = host.memory_use("cpu")
print(json.dumps([before, held, after]))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="the resident size comes from /proc")
def test_memory_use_reports_what_the_process_holds_now_and_at_its_peak():
    env = {**os.environ, "GRPO_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", _MEMORY], env=env, capture_output=True, text=True, timeout=120, check=True)
    before, held, after = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert set(before) == {"rss", "peak_rss"} and 0 < before["rss"] <= before["peak_rss"]
    assert 250 * mib <= held["rss"] - before["rss"] <= 300 * mib  # the block's pages, resident
    assert held["peak_rss"] >= held["rss"]
    assert held["rss"] - after["rss"] >= 250 * mib  # freed: gone from the resident size...
    assert after["peak_rss"] - before["rss"] >= 250 * mib  # ...and still in the peak (the kernel's high-water mark
    # lags the resident size by the pages each thread has not yet counted in: up to a few hundred KiB here)


def test_memory_use_on_cuda_reports_each_intervals_peak(monkeypatch):
    """On a CUDA device: the tensors' peak since the previous call (then reset, so each step has its own) and the
    caching allocator's reserve."""
    import torch

    state = {"peak": 5 * 2**30, "resets": 0}

    def reset(device):
        state["peak"], state["resets"] = 0, state["resets"] + 1

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 7 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    first = host.memory_use(torch.device("cuda", 0))
    assert (first["cuda_peak"], first["cuda_reserved"], state["resets"]) == (5 * 2**30, 7 * 2**30, 1)
    assert host.memory_use("cuda:0")["cuda_peak"] == 0  # the next interval starts at the reset
    assert "cuda_peak" not in host.memory_use("cpu")
