"""`grpo sweep`: one config trained once per seed, each run in its own folder, and the spread of what it learned.

A single run's end point is one sample: the seed decides which completions get sampled, and so the path the
policy takes. A sweep runs the same config with trainer.seed = each of the given seeds (everything else, the
held-out problems included, stays the same: they come from data.seed), one run after another in this process,
in OUTPUT/seed-N, and then reports the mean, the spread (sample std, min, max) of held-out accuracy before and
after training and of the gain, per seed and over seeds. It writes OUTPUT/sweep.json and OUTPUT/sweep.html, the
held-out curves of every seed on one chart (grpo.report.sweep).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from grpo.config import Config, ConfigError
from grpo.files import read_jsonl

SUMMARY_NAME = "sweep.json"


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; "0-4" -> [0, 1, 2, 3, 4]; distinct integers, in the order given."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: give integers separated by commas (0,1,2) or a range (0-4)") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def seed_dir(out_dir: Path, seed: int) -> Path:
    return out_dir / f"seed-{seed}"


def seed_config(config: Config, seed: int, out_dir: Path) -> Config:
    """The config of one seed's run: trainer.seed = seed, output.dir = OUTPUT/seed-N; nothing else changes."""
    return config.model_copy(update={
        "trainer": config.trainer.model_copy(update={"seed": seed}),
        "output": config.output.model_copy(update={"dir": str(seed_dir(out_dir, seed))}),
    })


def check_sweep(config: Config) -> None:
    """A sweep compares held-out results before and after training: both evaluations must be on."""
    if not (config.eval.before and config.eval.after):
        raise ConfigError("grpo sweep compares held-out results before and after training: set eval.before=true "
                          "and eval.after=true")


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (the sample std, Bessel-corrected; 0 for one value), min and max of `values`."""
    if not values:
        raise ValueError("spread of no values")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def run_summary(run_dir: Path, seed: int) -> dict:
    """One seed's result from its run folder: held-out accuracy (or, for a task without a check of right answers,
    the mean reward) before and after, the gain, and the training time (the sum of its steps' times)."""
    evals = {}
    for name in ("before", "after"):
        path = run_dir / f"eval_{name}.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir} has no {path.name}: the run of seed {seed} did not finish its evaluations")
        evals[name] = json.loads(path.read_text())
    key = "accuracy" if all(evals[n].get("accuracy") is not None for n in evals) else "reward"
    before, after = evals["before"][key], evals["after"][key]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    return {
        "seed": seed, "run_dir": str(run_dir), "value": key, "metric": evals["after"].get("metric"),
        "num_problems": evals["after"].get("num_problems"), "before": before, "after": after, "gain": after - before,
        "steps": len(metrics), "train_seconds": sum(m.get("time/step") or 0.0 for m in metrics),
    }


def summarize(runs: list[dict]) -> dict:
    """The sweep's summary: every seed's run, and the spread over seeds of before, after and gain."""
    values = {r["value"] for r in runs}
    if len(values) > 1:
        raise ConfigError("the seeds' runs report different things (accuracy for some, mean reward for others)")
    out = {"seeds": [r["seed"] for r in runs], "value": runs[0]["value"], "metric": runs[0]["metric"],
           "num_problems": runs[0]["num_problems"], "runs": runs}
    for key in ("before", "after", "gain", "train_seconds"):
        out[key] = spread([r[key] for r in runs])
    return out


def format_summary(summary: dict) -> str:
    """The table printed at the end: one row per seed, then mean, std, min and max over seeds."""
    what = summary["value"] + (f" ({summary['metric']})" if summary.get("metric") else "")
    pct = summary["value"] == "accuracy"
    cell = (lambda v: f"{100 * v:>9.1f}%") if pct else (lambda v: f"{v:>10.3f}")  # noqa: E731
    gain = (lambda v: f"{100 * v:>+9.1f}%") if pct else (lambda v: f"{v:>+10.3f}")  # noqa: E731
    lines = [f"held-out {what} on {summary['num_problems']} problems, {len(summary['runs'])} seeds (trainer.seed)",
             f"{'':<10}{'before':>10}{'after':>10}{'gain':>10}{'train time':>12}"]
    for r in summary["runs"]:
        lines.append(f"{'seed ' + str(r['seed']):<10}{cell(r['before'])}{cell(r['after'])}{gain(r['gain'])}"
                     f"{_minutes(r['train_seconds']):>12}")
    for stat in ("mean", "std", "min", "max"):
        b, a, g, t = (summary[k][stat] for k in ("before", "after", "gain", "train_seconds"))
        g_cell = cell(g) if stat == "std" else gain(g)
        lines.append(f"{stat:<10}{cell(b)}{cell(a)}{g_cell}{_minutes(t):>12}")
    lines.append("(std: the sample standard deviation over seeds)")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    """'7 min 05 s': rounded to the second first, so 419.6 s reads 7 min 00 s, not 6 min 60 s."""
    if not math.isfinite(seconds):
        return "-"
    whole = int(round(seconds))
    return f"{whole // 60} min {whole % 60:02d} s"


def finished(run_dir: Path) -> bool:
    """A seed's run that need not run again under --resume: it wrote its evaluation after training."""
    return (run_dir / "eval_after.json").is_file()


def sweep(config: Config, seeds: list[int], out_dir: Path, quiet: bool = False, console_mode: str = "auto",
          resume: bool = False, info=print) -> dict:
    """Train `config` once per seed, each in out_dir/seed-N, and write out_dir/sweep.json and sweep.html; returns
    the summary (format_summary prints it).
    Every seed's run folder is checked before the first one trains. With `resume`, a seed whose run finished is
    read, not trained again, and one that stopped continues from its last checkpoint (grpo train --resume auto)."""
    from grpo import run
    from grpo.data import load_task
    from grpo.evaluate import no_eval_split
    from grpo.files import write_text_atomic
    from grpo.report.sweep import write_sweep_report

    check_sweep(config)
    configs = {s: seed_config(config, s, out_dir) for s in seeds}
    if not load_task(config.data, run.needed_columns(config)).eval:
        raise ConfigError(f"grpo sweep needs held-out problems: {no_eval_split(config.data)}")
    for s, cfg in configs.items():  # before anything trains: a refused folder should not waste a run
        if not (resume or config.output.overwrite):
            run.check_run_dir(cfg)
    runs = []
    for i, (s, cfg) in enumerate(configs.items(), start=1):
        folder = seed_dir(out_dir, s)
        if resume and finished(folder):
            info(f"seed {s} ({i}/{len(seeds)}): finished earlier, read from {folder}")
        else:
            info(f"seed {s} ({i}/{len(seeds)}): training in {folder}")
            run.train(cfg, quiet=quiet, console_mode=console_mode, resume="auto" if resume else False)
        runs.append(run_summary(folder, s))
    summary = summarize(runs)
    summary["report"] = str(write_sweep_report(out_dir, summary))
    write_text_atomic(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["check_sweep", "format_summary", "parse_seeds", "seed_config", "spread", "summarize", "sweep"]
