"""How the policy is replicated or sharded over the ranks of a run (`trainer.parallel`).

- ddp: every rank holds the whole model; `DistributedDataParallel` averages the gradients in the
  backward pass of each optimizer step's last micro-batch (the others run under `no_sync`).
- fsdp: FSDP2, `torch.distributed.fsdp.fully_shard` on every decoder layer and on the root, for the policy
  and the reference: each rank holds 1/W of the weights, gradients and AdamW state, and gathers a layer's
  weights when it runs. On CUDA the forward and backward run in bfloat16 (MixedPrecisionPolicy), the
  weights and their gradients stay in float32. The rollout engine samples from a whole copy of the policy
  on every rank, refreshed from the shards after every update (grpo.rollout.full_copy.FullCopyEngine):
  sampling costs one more model's weights per rank.

Both wrappers average gradients over ranks; the trainer's loss uses global normalizers (grpo.core.losses),
so it scales each rank's loss by the world size: the update is the single-process one.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

from grpo.rollout.full_copy import full_state_dict  # noqa: F401  (the whole weights of a sharded model)

Parallel = Literal["ddp", "fsdp"]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers FSDP2 shards one by one (transformers' GradientCheckpointingLayer instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def shard(model, device: torch.device) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer, then the root (embeddings, final norm, output head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"trainer.parallel=fsdp: {type(model).__name__} has no decoder layers to shard; use ddp")
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def wrap_policy(model, parallel: Parallel, device: torch.device) -> torch.nn.Module:
    """The module the training forward runs through: DDP around the model, or the model sharded in place."""
    if parallel == "fsdp":
        return shard(model, device)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextmanager
def grad_sync(policy, enabled: bool):
    """Within this block the backward pass reduces gradients over ranks only if `enabled` (the last
    micro-batch of an optimizer step); otherwise each rank only accumulates its own."""
    if type(policy).__name__ == "DistributedDataParallel":
        with nullcontext() if enabled else policy.no_sync():
            yield
        return
    if hasattr(policy, "set_requires_gradient_sync"):  # FSDP2: unsharded gradients accumulate until the last
        policy.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            policy.set_requires_gradient_sync(True)
        return
    yield


def is_sharded(model) -> bool:
    """Whether FSDP2 sharded `model` (its parameters are DTensors)."""
    p = next(model.parameters(), None)
    return p is not None and hasattr(p, "full_tensor")


def optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state keyed by parameter name, the same for one process, DDP and FSDP2 (under FSDP2
    every rank takes part), so a checkpoint resumes on any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load `optimizer_state`'s whole state (each FSDP2 rank keeps its shards); a state keyed by parameter index
    (checkpoints written before names were used) loads as it is."""
    if all(isinstance(k, int) for k in state.get("state", {})) and state.get("state"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_whole_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Whole weights into a (possibly sharded) model: each FSDP2 rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def rank_state(model, optimizer) -> dict:
    """{"model": ..., "optimizer": ...} as this rank holds them, trainable parameters only (for LoRA: the adapter),
    for torch.distributed.checkpoint: under FSDP2 each rank's shards (DTensors), under DDP and in one process whole
    tensors (which a multi-rank save writes once, split over the ranks). Keyed by parameter name, so any world size
    and either wrapper loads it (grpo.checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model, options=_trainable()),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=_trainable())}


def load_rank_state(model, optimizer, state: dict) -> None:
    """Put `rank_state`'s dict (filled by torch.distributed.checkpoint.load) into the model and the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"], options=_trainable())
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_trainable())


def weights_state(model) -> dict:
    """A frozen model's weights as this rank holds them (the reference after a reset), for
    torch.distributed.checkpoint; `load_weights_state` puts them back."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def load_weights_state(model, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state)


def _trainable():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)
