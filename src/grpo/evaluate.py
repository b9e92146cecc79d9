"""Held-out evaluation of any task: the mean of each of the run's rewards on greedy completions, and
accuracy and pass@k where the task has a check of right answers (see `accuracy_check`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from grpo.data import DataError, accuracy_reward
from grpo.distributed import SINGLE, World
from grpo.rewards import Reward, build_rewards, get_reward
from grpo.rollout.base import SamplingParams, group_seed
from grpo.envs.episodes import Episodes
from grpo.sample import sample_rows, score_sampled


@dataclass
class AccuracyCheck:
    """What eval reports as accuracy: `name` is the eval.metric label or the task's built-in check;
    `reward` is the check to run besides the run's rewards (None: the run's reward labelled `name`)."""

    name: str
    reward: Reward | None


def accuracy_check(config, rows: list[dict]) -> AccuracyCheck | None:
    """The reward whose mean eval reports as accuracy (a completion scoring 1 is right, for pass@k): the run's
    reward labelled eval.metric; with an environment its own reward (`environment`: an episode's return, 1 for a
    right final answer in the built-ins); else the task's own check (grpo.data.ACCURACY_REWARDS), which for a prompt
    file is answer_accuracy only when its rows carry an answer; else None (eval reports reward means only)."""
    if config.eval.metric is not None:
        return AccuracyCheck(config.eval.metric, None)
    if config.environment.enabled:  # the environment judges its episodes (the transcript holds tool results too)
        return AccuracyCheck("environment", Reward("environment", get_reward("environment"), 0.0))
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


def evaluate(tokenizer, engine, rows: list[dict], config, progress=None, world: World = SINGLE) -> dict:
    """Greedy completions of the held-out rows scored by the run's rewards: each reward's mean and the mean
    weighted total ("reward"); "accuracy" the mean of the accuracy check (None where the task has none, see
    accuracy_check) and pass@k (k sampled completions, at least one scoring 1) when eval.k > 1; "examples":
    every problem with its greedy completion.

    The rows go to the engine in batches of eval.batch_size, the same batches whatever the world size: under
    several ranks, rank r completes batches r, r + W, r + 2W, ... and every rank gets the whole result (the
    batches gathered in order), so the result is the one-process result whatever the engine's numerics make
    of a batch's padding. pass@k samples problem i from its own seeded stream."""
    ev = config.eval
    check_eval(config, rows)
    rows = held_out(config, rows)
    parts = _EvalParts.of(config, rows)
    starts = list(range(0, len(rows), ev.batch_size))
    done = []
    for n, start in enumerate(starts[world.rank :: world.size]):
        done.append(_evaluate_batch(parts, tokenizer, engine, rows[start : start + ev.batch_size], start, config))
        if progress:
            progress(min((n + 1) * world.size * ev.batch_size, len(rows)), len(rows))
    with world.during("evaluation"):
        batches = sorted((b for part in world.gather(done) for b in part), key=lambda b: b["start"])
    return _summarize(batches, parts.acc, ev.k, len(rows))


@dataclass
class _EvalParts:
    """What every batch of an evaluation uses: the run's rewards, the check of right answers and its reward
    (run besides the run's rewards), and the greedy and pass@k sampling parameters."""

    specs: list
    acc: AccuracyCheck | None
    acc_specs: list
    greedy: SamplingParams
    sampled: SamplingParams
    max_new: int

    @classmethod
    def of(cls, config, rows: list[dict]) -> "_EvalParts":
        max_new = config.eval.max_new_tokens or config.sampling.max_new_tokens
        specs = build_rewards(config.rewards)
        acc = accuracy_check(config, rows)
        # the check of right answers: the run's reward named by eval.metric, or the task's own, run besides
        acc_specs = [] if acc is None else [acc.reward or next(s for s in specs if s.name == acc.name)]
        return cls(specs, acc, acc_specs, SamplingParams.from_config(config.sampling, max_new, greedy=True),
                   SamplingParams.from_config(config.sampling, max_new), max_new)


