"""Several processes under torchrun (gloo, 2 ranks on this machine's 2 cores, one thread each): the update equals
the single-process one. tests/dist_worker.py runs the steps; the hf engine samples each group under its own seed,
so both sides train on the same rollouts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, env=ENV)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run of each loss type, computed once."""
    out = {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        path = tmp_path_factory.mktemp("single") / f"{loss_type}.pt"
        proc = one_process(str(WORKER), str(path), "ddp", loss_type)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[loss_type] = torch.load(path)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_two_ranks_make_the_single_process_update(single, tmp_path, parallel, loss_type):
    """Same rollouts (each group under its own seed), so the same rewards and advantages; loss, KL and gradient
    norm from global normalizers and summed gradients; the same weights after two AdamW steps (micro-batches of
    3 rows over each rank's 8 completions, so several micro-batches per rank)."""
    path = tmp_path / "two.pt"
    proc = torchrun(str(WORKER), str(path), parallel, loss_type)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = single[loss_type], torch.load(path)
    assert two["world"] == 2 and one["world"] == 1
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert a["completions"] == b["completions"]  # the whole batch, gathered in rank order
        assert a["advantages"] == b["advantages"]
        for key in ("reward/mean", "reward/std", "reward/zero_std_frac", "completion/length_mean"):
            assert a[key] == b[key], key
        for key in ("loss", "kl/mean", "grad_norm", "entropy/mean", "clip/low_frac", "ratio/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert one["weights"].keys() == two["weights"].keys()
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=5e-5, msg=name)
