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
