"""A training run end to end: the run folder, the models, evaluation before/after, the loop, checkpoints.

One flow that every rank of a run goes through (one process: rank 0 of 1), in the same order, so every rank
runs the same collectives: the steps, the held-out evaluations (each rank completes its share), checkpoints,
a resume. Only the side effects are rank 0's: it reads and writes the run folder (grpo.rundir), logs
(grpo.logging) and prints; the other ranks may be on machines that cannot see the folder. Resuming:
grpo.resume."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from grpo import checkpoint, host
from grpo.backend import make_backend, resolve_precision
from grpo.config import Config, ConfigError, absolute_paths
from grpo.data import DataError, PromptSampler, encode_rows, load_task
from grpo.distributed import SINGLE, World, close_world, init_world
from grpo.evaluate import (check_eval, curve_due, curve_metrics, episode_transcripts, evaluate, format_table,
                           no_eval_split, summary)
from grpo.logging.console import format_duration, make_console
from grpo.logging.metrics import sample_records
from grpo.logging.run import RunLog, write_json
from grpo.envs.episodes import Episodes
from grpo.models import apply_lora, frozen_copy, load_model_and_tokenizer, load_tokenizer_only, pick_device
from grpo.optim import make_optimizer, make_scheduler
from grpo.parallel import shard, wrap_policy
from grpo.resume import restore, resume_point
from grpo.rewards import build_rewards, get_reward, required_columns
from grpo.rollout import FullCopyEngine, make_engine
from grpo.rundir import check_run_dir, open_run_dir
from grpo.trainer import Trainer


class TrainingStopped(RuntimeError):
    """The run stopped itself (the numerics guard), or trained without a single update; the message says why and
    what was saved."""


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


def check_environment(config: Config) -> None:
    """With an environment: build it once against the model's tokenizer (not the model), so that a class, tool or
    chat template that cannot serve it is refused before the model loads."""
    if config.environment.enabled:
        try:
            Episodes.from_config(config, load_tokenizer_only(config.model))
        except ValueError as e:  # the environment refuses this tokenizer, e.g. a tool format its template lacks
            raise ConfigError(f"environment: {e}") from None


def set_up_host(config: Config) -> None:
    """The process's threads and, on a CPU, its allocator policy (grpo.host), before the model loads."""
    host.set_up(config.model.threads, pick_device(config.model.device))


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


def train_loop(trainer: Trainer, config: Config, log: RunLog | None, console, run_dir: Path, tokenizer,
               held_out: list[dict] = ()) -> str:
    """Steps until trainer.steps, a checkpoint every output.checkpoint_every steps and at the end, and an
    evaluation on the `held_out` rows every eval.every steps (the held-out curve). Returns how it ended: "done",
    "interrupted" (Ctrl-C) or "guard" (too many bad steps in a row). Every rank runs it; only rank 0 logs
    (`log` is None elsewhere), and a Ctrl-C on any rank stops all after the same step."""
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
    """The step's eval/ metrics (grpo.evaluate.curve_metrics): the policy as it is now, on the same held-out
    problems as before and after training, each rank completing its share."""
    start = time.perf_counter()
    result = evaluate(trainer.tokenizer, trainer.engine, rows, config, world=trainer.world)
    console.info(f"step {trainer.step_count}: held-out {summary(result)} ({time.perf_counter() - start:.0f} s)")
    return curve_metrics(result)


def check_ending(ending: str, trainer: Trainer, config: Config, run_dir: Path, console) -> None:
    """Raise unless the loop trained to the end and made at least one update: TrainingStopped for the guard
    and for a run whose every step the guard skipped (nothing was learned: not a success), KeyboardInterrupt
    for a Ctrl-C (after saying how to resume)."""
    world = trainer.world
    if ending == "guard":
        raise TrainingStopped(stop_message(trainer, config, run_dir) if world.is_main
                              else f"rank {world.rank}: stopped with rank 0 (the numerics guard)")
    if ending == "interrupted":
        console.info(f"interrupted at step {trainer.step_count}; resume with: grpo train --resume {run_dir}")
        raise KeyboardInterrupt
    if trainer.step_count and trainer.skipped_steps == trainer.step_count:
        raise TrainingStopped(no_update_message(trainer, config, run_dir))