def _evaluate_batch(parts: _EvalParts, tokenizer, engine, chunk: list[dict], start: int, config) -> dict:
    """One batch of held-out rows (the first is row `start`): per-row values of each reward, the total, the
    accuracy check and pass@k, and each row's example."""
    data, k, acc = config.data, config.eval.k, parts.acc
    episodes = Episodes.from_config(config, tokenizer)  # None without an environment
    greedy = sample_rows(engine, tokenizer, chunk, data, 1, parts.greedy, None, episodes)
    result = score_sampled(greedy, parts.specs)
    out = {"start": start, "rewards": {name: v.tolist() for name, v in result.per_function.items()},
           "totals": result.total.tolist(), "correct": [], "passed": []}
    if acc is not None:  # eval.metric's values are in result already; the task's own check runs here
        right = result if acc.reward is None else score_sampled(greedy, parts.acc_specs)
        out["correct"] = right.per_function[acc.name].tolist()
    out["examples"] = [{"prompt": r[data.prompt_column], "answer": r.get("answer"), "completion": text,
                        "correct": _finite(out["correct"][i]) if acc is not None else None,
                        "reward": _finite(out["totals"][i])} for i, (r, text) in enumerate(zip(chunk, greedy.completions))]
    for example, episode in zip(out["examples"], greedy.rollout.episodes or []):  # the whole conversation
        example["episode"] = episode.to_dict()
    if k > 1:  # check_eval refused pass@k without a check
        seeds = [group_seed(config.trainer.seed + 1, start + i) for i in range(len(chunk))]  # problem i's stream
        right = score_sampled(sample_rows(engine, tokenizer, chunk, data, k, parts.sampled, seeds, episodes),
                              parts.acc_specs)
        out["passed"] = (right.per_function[acc.name].view(-1, k) == 1).any(dim=1).float().tolist()
    return out


def _summarize(batches: list[dict], acc: AccuracyCheck | None, k: int, num_problems: int) -> dict:
    """The evaluation's result from its batches' per-row values, in row order."""
    per_reward: dict[str, list[float]] = {}
    for b in batches:
        for name, values in b["rewards"].items():
            per_reward.setdefault(name, []).extend(values)
    every = lambda key: [v for b in batches for v in b[key]]  # noqa: E731
    out = {
        "num_problems": num_problems,
        "metric": acc.name if acc else None,
        "accuracy": _mean(every("correct")) if acc else None,
        "reward": _mean(every("totals")),
        "rewards": {name: m for name, v in per_reward.items() if (m := _mean(v)) is not None},
        "examples": every("examples"),
    }
    if k > 1:
        passed = every("passed")
        out[f"pass@{k}"] = sum(passed) / len(passed)
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


def episode_transcripts(result: dict, count: int = 2) -> str:
    """The first `count` held-out episodes as text (multi-turn runs): each turn under its role, the environment's
    reward per model turn, and whether the answer was right."""
    out = []
    for ex in [x for x in result.get("examples", []) if x.get("episode")][:count]:
        ep = ex["episode"]
        turn, lines = 0, []
        for m in ep["messages"][ep.get("first_messages", 0):]:
            note = ""
            if m.get("role") == "assistant":
                rewards = ep.get("turn_rewards") or []
                note = f" (turn {turn + 1}, reward {rewards[turn] if turn < len(rewards) else None})"
                turn += 1
            lines.append(f"  [{m.get('role')}]{note} {m.get('content', '')}")
        right = {1.0: "right", 0.0: "wrong"}.get(ex.get("correct"), "")
        prompt = ex["prompt"] if isinstance(ex["prompt"], str) else ex["prompt"][-1]["content"]
        out.append(f"episode: {prompt} {right}".rstrip() + "\n" + "\n".join(lines))
    return "\n".join(out)


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
