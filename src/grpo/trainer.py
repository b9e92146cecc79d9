"""The GRPO loop (SPEC.md section 1). Orchestration only: the math lives in grpo.core.

One step:
  1. draw B prompts; the engine samples G completions each      (rollout)
  2. score every completion with the reward functions            (rewards)
  3. group-relative advantages                                   (core.advantages)
  4. reference log-probs if beta > 0, old log-probs if mu > 1    (core.logprobs)
  5. mu optimizer steps, micro-batched, loss normalized over the whole batch (core.losses)
  6. metrics to metrics.jsonl and the console, samples to samples.jsonl

Departures from the paper, on purpose: the policy's log-probs use the sampling
temperature (as TRL does), and the model runs without dropout so that with
mu = 1 the ratio is exactly 1.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from grpo.config import Config
from grpo.core.advantages import outcome_advantages, zero_std_groups
from grpo.core.logprobs import SequenceBatch, build_sequences, completion_logprobs, slice_batch
from grpo.core.losses import BatchTotals, aggregate, clipped_surrogate, kl_k3, masked_mean, per_token_loss
from grpo.data import PromptSampler, chat_messages
from grpo.models import encode_prompt
from grpo.rewards import get_reward, score
from grpo.rollout.base import Rollout, SamplingParams


@dataclass
class Phases:
    """Wall time of each phase of a step, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class StepBatch:
    """Everything one step computes before the gradient steps. N = B * G rows."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout
    prompts: list[str]  # N rendered prompt texts
    completions: list[str]  # N completion texts
    rewards: dict[str, torch.Tensor]  # per reward function, [N] with NaN for None
    total_rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    sequences: SequenceBatch
    ref_logprobs: torch.Tensor | None = None  # [N, T]
    old_logprobs: torch.Tensor | None = None  # [N, T]


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the base learning rate at optimizer step s: linear warmup, then constant or cosine."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "cosine":
            progress = (s - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


class Trainer:
    def __init__(self, config: Config, model, tokenizer, engine, train_rows: list[dict], ref_model=None, console=None):
        self.cfg = config
        self.model, self.tokenizer, self.engine, self.ref_model = model, tokenizer, engine, ref_model
        self.console = console
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        self.sampler = PromptSampler(train_rows, config.data.seed)
        self.reward_specs = [(r.name, get_reward(r.name), r.weight, r.args) for r in config.rewards]
        self.params = SamplingParams(
            max_new_tokens=config.sampling.max_new_tokens,
            temperature=config.sampling.temperature,
            top_p=config.sampling.top_p,
            top_k=config.sampling.top_k,
            min_p=config.sampling.min_p,
            stop=tuple(config.sampling.stop),
        )
        t = config.trainer
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        total_updates = t.steps * config.algorithm.mu
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, total_updates, t.lr_schedule)
        )
        self.generator = torch.Generator().manual_seed(t.seed)
        self.step_count = 0

    # -- 1. rollout ---------------------------------------------------------------------------
    def rollout(self, rows: list[dict]) -> tuple[Rollout, list[str]]:
        messages = [chat_messages(r[self.cfg.data.prompt_column], self.cfg.data.system_prompt) for r in rows]
        prompt_ids = [encode_prompt(self.tokenizer, m) for m in messages]
        rollout = self.engine.generate(prompt_ids, self.cfg.sampling.group_size, self.params, self.generator)
        prompt_texts = [self.tokenizer.decode(p) for p in prompt_ids]
        return rollout, [t for t in prompt_texts for _ in range(rollout.group_size)]

    # -- 2. rewards ---------------------------------------------------------------------------
    def score(self, rows: list[dict], prompts: list[str], completions: list[str]):
        g = self.cfg.sampling.group_size
        columns = {k: [r.get(k) for r in rows for _ in range(g)] for k in rows[0] if k != self.cfg.data.prompt_column}
        return score(self.reward_specs, prompts, completions, columns)

    # -- 4. log-probs that stay fixed during the step ------------------------------------------
    @torch.no_grad()
    def fixed_logprobs(self, model, sequences: SequenceBatch) -> torch.Tensor:
        mb = self.cfg.trainer.micro_batch_size
        parts = []
        for start in range(0, sequences.input_ids.shape[0], mb):
            lp, _ = completion_logprobs(model, slice_batch(sequences, slice(start, start + mb)), self.params.temperature)
            parts.append(lp)
        return torch.cat(parts)  # [N, T]

    # -- 5. gradient steps ---------------------------------------------------------------------
    def optimize(self, batch: StepBatch) -> dict[str, float]:
        """mu optimizer steps on this batch (DeepSeekMath's inner iterations); averaged metrics."""
        mu = self.cfg.algorithm.mu
        totals: dict[str, float] = {}
        for _ in range(mu):
            self.optimizer.zero_grad(set_to_none=True)
            for k, v in self.accumulate_gradients(batch).items():
                totals[k] = totals.get(k, 0.0) + v / mu
            grad_norm = self.clip_and_step()
        totals["grad_norm"] = grad_norm
        return totals

    def accumulate_gradients(self, batch: StepBatch) -> dict[str, float]:
        """Backward of the whole batch's loss, one micro-batch at a time; the sum of the micro-batch
        gradients equals the gradient of the whole batch (normalizers are the global batch's)."""
        a, mb = self.cfg.algorithm, self.cfg.trainer.micro_batch_size
        mask = batch.rollout.completion_mask.to(self.device)  # [N, T]
        n = mask.shape[0]
        totals = BatchTotals(n, int(mask.sum()), self.cfg.sampling.max_new_tokens)
        advantages = batch.advantages.to(self.device)
        sums = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "entropy": 0.0, "ratio": 0.0}
        for start in range(0, n, mb):
            rows = slice(start, start + mb)
            m = mask[rows]
            lp, entropy = completion_logprobs(
                self.model, slice_batch(batch.sequences, rows), self.params.temperature, with_entropy=True
            )
            old = lp.detach() if batch.old_logprobs is None else batch.old_logprobs[rows]
            sur = clipped_surrogate(lp, old, advantages[rows], a.eps_low, a.eps_high)
            kl = kl_k3(lp, batch.ref_logprobs[rows]) if batch.ref_logprobs is not None else None
            loss = aggregate(per_token_loss(sur.objective, kl, a.beta), m, a.loss_type, totals)
            loss.backward()
            share = int(m.sum()) / max(totals.num_tokens, 1)  # token-weighted metric averages
            sums["loss"] += float(loss.detach())
            sums["entropy"] += float(masked_mean(entropy, m)) * share
            sums["ratio"] += float(masked_mean(sur.ratio.detach(), m)) * share
            sums["clip_low"] += float(masked_mean(sur.clipped_low.float(), m)) * share
            sums["clip_high"] += float(masked_mean(sur.clipped_high.float(), m)) * share
            if kl is not None:
                sums["kl"] += float(masked_mean(kl.detach(), m)) * share
        return sums

    def clip_and_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.trainer.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.last_lr = lr
        return grad_norm

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> tuple[dict, StepBatch]:
        phases, start = Phases(), time.perf_counter()
        batch = self.make_batch(self.sampler.next(self.cfg.prompts_per_step), phases)
        with phases.time("train"):
            opt = self.optimize(batch)
        self.step_count += 1
        phases.seconds["step"] = time.perf_counter() - start
        return self.metrics(batch, opt, phases), batch

    def make_batch(self, rows: list[dict], phases: Phases) -> StepBatch:
        """Steps 1-4: sample, score, advantages, and the log-probs that stay fixed during the step."""
        cfg = self.cfg
        with phases.time("generate"):
            rollout, prompts = self.rollout(rows)
        with phases.time("score"):
            completions = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            rewards = self.score(rows, prompts, completions)
            advantages = outcome_advantages(
                rewards.total, rollout.group_size, cfg.algorithm.scale_rewards, cfg.algorithm.advantage_eps
            )
        sequences = build_sequences(rollout.prompt_ids, rollout.completion_ids, rollout.completion_mask, self.pad_id)
        batch = StepBatch(rows, rollout, prompts, completions, rewards.per_function, rewards.total, advantages, sequences)
        if cfg.algorithm.beta > 0:
            with phases.time("reference"):
                batch.ref_logprobs = self.fixed_logprobs(self.ref_model, sequences)
        if cfg.algorithm.mu > 1:
            with phases.time("old_logprobs"):
                batch.old_logprobs = self.fixed_logprobs(self.model, sequences)
        return batch

    # -- 6. metrics (SPEC.md section 5) ---------------------------------------------------------
    def metrics(self, batch: StepBatch, opt: dict, phases: Phases) -> dict:
        r, lengths = batch.total_rewards, batch.rollout.lengths.float()
        tokens = float(lengths.sum())
        m: dict[str, float] = {"step": self.step_count}
        m.update(_mean_std("reward", r))
        for name, values in batch.rewards.items():
            m.update(_mean_std(f"reward/{name}", values))
        m["reward/zero_std_frac"] = float(zero_std_groups(r, batch.rollout.group_size).float().mean())
        m["advantage/abs_mean"] = float(batch.advantages.abs().mean())
        m["completion/length_mean"] = float(lengths.mean())
        m["completion/length_min"] = float(lengths.min())
        m["completion/length_max"] = float(lengths.max())
        m["completion/truncated_frac"] = float(batch.rollout.truncated.float().mean())
        m["loss"] = opt["loss"]
        if batch.ref_logprobs is not None:
            m["kl/mean"] = opt["kl"]
        m["clip/low_frac"], m["clip/high_frac"] = opt["clip_low"], opt["clip_high"]
        m["ratio/mean"] = opt["ratio"]
        m["entropy/mean"] = opt["entropy"]
        m["grad_norm"], m["lr"] = opt["grad_norm"], self.last_lr
        for name, seconds in phases.seconds.items():  # wall time and completion tokens/s of each phase
            m[f"time/{name}"] = seconds
            m["throughput/" + ("tokens_per_s" if name == "step" else f"{name}_tokens_per_s")] = tokens / max(seconds, 1e-9)
        m["tokens/completion"] = tokens
        return m

    def sample_records(self, batch: StepBatch, k: int) -> list[dict]:
        """k completions to show: the best and the worst of each group first."""
        g = batch.rollout.group_size
        order: list[int] = []
        r = torch.nan_to_num(batch.total_rewards, nan=-math.inf).view(-1, g)
        for b in range(r.shape[0]):
            order += [b * g + int(r[b].argmax()), b * g + int(r[b].argmin())]
        order += [i for i in range(len(batch.completions)) if i not in order]
        records = []
        for i in list(dict.fromkeys(order))[:k]:
            records.append(
                {
                    "step": self.step_count,
                    "group": i // g,
                    "prompt": batch.prompts[i],
                    "completion": batch.completions[i],
                    "rewards": {name: float(v[i]) for name, v in batch.rewards.items()},
                    "reward": float(batch.total_rewards[i]),
                    "advantage": float(batch.advantages[i]),
                    "length": int(batch.rollout.lengths[i]),
                    "truncated": bool(batch.rollout.truncated[i]),
                }
            )
        return records


def _mean_std(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """Mean and std over the values that are not NaN (None rewards are not zeros)."""
    v = values[~torch.isnan(values)]
    if v.numel() == 0:
        return {f"{prefix}/mean": float("nan"), f"{prefix}/std": float("nan")}
    return {f"{prefix}/mean": float(v.mean()), f"{prefix}/std": float(v.std()) if v.numel() > 1 else 0.0}
