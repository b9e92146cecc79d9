"""A Trainer on the tiny random model, and its accumulated gradient, shared by the trainer tests."""

import torch

from grpo.config import load_config
from grpo.data.arithmetic import arithmetic_rows
from grpo.models import frozen_copy
from grpo.rollout import HFGenerateEngine
from grpo.run import build_trainer
from grpo.testing import tiny_model_and_tokenizer


def make_trainer(*overrides, micro_batch_size=8, seed=0):
    """G=4, 2 prompts a step, 10 new tokens; `overrides` are config overrides (section.field=value)."""
    cfg = load_config(None, [
        "trainer.batch_size=8", "sampling.group_size=4", f"trainer.micro_batch_size={micro_batch_size}",
        "sampling.max_new_tokens=10", "data.digits=1", "data.num_eval=10", *overrides,
    ])
    model, tok = tiny_model_and_tokenizer(seed=seed)
    ref = None
    if cfg.algorithm.beta > 0:
        ref = frozen_copy(model)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
    train, _ = arithmetic_rows(1, ["+"], 40, 10, "{question}", seed=0)
    return build_trainer(cfg, model, tok, HFGenerateEngine(model, tok), train, ref_model=ref)


def gradients(trainer, batch):
    """The flattened gradient of the whole batch's loss, accumulated over the trainer's micro-batches."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.accumulate_gradients(batch)
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
