"""The GRPO loop (docs/algorithm.md section 1). Orchestration only: the math lives in grpo.core.

One step:
  1. draw B prompts (under torchrun each rank keeps its own whole groups); the engine samples G
     completions each, every group from its own seeded stream, or with an environment G multi-turn
     episodes (grpo.envs; only the model's tokens count from here on: Rollout.model_mask)   (rollout)
  2. score every completion with the reward functions            (rewards)
     dynamic sampling (DAPO): repeat 1-2, keeping groups whose rewards differ, until B groups
  3. group-relative advantages, outcome [N] or process [N, T]    (core.advantages)
  4. reference log-probs if beta > 0 (LoRA: the adapters off), old log-probs if mu > 1 (the
     rollout's own when the engine says they are the policy's: no forward pass)   (backend)
  5. mu optimizer steps, micro-batched under a token budget, loss normalized over the
     whole batch (core.losses); the engine takes the new weights after each (engine.sync_weights);
     the guard skips an update whose loss, gradient norm or rewards are not finite
  6. every ref_reset_steps steps, pi_ref := pi_theta             (DeepSeekMath iterative RL)
  7. the step's metrics, and the memory the process holds         (logging.metrics, host)

The parts come in built (grpo.run): the model and reference, the rollout engine, the backend that
computes log-probs and gradients on this device, the optimizer and scheduler, the prompt sampler and
the reward functions. The trainer reads the config for the algorithm and the step's shape only.

Departures from the paper, on purpose: the policy's and the reference's log-probs use the sampling
temperature (as TRL does), and the model runs without dropout so that with mu = 1 the ratio is
exactly 1. Under several ranks every normalizer, metric and guard decision is reduced over all of them
(grpo.distributed), and scale_rewards "batch" takes the std of every rank's rewards, so the update is the
single-process one (bnpo: the mean of each rank's own token mean, docs/algorithm.md section 3). Every rank runs as many forward and
backward passes as the others (`planned_passes`), whatever the lengths of its rows.

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

import torch

from grpo.backend import Backend
from grpo.batch import Scored, StepBatch, concat_scored, gather_batch
from grpo.config import Config
from grpo.core.advantages import outcome_advantages, process_advantages, values_std, zero_std_groups
from grpo.core.logprobs import (MicroBatch, SequenceBatch, build_sequences, micro_batch, padding_micro_batch,
                                plan_micro_batches, prompt_groups)
from grpo.core.losses import (BatchTotals, aggregate, clipped_surrogate, kl_penalty, masked_mean, per_token_loss,
                              truncated_importance_weights)
from grpo.data import PromptSampler
from grpo.distributed import SINGLE, World
from grpo.host import memory_use
from grpo.logging.metrics import Phases, step_metrics
from grpo.models import is_lora, pad_token_id
from grpo.optim import extend_schedule, load_optimizer_state_dict, optimizer_state_dict
from grpo.parallel import grad_sync, is_sharded
from grpo.rewards import Reward
from grpo.rewards.process import step_table
from grpo.sample import sample_rows, score_sampled
from grpo.rollout.base import LogprobKind, Rollout, RolloutEngine, SamplingParams, group_seed


class Trainer:
    def __init__(
        self,
        config: Config,
        model,
        tokenizer,
        engine: RolloutEngine,
        backend: Backend,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sampler: PromptSampler,
        rewards: list[Reward],
        ref_model=None,
        policy=None,
        world: World = SINGLE,
        episodes=None,
    ):
        """policy: the module the training forward runs through (a DDP wrapper, or the model FSDP2 sharded in
        place; None: the model itself); world: this process's place among the run's ranks; episodes: multi-turn
        episodes instead of single completions (grpo.envs.episodes.Episodes, from the config's environment)."""
        if config.algorithm.beta > 0 and ref_model is None and not is_lora(model):
            raise ValueError("algorithm.beta > 0 needs a reference model (ref_model), or a LoRA policy whose base "
                             "weights are the reference")
        if config.algorithm.ref_reset_steps is not None and ref_model is None:  # LoRA: nothing it could reset
            raise ValueError("algorithm.ref_reset_steps needs a reference model (ref_model); with LoRA the reference "
                             "is the base model without adapters: set algorithm.ref_reset_steps=null")
        self.cfg = config
        self.model, self.tokenizer, self.engine, self.ref_model = model, tokenizer, engine, ref_model
        self.policy, self.world = policy if policy is not None else model, world
        self.backend, self.optimizer, self.scheduler = backend, optimizer, scheduler
        self.sampler, self.reward_specs = sampler, rewards
        self.pad_id = pad_token_id(tokenizer)
        self.params = SamplingParams.from_config(config.sampling)
        self.episodes = episodes
        self.step_count = 0
        self.bad_steps = 0  # consecutive steps the guard skipped
        self.skipped_steps = 0  # all steps the guard skipped
        self.skip_reason: str | None = None  # why the last step was skipped (None: it was not)
        self.ref_reset_step: int | None = None  # last step at which pi_ref := pi_theta
        self.last_lr = scheduler.get_last_lr()[0]
        self.sync_seconds = 0.0  # this step's time in engine.sync_weights (metric time/weight_sync)
        self.schedule_note: str | None = None  # a resume's warning about its learning-rate schedule

    @property
    def max_completion_tokens(self) -> int:
        """The most tokens the model writes in one completion (dr_grpo's constant): every turn's, in an episode."""
        turns = self.episodes.limits.max_turns if self.episodes is not None else 1
        return self.cfg.sampling.max_new_tokens * turns

    # -- resume: the Trainer's own state (weights and global RNGs: grpo.checkpoint) -------------
    def state_dict(self, optimizer: bool = True) -> dict:
        """The trainer's own state; the optimizer's whole (FSDP2: gathered) unless `optimizer` is False (a sharded
        checkpoint writes it apart, grpo.parallel.rank_state)."""
        return {
            "step": self.step_count,
            **({"optimizer": optimizer_state_dict(self.model, self.optimizer)} if optimizer else {}),  # by name
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state(),
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
            "ref_reset_step": self.ref_reset_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        if "optimizer" in state:
            load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])  # then fitted to this run's trainer.steps (grpo.optim)
        t = self.cfg.trainer
        self.schedule_note = extend_schedule(self.scheduler, t.steps * self.cfg.algorithm.mu, t.lr)
        self.sampler.load_state(state["sampler"])
        self.bad_steps, self.skipped_steps = state["bad_steps"], state["skipped_steps"]
        self.ref_reset_step = state["ref_reset_step"]

    def whole_policy(self) -> torch.nn.Module:
        """The policy with its whole weights on this rank, to save, merge or evaluate: the model itself, or under
        FSDP2 (each rank holds shards) the rollout engine's whole copy, refreshed after every update."""
        return self.engine.whole_policy() if is_sharded(self.model) else self.model

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> tuple[dict, StepBatch]:
        phases, start = Phases(), time.perf_counter()
        with self.backend.step(self.model, self.ref_model):
            rows = self.sampler.next(self.cfg.prompts_per_step)  # the global batch's B prompts, on every rank
            mine = self.world.shard(len(rows))  # this rank's whole groups
            batch = self.make_batch(rows[mine], phases, first_group=mine.start)  # 1-4
            self.sync_seconds = 0.0
            with phases.time("train"):  # includes the engine's weight sync, also reported alone
                opt, self.skip_reason = self.optimize(batch)  # 5 (and the guard)
            phases.seconds["weight_sync"] = self.sync_seconds
        self.step_count += 1
        skipped = self.skip_reason is not None
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        self.skipped_steps += skipped
        opt["ref_reset"] = float(self.maybe_reset_reference())  # 6
        phases.seconds["step"] = time.perf_counter() - start
        a = self.cfg.algorithm
        with self.world.during("metrics"):
            whole = gather_batch(batch, self.world, self.pad_id)  # every rank's groups (itself in one process)
            memory = self.memory_metrics()
        metrics = step_metrics(self.step_count, whole, opt, phases, self.last_lr, skipped,  # 7
                               overlong_filter=a.overlong_filter, dual_clip=a.delta is not None,
                               ref_reset=a.ref_reset_steps is not None, kl=batch.ref_logprobs is not None,
                               tis=a.tis_cap is not None)
        metrics.update(memory)
        return metrics, whole

    def memory_metrics(self) -> dict[str, float]:
        """memory/rss_gib, memory/peak_rss_gib and on CUDA memory/cuda_peak_gib (this step's) and
        memory/cuda_reserved_gib (grpo.host.memory_use): under several ranks, the largest rank's."""
        use = memory_use(next(self.model.parameters()).device)
        names = sorted(use)
        values = self.world.max([use[k] for k in names])
        return {f"memory/{k}_gib": v / 2**30 for k, v in zip(names, values)}

    def make_batch(self, rows: list[dict], phases: Phases, first_group: int = 0) -> StepBatch:
        """Steps 1-4: sample, score, advantages, and the log-probs that stay fixed during the step. `rows` are
        this rank's groups, first_group the index of the first in the step's global draw."""
        a = self.cfg.algorithm
        s, sampling = self.sample_groups(rows, phases, first_group)
        with phases.time("score"):
            advantages, num_steps = self.advantages(s)
        r = s.rollout
        mask = r.model_mask & ~r.truncated[:, None] if a.overlong_filter else r.model_mask  # the model's own tokens
        sequences = build_sequences(r.prompt_ids, r.completion_ids, r.completion_mask, self.pad_id)
        batch = StepBatch(s, advantages, sequences, mask, sampling=sampling, num_steps=num_steps)
        if a.beta > 0:
            with phases.time("reference"):
                batch.ref_logprobs = self.reference_logprobs(sequences)
        if a.mu > 1 and self.rollout_logprobs_are_pi_old(r):
            batch.old_logprobs = r.sampling_logprobs  # no forward pass: the sampler computed them
        elif a.mu > 1:
            with phases.time("old_logprobs"):
                batch.old_logprobs = self.fixed_logprobs(self.policy, sequences)
        return batch

    # -- 1-2. rollout and rewards ----------------------------------------------------------------
    def generate_and_score(self, rows: list[dict], phases: Phases, round_: int = 0, first_group: int = 0) -> Scored:
        """Sample and score the groups of `rows`. Group i samples from its own stream, seeded by the run seed, the
        step, the sampling round and its index in the step's draw (first_group + i), whatever else is in the
        batch."""
        seeds = [group_seed(self.cfg.trainer.seed, self.step_count, round_, first_group + i) for i in range(len(rows))]
        with phases.time("generate"):
            sampled = sample_rows(self.engine, self.tokenizer, rows, self.cfg.data, self.cfg.sampling.group_size,
                                  self.params, seeds, self.episodes)
        with phases.time("score"):
            return sampled.scored(score_sampled(sampled, self.reward_specs))

    def sample_groups(self, rows: list[dict], phases: Phases, first_group: int = 0) -> tuple[Scored, dict[str, float]]:
        """Steps 1-2 for `rows`; with dynamic sampling (DAPO) more rounds of fresh prompts until B groups
        have rewards that differ. After max_sampling_rounds the batch is topped up with dropped groups
        (`top_up`). Under several ranks every round draws the prompts all ranks still need, each taking its
        own part, so every rank's prompt sampler stays in the same place and the ranks keep the groups one
        process keeps."""
        a, b = self.cfg.algorithm, len(rows)
        first = self.generate_and_score(rows, phases, 0, first_group)
        if not a.dynamic_sampling:
            return first, {}
        rounds, kept, dropped, offsets = [first], [], [], [first_group]  # offsets: each round's place in its draw
        while True:
            last = rounds[-1]
            zero = zero_std_groups(last.rewards.total, last.group_size).tolist() if last else []  # [B_round] bool
            kept += [(len(rounds) - 1, i) for i, z in enumerate(zero) if not z]
            dropped += [(len(rounds) - 1, i) for i, z in enumerate(zero) if z]
            with self.world.during("dynamic sampling"):
                needs = [int(n) for n in self.world.gather(max(0, b - len(kept)))]  # groups each rank still needs
            if max(needs) == 0 or len(rounds) == a.max_sampling_rounds:
                break
            drawn, offset = self.sampler.next(sum(needs)), sum(needs[: self.world.rank])
            mine = drawn[offset : offset + needs[self.world.rank]]
            rounds.append(self.generate_and_score(mine, phases, len(rounds), offset) if mine else None)
            offsets.append(offset)
        fill, received = self.top_up(rounds, dropped, offsets, needs)
        chosen = kept + fill
        parts = [s.select([i for r, i in chosen if r == k]) for k, s in enumerate(rounds) if s is not None]
        scored = concat_scored([part for part in parts + received if part.rows], self.pad_id)
        counts = {
            "rounds": len(rounds),
            "groups_drawn": sum(len(s.rows) for s in rounds if s is not None),
            "groups_kept": min(len(kept), b),
            "groups_filled": max(0, b - len(kept)),
        }
        return scored, counts

    def top_up(self, rounds: list[Scored | None], dropped: list[tuple[int, int]], offsets: list[int],
               needs: list[int]) -> tuple[list[tuple[int, int]], list[Scored]]:
        """Dynamic sampling's top-up after the last round: the first dropped groups of the step's draws (by round,
        then by place in the round's draw), as one process takes them, wherever they were sampled; rank r takes
        needs[r] of them, in rank order. Returns this rank's own (round, index) and the groups other ranks sampled
        for it (their reward error counts stay with the rank that scored them)."""
        if sum(needs) == 0:
            return [], []
        mine = {(k, offsets[k] + i): (k, i) for k, i in dropped}  # (round, place in the round's draw) -> own group
        with self.world.during("dynamic sampling"):
            keys = sorted(key for part in self.world.gather(sorted(mine)) for key in part)[: sum(needs)]
        owner = {key: r for r in range(self.world.size) for key in keys[sum(needs[:r]) : sum(needs[: r + 1])]}
        rank = self.world.rank
        own = [mine[key] for key in keys if owner[key] == rank and key in mine]
        if not self.world.distributed:
            return own, []
        send = {}
        for key, (k, i) in mine.items():
            if owner.get(key, rank) != rank:
                group = rounds[k].select([i])
                r = group.rewards
                r.errors, r.nonfinite = dict.fromkeys(r.errors, 0), dict.fromkeys(r.nonfinite, 0)
                send[key] = group
        with self.world.during("dynamic sampling"):
            received = {key: g for part in self.world.gather(send) for key, g in part.items() if owner[key] == rank}
        return own, [received[key] for key in sorted(received)]

    # -- 3. advantages --------------------------------------------------------------------------
    def advantages(self, s: Scored) -> tuple[torch.Tensor, int | None]:
        """Outcome: [N] from the total rewards. Process: [N, T] from every weighted step reward."""
        a, g = self.cfg.algorithm, s.group_size
        if a.advantage == "outcome":
            total = s.rewards.total  # [N], NaN: every reward function skipped the completion
            std = self.global_std(total[~torch.isnan(total)])
            return outcome_advantages(total, g, a.scale_rewards, a.advantage_eps, std), None
        weights = {r.name: r.weight for r in self.reward_specs}
        ids, spans = s.rollout.completion_ids, s.rollout.spans  # an episode's last token is its model's
        values, rows, index = step_table(s.rewards.steps, s.rewards.per_function, weights, ids, spans, self.tokenizer)
        n, t = ids.shape
        std = self.global_std(values)
        return process_advantages(values, rows, index, t, g, n, a.scale_rewards, a.advantage_eps, std), \
            int(values.numel())

    def global_std(self, values: torch.Tensor) -> torch.Tensor | None:
        """scale_rewards "batch" under several ranks: the std of these [M] values over every rank's (the whole
        global batch's, docs/algorithm.md section 2); None otherwise (the advantage functions take their own batch's)."""
        if self.cfg.algorithm.scale_rewards != "batch" or not self.world.distributed:
            return None
        with self.world.during("scale_rewards=batch"):
            return values_std(torch.cat(self.world.gather(values.double().cpu())))

    # -- 4. log-probs that stay fixed during the step ------------------------------------------
    def micro_batches(self, sequences: SequenceBatch, packed: bool = False) -> list[MicroBatch]:
        """The batch's micro-batches within trainer.micro_batch_size rows and trainer.micro_batch_tokens tokens,
        each cut to its own width: rows of similar length together, or with `packed` (the backend runs the rows
        packed) the rows of a prompt together, counting the tokens the packed pass runs."""
        t = self.cfg.trainer
        lengths = sequences.attention_mask.sum(dim=1)  # [N] prompt + completion tokens
        prompts = prompt_groups(sequences) if packed else None
        return [micro_batch(sequences, rows)
                for rows in plan_micro_batches(lengths, t.micro_batch_size, t.micro_batch_tokens, prompts)]

    def packed(self, model, sequences: SequenceBatch, training: bool = False) -> bool:
        """Whether the backend runs `model`'s log-prob passes over these rows packed (in a training pass: with
        trainer.gradient_checkpointing)."""
        checkpointing = training and self.cfg.trainer.gradient_checkpointing
        return self.backend.runs_packed(model, sequences.input_ids.shape[1], checkpointing)

    def planned_passes(self, sequences: SequenceBatch, packed: bool = False) -> list[MicroBatch | None]:
        """This rank's micro-batches, then None for each padding pass: under several ranks every rank runs as
        many forward (and backward) passes as the rank with the most micro-batches, agreed first, since FSDP2
        gathers the weights in every pass (docs/design.md: a count that depends on local data is agreed first). A
        padding pass runs `padding_micro_batch` and contributes exactly nothing."""
        plan: list[MicroBatch | None] = list(self.micro_batches(sequences, packed))
        with self.world.during("agreeing on the number of micro-batches"):
            (count,) = self.world.max([len(plan)])
        return plan + [None] * (count - len(plan))

    def logprobs(self, model, mb: MicroBatch, with_entropy: bool = False, entropy_grad: bool = False):
        """[n, T'] completion log-probs of one micro-batch (and entropy), at the sampling temperature."""
        return self.backend.logprobs(model, mb.sequences, self.params.temperature, with_entropy, entropy_grad)

    @torch.no_grad()
    def fixed_logprobs(self, model, sequences: SequenceBatch) -> torch.Tensor:
        """[N, T] log-probs of every completion under `model` (0 at padding)."""
        out = torch.zeros(sequences.input_ids.shape[0], sequences.completion_len)
        for mb in self.planned_passes(sequences, self.packed(model, sequences)):
            if mb is None:  # a padding pass: the same forward passes as the other ranks, its output unused
                self.logprobs(model, padding_micro_batch(sequences))
                continue
            lp, _ = self.logprobs(model, mb)
            out[mb.rows, : mb.sequences.completion_len] = lp.float().cpu()
        return out

    def reference_logprobs(self, sequences: SequenceBatch) -> torch.Tensor:
        """[N, T] log-probs under pi_ref: the reference model, or with LoRA the policy's base weights
        (adapters switched off), which need no second copy."""
        if self.ref_model is not None:
            return self.fixed_logprobs(self.ref_model, sequences)
        with self.model.disable_adapter():
            return self.fixed_logprobs(self.policy, sequences)

    def rollout_logprobs_are_pi_old(self, rollout: Rollout) -> bool:
        """Whether the sampler's log-probs serve as pi_old's: the engine says they are the policy's own
        (same weights and dtype, the whole tempered distribution), and the backend computes log-probs in
        the weights' precision (not under bf16 autocast)."""
        return (rollout.sampling_logprobs is not None
                and self.engine.logprob_kind(self.params) is LogprobKind.POLICY
                and not self.backend.reduced_precision)

    # -- 5. gradient steps ---------------------------------------------------------------------
    def optimize(self, batch: StepBatch) -> tuple[dict[str, float], str | None]:
        """mu optimizer steps on this batch (DeepSeekMath's inner iterations); averaged metrics, and why
        the guard skipped an update (None: none was skipped).

        pi_old is the policy that sampled the batch: with mu > 1 its log-probs are the rollout's own or
        were computed once before the first update (StepBatch.old_logprobs); with mu = 1 they are the
        detached current ones.
        """
        mu = self.cfg.algorithm.mu
        nonfinite = batch.scored.rewards.nonfinite
        names = sorted({k for part in self.world.gather(sorted(nonfinite)) for k in part}) if self.world.distributed \
            else sorted(nonfinite)  # every rank skips the update if any rank's rewards are not finite
        counts = self.world.sum([nonfinite.get(k, 0) for k in names])
        bad = ", ".join(f"reward {k!r} returned NaN/inf for {int(n)} completions" for k, n in zip(names, counts))
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
        device = next(self.model.parameters()).device
        take = lambda x: mb.take(x).to(device)  # noqa: E731  [n, T'] (or [n]) of this micro-batch
        m = take(batch.loss_mask)
        lp, entropy = self.logprobs(self.policy, mb, with_entropy=True, entropy_grad=a.entropy_coef > 0)
        old = lp.detach() if batch.old_logprobs is None else take(batch.old_logprobs)
        completion_mask = take(batch.rollout.model_mask)
        advantages = take(batch.advantages).to(lp.dtype)  # computed in float64, exact zeros stay zeros
        sur = clipped_surrogate(lp, old, advantages, a.eps_low, a.eps_high, completion_mask,
                                a.importance_sampling_level, a.delta)
        ref = batch.ref_logprobs
        kl = kl_penalty(lp, take(ref), a.kl_estimator) if ref is not None else None
        tis = None  # truncated importance sampling: the sampler's kernels are not the trainer's
        if a.tis_cap is not None and batch.rollout.sampling_logprobs is not None:
            tis = truncated_importance_weights(old, take(batch.rollout.sampling_logprobs), a.tis_cap)  # [n, T']
        loss = aggregate(per_token_loss(sur.objective, kl, a.beta, entropy, a.entropy_coef, tis), m, a.loss_type,
                         totals)
        return loss, m, sur, kl, entropy, lp, tis

    def accumulate_gradients(self, batch: StepBatch, compare_rollout: bool = False) -> dict[str, float]:
        """Backward of the whole batch's loss, one micro-batch at a time; the sum of the micro-batch
        gradients equals the gradient of the whole batch (normalizers are the global batch's).
        compare_rollout (before the first update): also the mean |log pi_theta - sampler's log-prob|."""
        mask = batch.loss_mask  # [N, T] this rank's rows
        local = BatchTotals.of(mask, self.max_completion_tokens)
        sampled_tokens = int(batch.rollout.model_mask.sum())
        with self.world.during("loss normalizers"):  # the global batch's counts (docs/algorithm.md section 3)
            n, tokens, sampled_tokens = (int(x) for x in self.world.sum([local.num_completions, local.num_tokens,
                                                                          sampled_tokens]))
        totals = BatchTotals(n, tokens, local.max_completion_length, process_tokens=local.num_tokens,
                             num_processes=self.world.size)
        sums = dict.fromkeys(["loss", "kl", "clip_low", "clip_high", "clip_dual", "entropy", "ratio", "tis_weight",
                              "tis_capped"], 0.0)
        sampled = batch.rollout.sampling_logprobs if compare_rollout else None  # [N, T]
        mismatch = 0.0
        packed = self.packed(self.policy, batch.sequences, training=True)
        plan = self.planned_passes(batch.sequences, packed)  # as many on every rank
        for i, mb in enumerate(plan):
            last = i == len(plan) - 1  # gradients are reduced over ranks in its backward pass
            with self.backend.grad_scope(self.model, self.cfg.trainer.gradient_checkpointing), \
                    grad_sync(self.policy, last), self.world.during("backward"):
                if mb is None:  # a padding pass: every weight in the graph, a gradient of exactly 0
                    lp, _ = self.logprobs(self.policy, padding_micro_batch(batch.sequences))
                    (lp.sum() * 0.0).backward()
                    continue
                loss, m, sur, kl, entropy, lp, tis = self.micro_batch_loss(batch, mb, totals)
                # each share is of the global loss (docs/algorithm.md section 3): DDP / FSDP average the ranks' gradients, so
                # scaling by the world size makes them the sum, the gradient of the global loss
                (loss * self.world.size if self.world.distributed else loss).backward()
            if sampled is not None:  # how far the sampler's log-probs are from the policy's (docs/algorithm.md section 5)
                c = mb.take(batch.rollout.model_mask)
                mismatch += float(((lp.detach().cpu() - mb.take(sampled)).abs() * c).sum()) / max(sampled_tokens, 1)
            share = int(m.sum()) / max(totals.num_tokens, 1)  # token-weighted metric averages
            sums["loss"] += float(loss.detach())
            for key, x in [("entropy", entropy), ("ratio", sur.ratio), ("clip_low", sur.clipped_low),
                           ("clip_high", sur.clipped_high), ("clip_dual", sur.clipped_dual), ("kl", kl),
                           ("tis_weight", tis), ("tis_capped", None if tis is None else tis >= self.cfg.algorithm.tis_cap)]:
                if x is not None:
                    sums[key] += float(masked_mean(x.detach().float(), m)) * share
        if sampled is not None:
            sums["rollout_logprob_diff"] = mismatch
        with self.world.during("metrics"):
            return dict(zip(sums, self.world.sum(list(sums.values()))))  # each is a share of a global total

    def clip_and_step(self, loss: float | None = None, bad_reward: str | None = None) -> tuple[float, str | None]:
        """Clip the gradient and take the optimizer step, unless the guard finds the update unsafe
        (then the gradient is dropped); the engine takes the new weights. Returns the grad norm and the
        reason for a skip."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.backend.finish_grads(params)
        max_norm = self.cfg.trainer.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        reason = bad_reward or guard_reason(loss, grad_norm)
        self.last_lr = self.scheduler.get_last_lr()[0]
        if reason is None:
            self.optimizer.step()
            start = time.perf_counter()
            self.engine.sync_weights(self.model)  # an engine holding a copy must not sample stale weights
            self.sync_seconds += time.perf_counter() - start
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


def guard_reason(loss: float | None, grad_norm: float) -> str | None:
    """Why an update must be skipped: a non-finite loss or gradient norm (None: it is safe)."""
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None
