"""A training run end to end: run folder, models, evaluation before/after, the loop, checkpoints, resume."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from grpo import checkpoint
from grpo.backend import make_backend
from grpo.config import Config, ConfigError, dump_config
from grpo.data import DataError, PromptSampler, encode_rows, load_task
from grpo.distributed import SINGLE, World, close_world, init_world
from grpo.evaluate import check_eval, curve_due, curve_metrics, evaluate, format_table, no_eval_split, summary
from grpo.files import write_text_atomic
from grpo.logging.console import format_duration, make_console
from grpo.logging.metrics import sample_records
from grpo.logging.run import RunLog, write_json
from grpo.models import apply_lora, frozen_copy, load_model_and_tokenizer
from grpo.optim import make_optimizer, make_scheduler
from grpo.parallel import FullCopyEngine, Snapshot, is_sharded, load_whole_weights, shard, wrap_policy
from grpo.rewards import build_rewards, get_reward, required_columns
from grpo.rollout import make_engine
from grpo.trainer import Trainer


class RunFolderError(RuntimeError):
    pass


class TrainingStopped(RuntimeError):
    """The run stopped itself (the numerics guard); the message says why and what was saved."""


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


def prepare_run_dir(config: Config) -> Path:
    """Check and create the run folder (both steps at once)."""
    restart = check_run_dir(config)
    run_dir = Path(config.output.dir).expanduser()
    create_run_dir(config, run_dir, replace=restart is not None)
    return run_dir


def write_config(run_dir: Path, config: Config) -> None:
    write_text_atomic(run_dir / "config.yaml", dump_config(config))


def resume_point(run_dir: Path, config: Config, task, info=print, auto: bool = False) -> checkpoint.Checkpoint | None:
    """The newest intact checkpoint of run_dir, checked against the config (or a CheckpointError); newer
    damaged ones are set aside, saying so. None for --resume auto (`auto`) when there is no checkpoint.
    A finished run (the checkpoint at trainer.steps) is resumed only to repair its final outputs."""
    ckpt, damaged = checkpoint.latest_intact_checkpoint(run_dir)
    if ckpt is None and damaged:
        raise checkpoint.CheckpointError(
            f"cannot resume {run_dir}: every checkpoint is damaged: " + "; ".join(why for _, why in damaged)
            + ". Start the run again with --overwrite"
        )
    if ckpt is None:
        if auto:
            return None
        raise checkpoint.CheckpointError(
            f"cannot resume {run_dir}: no complete checkpoint in {checkpoint.checkpoints_dir(run_dir)}; "
            "start the run again (with --overwrite to replace the folder, or --resume auto)"
        )
    checkpoint.check_same_run(ckpt, config)
    if ckpt.step >= config.trainer.steps:
        missing = unfinished_outputs(run_dir, config, task) if ckpt.step == config.trainer.steps else []
        if not missing:
            raise checkpoint.nothing_to_train(ckpt, config)
        info(f"the run finished training, but {'; '.join(missing)}: writing the final outputs again from {ckpt.path}")
    for bad, why in damaged:
        info(f"damaged checkpoint: {why}; resuming from {ckpt.path.name} instead "
             f"(the damaged one is kept as {checkpoint.set_aside(bad)})")
    return ckpt


def unfinished_outputs(run_dir: Path, config: Config, task) -> list[str]:
    """What a finished run should have written after its last step and has not (a kill while saving)."""
    missing = []
    if config.output.save_model and (why := checkpoint.policy_damage(run_dir / "model")):
        missing.append(why)
    if config.lora.enabled and config.lora.save_merged and (why := checkpoint.policy_damage(run_dir / "model-merged")):
        missing.append(why)
    if config.eval.after and task.eval and not (run_dir / "eval_after.json").is_file():
        missing.append(f"{run_dir / 'eval_after.json'} is missing")
    return missing


def reopen_run_dir(run_dir: Path, config: Config, ckpt: checkpoint.Checkpoint) -> None:
    """A resumed run's folder: the new config, and log lines only up to the checkpoint's step."""
    write_config(run_dir, config)
    for name in ("metrics.jsonl", "samples.jsonl"):
        checkpoint.truncate_jsonl(run_dir / name, ckpt.step)


def needed_columns(config: Config) -> list[str]:
    """Dataset columns the configured rewards take (their parameters without a default)."""
    cols: list[str] = []
    for r in config.rewards:
        cols += [c for c in required_columns(get_reward(r.name), r.args) if c not in cols]
    return cols


def check_prompt_lengths(config: Config, task, tokenizer, model) -> None:
    """Every prompt, as the chat template renders it, leaves room for the completion in the model's
    context (checked before any training; also fails early on a tokenizer without a chat template)."""
    context = getattr(model.config, "max_position_embeddings", None)
    data = config.data
    eval_rows = task.eval[: config.eval.num_problems] if config.eval.num_problems else task.eval
    splits = [("train", task.train, config.sampling.max_new_tokens, data.train_file),
              ("eval", eval_rows, config.eval.max_new_tokens or config.sampling.max_new_tokens, data.eval_file)]
    for split, rows, max_new, path in splits:
        for i, ids in enumerate(encode_rows(tokenizer, rows, data), start=1):
            n = len(ids)
            if context and n + max_new > context:
                where = f"{path or f'data.task={data.task} ({split} problems)'}: row {i}"
                raise DataError(prompt_too_long(where, n, max_new, context, split))


def prompt_too_long(where: str, n: int, max_new: int, context: int, split: str) -> str:
    """n prompt tokens + max_new new ones exceed the context: the fix depends on whether the prompt alone does."""
    if n >= context:  # no max_new_tokens helps: not even one new token fits
        return (f"{where}: the prompt alone is {n} tokens and the model's context is {context}, so not even one new "
                f"token fits; shorten that prompt by at least {n - context + 1} tokens, or drop it")
    return (f"{where}: the prompt is {n} tokens, and with {max_new} new tokens it does not fit the model's context "
            f"of {context} tokens; shorten or drop that prompt, or lower "
            f"{'sampling' if split == 'train' else 'eval'}.max_new_tokens to at most {context - n}")


def set_threads(config: Config) -> None:
    if config.model.threads:
        torch.set_num_threads(config.model.threads)


@contextmanager
def stop_requested():
    """Ctrl-C during training asks the loop to stop after the current step (and save a checkpoint);
    a second Ctrl-C raises KeyboardInterrupt at once. Yields a function: has a stop been asked for?"""
    asked = []

    def handler(signum, frame):
        asked.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C interrupts
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)  # also over SIG_IGN (nohup, `cmd &`): a SIGINT sent still stops
    try:
        yield lambda: bool(asked)
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)  # whatever was there: default, SIG_IGN, a caller's own


def save(run_dir: Path, config: Config, trainer: Trainer, tokenizer, console) -> checkpoint.Checkpoint:
    """A checkpoint of the run's whole state: whole in one process, sharded under several ranks (each rank writes
    its part; rank 0 the rest): see grpo.checkpoint."""
    write = lambda folder: checkpoint.write_checkpoint(folder, config, trainer, tokenizer)  # noqa: E731
    ckpt = checkpoint.save_checkpoint(run_dir, trainer.step_count, write, config.output.keep_checkpoints,
                                      trainer.world)
    console.info(f"saved checkpoint {ckpt.path}")
    return ckpt


def train_loop(trainer: Trainer, config: Config, log: RunLog, console, run_dir: Path, tokenizer,
               held_out: list[dict] = ()) -> str:
    """Steps until trainer.steps, a checkpoint every output.checkpoint_every steps and at the end, and an
    evaluation on the `held_out` rows every eval.every steps (the held-out curve). Returns how it ended: "done",
    "interrupted" (Ctrl-C) or "guard" (too many bad steps in a row). Under several ranks only rank 0 logs,
    evaluates and saves (`log` is None elsewhere), and a Ctrl-C on any rank stops all after the same step."""
    t, every, saved = config.trainer, config.output.checkpoint_every, trainer.step_count  # the start is saved
    ending, world = "done", trainer.world
    with console.training(), stop_requested() as stop:
        while trainer.step_count < t.steps:
            m, batch = trainer.step()
            if held_out and curve_due(config, trainer.step_count):
                m.update(evaluate_during_training(trainer, config, held_out, console))
            if log is not None:
                log.step(trainer.step_count, m, lambda: sample_records(trainer.step_count, batch, t.samples_per_step))
            console.step(trainer.step_count, m)
            if trainer.skip_reason:
                console.info(f"step {trainer.step_count}: update skipped: {trainer.skip_reason} "
                             f"({trainer.bad_steps} bad step(s) in a row, stop at {t.max_bad_steps})")
            if trainer.bad_steps >= t.max_bad_steps:
                ending = "guard"
                break
            with world.during("stop request"):
                stopping = world.any(stop())
            if stopping and trainer.step_count < t.steps:
                ending = "interrupted"
                break
            if every and trainer.step_count % every == 0:
                save(run_dir, config, trainer, tokenizer, console)
                saved = trainer.step_count
    if saved != trainer.step_count:
        save(run_dir, config, trainer, tokenizer, console)
    return ending


def evaluate_during_training(trainer: Trainer, config: Config, rows: list[dict], console) -> dict:
    """The step's eval/ metrics (grpo.evaluate.curve_metrics): rank 0 evaluates the policy as it is now, on the
    same held-out problems as before and after training; the other ranks wait for it and return {}."""
    world, out = trainer.world, {}
    if world.is_main:
        start = time.perf_counter()
        result = evaluate(trainer.model, trainer.tokenizer, trainer.engine, rows, config)
        out = curve_metrics(result)
        console.info(f"step {trainer.step_count}: held-out {summary(result)} ({time.perf_counter() - start:.0f} s)")
    with world.during(f"rank 0's evaluation at step {trainer.step_count}"):
        world.barrier()  # the other ranks wait for it
    return out


def stop_message(trainer: Trainer, config: Config, run_dir: Path) -> str:
    good = trainer.step_count - trainer.bad_steps
    return (
        f"training stopped at step {trainer.step_count}: {trainer.bad_steps} steps in a row had non-finite numbers "
        f"(last: {trainer.skip_reason}); no update was made in them, so the saved checkpoint holds the weights "
        f"of step {good} ({checkpoint.latest_checkpoint(run_dir).path}). Check the reward functions for NaN, or lower "
        f"trainer.lr / set trainer.max_grad_norm, then resume with: grpo train --resume {run_dir} "
        f"(trainer.max_bad_steps={config.trainer.max_bad_steps} sets how many bad steps in a row are tolerated)"
    )


def load_for_training(config: Config, log=print, world: World = SINGLE):
    """(model, tokenizer, folder, engine, ref_model): the policy on its device, its rollout engine, and the
    reference policy (None when beta = 0: no second copy). Under FSDP the engine samples from a whole copy of
    the policy, made here before `build_trainer` shards it."""
    model, tokenizer, folder = load_model_and_tokenizer(config.model, log=log)
    if config.lora.enabled:  # the reference is the base model with the adapters off: no copy
        model, ref_model = apply_lora(model, config.lora), None
    else:
        ref_model = frozen_copy(model) if config.algorithm.beta > 0 else None  # the start weights
    if world.distributed and config.trainer.parallel == "fsdp":
        engine = FullCopyEngine.around(lambda full: make_engine(config.sampling, full, tokenizer), model)
    else:
        engine = make_engine(config.sampling, model, tokenizer)
    log(f"sampling: {engine.describe()}")
    return model, tokenizer, folder, engine, ref_model


def build_trainer(config: Config, model, tokenizer, engine, train_rows: list[dict], ref_model=None,
                  world: World = SINGLE) -> Trainer:
    """The Trainer with its parts: under torchrun the policy wrapped for DDP or sharded by FSDP2 (and the
    reference sharded too), the backend for the policy's device, AdamW and its schedule, the prompt sampler
    and the reward functions."""
    t = config.trainer
    device = next(model.parameters()).device
    policy = model
    if world.distributed:
        policy = wrap_policy(model, t.parallel, device)
        if t.parallel == "fsdp" and ref_model is not None:
            shard(ref_model, device)
    backend = make_backend(t.backend, device, t.autocast, t.logprob_chunk_tokens, world.distributed)
    optimizer = make_optimizer(model, t)  # after sharding: AdamW holds each rank's shards only
    scheduler = make_scheduler(optimizer, t, t.steps * config.algorithm.mu)
    sampler = PromptSampler(train_rows, config.data.seed)
    return Trainer(config, model, tokenizer, engine, backend, optimizer, scheduler, sampler,
                   build_rewards(config.rewards), ref_model=ref_model, policy=policy, world=world)


def train(config: Config, quiet: bool = False, console_mode: str = "auto", resume: bool | str = False) -> dict:
    """Run GRPO as configured; returns {"before": eval, "after": eval, "run_dir": ...}. With resume, continue
    the run in output.dir from its newest checkpoint, exactly as if it had not stopped; resume="auto" starts
    a new run where there is no checkpoint. Under torchrun this is one rank of the run: rank 0 alone prints,
    evaluates and writes the run folder."""
    world = start_world(config)
    if world.device.type == "cuda" and config.model.device != str(world.device):  # each rank on its own GPU
        config = config.model_copy(update={"model": config.model.model_copy(update={"device": str(world.device)})})
    try:
        return _train(config, world, quiet, console_mode, resume)
    finally:
        close_world(world)


def start_world(config: Config) -> World:
    """This process's place in the run (one process: rank 0 of 1), with the batch checked to split into whole
    groups per rank."""
    from grpo.models import pick_device

    world = init_world(pick_device(config.model.device).type, config.trainer.dist_timeout_s)
    if config.prompts_per_step % world.size:
        close_world(world)
        raise ConfigError(
            f"trainer.batch_size={config.trainer.batch_size} is {config.prompts_per_step} groups of "
            f"sampling.group_size={config.sampling.group_size}, which do not split evenly over {world.size} ranks "
            f"(each rank samples whole groups); use a batch_size of {world.size * config.sampling.group_size} x k"
        )
    return world


def _train(config: Config, world: World, quiet: bool, console_mode: str, resume: bool | str) -> dict:
    console = make_console("quiet" if quiet or not world.is_main else console_mode, config.trainer.steps)
    task = load_task(config.data, needed_columns(config))  # data errors before any model loads
    if config.eval.before or config.eval.after:  # and what evaluation cannot do
        if task.eval:
            check_eval(config, task.eval)
        else:
            console.info(f"training without held-out evaluation: {no_eval_split(config.data)}")
    run_dir = Path(config.output.dir).expanduser()
    auto = resume == "auto"
    ckpt = restart = None
    if world.is_main:  # rank 0 reads the run folder; the others may be on other machines
        ckpt = resume_point(run_dir, config, task, console.info, auto) if resume else None
        restart = check_run_dir(config, auto) if ckpt is None else None
        if restart:
            console.info(restart)
    ckpt = world.broadcast(ckpt)
    set_threads(config)
    torch.manual_seed(config.trainer.seed)
    with console.phase("loading the model"):
        model, tokenizer, folder, engine, ref_model = load_for_training(config, log=console.info, world=world)
    check_prompt_lengths(config, task, tokenizer, model)
    if not world.is_main:
        return _follow(config, world, console, task, model, tokenizer, engine, ref_model, ckpt)
    if ckpt is None:
        create_run_dir(config, run_dir, replace=restart is not None)
    else:
        reopen_run_dir(run_dir, config, ckpt)
    console.info(f"run folder: {run_dir}")
    console.info(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.device})")
    if world.distributed:
        console.info(f"ranks: {world.size} ({config.trainer.parallel}), {config.prompts_per_step // world.size} "
                     "groups each a step")
    results: dict = {"run_dir": str(run_dir)}

    def run_eval(name: str):
        if not task.eval:
            return
        start, n = time.perf_counter(), min(config.eval.num_problems or len(task.eval), len(task.eval))
        with console.progress(f"evaluating ({name}) on {n} held-out problems", n) as update:
            results[name] = evaluate(model, tokenizer, engine, task.eval, config, progress=update)
        write_json(run_dir / f"eval_{name}.json", results[name])
        console.info(f"  {summary(results[name])} ({time.perf_counter() - start:.0f} s)")

    log = RunLog(run_dir, config, console.info, purge_step=ckpt.step + 1 if ckpt else None)
    try:
        if ckpt is None and config.eval.before:
            run_eval("before")
        elif (run_dir / "eval_before.json").is_file():  # a resumed run does not evaluate "before" again
            results["before"] = json.loads((run_dir / "eval_before.json").read_text())
        with world.during("rank 0's evaluation before training"):
            world.barrier()  # the other ranks wait for it
        trainer = build_trainer(config, model, tokenizer, engine, task.train, ref_model=ref_model, world=world)
        console.info(f"backend: {trainer.backend.name}")
        if ckpt is not None:
            restore(ckpt, trainer)
            console.info(f"resumed from {ckpt.path} at step {ckpt.step}")
            if trainer.schedule_note:  # an extension of a finished cosine schedule (grpo.optim.extend_schedule)
                console.info(f"warning: {trainer.schedule_note}")
        ending = train_loop(trainer, config, log, console, run_dir, tokenizer, task.eval)
        if ending == "guard":
            raise TrainingStopped(stop_message(trainer, config, run_dir))
        if ending == "interrupted":
            console.info(f"interrupted at step {trainer.step_count}; resume with: grpo train --resume {run_dir}")
            raise KeyboardInterrupt
        done = config.trainer.steps - (ckpt.step if ckpt else 0)
        if done:
            console.info(f"trained {done} steps in {format_duration(time.perf_counter() - console.start)}")
        whole = trainer.engine.copy if is_sharded(model) else model  # FSDP2: the engine's whole copy of the policy
        if config.output.save_model:
            last = checkpoint.latest_checkpoint(run_dir)  # of this step: its model/ holds these weights
            same = last.path / "model" if last is not None and last.step == trainer.step_count else None
            checkpoint.publish_policy(whole, tokenizer, run_dir / "model", run_dir, same_as=same)
            what = "the LoRA adapter" if config.lora.enabled else "the model"
            console.info(f"saved {what} to {run_dir / 'model'}")
        if config.eval.after:
            run_eval("after")
        if config.lora.enabled and config.lora.save_merged:
            checkpoint.publish_policy(whole.merge_and_unload(), tokenizer, run_dir / "model-merged", run_dir)
            console.info(f"saved the model with the adapter merged in to {run_dir / 'model-merged'}")
        with world.during("rank 0's saving and evaluation after training"):
            world.barrier()  # the other ranks wait for them
    finally:
        report = log.close()  # the report also covers a run that stopped early
    evals = {k: results[k] for k in ("before", "after") if k in results}
    if evals:
        console.info("\nheld-out evaluation\n" + format_table(evals))
    if report:
        console.info(f"report: {report}")
    return results


def restore(ckpt: checkpoint.Checkpoint, trainer: Trainer) -> None:
    """Put the trainer back to the checkpoint, whatever world size wrote it. A sharded one (written by several
    ranks) is read by every rank. A whole one (one process) is read by rank 0, which sends the weights and the
    trainer's state to the others (they may be on machines that cannot see the run folder)."""
    world = trainer.world
    if checkpoint.is_sharded_checkpoint(ckpt):
        with world.during("resume"):
            checkpoint.restore_sharded(ckpt, trainer)
    elif is_sharded(trainer.model):  # FSDP2 from a whole checkpoint: every rank keeps its shards of rank 0's
        view = Snapshot(trainer, trainer.engine.copy)
        if world.is_main:
            checkpoint.restore(ckpt, view)
        with world.during("resume"):
            weights, state, ref = world.broadcast((view.model.state_dict(), view.state, checkpoint.saved_reference(ckpt))
                                                  if world.is_main else None)
        load_whole_weights(trainer.model, weights)
        if ref is not None and trainer.ref_model is not None:
            load_whole_weights(trainer.ref_model, ref)
        trainer.load_state_dict(state)
    else:
        _restore_whole(ckpt, trainer)
    trainer.engine.sync_weights(trainer.model)  # an engine that samples from a copy must see the restored weights


