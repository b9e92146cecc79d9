"""How log-probs and gradients are computed on this device: one backend object, chosen in grpo.run.

- `plain` (grpo.backend.plain): the model's own forward and autograd, lean where the model allows (a
  chunked output head with its own backward, each group's prompt run once: grpo.backend.lean). Runs on
  CUDA, under a distributed wrapper, and wherever the fast path misbehaves.
- `cpu_fast` (grpo.backend.cpu_fast): the same numbers on a CPU with less work (oneDNN matmuls, a
  sparse embedding gradient); each piece tested against the plain path.

`trainer.backend: auto` takes cpu_fast for a policy on the CPU in one process and plain elsewhere (CUDA,
and several processes: DDP and FSDP2 must see every forward).

The trainer uses a backend through six verbs: `step(*models)` (the scope of a step), `logprobs(model,
batch, temperature, ...)`, `runs_packed(model, width, checkpointing)` (whether those passes run the rows
packed: the trainer then budgets micro-batches by the tokens packing runs), `grad_scope(model, checkpointing)`
(around the policy's forward and backward), `finish_grads(params)` (before clipping) and `reduced_precision`
(whether its log-probs are in lower precision than the weights).

Precision (`trainer.precision`, `resolve_precision`): float32, or bfloat16 autocast of the matmuls with
float32 weights, gradients, optimizer state, log-softmax and loss (on a CPU the attention too stays float32:
`plain.float32_attention`). bfloat16 runs only where the device multiplies bfloat16 matrices in hardware (a
CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX); elsewhere it is refused, since emulated it would be
slower than float32.
"""

from __future__ import annotations

from typing import Literal

import torch

from grpo.backend import onednn
from grpo.backend.cpu_fast import CpuFastBackend
from grpo.backend.plain import PlainBackend
from grpo.config import ConfigError

BackendName = Literal["auto", "plain", "cpu_fast"]
Precision = Literal["auto", "float32", "bfloat16"]
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


def bf16_unsupported(device: torch.device) -> str | None:
    """Why `device` cannot run bfloat16 matmuls in hardware, or None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported(including_emulation=False) else \
            f"the GPU {torch.cuda.get_device_name(device)} has no bfloat16 support"
    if device.type == "cpu":
        if not onednn.bf16_matmul_hardware():
            return "this CPU has neither AVX512-BF16 nor AMX (bfloat16 matmuls would be emulated, slower than float32)"
        return None
    return f"bfloat16 training is not measured on {device.type}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """float32 or bfloat16: what trainer.precision=`precision` means on `device` (auto: bfloat16 on a CUDA GPU
    that supports it, float32 elsewhere). A ConfigError naming the field where bfloat16 is asked for and the
    device cannot run it in hardware."""
    if precision == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" and bf16_unsupported(device) is None else "float32"
    if precision == "bfloat16" and (why := bf16_unsupported(device)) is not None:
        raise ConfigError(f"trainer.precision=bfloat16: {why}; use trainer.precision=float32 (or auto)")
    if precision not in ("float32", "bfloat16"):
        raise ConfigError(f"unknown trainer.precision {precision!r}; valid: auto, bfloat16, float32")
    return precision


def make_backend(name: str, device: torch.device, precision: str = "auto", chunk_tokens: int = 256,
                 distributed: bool = False) -> PlainBackend:
    """The backend for `device` (`name` as in trainer.backend, `precision` as in trainer.precision)."""
    return BACKENDS[resolve_backend(name, device, distributed)](
        torch.device(device), resolve_precision(precision, device), chunk_tokens)


__all__ = ["BACKENDS", "Backend", "BackendName", "CpuFastBackend", "PlainBackend", "Precision",
           "bf16_unsupported", "make_backend", "resolve_backend", "resolve_precision"]
