"""Randomized equivalence: random configurations on 2 ranks, and on 3 where the batch divides, make the update one
process makes (tests/dist_worker.py, torchrun with gloo, one thread each, the tiny model, 2 steps).

Each seed draws: DDP or FSDP2, every loss_type, scale_rewards, outcome or process advantages, mu 1 or 2, the KL
term or not, LoRA or not, dynamic sampling or not, a top-k sampler or not, group size and number of prompts,
micro-batch rows and token budgets that split the rows unevenly over micro-batches (and give the ranks different
numbers of them), prompts of one length or of ~10 and ~340 characters mixed. The two runs must sample the same
completions and reach the same advantages, loss, KL, gradient norm and weights. bnpo's reference is its definition
over the same number of ranks (dist_worker --reference-ranks): the mean of each rank's own token mean.

A fixed handful of seeds runs by default (about 15-45 s each on 2 cores). For a long run, more seeds:

    GRPO_RANDOM_CONFIGS=50 pytest tests/test_distributed_random.py    # seeds 1000 .. 1049 as well
    GRPO_RANDOM_CONFIGS=1 GRPO_RANDOM_START=1017 pytest tests/test_distributed_random.py -k 1017   # one again

A failure names its seed in the test id; `random_config(seed)` says what it drew.
"""

import os
import random

import pytest
import torch

from test_distributed import WORKER, assert_same_weights, groups, one_process, torchrun

FIXED = [0, 7, 12, 20, 35, 39]  # every loss type, 2 and 3 ranks, DDP and FSDP2, LoRA, dynamic sampling
EXTRA = int(os.environ.get("GRPO_RANDOM_CONFIGS", "0"))
START = int(os.environ.get("GRPO_RANDOM_START", "1000"))
SEEDS = FIXED + [s for s in range(START, START + EXTRA) if s not in FIXED]
LOSS_TYPES = ["grpo", "dapo", "token", "dr_grpo", "bnpo"]


def random_config(seed: int) -> tuple[str, str, int, list[str], list[str]]:
    """(parallel, loss_type, ranks, worker flags, config overrides) drawn from `seed`; the first five seeds go
    through the loss types in turn."""
    rng = random.Random(seed)
    loss_type = LOSS_TYPES[seed] if seed < len(LOSS_TYPES) else rng.choice(LOSS_TYPES)
    parallel = rng.choice(["ddp", "fsdp"])
    group_size = rng.choice([2, 3, 4])
    ranks = 3 if rng.random() < 0.3 else 2
    prompts = rng.choice([p for p in (2, 3, 4, 6) if p % ranks == 0 and p * group_size <= 18])
    lora = rng.random() < 0.3
    dynamic = loss_type != "bnpo" and rng.random() < 0.3  # bnpo depends on which rank holds which group
    overrides = [
        f"trainer.batch_size={prompts * group_size}", f"sampling.group_size={group_size}",
        f"algorithm.loss_type={loss_type}", f"algorithm.scale_rewards={rng.choice(['group', 'batch', 'none'])}",
        f"algorithm.advantage={rng.choice(['outcome', 'process'])}", f"algorithm.mu={rng.choice([1, 2])}",
        f"algorithm.beta={rng.choice([0.0, 0.04])}", f"sampling.max_new_tokens={rng.randint(6, 10)}",
        f"trainer.micro_batch_size={rng.randint(1, 4)}",
        f"trainer.micro_batch_tokens={rng.choice(['null', 40, 80, 200, 400])}",
        f"rewards=[{{name: length, args: {{target: {rng.randint(3, 8)}}}}}, {{name: format}}]",
    ]
    if rng.random() < 0.3:  # a truncated sampler: pi_old is a forward pass of the trainer's (with mu = 2)
        overrides += ["sampling.top_k=40"]
    if lora:
        overrides += ["lora.enabled=true", "lora.r=4", "trainer.lr=1e-2"]
    if dynamic:
        overrides += ["algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3"]
    flags = ["--mixed"] if rng.random() < 0.6 else []
    return parallel, loss_type, ranks, flags, overrides


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configuration_on_several_ranks_makes_the_one_process_update(tmp_path, seed):
    parallel, loss_type, ranks, flags, overrides = random_config(seed)
    reference = [f"--reference-ranks={ranks}"] if loss_type == "bnpo" else []
    one = one_process(str(WORKER), str(tmp_path / "one.pt"), parallel, loss_type, *flags, *reference, *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    many = torchrun(str(WORKER), str(tmp_path / "many.pt"), parallel, loss_type, *flags, *overrides, nproc=ranks)
    assert many.returncode == 0, many.stderr[-3000:]
    a_run, b_run = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "many.pt")
    assert b_run["world"] == ranks
    dynamic = "algorithm.dynamic_sampling=true" in overrides
    size = int(next(o for o in overrides if o.startswith("sampling.group_size=")).split("=")[1])
    # bnpo's reference averages per-rank token means, so only its loss and gradient compare (the other metrics are
    # the global batch's token means on the ranks, the parts' in the reference)
    keys = ("loss", "grad_norm") if loss_type == "bnpo" else ("loss", "grad_norm", "kl/mean", "entropy/mean",
                                                               "ratio/mean", "clip/low_frac", "clip/high_frac")
    for a, b in zip(a_run["steps"], b_run["steps"], strict=True):
        if dynamic:  # every rank keeps its own groups: the same groups, in rank order rather than round order
            assert sorted(groups(a, size)) == sorted(groups(b, size))
        else:
            assert a["completions"] == b["completions"]
            assert a["advantages"] == b["advantages"]
        for key in ("reward/mean", "reward/std", "completion/length_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    lr = float(next((o for o in reversed(overrides) if o.startswith("trainer.lr=")), "trainer.lr=1e-3").split("=")[1])
    assert_same_weights(a_run["weights"], b_run["weights"], lr)
