"""`grpo train | eval | sweep | probe | report`: the command line. Each parses, validates, then calls grpo.run."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from grpo.config import Config, ConfigError, load_config
from grpo.logging.console import CONSOLE_MODES


def config_reference(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One entry per config field: dotted name, type, default, and its docstring."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"\n{prefix}{name}:")
            lines += config_reference(ann, f"{prefix}{name}.")
            continue
        if get_origin(ann) is Literal:
            kind = "one of " + ", ".join(map(str, get_args(ann)))
        else:
            kind = str(ann).replace("typing.", "") if get_args(ann) else getattr(ann, "__name__", str(ann))
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = "..."
        elif isinstance(default, list) and default and isinstance(default[0], BaseModel):
            default = [d.model_dump() for d in default]
        doc = " ".join((field.description or "").split())
        head = f"  {prefix}{name} ({kind}, default {default!r})"
        lines.append(head + ("\n" + textwrap.fill(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6) if doc else ""))
    return lines


EXAMPLES = """
examples:
  grpo train configs/default.yaml
  grpo train configs/default.yaml trainer.steps=10 trainer.lr=5e-6 output.dir=runs/try
  grpo train --resume runs/try             # continue a stopped run from its newest checkpoint
  grpo train --resume runs/try trainer.steps=20   # ... and extend it to 20 steps
  grpo eval runs/grpo                      # the trained model of a run folder, on its task
  grpo eval configs/default.yaml           # the configured (untrained) model
  grpo report runs/grpo                    # (re)write runs/grpo/report.html
  grpo sweep configs/default.yaml --seeds 0,1,2   # one run per seed; mean and spread of the gain
  grpo probe configs/default.yaml --prompts 32    # before training: do the groups' rewards differ at all?
  grpo train configs/default.yaml --log-format jsonl > steps.jsonl   # one JSON object per step
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="grpo",
        description="Train language models with Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300).",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    reference = "config fields (set in the YAML file or as section.field=value):" + "\n".join(config_reference())

    train = sub.add_parser(
        "train", help="run GRPO training", formatter_class=fmt, epilog=reference,
        description="Train with GRPO. Writes the run folder: config.yaml, metrics.jsonl, samples.jsonl, "
        "tensorboard/, eval_before.json, eval_after.json, report.html, checkpoints/ and model/. Ctrl-C stops after "
        "the current step and saves a checkpoint; --resume continues a stopped run exactly.",
    )
    train.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
    train.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, e.g. trainer.lr=1e-6")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder (output.overwrite=true)")
    train.add_argument("--resume", metavar="RUN_DIR|auto", help=RESUME_HELP)
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.add_argument("--log-format", choices=CONSOLE_MODES, default="auto", help=LOG_FORMAT_HELP)
    train.add_argument("--nproc", type=int, metavar="N", help=NPROC_HELP)

    ev = sub.add_parser(
        "eval", help="held-out reward means, accuracy and pass@k of a model or a run folder", formatter_class=fmt,
        epilog=reference, description="The mean of each reward on greedy completions of the task's eval split, and "
        "accuracy and pass@k (eval.k > 1) where the task has a check of right answers (see eval.metric), "
        "printed as a table and written as JSON.",
    )
    ev.add_argument("target", nargs="?", help="a run folder (uses its config.yaml and model/) or a YAML config file")
    ev.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, e.g. eval.k=8")
    ev.add_argument("--model", help="model to evaluate: HF folder or .gguf (default: the run's model/ or model.path)")
    ev.add_argument("--output", help="where to write the JSON results (default: <run folder>/eval.json)")
    ev.add_argument("--quiet", action="store_true", help="print nothing but the table and errors")
    ev.add_argument("--log-format", choices=CONSOLE_MODES, default="auto", help=LOG_FORMAT_HELP)

    sw = sub.add_parser(
        "sweep", help="train a config once per seed; mean and spread of held-out accuracy before/after",
        formatter_class=fmt, epilog=reference, description=SWEEP_HELP,
    )
    sw.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
    sw.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, as for grpo train")
    sw.add_argument("--seeds", required=True, metavar="0,1,2", help="trainer.seed of each run: a list (0,1,2) or a range (0-4)")
    sw.add_argument("--output", metavar="DIR", help="the sweep folder (default: <output.dir>-seeds); each seed's run goes in DIR/seed-N")
    sw.add_argument("--overwrite", action="store_true", help="replace existing seed folders")
    sw.add_argument("--resume", action="store_true", help="keep the seeds whose run finished; continue the others "
                    "from their last checkpoint (or start them)")
    sw.add_argument("--quiet", action="store_true", help="print nothing but the summary table and errors")
    sw.add_argument("--log-format", choices=CONSOLE_MODES, default="auto", help=LOG_FORMAT_HELP)

    pr = sub.add_parser("probe", help="before training: can this task teach the starting model? (reward "
                        "spread, pass@G, groups with no signal, a verdict)", formatter_class=fmt, epilog=reference,
                        description=PROBE_HELP)
    pr.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
    pr.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides, as for grpo train")
    pr.add_argument("--prompts", type=int, default=32, metavar="N", help="training prompts to sample (default 32)")
    pr.add_argument("--json", action="store_true", help="print the result as one JSON object (every group's "
                    "completions and values included) instead of the table")
    pr.add_argument("--quiet", action="store_true", help="print nothing but the result and errors")

    rep = sub.add_parser(
        "report", help="write the HTML report of a run folder", formatter_class=fmt,
        description="Write one self-contained HTML file (no network needed to view it): curves of every metric, "
        "held-out evaluation before/after (and `grpo eval` results), sampled completions of each step with "
        "rewards and advantages, and the config. Training refreshes it every output.report_every steps.",
    )
    rep.add_argument("run_dir", help="a run folder written by grpo train")
    rep.add_argument("--output", help="where to write the HTML (default: <run folder>/report.html)")
    return parser


