"""Held-out evaluation of any task: the mean of each of the run's rewards on greedy completions, and
accuracy and pass@k where the task has a check of right answers (see `accuracy_check`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


from grpo.data import DataError, accuracy_reward, encode_rows
from grpo.rewards import Reward, build_rewards, get_reward, reward_columns, score
from grpo.rollout.base import SamplingParams, group_seed


@dataclass
class AccuracyCheck:
    """What eval reports as accuracy: `name` is the eval.metric label or the task's built-in check;
    `reward` is the check to run besides the run's rewards (None: the run's reward labelled `name`)."""

    name: str
    reward: Reward | None


def accuracy_check(config, rows: list[dict]) -> AccuracyCheck | None:
    """The reward whose mean eval reports as accuracy (a completion scoring 1 is right, for pass@k): the run's
    reward labelled eval.metric; else the task's own check (grpo.data.ACCURACY_REWARDS), which for a prompt
    file is answer_accuracy only when its rows carry an answer; else None (eval reports reward means only)."""
    if config.eval.metric is not None:
        return AccuracyCheck(config.eval.metric, None)
    task = config.data.task
    if task == "file" and not any(r.get("answer") is not None for r in rows):
        return None
    name = accuracy_reward(task)
    return AccuracyCheck(name, Reward(name, get_reward(name), 0.0))


def no_eval_split(data) -> str:
    """Why a task has no held-out rows, and the fix."""
    return (f"data.task={data.task} has no held-out split (data.eval_file is not set): set data.eval_file to a "
            f"file of held-out rows with the columns of {data.train_file}, none of them trained on")


def held_out(config, rows: list[dict]) -> list[dict]:
    """The rows eval runs on: the first eval.num_problems (all when None)."""
    return rows[: config.eval.num_problems] if config.eval.num_problems else rows


def check_eval(config, rows: list[dict]) -> None:
    """Refuse, before any model loads, an evaluation that cannot run on these held-out rows."""
    data, ev = config.data, config.eval
    rows = held_out(config, rows)
    if not rows:
        raise DataError(no_eval_split(data))
    where = data.eval_file or f"data.task={data.task}"
    if data.task == "file" and data.answer_column != "answer" and not any(data.answer_column in r for r in rows):
        raise DataError(
            f"{where}: no row has the column data.answer_column={data.answer_column!r} (columns: "
            f"{', '.join(sorted(rows[0]))}); name the column that holds the reference answer, or leave "
            "data.answer_column unset for a task without one"
        )
    if ev.k > 1 and accuracy_check(config, rows) is None:
        labels = ", ".join(r.metric_name for r in config.rewards)
        raise DataError(
            f"eval.k={ev.k} asks for pass@{ev.k}, which needs a check of right answers, and {where} has no "
            f"{data.answer_column!r} column: add that column (for answer_accuracy), set eval.metric to the label "
            f"of a reward that scores 1 for a right completion (here: {labels}), or set eval.k=1"
        )


def evaluate(model, tokenizer, engine, rows: list[dict], config, progress=None) -> dict:
    """Greedy completions of the held-out rows scored by the run's rewards: each reward's mean and the mean
    weighted total ("reward"); "accuracy" the mean of the accuracy check (None where the task has none, see
    accuracy_check) and pass@k (k sampled completions, at least one scoring 1) when eval.k > 1."""
    ev, data = config.eval, config.data
    check_eval(config, rows)
    rows = held_out(config, rows)
    max_new = ev.max_new_tokens or config.sampling.max_new_tokens
    specs = build_rewards(config.rewards)
    acc = accuracy_check(config, rows)
    # the check of right answers: the run's reward named by eval.metric, or the task's own, run besides
    acc_specs = [] if acc is None else [acc.reward or next(s for s in specs if s.name == acc.name)]
    greedy = SamplingParams.from_config(config.sampling, max_new, greedy=True)
    sampled = SamplingParams.from_config(config.sampling, max_new)
    per_reward: dict[str, list[float]] = {}
    totals, correct, passed, examples = [], [], [], []
    for start in range(0, len(rows), ev.batch_size):
        chunk = rows[start : start + ev.batch_size]
        prompt_ids = encode_rows(tokenizer, chunk, data)
        texts, lengths = _complete(engine, tokenizer, prompt_ids, 1, greedy, None)
        result = _score(specs, tokenizer, prompt_ids, texts, lengths, chunk, data.prompt_column, 1, max_new)
        for name, values in result.per_function.items():
            per_reward.setdefault(name, []).extend(values.tolist())
        totals += result.total.tolist()
        if acc is not None:  # eval.metric's values are in result already; the task's own check runs here
            right = result if acc.reward is None else _score(acc_specs, tokenizer, prompt_ids, texts, lengths, chunk,
                                                             data.prompt_column, 1, max_new)
            correct += right.per_function[acc.name].tolist()
        for i, (r, text) in enumerate(zip(chunk, texts)):
            if len(examples) < 8:
                ok = correct[start + i] if acc is not None else None
                examples.append({"prompt": r[data.prompt_column], "answer": r.get("answer"), "completion": text,
                                 "correct": _finite(ok), "reward": _finite(result.total[i].item())})
        if ev.k > 1:  # check_eval refused pass@k without a check
            seeds = [group_seed(config.trainer.seed + 1, start + i) for i in range(len(chunk))]  # problem i's stream
            texts, lengths = _complete(engine, tokenizer, prompt_ids, ev.k, sampled, seeds)
            right = _score(acc_specs, tokenizer, prompt_ids, texts, lengths, chunk, data.prompt_column, ev.k, max_new)
            passed += (right.per_function[acc.name].view(-1, ev.k) == 1).any(dim=1).float().tolist()
        if progress:
            progress(min(start + ev.batch_size, len(rows)), len(rows))
    out = {
        "num_problems": len(rows),
        "metric": acc.name if acc else None,
        "accuracy": _mean(correct) if acc else None,
        "reward": _mean(totals),
        "rewards": {name: m for name, v in per_reward.items() if (m := _mean(v)) is not None},
        "examples": examples,
    }
    if ev.k > 1:
        out[f"pass@{ev.k}"] = sum(passed) / len(passed)
    return out


# -- the held-out curve: evaluations during training (eval.every) -------------------------------------------


def curve_due(config, step: int) -> bool:
    """Whether the held-out evaluation runs after training step `step`: every eval.every steps, but not at the
    last step when eval.after evaluates the same weights anyway (its result is the curve's end)."""
    every = config.eval.every
    if not every or step % every:
        return False
    return not (step == config.trainer.steps and config.eval.after)


def curve_metrics(result: dict) -> dict[str, float]:
    """What an evaluation during training adds to its step's metrics line: eval/accuracy (where the task has a
    check of right answers), eval/reward (the weighted total) and eval/reward/<label> of each reward."""
    out = {"eval/accuracy": result.get("accuracy"), "eval/reward": result.get("reward")}
    out.update({f"eval/reward/{name}": v for name, v in result.get("rewards", {}).items()})
    return {k: float(v) for k, v in out.items() if v is not None}


def _mean(values: list[float]) -> float | None:
    """Mean over the values that are not NaN (a reward's None); None when there are none."""
    valid = [v for v in values if v == v]
    return sum(valid) / len(valid) if valid else None


def _finite(v) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _complete(engine, tokenizer, prompt_ids, k, params, seeds) -> tuple[list[str], list[int]]:
    rollout = engine.generate(prompt_ids, k, params, seeds=seeds)
    return tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True), rollout.lengths.tolist()


