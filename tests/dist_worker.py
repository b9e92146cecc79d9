"""A few GRPO steps on the tiny model, run by tests/test_distributed.py (and test_distributed_random.py) once in one
process and once under torchrun. The hf engine samples each group in its own generate call under the group's seed,
so the rollouts are the same at any world size; rank 0 writes each step's metrics and the final weights to OUT.

    python tests/dist_worker.py OUT ddp|fsdp LOSS_TYPE [--mixed] [--reference-ranks=W] [section.field=value ...]

--mixed: every third prompt is ~300 characters long (the others ~10), so that under a token budget the ranks plan
    different numbers of micro-batches.
--reference-ranks=W (one process, loss_type bnpo): the update bnpo makes on W ranks, by its definition (docs/algorithm.md section 3):
    each of the W parts of the batch (the whole groups World.shard gives rank r) is a dapo loss of its own, and the
    gradient is their mean (DDP's average of the per-rank gradients); the loss is the mean of the parts' losses.
"""

import sys

import torch

from grpo.batch import StepBatch
from grpo.config import load_config
from grpo.core.logprobs import slice_batch
from grpo.data.arithmetic import arithmetic_rows
from grpo.distributed import World, close_world, init_world
from grpo.models import apply_lora, frozen_copy
from grpo.parallel import full_state_dict
from grpo.rollout import FullCopyEngine
from grpo.rollout import HFGenerateEngine
from grpo.run import build_trainer
from grpo.testing import tiny_model_and_tokenizer

LONG = "Read this carefully, every word of it, before you answer the question at its very end. " * 4  # ~340 chars


def part_of(batch: StepBatch, groups: slice) -> StepBatch:
    """The groups `groups` of a one-process batch, as the rank holding them would have them."""
    g = batch.group_size
    rows = slice(groups.start * g, groups.stop * g)
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return StepBatch(batch.scored.select(list(range(groups.start, groups.stop))), batch.advantages[rows],
                     slice_batch(batch.sequences, rows), batch.loss_mask[rows], pick(batch.ref_logprobs),
                     pick(batch.old_logprobs), batch.sampling, batch.num_steps)


def bnpo_as_ranks(trainer, ranks: int) -> None:
    """Make the one-process trainer's gradient bnpo's on `ranks` ranks (see the module docstring)."""
    whole = trainer.accumulate_gradients

    def accumulate(batch: StepBatch, compare_rollout: bool = False) -> dict[str, float]:
        sums: dict[str, float] = {}
        for r in range(ranks):
            part = part_of(batch, World(rank=r, size=ranks).shard(len(batch.scored.rows)))
            for k, v in whole(part, compare_rollout).items():  # in one process bnpo is dapo over the part
                sums[k] = sums.get(k, 0.0) + v / ranks
        for p in trainer.model.parameters():
            if p.grad is not None:
                p.grad.div_(ranks)  # the sum of the parts' gradients -> their mean
        return sums

    trainer.accumulate_gradients = accumulate


def prompt_rows(mixed: bool) -> list[dict]:
    rows, _ = arithmetic_rows(1, ["+", "-"], 80, 10, "{question}", seed=0)
    if mixed:
        rows = [{**row, "prompt": LONG + row["prompt"]} if i % 3 == 0 else row for i, row in enumerate(rows)]
    return rows


def main(out: str, parallel: str, loss_type: str, *args: str) -> None:
    torch.set_num_threads(1)
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    mixed = "--mixed" in flags
    reference = next((int(f.split("=")[1]) for f in flags if f.startswith("--reference-ranks=")), None)
    world = init_world("cpu", 120)
    cfg = load_config(None, [
        "trainer.batch_size=16", "sampling.group_size=4", "trainer.micro_batch_size=3", "sampling.max_new_tokens=10",
        "data.digits=1", "data.num_eval=10", "trainer.lr=1e-3", "algorithm.beta=0.04", "trainer.steps=2",
        f"algorithm.loss_type={loss_type}", f"trainer.parallel={parallel}",
        "rewards=[{name: length, args: {target: 6}}]", *overrides,
    ])
    model, tok = tiny_model_and_tokenizer(seed=0)
    ref = None
    if cfg.lora.enabled:  # the reference is the base model with the adapters off
        model = apply_lora(model, cfg.lora)
    elif cfg.algorithm.beta > 0:
        ref = frozen_copy(model)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
            for p in ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    if world.distributed and parallel == "fsdp":
        engine = FullCopyEngine.around(lambda full: HFGenerateEngine(full, tok), model)
    else:
        engine = HFGenerateEngine(model, tok)
    trainer = build_trainer(cfg, model, tok, engine, prompt_rows(mixed), ref_model=ref, world=world)
    if reference is not None:
        bnpo_as_ranks(trainer, reference)
    steps = []
    for _ in range(cfg.trainer.steps):
        metrics, batch = trainer.step()
        metrics = {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/", "memory/"))}
        metrics["advantages"] = batch.advantages.tolist()
        metrics["completions"] = batch.scored.completions
        steps.append(metrics)
    weights = full_state_dict(model) if world.distributed and parallel == "fsdp" else model.state_dict()
    if world.is_main:
        torch.save({"steps": steps, "weights": {k: v.detach().cpu() for k, v in weights.items()},
                    "world": world.size}, out)
    close_world(world, finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