def stop_message(trainer: Trainer, config: Config, run_dir: Path) -> str:
    good = trainer.step_count - trainer.bad_steps
    return (
        f"training stopped at step {trainer.step_count}: {trainer.bad_steps} steps in a row had non-finite numbers "
        f"(last: {trainer.skip_reason}); no update was made in them, so the saved checkpoint holds the weights "
        f"of step {good} ({checkpoint.latest_checkpoint(run_dir).path}). Check the reward functions for NaN, or lower "
        f"trainer.lr / set trainer.max_grad_norm, then resume with: grpo train --resume {run_dir} "
        f"(trainer.max_bad_steps={config.trainer.max_bad_steps} sets how many bad steps in a row are tolerated)"
    )


def no_update_message(trainer: Trainer, config: Config, run_dir: Path) -> str:
    return (
        f"training made no update: the numerics guard skipped all {trainer.step_count} steps (last: "
        f"{trainer.skip_reason}), fewer than trainer.max_bad_steps={config.trainer.max_bad_steps} in a row, so the "
        f"weights are still the starting ones and model/ was not written. Check the reward functions for NaN, or "
        f"lower trainer.lr / set trainer.max_grad_norm, then start again: grpo train ... --overwrite "
        f"(output.dir={run_dir})"
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
    if world.distributed and config.trainer.parallel == "fsdp":  # samples from a whole copy (grpo.rollout.full_copy)
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
    backend = make_backend(t.backend, device, t.precision, t.logprob_chunk_tokens, world.distributed)
    optimizer = make_optimizer(model, t)  # after sharding: AdamW holds each rank's shards only
    scheduler = make_scheduler(optimizer, t, t.steps * config.algorithm.mu)
    sampler = PromptSampler(train_rows, config.data.seed)
    return Trainer(config, model, tokenizer, engine, backend, optimizer, scheduler, sampler,
                   build_rewards(config.rewards), ref_model=ref_model, policy=policy, world=world,
                   episodes=Episodes.from_config(config, tokenizer))


def train(config: Config, quiet: bool = False, console_mode: str = "auto", resume: bool | str = False) -> dict:
    """Run GRPO as configured; returns {"before": eval, "after": eval, "run_dir": ...}. With resume, continue
    the run in output.dir from its newest checkpoint, exactly as if it had not stopped; resume="auto" starts
    a new run where there is no checkpoint. Under torchrun this is one rank of the run: rank 0 alone prints
    and writes the run folder. Relative paths in the config are made absolute first (config.yaml keeps them
    so: `grpo eval RUN` and `--resume RUN` work from any folder)."""
    config = absolute_paths(config)
    world = start_world(config)
    if world.device.type == "cuda" and config.model.device != str(world.device):  # each rank on its own GPU
        config = config.model_copy(update={"model": config.model.model_copy(update={"device": str(world.device)})})
    finished = False
    try:
        result = run_flow(config, world, quiet, console_mode, resume)
        finished = True
        return result
    finally:
        close_world(world, finished)


def check_ranks(config: Config, size: int) -> None:
    """The batch splits into whole groups per rank (each rank samples whole groups)."""
    if config.prompts_per_step % size:
        raise ConfigError(
            f"trainer.batch_size={config.trainer.batch_size} is {config.prompts_per_step} groups of "
            f"sampling.group_size={config.sampling.group_size}, which do not split evenly over {size} ranks "
            f"(each rank samples whole groups); use a batch_size of {size * config.sampling.group_size} x k"
        )


def start_world(config: Config) -> World:
    """This process's place in the run (one process: rank 0 of 1), with the batch checked to split into whole
    groups per rank."""
    from grpo.models import pick_device

    device = pick_device(config.model.device)
    world = init_world(device.type, config.trainer.dist_timeout_s)
    try:
        check_ranks(config, world.size)
        resolve_precision(config.trainer.precision, device)  # bfloat16 without the hardware: refused before loading
    except ConfigError:
        close_world(world)
        raise
    return world


def run_flow(config: Config, world: World, quiet: bool, console_mode: str, resume: bool | str) -> dict:
    """The run on this rank: every rank goes through the same calls; files and printing are rank 0's."""
    console = make_console("quiet" if quiet or not world.is_main else console_mode, config.trainer.steps)
    task = load_task(config.data, needed_columns(config))  # data errors before any model loads
    if config.eval.before or config.eval.after:  # and what evaluation cannot do
        if task.eval:
            check_eval(config, task.eval)
        else:
            console.info(f"training without held-out evaluation: {no_eval_split(config.data)}")
    check_environment(config)  # and what the environment cannot do with this model's chat template
    run_dir = Path(config.output.dir).expanduser()
    ckpt, restart = starting_point(run_dir, config, task, resume, console, world)
    set_up_host(config)
    torch.manual_seed(config.trainer.seed)
    with console.phase("loading the model"):
        model, tokenizer, folder, engine, ref_model = load_for_training(config, log=console.info, world=world)
    check_prompt_lengths(config, task, tokenizer, model)
    if world.is_main:
        open_run_dir(run_dir, config, ckpt, restart)
    console.info(f"run folder: {run_dir}")
    console.info(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.device})")
    if world.distributed:
        console.info(f"ranks: {world.size} ({config.trainer.parallel}), {config.prompts_per_step // world.size} "
                     "groups each a step")
    held_out = HeldOut(run_dir, task.eval, config, console, world)
    log = RunLog(run_dir, config, console.info, purge_step=ckpt.step + 1 if ckpt else None) if world.is_main else None
    try:
        if ckpt is None and config.eval.before:
            held_out.run("before", tokenizer, engine)
        else:  # a resumed run does not evaluate "before" again
            held_out.read("before")
        trainer = build_trainer(config, model, tokenizer, engine, task.train, ref_model=ref_model, world=world)
        console.info(f"backend: {trainer.backend.name}")
        if ckpt is not None:
            restore(ckpt, trainer)
            console.info(f"resumed from {ckpt.path} at step {ckpt.step}")
            if trainer.schedule_note:  # an extension of a finished cosine schedule (grpo.optim.extend_schedule)
                console.info(f"warning: {trainer.schedule_note}")
        ending = train_loop(trainer, config, log, console, run_dir, tokenizer, task.eval)
        check_ending(ending, trainer, config, run_dir, console)
        done = config.trainer.steps - (ckpt.step if ckpt else 0)
        if done:
            console.info(f"trained {done} steps in {format_duration(time.perf_counter() - console.start)}")
        finish(trainer, config, run_dir, console, held_out)
    finally:
        report = log.close() if log is not None else None  # the report also covers a run that stopped early
    if held_out.results:
        console.info("\nheld-out evaluation\n" + format_table(held_out.results))
    if report:
        console.info(f"report: {report}")
    return {"run_dir": str(run_dir), **held_out.results}


