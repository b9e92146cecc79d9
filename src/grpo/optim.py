"""The optimizer and its learning-rate schedule, built from the `trainer` section (grpo.run hands them to
the Trainer)."""

from __future__ import annotations

import math

import torch


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the base learning rate at optimizer step s: linear warmup, then constant or cosine."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "cosine":
            progress = (s - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def make_optimizer(model: torch.nn.Module, trainer) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (`trainer`: the TrainerConfig section)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel: one pass over each tensor, no full-size temporaries (faster on CPU than foreach)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trainable)
    return torch.optim.AdamW(trainable, lr=trainer.lr, betas=trainer.adam_betas, weight_decay=trainer.weight_decay,
                             fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, trainer, updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then constant or cosine over `updates` optimizer steps (trainer.steps x algorithm.mu)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(trainer.warmup_steps, updates, trainer.lr_schedule))
