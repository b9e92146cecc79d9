"""The rollout engine of an FSDP2 run: it samples from a whole copy of the sharded policy.

FSDP2 (grpo.parallel) leaves each rank 1/W of the policy's weights; sampling needs them whole. `FullCopyEngine`
keeps a whole, frozen copy of the policy on every rank (one more model's weights per rank), refreshed from the
shards after every update (`sync_weights`, where every rank takes part), and hands the copy to any engine of
this package to sample from. The copy is also the run's way to the whole policy (`whole_policy`): the weights
it saves as model/, merges a LoRA adapter into, and evaluates.
"""

from __future__ import annotations

import copy

import torch

from grpo.rollout.base import LogprobKind


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole weights of a (possibly sharded) model, on every rank (every rank takes part). Not offloaded
    to the CPU: with cpu_offload, torch gives them to rank 0 only."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


class FullCopyEngine:
    """A rollout engine on a whole copy of a sharded policy: `sync_weights` gathers the shards into the copy
    (every rank takes part), and the inner engine samples from the copy. Its log-probs are the copy's: the
    policy's own up to rounding on the CPU; on CUDA, where FSDP2 runs the policy's forward in bfloat16 and the
    copy stays in float32, another precision's (LogprobKind.OTHER: the trainer computes pi_old itself)."""

    def __init__(self, inner, copy_model, reduced_precision: bool = False):
        self.inner, self._copy, self.reduced_precision = inner, copy_model, reduced_precision

    @classmethod
    def around(cls, make_engine, model):
        """Copy `model` (before it is sharded) and build the inner engine on the copy."""
        full = copy.deepcopy(model).eval()
        for p in full.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        return cls(make_engine(full), full, reduced_precision=device.type == "cuda")  # as grpo.parallel.shard sets it

    def whole_policy(self) -> torch.nn.Module:
        """The whole copy of the policy, as of the last `sync_weights` (the same on every rank)."""
        return self._copy

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)

    def episodes(self, *args, **kwargs):
        return self.inner.episodes(*args, **kwargs)

    def logprob_kind(self, params):
        return LogprobKind.OTHER if self.reduced_precision else self.inner.logprob_kind(params)

    def sync_weights(self, model) -> None:
        state = full_state_dict(model)
        with torch.no_grad():
            own = self._copy.state_dict()
            for name, value in state.items():
                if name in own:
                    own[name].copy_(value)
        self.inner.sync_weights(self._copy)

    def describe(self) -> str:
        return self.inner.describe() + ", on a whole copy of the sharded policy (refreshed after every update)"
