"""What several processes cost and change, on this machine: prints tables, never asserts.

1. Step time and peak memory per rank of the same run (the same global batch) on 1 process and on 2 ranks
   under torchrun (gloo): the default config on SmolLM2-135M for a few steps, no evaluation. The 1-process
   run uses 2 threads, each of the 2 ranks 1, so both use the machine's 2 cores.
2. How often a completion flips with the world size: the default run's prompts sampled with the same group
   seeds as one batch of B groups and as W batches of B/W groups (what each rank samples). The streams are the
   same; a different batch shape can still round a logit differently and flip a sample.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_distributed.py --steps 4 --flip-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, steps: int, out: Path) -> dict:
    threads = 2 if nproc == 1 else 1
    cmd = [sys.executable, "-m", "grpo", "train", str(ROOT / "configs/default.yaml"), f"output.dir={out}",
           f"trainer.steps={steps}", "eval.before=false", "eval.after=false", "output.checkpoint_every=0",
           "output.save_model=false", "output.tensorboard=false", "output.report_every=0",
           f"model.threads={threads}", "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, env=env)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far (KiB)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows  # step 1 warms up
    return {"step_s": statistics.median(r["time/step"] for r in later),
            "generate_s": statistics.median(r["time/generate"] for r in later),
            "train_s": statistics.median(r["time/train"] for r in later),
            "peak_rss_gib": max(peak, before) / 2**20}


def flips(steps: int, world: int) -> tuple[int, int]:
    """(completions that differ, completions) between one batch and `world` batches, same group seeds."""
    import torch

    from grpo.config import load_config
    from grpo.data import PromptSampler, encode_rows, load_task
    from grpo.models import load_model_and_tokenizer
    from grpo.rollout import SamplingParams, make_engine
    from grpo.rollout.base import group_seed

    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs/default.yaml", [])
    model, tok, _ = load_model_and_tokenizer(cfg.model, log=lambda *a: None)
    engine = make_engine(cfg.sampling, model, tok)
    params = SamplingParams.from_config(cfg.sampling)
    sampler = PromptSampler(load_task(cfg.data, []).train, cfg.data.seed)
    differ = total = 0
    for step in range(steps):
        rows = sampler.next(cfg.prompts_per_step)
        ids = encode_rows(tok, rows, cfg.data)
        seeds = [group_seed(cfg.trainer.seed, step, 0, i) for i in range(len(rows))]
        whole = engine.generate(ids, cfg.sampling.group_size, params, seeds=seeds)
        per = len(rows) // world
        parts = [engine.generate(ids[r * per:(r + 1) * per], cfg.sampling.group_size, params,
                                 seeds=seeds[r * per:(r + 1) * per]) for r in range(world)]
        a = tok.batch_decode(whole.completion_ids, skip_special_tokens=True)
        b = [t for p in parts for t in tok.batch_decode(p.completion_ids, skip_special_tokens=True)]
        differ += sum(x != y for x, y in zip(a, b))
        total += len(a)
    return differ, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--flip-steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.steps, Path(tmp) / "one")
        two = run(2, args.steps, Path(tmp) / "two")
    print(f"\nconfigs/default.yaml, {args.steps} steps, median of steps 2-{args.steps}, same global batch (32 completions)")
    print("| | 1 process (2 threads) | 2 ranks (1 thread each) | ratio |\n|---|---:|---:|---:|")
    for key, label in [("step_s", "s / step"), ("generate_s", "generate s"), ("train_s", "train s (incl. all-reduce)"),
                       ("peak_rss_gib", "peak RSS GiB (largest process)")]:
        print(f"| {label} | {one[key]:.2f} | {two[key]:.2f} | {two[key] / one[key]:.2f}x |")
    differ, total = flips(args.flip_steps, 2)
    print(f"\ncompletions that differ between 1 batch and 2 rank batches (same group seeds): {differ} of {total} "
          f"({100 * differ / total:.1f}%) over {args.flip_steps} steps of the default run's prompts")


if __name__ == "__main__":
    main()
