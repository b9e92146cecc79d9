"""`grpo probe`: can this task teach the starting model anything? Answered before any training.

GRPO learns only from groups whose rewards differ: a group of G equal rewards has advantages that are all 0
(grpo.core.advantages.zero_std_groups, the trainer's reward/zero_std_frac). A reward the starting model never
earns, or always earns, trains nothing however long the run. The probe samples what the run's first steps would
sample and says how much of it carries a signal:

    grpo probe configs/default.yaml --prompts 32

It builds the model, the rollout engine and the rewards as `grpo train` does (grpo.run.load_for_training,
grpo.rewards.build_rewards), draws the first `--prompts` training prompts in the order the run draws them
(grpo.data.PromptSampler) and samples each step's B = prompts_per_step groups in one call under the seeds the
trainer gives them (prompt i is group i % B of step i // B: group_seed(trainer.seed, step, 0, i % B); prompts
past the first step are what later steps would draw, sampled from the starting weights). Dynamic sampling's extra
rounds are not drawn: the probe reports what the first round finds. With an environment the groups are G
multi-turn episodes, played by the run's grpo.envs.episodes.Episodes through the same `grpo.sample.sample_rows`.

The numbers (pure functions below, of the rewards and the rollout):
- each reward's and the weighted total's distribution over the N = prompts x G completions: mean and std (of the
  values that are not None, as the training metrics reward/<label>/mean and /std), min, max, how many are None,
  and the count of each value when there are at most COUNTS_MAX distinct ones, else a histogram;
- hits: per reward, the fraction of all N completions it scores above 0 (a format or answer reward's "got it"),
  and the fraction it scores None (does not apply); and the fraction of groups in which its own values differ
  (which reward the total's signal comes from);
- accuracy and pass@G where the task has a check of right answers (grpo.evaluate.accuracy_check): the fraction of
  completions the check scores 1, and of prompts with at least one such completion among their G;
- groups: the fraction whose G total rewards are all equal (no signal), split into those all at the probe's
  highest total and those all at its lowest, and the mean within-group (sample) std of the totals;
- completions: the mean length in model tokens and the fraction truncated (hit sampling.max_new_tokens);
- episodes (multi-turn, where the rollout has them): turns per episode, tool calls and errors, and episodes the
  environment failed in, as far as the records carry them.

The verdict (thresholds below): TEACHABLE when at least TEACHABLE_MIN of the groups have a signal; WEAK SIGNAL
from SIGNAL_MIN; under that TOO EASY when more of the equal groups are all at the top than at the bottom, else NO
SIGNAL (naming the trained rewards no completion scores above 0 on). NO REWARD when every reward is None. With
several trained rewards (weight != 0) a signal's verdict also says in how many groups each differs: a signal that
comes from a side reward (a lenient accuracy next to the format being taught) teaches that side reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo.core.advantages import group_view, masked_group_mean_std, zero_std_groups
from grpo.data import PromptSampler, load_task
from grpo.envs.episodes import Episodes
from grpo.evaluate import accuracy_check
from grpo.logging.metrics import mean_std
from grpo.rewards import RewardResult, build_rewards
from grpo.rollout.base import SamplingParams, group_seed
from grpo.sample import Sampled, sample_rows, score_sampled

TEACHABLE_MIN = 0.25  # of groups with a signal: with 4 groups a step, about one a step, and dynamic sampling finds more
SIGNAL_MIN = 0.10  # below this the run mostly trains on nothing (or, with dynamic sampling, redraws for ever)
COUNTS_MAX = 8  # distinct values of a reward shown as value counts; more: a histogram of HISTOGRAM_BINS bins
HISTOGRAM_BINS = 6


# -- the statistics: pure functions of tensors -------------------------------------------------------------


def distribution(values: torch.Tensor) -> dict:  # values [N] float64, NaN where the reward was None
    """Mean, std (as the training metrics), min, max, None count, and value counts or a histogram."""
    valid = values[~torch.isnan(values)].double()
    out: dict = {"count": int(valid.numel()), "none": int(values.numel() - valid.numel())}
    if valid.numel() == 0:
        return {**out, "mean": None, "std": None, "min": None, "max": None}
    m = mean_std("r", valid)
    out.update(mean=m["r/mean"], std=m["r/std"], min=float(valid.min()), max=float(valid.max()))
    distinct, counts = torch.unique(valid, return_counts=True)  # sorted
    if distinct.numel() <= COUNTS_MAX:
        out["counts"] = {f"{float(v):g}": int(c) for v, c in zip(distinct, counts)}
    else:
        out["histogram"] = histogram(valid, HISTOGRAM_BINS)
    return out


def histogram(values: torch.Tensor, bins: int) -> dict:  # values [M] float64, M > 0
    """`bins` equal-width bins from min to max (the last one closed): their edges [bins + 1] and counts [bins]."""
    lo, hi = float(values.min()), float(values.max())
    width = (hi - lo) / bins
    index = ((values - lo) / width).floor().long().clamp(0, bins - 1) if width > 0 else torch.zeros_like(values).long()
    counts = torch.bincount(index, minlength=bins)
    return {"edges": [lo + k * width for k in range(bins)] + [hi], "counts": counts.tolist()}


def hits(values: torch.Tensor) -> dict:  # values [N] float64, NaN where the reward was None
    """The fraction of all N completions the reward scores above 0, and the fraction it scores None."""
    n = values.numel()
    return {"hit_frac": int((values > 0).sum()) / n, "none_frac": int(torch.isnan(values).sum()) / n}


def group_signal(totals: torch.Tensor, group_size: int) -> dict:  # totals [N] float64, N = B * G
    """How many of the B groups carry a signal: `no_signal` the fraction whose valid totals are all equal (the
    trainer's reward/zero_std_frac) and `signal` the others; `equal_at_top` / `equal_at_bottom` the fractions of
    groups that are equal at the highest / lowest total of all N (both, where every total is the same),
    `all_none` those with no valid total; `mean_group_std` the mean over groups of the sample std of their valid
    totals."""
    r = group_view(totals, group_size).double()  # [B, G]
    valid = ~torch.isnan(r)
    equal = zero_std_groups(totals, group_size)  # [B] bool
    _, std = masked_group_mean_std(r, valid)  # [B, 1]
    first = torch.where(valid, r, torch.full_like(r, -math.inf)).amax(dim=1)  # [B]: an equal group's value, exactly
    any_valid = valid.any(dim=1)  # [B]
    top = bottom = torch.zeros_like(equal)
    if any_valid.any():
        hi, lo = float(r[valid].max()), float(r[valid].min())
        top, bottom = equal & any_valid & (first == hi), equal & any_valid & (first == lo)
    b = equal.numel()
    return {
        "groups": b,
        "signal": int((~equal).sum()) / b,
        "no_signal": int(equal.sum()) / b,
        "equal_at_top": int(top.sum()) / b,
        "equal_at_bottom": int(bottom.sum()) / b,
        "all_none": int((~any_valid).sum()) / b,
        "mean_group_std": float(std.mean()),
    }


def pass_at_group(correct: torch.Tensor, group_size: int) -> dict:  # correct [N] float64 (1: right)
    """The fraction of completions the check scores 1 (`accuracy`) and of groups with at least one (`pass_at_g`)."""
    right = group_view(correct, group_size) == 1  # [B, G]
    return {"accuracy": int(right.sum()) / right.numel(), "pass_at_g": int(right.any(dim=1).sum()) / right.shape[0]}


def length_stats(lengths: torch.Tensor, truncated: torch.Tensor) -> dict:  # [N] long, [N] bool
    """The mean completion length in model tokens and the fraction that hit sampling.max_new_tokens."""
    return {"mean_length": float(lengths.double().mean()), "truncated": int(truncated.sum()) / truncated.numel()}


def episode_stats(episodes: list | None) -> dict | None:
    """Turns per episode (mean, max), tool calls and tool errors per episode of multi-turn episodes
    (grpo.envs.episodes records, or dicts), and how many episodes the environment failed in (`error`), as far as
    the records carry them: a field a record lacks is left out (None: no episodes)."""
    if not episodes:
        return None
    out = {"episodes": len(episodes)}
    for key, names in (("turns", ("turns", "num_turns")), ("tool_calls", ("tool_calls",)),
                       ("tool_errors", ("tool_errors",))):
        counts = [_count(e, names) for e in episodes]
        if all(c is not None for c in counts):
            out[f"{key}_mean"] = sum(counts) / len(counts)
            if key == "turns":
                out["turns_max"] = max(counts)
    if all(hasattr(e, "error") or (isinstance(e, dict) and "error" in e) for e in episodes):
        out["environment_errors"] = sum(bool(e["error"] if isinstance(e, dict) else e.error) for e in episodes)
    return out


def _count(record, names: tuple[str, ...]) -> int | None:
    """The first of `names` the record has, as a number: an int as it is, a list by its length."""
    for name in names:
        value = record.get(name) if isinstance(record, dict) else getattr(record, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, (list, tuple)):
            return len(value)
    return None


def verdict(stats: dict, dynamic_sampling: bool = False) -> str:
    """One line: can GRPO learn from these groups? (the module docstring has the rule; `dynamic_sampling`: the run
    has algorithm.dynamic_sampling on, which the advice takes into account)"""
    g, total = stats["groups"], stats["reward"]
    signal = g["signal"]
    if total["count"] == 0:
        return ("NO REWARD: every reward is None for every completion; check the rewards' columns and the cases "
                "they return None for")
    if signal >= TEACHABLE_MIN:
        line = f"TEACHABLE: {signal:.0%} of groups have a signal (total rewards that differ within the group)"
    elif signal >= SIGNAL_MIN:
        redraw = (f"algorithm.dynamic_sampling (on) draws about {1 / signal:.0f} groups for each it trains on"
                  if dynamic_sampling else "algorithm.dynamic_sampling=true trains only on those")
        line = (f"WEAK SIGNAL: only {signal:.0%} of groups have a signal; learning will be slow: {redraw}; a larger "
                "sampling.group_size or sampling.temperature finds more")
    elif g["equal_at_top"] > g["equal_at_bottom"]:
        line = (f"TOO EASY: {g['no_signal']:.0%} of groups have equal rewards, {g['equal_at_top']:.0%} all at the "
                f"top ({total['max']:g}); the model already does this: use harder prompts or a stricter reward")
    else:
        never = [name for name, r in stats["rewards"].items() if r["weight"] != 0 and r["hit_frac"] == 0]
        why = (f"no completion scores above 0 on {', '.join(never)}" if never
               else f"{g['equal_at_bottom']:.0%} of groups score all {total['min']:g}")
        line = (f"NO SIGNAL: {g['no_signal']:.0%} of groups have equal rewards; {why}; change the prompt or the "
                "reward (partial credit for a step towards it), or sample more (sampling.group_size, "
                "sampling.temperature)")
    trained = {name: r["groups_differ"] for name, r in stats["rewards"].items() if r["weight"] != 0}
    if signal >= SIGNAL_MIN and len(trained) > 1:  # which reward the signal comes from: is it the one meant?
        line += "; groups in which each reward differs: " + ", ".join(
            f"{name} {v:.0%}" for name, v in sorted(trained.items(), key=lambda kv: -kv[1]))
    if stats["completions"]["truncated"] >= 0.5:
        line += f" (note: {stats['completions']['truncated']:.0%} were cut by a length limit)"
    return line


def probe_stats(per_function: dict[str, torch.Tensor], totals: torch.Tensor, weights: dict[str, float],
                lengths: torch.Tensor, truncated: torch.Tensor, group_size: int,
                correct: torch.Tensor | None = None, episodes: list | None = None,
                dynamic_sampling: bool = False) -> dict:
    """Every number of the probe from its N completions (B whole groups of G, row n = b * G + g): each reward's
    values [N] (NaN: None) and weight, the weighted totals [N], model-token lengths [N], truncated flags [N], the
    accuracy check's values [N] (None: the task has no check), the episode records (None: single-turn) and whether
    the run has algorithm.dynamic_sampling on (for the verdict's advice)."""
    stats = {
        "group_size": group_size,
        "reward": distribution(totals),
        "rewards": {name: {**distribution(v), **hits(v), "weight": weights[name],
                           "groups_differ": group_signal(v, group_size)["signal"]}
                    for name, v in per_function.items()},
        "accuracy": None if correct is None else pass_at_group(correct, group_size),
        "groups": group_signal(totals, group_size),
        "completions": {"count": int(totals.numel()), **length_stats(lengths, truncated)},
        "episodes": episode_stats(episodes),
    }
    stats["verdict"] = verdict(stats, dynamic_sampling)
    return stats


# -- the probe: the run's starting model on the run's first prompts --------------------------------------------


def probe(config, num_prompts: int = 32, log=print) -> dict:
    """Sample G completions for each of the first `num_prompts` training prompts with the model training would
    start from, score them with the run's rewards, and return probe_stats' numbers with the run's sampling
    settings, the accuracy check's name (`metric`) and every group's completions and values (`samples`)."""
    from grpo.run import check_environment, check_prompt_lengths, load_for_training, needed_columns, set_up_host

    task = load_task(config.data, needed_columns(config))  # data errors before any model loads
    check_environment(config)  # and what the environment cannot do with this model's chat template
    set_up_host(config)
    torch.manual_seed(config.trainer.seed)
    no_reference = config.model_copy(update={"algorithm": config.algorithm.model_copy(update={"beta": 0.0})})
    model, tokenizer, folder, engine, _ = load_for_training(no_reference, log=log)  # sampling needs no reference
    check_prompt_lengths(config, task, tokenizer, model)
    rows = PromptSampler(task.train, config.data.seed).next(num_prompts)  # the run's first draws
    specs, acc = build_rewards(config.rewards), accuracy_check(config, rows)
    episodes = Episodes.from_config(config, tokenizer)  # None without an environment
    b, g = config.prompts_per_step, config.sampling.group_size
    batches = []
    for step, start in enumerate(range(0, len(rows), b)):  # one step's B groups a call, as the trainer samples
        log(f"sampling {g} {'episodes' if episodes else 'completions'} for prompts {start + 1}-"
            f"{min(start + b, len(rows))} of {len(rows)}")
        chunk = rows[start : start + b]
        batches.append(_sample_step(engine, tokenizer, chunk, config, specs, acc, episodes, step))
    out = {"model": str(folder), "prompts": len(rows), "temperature": config.sampling.temperature,
           "max_new_tokens": config.sampling.max_new_tokens, "metric": acc.name if acc else None}
    out.update(_stats(batches, {s.name: s.weight for s in specs}, g, config.algorithm.dynamic_sampling))
    out["samples"] = [group for batch in batches for group in _groups(batch, config.data.prompt_column)]
    return out


@dataclass
class _Batch:
    """One step's groups as the trainer would sample and score them, and the accuracy check's values."""

    sampled: Sampled
    rewards: RewardResult
    correct: torch.Tensor | None  # [N] float64 (1: right); None: the task has no check


def _sample_step(engine, tokenizer, rows: list[dict], config, specs, acc, episodes, step: int) -> _Batch:
    """Training step `step + 1`'s groups of `rows` (group i under the trainer's seed for it), scored; `episodes`:
    the run's grpo.envs.episodes.Episodes (None: single completions)."""
    seeds = [group_seed(config.trainer.seed, step, 0, i) for i in range(len(rows))]  # as Trainer.generate_and_score
    params = SamplingParams.from_config(config.sampling)
    sampled = sample_rows(engine, tokenizer, rows, config.data, config.sampling.group_size, params, seeds, episodes)
    result = score_sampled(sampled, specs)
    if acc is None:
        return _Batch(sampled, result, None)
    right = result if acc.reward is None else score_sampled(sampled, [acc.reward])  # as grpo.evaluate
    return _Batch(sampled, result, right.per_function[acc.name])


def _stats(batches: list[_Batch], weights: dict[str, float], group_size: int, dynamic_sampling: bool) -> dict:
    """probe_stats over the batches, concatenated in order (each holds whole groups)."""
    cat = lambda tensors: torch.cat(list(tensors))  # noqa: E731
    rollouts = [b.sampled.rollout for b in batches]
    episodes = [e for r in rollouts for e in (r.episodes or [])]
    return probe_stats(
        {name: cat(b.rewards.per_function[name] for b in batches) for name in weights},
        cat(b.rewards.total for b in batches), weights,
        cat(r.lengths for r in rollouts), cat(r.truncated for r in rollouts), group_size,
        correct=None if batches[0].correct is None else cat(b.correct for b in batches), episodes=episodes or None,
        dynamic_sampling=dynamic_sampling)


def _groups(batch: _Batch, prompt_column: str) -> list[dict]:
    """Each group of a batch as plain data: its prompt, answer, G completions and their values (None: None)."""
    r, g = batch.sampled.rollout, batch.sampled.rollout.group_size
    values = lambda t, b: [_finite(float(v)) for v in t[b * g : (b + 1) * g]]  # noqa: E731
    return [{
        "prompt": row[prompt_column], "answer": row.get("answer"),
        "completions": batch.sampled.completions[b * g : (b + 1) * g],
        "totals": values(batch.rewards.total, b),
        "rewards": {name: values(v, b) for name, v in batch.rewards.per_function.items()},
        "correct": None if batch.correct is None else values(batch.correct, b),
        "lengths": r.lengths[b * g : (b + 1) * g].tolist(),
        "truncated": r.truncated[b * g : (b + 1) * g].tolist(),
        **({"episodes": [_record(e) for e in r.episodes[b * g : (b + 1) * g]]} if r.episodes else {}),
    } for b, row in enumerate(batch.sampled.rows)]


def _record(episode) -> dict:
    """An episode as plain data: its own to_dict (grpo.envs.episodes.Episode), a dict as it is."""
    return episode.to_dict() if hasattr(episode, "to_dict") else dict(episode)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


# -- the printed table ----------------------------------------------------------------------------------------


def format_probe(result: dict) -> str:
    """The probe's result as text: what was sampled, the reward table, accuracy and pass@G, the groups, the
    completions, the episodes, the first group's first three completions and the verdict."""
    g, groups, comp = result["group_size"], result["groups"], result["completions"]
    unit = "episodes" if result["episodes"] else "completions"
    per = " per turn" if result["episodes"] else ""
    head = (f"probe: {result['prompts']} training prompts x {g} {unit} (temperature {result['temperature']:g}, "
            f"max_new_tokens {result['max_new_tokens']}{per}) from {result['model']}, before any training")
    lines = [head, ""]
    lines.append(f"{'reward':<20}{'weight':>7}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}{'> 0':>7}{'None':>7}"
                 f"{'differ':>8}   values")
    rows = [("total", result["reward"], None)] + [(n, r, r) for n, r in result["rewards"].items()]
    for name, d, r in rows:
        cells = [d[k] for k in ("mean", "std", "min", "max")]
        lines.append(f"{name:<20}" + (f"{r['weight']:>7g}" if r else f"{'':>7}")
                     + "".join(f"{'-':>8}" if v is None else f"{v:>8.3g}" for v in cells)
                     + (f"{r['hit_frac']:>7.0%}{r['none_frac']:>7.0%}{r['groups_differ']:>8.0%}" if r else
                        f"{'':>7}{d['none'] / comp['count']:>7.0%}{groups['signal']:>8.0%}")
                     + "   " + _values(d))
    lines.append("(> 0: the fraction of completions scored above 0; None: scored None (does not apply); differ: the "
                 "fraction of groups whose G values differ)")
    acc = result["accuracy"]
    lines.append("")
    lines.append(f"accuracy ({result['metric']}): {acc['accuracy']:.1%} of completions right; pass@{g}: "
                 f"{acc['pass_at_g']:.1%} of prompts have a right one" if acc else
                 "accuracy: the task has no check of right answers (eval.metric, an answer column): skipped")
    lines.append(f"groups with equal rewards (no signal): {groups['no_signal']:.1%} of {groups['groups']} "
                 f"({groups['equal_at_top']:.1%} all at the highest total, {groups['equal_at_bottom']:.1%} all at "
                 f"the lowest); mean within-group std {groups['mean_group_std']:.3g}")
    limit = "a limit: max_new_tokens, environment.max_turns or max_tokens" if result["episodes"] else \
        f"max_new_tokens {result['max_new_tokens']}"
    lines.append(f"{unit}: mean length {comp['mean_length']:.1f} model tokens; {comp['truncated']:.1%} truncated "
                 f"(hit {limit})")
    if result["episodes"]:
        lines.append("per episode: " + ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in result["episodes"].items()
                                              if k != "episodes") + f" ({result['episodes']['episodes']} episodes)")
    for sample in result["samples"][:1]:
        lines.append(f"\nexample group: {_short(sample['prompt'])}")
        lines += [f"  {'None' if t is None else f'{t:.3g}':>6}  {_short(c)}" for t, c in
                  zip(sample["totals"][:3], sample["completions"][:3])]
    lines += ["", f"verdict: {result['verdict']}"]
    return "\n".join(lines)


def _values(d: dict) -> str:
    if "counts" in d:
        return ", ".join(f"{v}: {n}" for v, n in d["counts"].items())
    if "histogram" in d:
        h = d["histogram"]
        counts = " ".join(map(str, h["counts"]))
        return f"{len(h['counts'])} bins from {h['edges'][0]:g} to {h['edges'][-1]:g}: {counts}"
    return ""


def _short(text, width: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."