def _score(specs, tokenizer, prompt_ids, texts, lengths, rows, prompt_column, k, max_new):
    """Rewards as in training: every column of the rows (a row without one gets None), and the
    completion lengths and max_new_tokens that length rewards read."""
    prompts = [text for text in tokenizer.batch_decode(prompt_ids) for _ in range(k)]
    return score(specs, prompts, texts, reward_columns(rows, k, prompt_column, lengths, max_new))


def summary(result: dict) -> str:
    """One line: the accuracy and its check where there is one, else the mean total reward."""
    if result.get("accuracy") is not None:
        return f"accuracy {result['accuracy']:.3f} ({result.get('metric') or 'accuracy'})"
    return "reward " + ("n/a" if result.get("reward") is None else f"{result['reward']:.3f}") + " (no accuracy check)"


def format_table(results: dict[str, dict]) -> str:
    """A small text table: one column per evaluation (e.g. before / after); a row only for what some
    evaluation has (no accuracy row for a task without a check of right answers); '-' where one lacks it."""
    names = list(results)
    keys = [k for k in ("accuracy", "reward") if any(r.get(k) is not None for r in results.values())]
    keys += sorted({k for r in results.values() for k in r if k.startswith("pass@")})
    reward_names = sorted({k for r in results.values() for k in r.get("rewards", {})})
    rows = [(key, [r.get(key) for r in results.values()]) for key in keys]
    rows += [(f"reward/{rn}", [r.get("rewards", {}).get(rn) for r in results.values()]) for rn in reward_names]
    cell = lambda v: f"{'-':>12}" if v is None else f"{v:>12.3f}"  # noqa: E731
    lines = [f"{'':<24}" + "".join(f"{n:>12}" for n in names)]
    lines += [f"{key:<24}" + "".join(cell(v) for v in values) for key, values in rows]
    lines.append(f"{'problems':<24}" + "".join(f"{results[n]['num_problems']:>12d}" for n in names))
    metrics = sorted({r["metric"] for r in results.values() if r.get("metric")})
    if metrics and "accuracy" in keys:
        lines.append(f"(accuracy: the mean of {', '.join(metrics)} on the greedy completions)")
    return "\n".join(lines)


__all__ = ["AccuracyCheck", "accuracy_check", "check_eval", "curve_due", "curve_metrics", "evaluate", "format_table", "no_eval_split", "summary"]
