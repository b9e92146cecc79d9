"""A run folder's lifecycle: checked before anything loads, created (or an earlier run's replaced, or a run that
stopped before its first step started again), reopened by a resume, its config.yaml written with absolute
paths (grpo.config.absolute_paths). What the run writes into it: grpo.logging.run, grpo.checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from grpo import checkpoint
from grpo.config import Config, dump_config
from grpo.files import write_text_atomic


class RunFolderError(RuntimeError):
    pass


def check_run_dir(config: Config, auto: bool = False) -> str | None:
    """Refuse, before anything loads, a run folder that holds an earlier run (unless output.overwrite)
    or that cannot be created. A folder that holds only a run stopped before its first step (with
    `auto`, --resume auto: before its first checkpoint) is started again: returns why, to be said."""
    run_dir = Path(config.output.dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output.dir {run_dir} is a file, not a folder; choose another output.dir")
    restart = None
    if run_dir.is_dir() and any(run_dir.iterdir()) and not config.output.overwrite:
        restart = restartable(run_dir, auto)
        if restart is None:
            hint = f", or continue it with --resume {run_dir}" if checkpoint.list_checkpoints(run_dir) else ""
            raise RunFolderError(
                f"run folder {run_dir} already exists and is not empty; choose another output.dir "
                f"or pass --overwrite (output.overwrite=true) to replace it{hint}"
            )
    check_writable(run_dir)
    return restart


def check_writable(run_dir: Path) -> None:
    """Create (and remove) a folder where the run folder will be made: the only sure test (permissions,
    a read-only disk, a folder like /proc that takes no new entries)."""
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunFolderError(
            f"cannot write the run folder {run_dir}: {parent} is not a writable folder; choose another output.dir"
        )
    try:
        Path(tempfile.mkdtemp(prefix=".grpo-write-test-", dir=parent)).rmdir()
    except OSError as e:
        raise RunFolderError(
            f"cannot write the run folder {run_dir}: a folder cannot be created in {parent} ({e.strerror}); "
            "choose another output.dir"
        ) from None


# What a run writes before its first checkpoint; a folder holding only these may be started again.
RUN_FILES = {"config.yaml", "metrics.jsonl", "samples.jsonl", "tensorboard", "report.html", "eval_before.json",
             "checkpoints"}


def restartable(run_dir: Path, auto: bool) -> str | None:
    """Why run_dir may be replaced without --overwrite, or None: it holds only a run (its config.yaml)
    that stopped before its first step, or, with `auto`, before its first checkpoint (nothing to resume)."""
    names = {p.name.removesuffix(".tmp") for p in run_dir.iterdir()}
    ckpts = checkpoint.checkpoints_dir(run_dir)
    if names - RUN_FILES or not is_run_config(run_dir / "config.yaml"):
        return None
    if ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir()):  # checkpoints, set-aside ones
        return None
    steps = len(checkpoint.logged_steps(run_dir / "metrics.jsonl"))
    if steps == 0:
        return f"{run_dir} holds a run that stopped before its first step: starting it again in that folder"
    if auto:
        return (f"{run_dir} holds a run that stopped after {steps} step(s) but before its first checkpoint, so "
                "there is nothing to resume (--resume auto): starting it again in that folder")
    return None


def is_run_config(path: Path) -> bool:
    """config.yaml as `grpo train` writes it (not a user's own file that happens to have that name)."""
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and {"trainer", "sampling", "output"} <= set(tree)


def create_run_dir(config: Config, run_dir: Path, replace: bool = False) -> None:
    """Make the (checked) run folder, replacing an earlier run when output.overwrite (or `replace`) is set."""
    try:
        if run_dir.exists() and (config.output.overwrite or replace):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config)
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder {run_dir}: {e.strerror}") from None


def write_config(run_dir: Path, config: Config) -> None:
    write_text_atomic(run_dir / "config.yaml", dump_config(config))


def reopen_run_dir(run_dir: Path, config: Config, ckpt: checkpoint.Checkpoint) -> None:
    """A resumed run's folder: the new config, and log lines only up to the checkpoint's step."""
    write_config(run_dir, config)
    for name in ("metrics.jsonl", "samples.jsonl"):
        checkpoint.truncate_jsonl(run_dir / name, ckpt.step)


def open_run_dir(run_dir: Path, config: Config, ckpt: checkpoint.Checkpoint | None, restart: str | None) -> None:
    """The run folder ready for the run: created (`restart`: over a run that stopped before its first step,
    see check_run_dir), or reopened to continue from `ckpt`."""
    if ckpt is None:
        create_run_dir(config, run_dir, replace=restart is not None)
    else:
        reopen_run_dir(run_dir, config, ckpt)
