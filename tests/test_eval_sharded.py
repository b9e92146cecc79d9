"""Held-out evaluation under several ranks: each rank completes its share of the batches (batch i on rank
i mod W, the batches of one process), and every rank gets the one-process result (tests/dist_eval_worker.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import ENV, torchrun

WORKER = Path(__file__).with_name("dist_eval_worker.py")


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_two_ranks_evaluate_their_shares_and_give_the_one_process_result(engine, tmp_path):
    """10 held-out problems in batches of 3 (starting at rows 0, 3, 6, 9): rank 0 completes rows 0-2 and 6-8,
    rank 1 rows 3-5 and 9; greedy completions, reward means, accuracy, pass@2 and every example as one process."""
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.pt"), engine], capture_output=True,
                         text=True, timeout=240, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(str(WORKER), str(tmp_path / "two.pt"), engine)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["work"] == [10] and two["work"] == [6, 4]
    assert two["result"] == one["result"]  # exactly: the same batches, gathered in order
    assert len(one["result"]["examples"]) == 10 and "pass@2" in one["result"]
