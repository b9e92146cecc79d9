"""The GRPO loop (SPEC.md section 1). Orchestration only: the math lives in grpo.core.

One step:
  1. draw B prompts; the engine samples G completions each      (rollout)
  2. score every completion with the reward functions            (rewards)
     dynamic sampling (DAPO): repeat 1-2, keeping groups whose rewards differ, until B groups
  3. group-relative advantages, outcome [N] or process [N, T]    (core.advantages)
  4. reference log-probs if beta > 0 (LoRA: the adapters off), old log-probs if mu > 1 (the
     rollout's own when they are the policy's: no forward pass)   (core.logprobs)
  5. mu optimizer steps, micro-batched by length under a token budget, loss normalized over the
     whole batch (core.losses);
     the guard skips an update whose loss, gradient norm or rewards are not finite
  6. every ref_reset_steps steps, pi_ref := pi_theta             (DeepSeekMath iterative RL)
  7. metrics to metrics.jsonl and the console, samples to samples.jsonl

Departures from the paper, on purpose: the policy's log-probs use the sampling
temperature (as TRL does), and the model runs without dropout so that with
mu = 1 the ratio is exactly 1.

The numerics guard: a NaN/inf loss or gradient norm, or a reward function that returned NaN/inf
(None is fine: "does not apply"), skips that optimizer update: the gradients are dropped and the
weights and AdamW moments stay as they were. The learning-rate scheduler still advances, so the
schedule stays a function of the iteration (and a resumed or guarded run lines up with a clean one).
The step is counted (`guard/skipped`, `bad_steps` in a row); grpo.run stops the run after
trainer.max_bad_steps bad steps in a row.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from grpo import onednn
from grpo.config import Config
from grpo.core.advantages import outcome_advantages, process_advantages, zero_std_groups
from grpo.core.logprobs import (
    MicroBatch, SequenceBatch, build_sequences, completion_logprobs, micro_batch, plan_micro_batches,
)
from grpo.core.losses import BatchTotals, aggregate, clipped_surrogate, kl_penalty, masked_mean, per_token_loss
from grpo.data import PromptSampler, chat_messages
from grpo.models import (
    checkpointed_layers,
    densify_grads,
    encode_prompt,
    is_lora,
    lora_dropout,
    sparse_embedding_grad,
)
from grpo.rewards import build_rewards, score
from grpo.rewards.base import RewardResult
from grpo.rewards.process import step_table
from grpo.rollout.base import Rollout, SamplingParams, concat_rollouts, select_groups


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
class Scored:
    """Whole groups of sampled completions and their rewards (steps 1-2). N = B * G rows."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout
    prompts: list[str]  # N rendered prompt texts
    completions: list[str]  # N completion texts
    rewards: RewardResult

    def select(self, groups: list[int]) -> "Scored":
        g = self.rollout.group_size
        idx = [b * g + k for b in groups for k in range(g)]
        r = self.rewards
        rewards = RewardResult(
            per_function={k: v[idx] for k, v in r.per_function.items()},
            total=r.total[idx],
            errors=dict(r.errors),
            steps={k: [v[i] for i in idx] for k, v in r.steps.items()},
            nonfinite=dict(r.nonfinite),
        )
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        rollout = select_groups(self.rollout, groups)
        return Scored([self.rows[b] for b in groups], rollout, pick(self.prompts), pick(self.completions), rewards)


def concat_scored(parts: list[Scored], pad_id: int) -> Scored:
    """The groups of all parts, in order (a reward's steps are None where a part had none)."""
    n = [p.rollout.num_completions for p in parts]
    names = {k: None for p in parts for k in p.rewards.steps}
    rewards = RewardResult(
        per_function={k: torch.cat([p.rewards.per_function[k] for p in parts]) for k in parts[0].rewards.per_function},
        total=torch.cat([p.rewards.total for p in parts]),
        errors={k: sum(p.rewards.errors.get(k, 0) for p in parts) for k in parts[0].rewards.errors},
        steps={k: [s for p, m in zip(parts, n) for s in p.rewards.steps.get(k, [None] * m)] for k in names},
        nonfinite={k: sum(p.rewards.nonfinite.get(k, 0) for p in parts)
                   for k in dict.fromkeys(k for p in parts for k in p.rewards.nonfinite)},
    )
    return Scored(
        [r for p in parts for r in p.rows],
        concat_rollouts([p.rollout for p in parts], pad_id),
        [x for p in parts for x in p.prompts],
        [x for p in parts for x in p.completions],
        rewards,
    )