def starting_point(run_dir: Path, config: Config, task, resume: bool | str, console,
                   world: World) -> tuple[checkpoint.Checkpoint | None, str | None]:
    """Where the run starts: the checkpoint to continue from (None: a new run) and, for a new run over a folder
    that holds one stopped before its first step (or, with --resume auto, its first checkpoint), why it is
    started again there (grpo.rundir.check_run_dir). Rank 0 reads the folder; every rank gets the checkpoint."""
    ckpt = restart = None
    if world.is_main:  # the other ranks may be on machines that cannot see the run folder
        auto = resume == "auto"
        ckpt = resume_point(run_dir, config, task, console.info, auto) if resume else None
        restart = check_run_dir(config, auto) if ckpt is None else None
        if restart:
            console.info(restart)
    return world.broadcast(ckpt), restart


class HeldOut:
    """The evaluations before and after training on the task's held-out rows (none: nothing to do): every
    rank completes its share (grpo.evaluate), rank 0 writes <run>/eval_<name>.json and prints the result."""

    def __init__(self, run_dir: Path, rows: list[dict], config: Config, console, world: World):
        self.run_dir, self.rows, self.cfg, self.console, self.world = run_dir, rows, config, console, world
        self.results: dict[str, dict] = {}

    def run(self, name: str, tokenizer, engine) -> None:
        if not self.rows:
            return
        start, n = time.perf_counter(), min(self.cfg.eval.num_problems or len(self.rows), len(self.rows))
        with self.console.progress(f"evaluating ({name}) on {n} held-out problems", n) as update:
            self.results[name] = evaluate(tokenizer, engine, self.rows, self.cfg, progress=update,
                                          world=self.world)
        if self.world.is_main:
            write_json(self.run_dir / f"eval_{name}.json", self.results[name])
        self.console.info(f"  {summary(self.results[name])} ({time.perf_counter() - start:.0f} s)")

    def read(self, name: str) -> None:
        """An evaluation written earlier in the run (a resumed run's "before"), where rank 0 finds one."""
        path = self.run_dir / f"eval_{name}.json"
        if self.world.is_main and path.is_file():
            self.results[name] = json.loads(path.read_text())


