"""A few GRPO steps on the tiny model, run by tests/test_distributed.py once in one process and once under
torchrun. The hf engine samples each group in its own generate call under the group's seed, so the rollouts
are the same at any world size; rank 0 writes each step's metrics and the final weights to OUT.

    python tests/dist_worker.py OUT ddp|fsdp LOSS_TYPE [section.field=value ...]
"""

import json
import sys

import torch

from grpo.config import load_config
from grpo.data.arithmetic import arithmetic_rows
from grpo.distributed import close_world, init_world
from grpo.models import frozen_copy
from grpo.parallel import full_state_dict
from grpo.rollout import FullCopyEngine
from grpo.rollout import HFGenerateEngine
from grpo.run import build_trainer
from grpo.testing import tiny_model_and_tokenizer


def main(out: str, parallel: str, loss_type: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    world = init_world("cpu", 120)
    cfg = load_config(None, [
        "trainer.batch_size=16", "sampling.group_size=4", "trainer.micro_batch_size=3", "sampling.max_new_tokens=10",
        "data.digits=1", "data.num_eval=10", "trainer.lr=1e-3", "algorithm.beta=0.04", "trainer.steps=2",
        f"algorithm.loss_type={loss_type}", f"trainer.parallel={parallel}",
        "rewards=[{name: length, args: {target: 6}}]", *overrides,
    ])
    model, tok = tiny_model_and_tokenizer(seed=0)
    ref = frozen_copy(model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    if world.distributed and parallel == "fsdp":
        engine = FullCopyEngine.around(lambda full: HFGenerateEngine(full, tok), model)
    else:
        engine = HFGenerateEngine(model, tok)
    rows, _ = arithmetic_rows(1, ["+", "-"], 80, 10, "{question}", seed=0)
    trainer = build_trainer(cfg, model, tok, engine, rows, ref_model=ref, world=world)
    steps = []
    for _ in range(cfg.trainer.steps):
        metrics, batch = trainer.step()
        metrics = {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/"))}
        metrics["advantages"] = batch.advantages.tolist()
        metrics["completions"] = batch.scored.completions
        steps.append(metrics)
    weights = full_state_dict(model) if world.distributed and parallel == "fsdp" else model.state_dict()
    if world.is_main:
        torch.save({"steps": steps, "weights": {k: v.detach().cpu() for k, v in weights.items()},
                    "world": world.size}, out)
    close_world(world)


if __name__ == "__main__":
    main(*sys.argv[1:])