@dataclass
class StepBatch:
    """Everything one step computes before the gradient steps. N = B * G rows."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout
    prompts: list[str]  # N rendered prompt texts
    completions: list[str]  # N completion texts
    rewards: dict[str, torch.Tensor]  # per reward function, [N] with NaN for None
    total_rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N] (outcome) or [N, T] (process)
    sequences: SequenceBatch
    loss_mask: torch.Tensor  # [N, T] bool: completion tokens that enter the loss (overlong_filter drops truncated rows)
    ref_logprobs: torch.Tensor | None = None  # [N, T]
    old_logprobs: torch.Tensor | None = None  # [N, T]
    reward_errors: dict[str, int] = field(default_factory=dict)  # rewards with on_error: none -> failures
    reward_nonfinite: dict[str, int] = field(default_factory=dict)  # rewards -> NaN/inf scores (a bad step)
    sampling: dict[str, float] = field(default_factory=dict)  # dynamic sampling counts
    num_steps: int | None = None  # process supervision: step rewards in the batch


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
        if config.algorithm.beta > 0 and ref_model is None and not is_lora(model):
            raise ValueError("algorithm.beta > 0 needs a reference model (ref_model), or a LoRA policy whose base "
                             "weights are the reference")
        self.console = console
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        self.sampler = PromptSampler(train_rows, config.data.seed)
        self.reward_specs = build_rewards(config.rewards)
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
        # the fused kernel: one pass over each tensor, no full-size temporaries (3x faster on CPU than foreach)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trainable)
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, fused=fused
        )
        total_updates = t.steps * config.algorithm.mu
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup_steps, total_updates, t.lr_schedule)
        )
        self.generator = torch.Generator().manual_seed(t.seed)
        self.step_count = 0
        self.bad_steps = 0  # consecutive steps the guard skipped
        self.skipped_steps = 0  # all steps the guard skipped
        self.skip_reason: str | None = None  # why the last step was skipped (None: it was not)
        self.ref_reset_step: int | None = None  # last step at which pi_ref := pi_theta

    # -- resume: the Trainer's own state (weights and global RNGs: grpo.checkpoint) -------------
    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state(),
            "generator": self.generator.get_state(),
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
            "ref_reset_step": self.ref_reset_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state(state["sampler"])
        self.generator.set_state(state["generator"])
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
        self.ref_reset_step = state["ref_reset_step"]

    # -- 1. rollout ---------------------------------------------------------------------------
    def rollout(self, rows: list[dict]) -> tuple[Rollout, list[str]]:
        messages = [chat_messages(r[self.cfg.data.prompt_column], self.cfg.data.system_prompt) for r in rows]
        prompt_ids = [encode_prompt(self.tokenizer, m) for m in messages]
        rollout = self.engine.generate(prompt_ids, self.cfg.sampling.group_size, self.params, self.generator)
        prompt_texts = [self.tokenizer.decode(p) for p in prompt_ids]
        return rollout, [t for t in prompt_texts for _ in range(rollout.group_size)]

    # -- 2. rewards ---------------------------------------------------------------------------
    def score(self, rows: list[dict], prompts: list[str], completions: list[str], rollout: Rollout | None = None):
        """Dataset columns reach reward functions by name; so do `completion_lengths` (tokens, EOS
        included) and `max_new_tokens`, which length rewards such as overlong_penalty read."""
        g = self.cfg.sampling.group_size
        columns = {k: [r.get(k) for r in rows for _ in range(g)] for k in rows[0] if k != self.cfg.data.prompt_column}
        if rollout is not None:
            columns["completion_lengths"] = rollout.lengths.tolist()
            columns["max_new_tokens"] = [self.params.max_new_tokens] * len(completions)
        return score(self.reward_specs, prompts, completions, columns)

    def generate_and_score(self, rows: list[dict], phases: Phases) -> Scored:
        with phases.time("generate"):
            rollout, prompts = self.rollout(rows)
        with phases.time("score"):
            completions = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            rewards = self.score(rows, prompts, completions, rollout)
        return Scored(rows, rollout, prompts, completions, rewards)

    def sample_groups(self, rows: list[dict], phases: Phases) -> tuple[Scored, dict[str, float]]:
        """Steps 1-2 for `rows`; with dynamic sampling (DAPO) more rounds of fresh prompts until B groups
        have rewards that differ. After max_sampling_rounds the batch is topped up with dropped groups."""
        a, b, g = self.cfg.algorithm, len(rows), self.cfg.sampling.group_size
        first = self.generate_and_score(rows, phases)
        if not a.dynamic_sampling:
            return first, {}
        rounds, kept, dropped = [first], [], []
        while True:
            zero = zero_std_groups(rounds[-1].rewards.total, g).tolist()  # [B_round] bool
            kept += [(len(rounds) - 1, i) for i, z in enumerate(zero) if not z]
            dropped += [(len(rounds) - 1, i) for i, z in enumerate(zero) if z]
            if len(kept) >= b or len(rounds) == a.max_sampling_rounds:
                break
            rounds.append(self.generate_and_score(self.sampler.next(b - len(kept)), phases))
        chosen = (kept + dropped)[:b]
        parts = [s.select([i for r, i in chosen if r == k]) for k, s in enumerate(rounds)]
        scored = concat_scored([part for part in parts if part.rows], self.pad_id)
        counts = {
            "rounds": len(rounds),
            "groups_drawn": sum(len(s.rows) for s in rounds),
            "groups_kept": min(len(kept), b),
            "groups_filled": max(0, b - len(kept)),
        }
        return scored, counts

    # -- 3. advantages --------------------------------------------------------------------------
    def advantages(self, s: Scored) -> tuple[torch.Tensor, int | None]:
        """Outcome: [N] from the total rewards. Process: [N, T] from every weighted step reward."""
        a, g = self.cfg.algorithm, s.rollout.group_size
        if a.advantage == "outcome":
            return outcome_advantages(s.rewards.total, g, a.scale_rewards, a.advantage_eps), None
        weights = {r.name: r.weight for r in self.reward_specs}
        ids, lengths = s.rollout.completion_ids, s.rollout.lengths
        values, rows, index = step_table(s.rewards.steps, s.rewards.per_function, weights, ids, lengths, self.tokenizer)
        n, t = ids.shape
        return process_advantages(values, rows, index, t, g, n, a.scale_rewards, a.advantage_eps), int(values.numel())

    # -- 4. log-probs that stay fixed during the step ------------------------------------------
    def micro_batches(self, sequences: SequenceBatch) -> list[MicroBatch]:
        """The batch's micro-batches: rows of similar length within trainer.micro_batch_size rows and
        trainer.micro_batch_tokens tokens, each cut to its own width."""
        t = self.cfg.trainer
        lengths = sequences.attention_mask.sum(dim=1)  # [N] prompt + completion tokens
        return [micro_batch(sequences, rows)
                for rows in plan_micro_batches(lengths, t.micro_batch_size, t.micro_batch_tokens)]

    def logprobs(self, model, mb: MicroBatch, with_entropy: bool = False, entropy_grad: bool = False):
        """[n, T'] completion log-probs of one micro-batch (and entropy): each group's prompt run once,
        logits a chunk at a time, under CUDA autocast."""
        t = self.cfg.trainer
        with torch.autocast("cuda", torch.bfloat16, enabled=t.autocast and self.device.type == "cuda"):
            return completion_logprobs(model, mb.sequences, self.params.temperature, with_entropy, entropy_grad,
                                       t.logprob_chunk_tokens)

    @torch.no_grad()
    def fixed_logprobs(self, model, sequences: SequenceBatch) -> torch.Tensor:
        """[N, T] log-probs of every completion under `model` (0 at padding)."""
        out = torch.zeros(sequences.input_ids.shape[0], sequences.completion_len)
        for mb in self.micro_batches(sequences):
            lp, _ = self.logprobs(model, mb)
            out[mb.rows, : mb.sequences.completion_len] = lp.float().cpu()
        return out

    # -- 5. gradient steps ---------------------------------------------------------------------
    def optimize(self, batch: StepBatch) -> tuple[dict[str, float], str | None]:
        """mu optimizer steps on this batch (DeepSeekMath's inner iterations); averaged metrics, and why
        the guard skipped an update (None: none was skipped).

        pi_old is the policy that sampled the batch: with mu > 1 its log-probs are the rollout's own or
        were computed once before the first update (StepBatch.old_logprobs); with mu = 1 they are the
        detached current ones.
        """
        mu = self.cfg.algorithm.mu
        bad = ", ".join(f"reward {k!r} returned NaN/inf for {n} completions" for k, n in batch.reward_nonfinite.items())
        totals: dict[str, float] = {}
        skipped: str | None = None
        for i in range(mu):
            self.optimizer.zero_grad(set_to_none=True)
            sums = self.accumulate_gradients(batch, compare_rollout=i == 0)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + (v / mu if k != "rollout_logprob_diff" else v)
            grad_norm, reason = self.clip_and_step(sums["loss"], bad or None)
            skipped = skipped or reason
        self.optimizer.zero_grad(set_to_none=True)  # not held through the next step's sampling
        totals["grad_norm"] = grad_norm
        return totals, skipped

    def micro_batch_loss(self, batch: StepBatch, mb: MicroBatch, totals: BatchTotals):
        """This micro-batch's share of the loss, and the per-token pieces the metrics need."""
        a = self.cfg.algorithm
        take = lambda x: mb.take(x).to(self.device)  # noqa: E731  [n, T'] (or [n]) of this micro-batch
        m = take(batch.loss_mask)
        lp, entropy = self.logprobs(self.model, mb, with_entropy=True, entropy_grad=a.entropy_coef > 0)
        old = lp.detach() if batch.old_logprobs is None else take(batch.old_logprobs)
        completion_mask = take(batch.rollout.completion_mask)
        sur = clipped_surrogate(lp, old, take(batch.advantages), a.eps_low, a.eps_high, completion_mask,
                                a.importance_sampling_level, a.delta)
        ref = batch.ref_logprobs
        kl = kl_penalty(lp, take(ref), a.kl_estimator) if ref is not None else None
        loss = aggregate(per_token_loss(sur.objective, kl, a.beta, entropy, a.entropy_coef), m, a.loss_type, totals)
        return loss, m, sur, kl, entropy, lp

    def accumulate_gradients(self, batch: StepBatch, compare_rollout: bool = False) -> dict[str, float]:
        """Backward of the whole batch's loss, one micro-batch at a time; the sum of the micro-batch
        gradients equals the gradient of the whole batch (normalizers are the global batch's).
        compare_rollout (before the first update): also the mean |log pi_theta - sampler's log-prob|."""
        mask = batch.loss_mask  # [N, T]
        totals = BatchTotals(int(mask.any(dim=1).sum()), int(mask.sum()), self.cfg.sampling.max_new_tokens)
        sums = dict.fromkeys(["loss", "kl", "clip_low", "clip_high", "clip_dual", "entropy", "ratio"], 0.0)
        sampled = batch.rollout.sampling_logprobs if compare_rollout else None  # [N, T]
        mismatch, sampled_tokens = 0.0, int(batch.rollout.completion_mask.sum())
        recompute = self.cfg.trainer.gradient_checkpointing
        for mb in self.micro_batches(batch.sequences):
            policy = self.model  # its training forward
            with checkpointed_layers(policy, recompute), lora_dropout(policy), sparse_embedding_grad(policy):
                loss, m, sur, kl, entropy, lp = self.micro_batch_loss(batch, mb, totals)
                loss.backward()
            if sampled is not None:  # how far the sampler's log-probs are from the policy's (SPEC.md 5)
                c = mb.take(batch.rollout.completion_mask)
                mismatch += float(((lp.detach().cpu() - mb.take(sampled)).abs() * c).sum()) / max(sampled_tokens, 1)
            share = int(m.sum()) / max(totals.num_tokens, 1)  # token-weighted metric averages
            sums["loss"] += float(loss.detach())
            for key, x in [("entropy", entropy), ("ratio", sur.ratio), ("clip_low", sur.clipped_low),
                           ("clip_high", sur.clipped_high), ("clip_dual", sur.clipped_dual), ("kl", kl)]:
                if x is not None:
                    sums[key] += float(masked_mean(x.detach().float(), m)) * share
        if sampled is not None:
            sums["rollout_logprob_diff"] = mismatch
        return sums

    def clip_and_step(self, loss: float | None = None, bad_reward: str | None = None) -> tuple[float, str | None]:
        """Clip the gradient and take the optimizer step, unless the guard finds the update unsafe
        (then the gradient is dropped); returns the grad norm and the reason for a skip."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        densify_grads(params)
        max_norm = self.cfg.trainer.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        reason = bad_reward or guard_reason(loss, grad_norm)
        self.last_lr = self.scheduler.get_last_lr()[0]
        if reason is None:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when the very first optimizer step was skipped
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule follows the iteration, skipped or not
        return grad_norm, reason

    # -- 6. reference reset ---------------------------------------------------------------------
    @torch.no_grad()
    def maybe_reset_reference(self) -> bool:
        """pi_ref := pi_theta every ref_reset_steps steps (DeepSeekMath 4.2, iterative RL)."""
        every = self.cfg.algorithm.ref_reset_steps
        if every is None or self.ref_model is None or self.step_count % every != 0:
            return False
        self.ref_model.load_state_dict(self.model.state_dict())
        self.ref_reset_step = self.step_count
        return True

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> tuple[dict, StepBatch]:
        phases, start = Phases(), time.perf_counter()
        with onednn.use_in(self.model, self.ref_model):  # on CPU: ~2x PyTorch's default fp32 matmuls
            batch = self.make_batch(self.sampler.next(self.cfg.prompts_per_step), phases)  # 1-4
            with phases.time("train"):
                opt, self.skip_reason = self.optimize(batch)  # 5 (and the guard)
        self.step_count += 1
        skipped = self.skip_reason is not None
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        self.skipped_steps += skipped
        opt["ref_reset"] = float(self.maybe_reset_reference())  # 6
        phases.seconds["step"] = time.perf_counter() - start
        return self.metrics(batch, opt, phases), batch  # 7

    def make_batch(self, rows: list[dict], phases: Phases) -> StepBatch:
        """Steps 1-4: sample, score, advantages, and the log-probs that stay fixed during the step."""
        cfg = self.cfg
        s, sampling = self.sample_groups(rows, phases)
        with phases.time("score"):
            advantages, num_steps = self.advantages(s)
        r = s.rollout
        mask = r.completion_mask & ~r.truncated[:, None] if cfg.algorithm.overlong_filter else r.completion_mask
        sequences = build_sequences(r.prompt_ids, r.completion_ids, r.completion_mask, self.pad_id)
        batch = StepBatch(
            s.rows, r, s.prompts, s.completions, s.rewards.per_function, s.rewards.total, advantages, sequences, mask,
            reward_errors=s.rewards.errors, reward_nonfinite=s.rewards.nonfinite, sampling=sampling, num_steps=num_steps,
        )
        if cfg.algorithm.beta > 0:
            with phases.time("reference"):
                batch.ref_logprobs = self.reference_logprobs(sequences)
        if cfg.algorithm.mu > 1 and self.rollout_logprobs_are_policy(r):
            batch.old_logprobs = r.sampling_logprobs  # no forward pass: the sampler computed them
        elif cfg.algorithm.mu > 1:
            with phases.time("old_logprobs"):
                batch.old_logprobs = self.fixed_logprobs(self.model, sequences)
        return batch

    def reference_logprobs(self, sequences: SequenceBatch) -> torch.Tensor:
        """[N, T] log-probs under pi_ref: the reference model, or with LoRA the policy's base weights
        (adapters switched off), which need no second copy."""
        if self.ref_model is not None:
            return self.fixed_logprobs(self.ref_model, sequences)
        with self.model.disable_adapter():
            return self.fixed_logprobs(self.model, sequences)

    def rollout_logprobs_are_policy(self, rollout: Rollout) -> bool:
        """Whether the rollout's log-probs are pi_old's, up to float rounding: the engine sampled with the
        policy's own weights (not a copy in another dtype) from the plain tempered distribution (no top-p,
        top-k or min-p truncation), and the trainer's forward passes run in the same precision."""
        p = self.params
        return (
            rollout.sampling_logprobs is not None
            and getattr(self.engine, "exact_logprobs", False)
            and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
            and not (self.cfg.trainer.autocast and self.device.type == "cuda")
        )

    # -- 7. metrics (SPEC.md section 5) ---------------------------------------------------------
    def metrics(self, batch: StepBatch, opt: dict, phases: Phases) -> dict:
        r, lengths = batch.total_rewards, batch.rollout.lengths.float()
        tokens = float(lengths.sum())
        m: dict[str, float] = {"step": self.step_count}
        m.update(_mean_std("reward", r))
        for name, values in batch.rewards.items():
            m.update(_mean_std(f"reward/{name}", values))
        for name, count in batch.reward_errors.items():
            m[f"reward/{name}/errors"] = count
        for name, count in batch.reward_nonfinite.items():
            m[f"reward/{name}/nonfinite"] = count
        m["reward/zero_std_frac"] = float(zero_std_groups(r, batch.rollout.group_size).float().mean())
        adv = batch.advantages
        abs_adv = adv.abs().mean() if adv.dim() == 1 else masked_mean(adv.abs(), batch.rollout.completion_mask)
        m["advantage/abs_mean"] = float(abs_adv)
        if batch.num_steps is not None:  # process supervision
            m["advantage/steps_per_completion"] = batch.num_steps / len(batch.completions)
        for name, count in batch.sampling.items():  # dynamic sampling: rounds, groups drawn / kept / filled
            m[f"dynamic_sampling/{name}"] = count
        m["completion/length_mean"] = float(lengths.mean())
        m["completion/length_min"] = float(lengths.min())
        m["completion/length_max"] = float(lengths.max())
        m["completion/truncated_frac"] = float(batch.rollout.truncated.float().mean())
        if self.cfg.algorithm.overlong_filter:
            m["completion/filtered_frac"] = float((~batch.loss_mask.any(dim=1)).float().mean())
        m["loss"] = opt["loss"]
        if batch.ref_logprobs is not None:
            m["kl/mean"] = opt["kl"]
        m["clip/low_frac"], m["clip/high_frac"] = opt["clip_low"], opt["clip_high"]
        if self.cfg.algorithm.delta is not None:
            m["clip/dual_frac"] = opt["clip_dual"]
        if self.cfg.algorithm.ref_reset_steps is not None:
            m["ref_reset"] = opt["ref_reset"]
        m["ratio/mean"] = opt["ratio"]
        if "rollout_logprob_diff" in opt:  # sampler vs trainer, same tokens, before any update
            m["rollout/logprob_diff"] = opt["rollout_logprob_diff"]
        m["entropy/mean"] = opt["entropy"]
        m["grad_norm"], m["lr"] = opt["grad_norm"], self.last_lr
        m["guard/skipped"] = float(self.skip_reason is not None)  # 1: this step's update was skipped (NaN/inf)
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
                    "advantage": float(batch.advantages[i].flatten()[0]),  # first token's, for process
                    "length": int(batch.rollout.lengths[i]),
                    "truncated": bool(batch.rollout.truncated[i]),
                }
            )
        return records


def guard_reason(loss: float | None, grad_norm: float) -> str | None:
    """Why an update must be skipped: a non-finite loss or gradient norm (None: it is safe)."""
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def _mean_std(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """Mean and std over the values that are not NaN (None rewards are not zeros)."""
    v = values[~torch.isnan(values)]
    if v.numel() == 0:
        return {f"{prefix}/mean": float("nan"), f"{prefix}/std": float("nan")}
    return {f"{prefix}/mean": float(v.mean()), f"{prefix}/std": float(v.std()) if v.numel() > 1 else 0.0}