RESUME_HELP = (
    "continue a run from its newest checkpoint, exactly as if it had not stopped: RUN_DIR (its config.yaml, or the "
    "given config file, with output.dir=RUN_DIR), or auto (output.dir, when it has a checkpoint; else a new run, "
    "also over a run folder whose run stopped before its first checkpoint). A damaged newest checkpoint is set aside "
    "and the one before it used; a finished run whose model/ or eval_after.json is missing or damaged gets them "
    "written again from its last checkpoint. "
    "Overrides may change trainer.steps (to extend the run), output.*, eval.* and logging fields"
)

SWEEP_HELP = (
    "Train one config once per seed (trainer.seed = each of --seeds; the held-out problems and everything else stay "
    "the same), one run after another, each a whole run folder in DIR/seed-N. Then print each seed's held-out "
    "accuracy before and after training and the gain, with their mean, sample std, min and max over seeds, and write "
    "DIR/sweep.json (the same numbers) and DIR/sweep.html (the table and the held-out curves of every seed on one "
    "chart; set eval.every to draw points between before and after). A claim about learning is then never one sample"
)

PROBE_HELP = (
    "Sample sampling.group_size completions for each of the first --prompts training prompts, as the run's first "
    "steps would (the same model, engine, prompt order and seeds), score them with the run's rewards and print, "
    "before any training: each reward's distribution and how often it scores above 0 or None, accuracy and pass@G "
    "where the task has a check of right answers, the fraction of groups whose rewards are all equal (they teach "
    "nothing: their advantages are 0), completion lengths and truncation, and a verdict: TEACHABLE (at least 25% "
    "of groups have a signal), WEAK SIGNAL (10-25%), TOO EASY or NO SIGNAL (under 10%). Progress goes to stderr"
)

NPROC_HELP = (
    "train on N processes of this machine (one per GPU, or N CPU processes with gloo): the same as "
    "`torchrun --standalone --nproc_per_node N -m grpo train ...`. Several machines: run torchrun on each, "
    "with --nnodes and --rdzv-endpoint (README, 'Many GPUs and machines')"
)

LOG_FORMAT_HELP = (
    "console output: auto (a live progress display on a terminal, else plain), live, plain (one line per step), "
    "jsonl (one JSON object per step on stdout, messages on stderr), quiet"
)


def split_overrides(first: str | None, rest: list[str]) -> tuple[str | None, list[str]]:
    """`grpo train a=b` has no config file: the first positional is an override then."""
    if first is not None and "=" in first and not Path(first).exists():
        return None, [first, *rest]
    return first, rest


def train_config(resume: str | None, path: str | None, overrides: list[str]) -> tuple[Config, bool | str]:
    """The config to train with, and whether it continues a run: True, False, or "auto" (continue it where
    output.dir has a checkpoint, else start it; see RESUME_HELP)."""
    if resume is None:
        return load_config(path, overrides), False
    if resume == "auto":
        return load_config(path, overrides), "auto"
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run folder (no config.yaml); give the output.dir of a run")
    return load_config(path or run_dir / "config.yaml", [*overrides, f"output.dir={run_dir}"]), True


def cmd_train(args) -> int:
    from grpo import run
    from grpo.checkpoint import CheckpointError, disk_full, how_to_continue
    from grpo.distributed import launched

    path, overrides = split_overrides(args.config, args.overrides)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite replaces a run and --resume continues it: give only one of them")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    config, resume = train_config(args.resume, path, overrides)  # a bad config fails here, before launching
    if args.nproc is not None and args.nproc > 1 and not launched():
        run.check_ranks(config, args.nproc)  # said once here, not by every rank after torchrun's banner
        return launch(args.nproc, sys.argv[1:] if args.argv is None else args.argv)
    try:
        run.train(config, quiet=args.quiet, console_mode=args.log_format, resume=resume)
    except OSError as e:  # a log, result or report file that could not be written (checkpoints say it themselves)
        if not disk_full(e):
            raise
        run_dir = Path(config.output.dir).expanduser()
        raise CheckpointError(f"could not write {e.filename or run_dir}: no space left on device. "
                              + how_to_continue(run_dir, e)) from None
    return 0


