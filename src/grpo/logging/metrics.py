"""A step's metrics (docs/algorithm.md section 5) and the completions it shows: pure functions of the step's batch.

The trainer hands over what it computed (the StepBatch, the averaged optimizer numbers, the phases'
wall times); nothing here reads a model or a config.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from grpo.batch import StepBatch
from grpo.core.advantages import zero_std_groups
from grpo.core.losses import masked_mean


@dataclass
class Phases:
    """Wall time of each phase of a step, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def mean_std(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """Mean and std over the values that are not NaN (None rewards are not zeros)."""
    v = values[~torch.isnan(values)]
    if v.numel() == 0:
        return {f"{prefix}/mean": float("nan"), f"{prefix}/std": float("nan")}
    return {f"{prefix}/mean": float(v.mean()), f"{prefix}/std": float(v.std()) if v.numel() > 1 else 0.0}


def step_metrics(
    step: int,
    batch: StepBatch,
    opt: dict[str, float],  # the optimizer steps' averages: loss, kl, clip_*, ratio, entropy, grad_norm, ...
    phases: Phases,
    lr: float,
    skipped: bool,  # the numerics guard dropped this step's update
    overlong_filter: bool = False,
    dual_clip: bool = False,
    ref_reset: bool = False,  # reference resets are configured (opt["ref_reset"]: one happened now)
    kl: bool | None = None,  # a reference was used (None: batch.ref_logprobs says)
    tis: bool = False,  # truncated importance sampling is on (algorithm.tis_cap)
) -> dict[str, float]:
    """One line of metrics.jsonl."""
    s = batch.scored
    r, lengths = s.rewards.total, s.rollout.lengths.float()
    tokens = float(lengths.sum())
    m: dict[str, float] = {"step": step}
    m.update(mean_std("reward", r))
    for name, values in s.rewards.per_function.items():
        m.update(mean_std(f"reward/{name}", values))
    for name, count in s.rewards.errors.items():
        m[f"reward/{name}/errors"] = count
    for name, count in s.rewards.nonfinite.items():
        m[f"reward/{name}/nonfinite"] = count
    m["reward/zero_std_frac"] = float(zero_std_groups(r, s.group_size).float().mean())
    adv = batch.advantages
    abs_adv = adv.abs().mean() if adv.dim() == 1 else masked_mean(adv.abs(), s.rollout.model_mask)
    m["advantage/abs_mean"] = float(abs_adv)
    if batch.num_steps is not None:  # process supervision
        m["advantage/steps_per_completion"] = batch.num_steps / len(s.completions)
    for name, count in batch.sampling.items():  # dynamic sampling: rounds, groups drawn / kept / filled
        m[f"dynamic_sampling/{name}"] = count
    m["completion/length_mean"] = float(lengths.mean())
    m["completion/length_min"] = float(lengths.min())
    m["completion/length_max"] = float(lengths.max())
    m["completion/truncated_frac"] = float(s.rollout.truncated.float().mean())
    if s.rollout.episodes is not None:
        m.update(episode_metrics(s.rollout))
    if overlong_filter:
        m["completion/filtered_frac"] = float((~batch.loss_mask.any(dim=1)).float().mean())
    m["loss"] = opt["loss"]
    if (batch.ref_logprobs is not None) if kl is None else kl:
        m["kl/mean"] = opt["kl"]
    m["clip/low_frac"], m["clip/high_frac"] = opt["clip_low"], opt["clip_high"]
    if dual_clip:
        m["clip/dual_frac"] = opt["clip_dual"]
    if ref_reset:
        m["ref_reset"] = opt["ref_reset"]
    m["ratio/mean"] = opt["ratio"]
    if "rollout_logprob_diff" in opt:  # sampler vs trainer, same tokens, before any update
        m["rollout/logprob_diff"] = opt["rollout_logprob_diff"]
    if tis:  # the policy term's per-token weights min(pi_old / pi_sampler, cap), and how often the cap bit
        m["tis/weight_mean"], m["tis/capped_frac"] = opt["tis_weight"], opt["tis_capped"]
    m["entropy/mean"] = opt["entropy"]
    m["grad_norm"], m["lr"] = opt["grad_norm"], lr
    m["guard/skipped"] = float(skipped)  # 1: this step's update was skipped (NaN/inf)
    for name, seconds in phases.seconds.items():  # wall time and completion tokens/s of each phase
        m[f"time/{name}"] = seconds
        if name == "weight_sync":  # the engine taking the new weights (inside time/train): no tokens
            continue
        m["throughput/" + ("tokens_per_s" if name == "step" else f"{name}_tokens_per_s")] = tokens / max(seconds, 1e-9)
    m["tokens/completion"] = tokens
    return m


def episode_metrics(rollout) -> dict[str, float]:
    """Multi-turn episodes (grpo.envs): turns per episode, tool calls and tool errors per episode, the fraction
    truncated and the environment errors (environment.on_error=none), environment tokens per episode."""
    eps = [e for e in rollout.episodes if e is not None]
    n = max(len(eps), 1)
    env_tokens = rollout.spans - rollout.lengths  # [N]
    return {
        "env/turns_mean": sum(e.turns for e in eps) / n,
        "env/turns_max": float(max((e.turns for e in eps), default=0)),
        "env/tool_calls_mean": sum(e.tool_calls for e in eps) / n,
        "env/tool_errors_mean": sum(e.tool_errors for e in eps) / n,
        "env/truncated_frac": sum(e.truncated for e in eps) / n,
        "env/errors": float(sum(e.error is not None for e in eps)),
        "env/env_tokens_mean": float(env_tokens.float().mean()),
        "time/environment": sum(e.seconds for e in eps),  # summed over episodes (they run concurrently)
    }


def sample_records(step: int, batch: StepBatch, k: int) -> list[dict]:
    """k completions to show: the best and the worst of each group first."""
    s = batch.scored
    g = s.group_size
    order: list[int] = []
    r = torch.nan_to_num(s.rewards.total, nan=-math.inf).view(-1, g)
    for b in range(r.shape[0]):
        order += [b * g + int(r[b].argmax()), b * g + int(r[b].argmin())]
    order += [i for i in range(len(s.completions)) if i not in order]
    records = []
    for i in list(dict.fromkeys(order))[:k]:
        records.append(
            {
                "step": step,
                "group": i // g,
                "prompt": s.prompts[i],
                "completion": s.completions[i],
                "rewards": {name: float(v[i]) for name, v in s.rewards.per_function.items()},
                "reward": float(s.rewards.total[i]),
                "advantage": float(batch.advantages[i].flatten()[0]),  # first token's, for process
                "length": int(s.rollout.lengths[i]),
                "truncated": bool(s.rollout.truncated[i]),
                **({"episode": s.rollout.episodes[i].to_dict()} if s.rollout.episodes is not None else {}),
            }
        )
    return records
