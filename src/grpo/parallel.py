"""How the policy is replicated or sharded over the ranks of a run (`trainer.parallel`).

- ddp: every rank holds the whole model; `DistributedDataParallel` averages the gradients in the
  backward pass of each optimizer step's last micro-batch (the others run under `no_sync`).
- fsdp: FSDP2, `torch.distributed.fsdp.fully_shard` on every decoder layer and on the root, for the policy
  and the reference: each rank holds 1/W of the weights, gradients and AdamW state, and gathers a layer's
  weights when it runs. On CUDA the forward and backward run in bfloat16 (MixedPrecisionPolicy), the
  weights and their gradients stay in float32. The rollout engine samples from a whole copy of the policy
  on every rank, refreshed from the shards after every update (`FullCopyEngine`): sampling costs one
  more model's weights per rank.

Both wrappers average gradients over ranks; the trainer's loss uses global normalizers (grpo.core.losses),
so it scales each rank's loss by the world size: the update is the single-process one.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

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


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole weights of a (possibly sharded) model, on every rank (every rank takes part). Not offloaded
    to the CPU: with cpu_offload, torch gives them to rank 0 only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


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


class Snapshot:
    """The trainer as a whole checkpoint (one process wrote it) sees it when rank 0 restores it into an FSDP2 run:
    the whole policy is the rollout engine's copy, and what the checkpoint loads is kept in `state` until every
    rank takes its shards (grpo.run.restore). Everything else is the trainer's."""

    def __init__(self, trainer, model):
        self._trainer, self.model, self.state, self.ref_model = trainer, model, None, None

    def load_state_dict(self, state: dict) -> None:
        self.state = state

    def __getattr__(self, name):
        return getattr(self._trainer, name)


class FullCopyEngine:
    """A rollout engine on a whole copy of a sharded policy: `sync_weights` gathers the shards into the copy
    (every rank takes part), and the inner engine samples from the copy. Its log-probs are the copy's: the
    policy's own up to rounding on the CPU; on CUDA, where FSDP2 runs the policy's forward in bfloat16 and the
    copy stays in float32, another precision's (LogprobKind.OTHER: the trainer computes pi_old itself)."""

    def __init__(self, inner, copy_model, reduced_precision: bool = False):
        self.inner, self.copy, self.reduced_precision = inner, copy_model, reduced_precision

    @classmethod
    def around(cls, make_engine, model):
        """Copy `model` (before it is sharded) and build the inner engine on the copy."""
        full = copy.deepcopy(model).eval()
        for p in full.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        return cls(make_engine(full), full, reduced_precision=device.type == "cuda")  # as `shard` sets it

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)

    def logprob_kind(self, params):
        from grpo.rollout.base import LogprobKind

        return LogprobKind.OTHER if self.reduced_precision else self.inner.logprob_kind(params)

    def sync_weights(self, model) -> None:
        state = full_state_dict(model)
        with torch.no_grad():
            own = self.copy.state_dict()
            for name, value in state.items():
                if name in own:
                    own[name].copy_(value)
        self.inner.sync_weights(self.copy)

    def describe(self) -> str:
        return self.inner.describe() + ", on a whole copy of the sharded policy (refreshed after every update)"