def finish(trainer: Trainer, config: Config, run_dir: Path, console, held_out: HeldOut) -> None:
    """After the last step: the policy as <run>/model (rank 0 writes it), the evaluation after training (every
    rank), the LoRA adapter merged into <run>/model-merged when asked for (rank 0)."""
    whole, tokenizer, main = trainer.whole_policy(), trainer.tokenizer, trainer.world.is_main
    if config.output.save_model and main:
        last = checkpoint.latest_checkpoint(run_dir)  # of this step: its model/ holds these weights
        same = last.path / "model" if last is not None and last.step == trainer.step_count else None
        checkpoint.publish_policy(whole, tokenizer, run_dir / "model", run_dir, same_as=same)
        console.info(f"saved {'the LoRA adapter' if config.lora.enabled else 'the model'} to {run_dir / 'model'}")
    if config.eval.after:
        held_out.run("after", tokenizer, trainer.engine)
    if config.lora.enabled and config.lora.save_merged and main:
        checkpoint.publish_policy(whole.merge_and_unload(), tokenizer, run_dir / "model-merged", run_dir)
        console.info(f"saved the model with the adapter merged in to {run_dir / 'model-merged'}")


def eval_only(config: Config, model_path: str | None, output: Path | None, quiet: bool = False, console_mode: str = "auto") -> dict:
    console = make_console("quiet" if quiet else console_mode, 1)
    task = load_task(config.data, needed_columns(config))
    check_eval(config, task.eval)  # before the model loads
    check_environment(config)
    set_up_host(config)
    cfg = config.model_copy(update={"model": config.model.model_copy(update={"path": model_path})}) if model_path else config
    with console.phase("loading the model"):
        model, tokenizer, folder = load_model_and_tokenizer(cfg.model, log=console.info)
    engine = make_engine(config.sampling, model, tokenizer)
    n = min(config.eval.num_problems or len(task.eval), len(task.eval))
    with console.progress(f"evaluating {folder} on {n} held-out problems", n) as update:
        result = evaluate(tokenizer, engine, task.eval, config, progress=update)
    result["model"] = str(folder)
    if output:
        write_json(output, result)
    if config.environment.enabled:  # what the episodes look like, not only their score
        console.result(episode_transcripts(result))
    console.result(format_table({"eval": result}))
    return result
