"""The optimizer and its learning-rate schedule, built from the `trainer` section (grpo.run hands them to
the Trainer)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from grpo.parallel import load_optimizer_state, optimizer_state


@dataclass
class Schedule:
    """Multiplier of the base learning rate at optimizer step s: linear warmup over `warmup` steps, then constant
    or a cosine from 1 to 0 at step `total`. A callable object, not a function, so that LambdaLR keeps its fields
    in the scheduler's state_dict: a checkpoint holds the schedule it ran, `extend` included.

    `extend` (a resume with another trainer.steps) fits the rest of the cosine to a new total: from the resume
    step `start`, where the cosine was at progress `start_progress`, the progress goes on linearly to 1 at the new
    `total`, so the learning rate is continuous at the resume step (no jump back up) and reaches 0 at the new end.
    """

    warmup: int
    total: int
    schedule: str = "constant"  # "constant" or "cosine" (trainer.lr_schedule)
    start: int = 0  # the step where the cosine's current stretch begins (0, or the step an extension resumed at)
    start_progress: float = 0.0  # the cosine's progress at `start`, in [0, 1]

    def progress(self, s: int) -> float:
        """How far along the cosine step s is, from 0 (its start, after warmup) to 1 (its end)."""
        begin = max(self.start, self.warmup)
        return min(1.0, self.start_progress + (1.0 - self.start_progress) * (s - begin) / max(1, self.total - begin))

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * self.progress(s)))
        return 1.0

    def extend(self, step: int, total: int) -> None:
        """Fit the steps after `step` (the resume point) to a new `total` (see the class docstring). Within the
        warmup only the total changes: the cosine has not begun, and warmup does not depend on the total."""
        if total == self.total:
            return
        if self.schedule == "cosine" and step > self.warmup:
            self.start, self.start_progress = step, self.progress(step)
        self.total = total


def lr_lambda(warmup: int, total: int, schedule: str) -> Schedule:
    """Multiplier of the base learning rate at optimizer step s: linear warmup, then constant or cosine."""
    return Schedule(warmup, total, schedule)


def make_optimizer(model: torch.nn.Module, trainer) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (`trainer`: the TrainerConfig section)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel: one pass over each tensor, no full-size temporaries (faster on CPU than foreach)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trainable)
    return torch.optim.AdamW(trainable, lr=trainer.lr, betas=trainer.adam_betas, weight_decay=trainer.weight_decay,
                             fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, trainer, updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then constant or cosine over `updates` optimizer steps (trainer.steps x algorithm.mu)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(trainer.warmup_steps, updates, trainer.lr_schedule))


def extend_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total: int, base_lr: float) -> str | None:
    """A resumed run's schedule (loaded from its checkpoint) fitted to `total` optimizer steps (`Schedule.extend`);
    returns a warning when the steps left would train at a learning rate of about 0 (a finished cosine), else
    None."""
    schedule, step = scheduler.lr_lambdas[0], scheduler.last_epoch
    if not isinstance(schedule, Schedule) or schedule.total == total:
        return None
    before = schedule.total
    schedule.extend(step, total)
    if step >= total or schedule.schedule != "cosine" or schedule(step) >= 0.01:
        return None
    return (f"the cosine learning-rate schedule had reached {base_lr * schedule(step):.3g} (of trainer.lr={base_lr:g}) "
            f"at optimizer step {step} of {before}: extended, it goes on from there to 0 at step {total}, so the "
            "steps added train at a learning rate of about 0. To train more at a useful rate, start a new run from "
            "this run's model (model.path=<run>/model) with the schedule you want")


# --- saving and loading the optimizer's state --------------------------------------------------
# torch.distributed.checkpoint's get/set_optimizer_state_dict first "initialize" an optimizer that holds no state
# by stepping it once with zero gradients at learning rate 0: the weights stay, but AdamW's step count becomes 1, so
# the next real update's bias correction would be that of a second step. A run's optimizer has no state until its
# first update (the guard may skip the first steps), so a checkpoint written then would change the run it saves.
# These keep such an optimizer fresh, and save it as fresh ("state": {}), so a resume continues exactly.


def is_fresh(optimizer: torch.optim.Optimizer) -> bool:
    """No update yet: AdamW holds no moments and no step count."""
    return not optimizer.state


@contextmanager
def kept_fresh(optimizer: torch.optim.Optimizer):
    """Within the block the optimizer may be initialized by torch.distributed.checkpoint (see above); a fresh one
    is fresh again after it. Yields whether it was fresh."""
    fresh = is_fresh(optimizer)
    try:
        yield fresh
    finally:
        if fresh:
            optimizer.state.clear()


def optimizer_state_dict(model, optimizer: torch.optim.Optimizer) -> dict:
    """grpo.parallel.optimizer_state (the whole state by parameter name), without changing the optimizer: a fresh
    one is saved with "state": {} (its hyperparameters in "param_groups")."""
    with kept_fresh(optimizer) as fresh:
        state = optimizer_state(model, optimizer)
    return {**state, "state": {}} if fresh else state


def load_optimizer_state_dict(model, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `optimizer_state_dict`'s state; one saved fresh leaves the optimizer fresh, with its hyperparameters."""
    if state.get("state"):
        return load_optimizer_state(model, optimizer, state)
    optimizer.state.clear()
    for group, saved in zip(optimizer.param_groups, state.get("param_groups", [])):
        group.update({k: v for k, v in saved.items() if k != "params"})
