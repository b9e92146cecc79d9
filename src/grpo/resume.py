"""Resuming a run: which checkpoint it continues from (checked against the config; damaged ones set aside) and
putting the trainer back to it on any world size and sharding, exactly as if the run had not stopped."""

from __future__ import annotations

from pathlib import Path

from grpo import checkpoint
from grpo.config import Config
from grpo.parallel import is_sharded, load_whole_weights


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


def restore(ckpt: checkpoint.Checkpoint, trainer) -> None:
    """Put the trainer back to the checkpoint, whatever world size wrote it. A sharded one (written by several
    ranks) is read by every rank. A whole one (one process) is read by rank 0, which sends the weights and the
    trainer's state to the others (they may be on machines that cannot see the run folder)."""
    world = trainer.world
    if checkpoint.is_sharded_checkpoint(ckpt):
        with world.during("resume"):
            checkpoint.restore_sharded(ckpt, trainer)
    elif is_sharded(trainer.model):  # FSDP2 from a whole checkpoint: every rank keeps its shards of rank 0's
        view = Snapshot(trainer, trainer.whole_policy())
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


def _restore_whole(ckpt: checkpoint.Checkpoint, trainer) -> None:
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


class Snapshot:
    """The trainer as a whole checkpoint (one process wrote it) sees it when rank 0 restores it into an FSDP2 run:
    the whole policy is the rollout engine's copy, and what the checkpoint loads is kept in `state` until every
    rank takes its shards (`restore`). Everything else is the trainer's."""

    def __init__(self, trainer, model):
        self._trainer, self.model, self.state, self.ref_model = trainer, model, None, None

    def load_state_dict(self, state: dict) -> None:
        self.state = state

    def __getattr__(self, name):
        return getattr(self._trainer, name)