def _restore_whole(ckpt: checkpoint.Checkpoint, trainer: Trainer) -> None:
    """A whole checkpoint into a policy every rank holds whole (one process, DDP)."""
    world = trainer.world
    if world.is_main:
        checkpoint.restore(ckpt, trainer)
    if world.distributed:
        with world.during("resume"):
            state = world.broadcast((trainer.model.state_dict(), trainer.state_dict(),
                                     trainer.ref_model.state_dict() if trainer.ref_model is not None else None))
        if not world.is_main:
            trainer.model.load_state_dict(state[0])
            trainer.load_state_dict(state[1])
            if state[2] is not None:
                trainer.ref_model.load_state_dict(state[2])


def _follow(config: Config, world: World, console, task, model, tokenizer, engine, ref_model, ckpt) -> dict:
    """A rank other than 0: the same steps as rank 0 (its share of each batch, every collective), no files."""
    with world.during("rank 0's evaluation before training"):
        world.barrier()
    trainer = build_trainer(config, model, tokenizer, engine, task.train, ref_model=ref_model, world=world)
    if ckpt is not None:
        restore(ckpt, trainer)
    ending = train_loop(trainer, config, None, console, Path(config.output.dir), tokenizer, task.eval)
    if ending == "guard":
        raise TrainingStopped(f"rank {world.rank}: stopped with rank 0 (the numerics guard)")
    if ending == "interrupted":
        raise KeyboardInterrupt
    with world.during("rank 0's saving and evaluation after training"):
        world.barrier()
    return {"run_dir": config.output.dir}


def eval_only(config: Config, model_path: str | None, output: Path | None, quiet: bool = False, console_mode: str = "auto") -> dict:
    console = make_console("quiet" if quiet else console_mode, 1)
    task = load_task(config.data, needed_columns(config))
    check_eval(config, task.eval)  # before the model loads
    set_threads(config)
    cfg = config.model_copy(update={"model": config.model.model_copy(update={"path": model_path})}) if model_path else config
    with console.phase("loading the model"):
        model, tokenizer, folder = load_model_and_tokenizer(cfg.model, log=console.info)
    engine = make_engine(config.sampling, model, tokenizer)
    n = min(config.eval.num_problems or len(task.eval), len(task.eval))
    with console.progress(f"evaluating {folder} on {n} held-out problems", n) as update:
        result = evaluate(model, tokenizer, engine, task.eval, config, progress=update)
    result["model"] = str(folder)
    if output:
        write_json(output, result)
    console.result(format_table({"eval": result}))
    return result
