"""Held-out evaluation on the tiny model, run by tests/test_eval_sharded.py once in one process and once under
torchrun: every rank completes its share of the batches; rank 0 writes the result and how many held-out rows
each rank completed greedily to OUT.

    python tests/dist_eval_worker.py OUT ENGINE
"""

import sys

import torch

from grpo.config import load_config
from grpo.data import load_task
from grpo.distributed import close_world, init_world
from grpo.evaluate import evaluate
from grpo.rollout import make_engine
from grpo.testing import tiny_model_and_tokenizer


def main(out: str, engine_name: str) -> None:
    torch.set_num_threads(1)
    world = init_world("cpu", 120)
    cfg = load_config(None, [
        "data.digits=1", "data.num_eval=10", "eval.batch_size=3", "eval.k=2", "sampling.max_new_tokens=8",
        f"sampling.engine={engine_name}", "rewards=[{name: answer_accuracy}, {name: length, args: {target: 6}}]",
    ])
    model, tok = tiny_model_and_tokenizer(seed=0)
    engine = make_engine(cfg.sampling, model, tok)
    greedy_rows, generate = [], engine.generate

    def counted(prompt_ids, group_size, *args, **kwargs):
        if group_size == 1:
            greedy_rows.append(len(prompt_ids))
        return generate(prompt_ids, group_size, *args, **kwargs)

    engine.generate = counted
    result = evaluate(tok, engine, load_task(cfg.data, []).eval, cfg, world=world)
    work = world.gather(sum(greedy_rows))
    if world.is_main:
        torch.save({"result": result, "work": work}, out)
    close_world(world, finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
