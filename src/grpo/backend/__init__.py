"""How log-probs and gradients are computed on this device: one backend object, chosen in grpo.run.

- `plain` (grpo.backend.plain): the model's own forward and autograd, lean where the model allows (a
  chunked output head with its own backward, each group's prompt run once: grpo.backend.lean). Runs on
  CUDA, under a distributed wrapper, and wherever the fast path misbehaves.
- `cpu_fast` (grpo.backend.cpu_fast): the same numbers on a CPU with less work (oneDNN matmuls, a
  sparse embedding gradient); each piece tested against the plain path.

`trainer.backend: auto` takes cpu_fast for a policy on the CPU in one process and plain elsewhere (CUDA,
and several processes: DDP and FSDP2 must see every forward).

The trainer uses a backend through five verbs: `step(*models)` (the scope of a step), `logprobs(model,
batch, temperature, ...)`, `grad_scope(model, checkpointing)` (around the policy's forward and
backward), `finish_grads(params)` (before clipping) and `reduced_precision` (whether its log-probs are
in lower precision than the weights).
"""

from __future__ import annotations

from typing import Literal

import torch

from grpo.backend.cpu_fast import CpuFastBackend
from grpo.backend.plain import PlainBackend

BackendName = Literal["auto", "plain", "cpu_fast"]
BACKENDS: dict[str, type[PlainBackend]] = {"plain": PlainBackend, "cpu_fast": CpuFastBackend}
Backend = PlainBackend  # the contract (cpu_fast implements the same verbs)


def resolve_backend(name: str, device: torch.device, distributed: bool = False) -> str:
    """The backend `name` stands for on `device`: auto -> cpu_fast on a CPU in one process, plain elsewhere."""
    if name == "auto":
        return "cpu_fast" if torch.device(device).type == "cpu" and not distributed else "plain"
    if name == "cpu_fast" and distributed:
        raise ValueError("trainer.backend=cpu_fast runs in one process only (it calls the model's modules "
                         "directly, which DDP and FSDP cannot see); use trainer.backend=auto or plain")
    if name not in BACKENDS:
        raise ValueError(f"unknown trainer.backend {name!r}; valid: auto, {', '.join(sorted(BACKENDS))}")
    if name == "cpu_fast" and torch.device(device).type != "cpu":
        raise ValueError(f"trainer.backend=cpu_fast runs on a CPU only, and the model is on {device}; "
                           "use trainer.backend=auto or plain")
    return name


def make_backend(name: str, device: torch.device, autocast: bool = True, chunk_tokens: int = 256,
                 distributed: bool = False) -> PlainBackend:
    """The backend for `device` (`name` as in trainer.backend)."""
    return BACKENDS[resolve_backend(name, device, distributed)](torch.device(device), autocast, chunk_tokens)


__all__ = ["BACKENDS", "Backend", "BackendName", "CpuFastBackend", "PlainBackend",
           "make_backend", "resolve_backend"]