def launch(nproc: int, argv: list[str]) -> int:
    """`grpo train --nproc N ...` as `torchrun --standalone --nproc_per_node N -m grpo train ...` starts it (the
    same launcher, run in this process). A rank that fails prints its own error; this says which rank it was,
    once, instead of torchrun's traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args, skip = [], False
    for a in argv:  # the same command without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we name the failed rank below
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "grpo", *args])
    try:
        run(launcher)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"error: rank {rank} of {nproc} stopped with exit code {failure.exitcode} (its message is above); "
              "the other ranks were stopped", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def cmd_eval(args) -> int:
    from grpo import run

    target, overrides = split_overrides(args.target, args.overrides)
    model, output = args.model, Path(args.output) if args.output else None
    if target and Path(target).is_dir():
        run_dir = Path(target)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
        config = load_config(run_dir / "config.yaml", overrides)
        model = model or str(run_model(run_dir, config))
        output = output or run_dir / "eval.json"
    else:
        config = load_config(target, overrides)
    run.eval_only(config, model, output, quiet=args.quiet, console_mode=args.log_format)
    if output and (output.parent / "config.yaml").is_file():  # a run folder: its report shows the result
        from grpo.report import write_report

        write_report(output.parent)
    return 0


def run_model(run_dir: Path, config: Config) -> Path:
    """The trained model of a run folder, <run>/model; a ConfigError that says how to get it when it is missing."""
    from grpo.checkpoint import latest_checkpoint

    folder = run_dir / "model"
    if folder.is_dir():
        return folder
    why = ("the run does not save one (output.save_model=false)" if not config.output.save_model
           else "it was removed, or the run stopped before its end")
    ckpt = latest_checkpoint(run_dir)
    fixes = []
    if ckpt is not None:
        save = "" if config.output.save_model else " output.save_model=true"
        fixes.append(f"`grpo train --resume {run_dir}{save}` writes it from the last checkpoint"
                     + (" (after training on to trainer.steps)" if ckpt.step < config.trainer.steps else ""))
    if ckpt is not None and (ckpt.path / "model").is_dir():
        fixes.append(f"`--model {ckpt.path / 'model'}` evaluates that checkpoint's weights")
    fixes.append("`--model PATH` evaluates another model on this run's task")
    raise ConfigError(f"{folder} is missing: {why}; " + "; or ".join(fixes))


def cmd_sweep(args) -> int:
    from grpo.sweep import format_summary, parse_seeds, sweep

    path, overrides = split_overrides(args.config, args.overrides)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite replaces the seeds' runs and --resume continues them: give only one of them")
    seeds = parse_seeds(args.seeds)
    config = load_config(path, [*overrides, *(["output.overwrite=true"] if args.overwrite else [])])
    out_dir = Path(args.output) if args.output else Path(config.output.dir + "-seeds").expanduser()
    info = (lambda text: None) if args.quiet else print  # noqa: E731
    summary = sweep(config, seeds, out_dir, quiet=args.quiet, console_mode=args.log_format, resume=args.resume,
                    info=info)
    stream = sys.stderr if args.log_format == "jsonl" else sys.stdout  # jsonl: stdout holds only the steps
    print("\n" + format_summary(summary), file=stream)
    print(f"summary: {out_dir / 'sweep.json'}; the curves of every seed: {summary['report']}", file=stream)
    return 0


def cmd_probe(args) -> int:
    import json

    from grpo.probe import format_probe, probe

    path, overrides = split_overrides(args.config, args.overrides)
    if args.prompts < 1:
        raise ConfigError(f"--prompts {args.prompts}: give at least 1 prompt to sample")
    config = load_config(path, overrides)  # a bad config fails here, before the model loads
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))  # noqa: E731
    result = probe(config, args.prompts, log=log)
    print(json.dumps(result, default=str) if args.json else format_probe(result))
    return 0


def cmd_report(args) -> int:
    from grpo.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir() or not ((run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file()):
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml or metrics.jsonl)")
    print(write_report(run_dir, args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra  # overrides given after an --option
    if extra and args.command == "report":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from grpo.data import DataError
    from grpo.models import ModelError
    from grpo.rewards import RewardError
    from grpo.checkpoint import CheckpointError
    from grpo.run import TrainingStopped
    from grpo.rundir import RunFolderError
    from grpo.distributed import DistributedError
    from grpo.envs.chat import TemplateError
    from grpo.envs.episodes import EnvironmentFailure

    try:
        return {"train": cmd_train, "eval": cmd_eval, "sweep": cmd_sweep, "probe": cmd_probe,
                "report": cmd_report}[args.command](args)
    except (ConfigError, DataError, ModelError, RunFolderError, RewardError, CheckpointError, EnvironmentFailure,
            TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DistributedError as e:  # another rank failed (it prints its own error) or a collective timed out
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
